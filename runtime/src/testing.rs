//! Test helpers shared by this crate's tests and other crates: a seeded PRNG, a tensor
//! comparer with a readable report, dtype-aware tolerances and the `test_device!` macro.

use crate::{DType, Device, Result, Tensor};

/// A small deterministic PRNG (SplitMix64), so tests need no extra crates.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }
    /// A `dtype` tensor of N(0, std²) values (rounded to the dtype) and those exact values
    /// widened back to f32, so a naive reference sees what the op sees.
    pub fn randn(
        &mut self,
        shape: impl Into<crate::Shape>,
        std: f32,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Vec<f32>)> {
        let shape = shape.into();
        let v: Vec<f32> = self
            .normal_vec(shape.elem_count(), std)
            .into_iter()
            .map(|x| dtype.round_f32(x))
            .collect();
        Ok((Tensor::from_f32(&v, shape, dtype, device)?, v))
    }
}

/// Tolerance on the relative L2 error `‖a − e‖ / ‖e‖`, by the dtype the operands were in:
/// bf16 1e-2, f16 2e-3, fp8 6e-2, f32 1e-5.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
        DType::F8E4M3 => 6e-2,
        DType::F32 => 1e-5,
    }
}

/// How far `actual` is from `expected`.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub len: usize,
    pub rel_l2: f32,
    pub max_abs: f32,
    pub max_abs_at: usize,
    /// Largest |a − e| / max(|e|, 1e-6·max|e|).
    pub max_rel: f32,
    pub nan_count: usize,
    pub first_actual: Vec<f32>,
    pub first_expected: Vec<f32>,
}

/// Compare two equally long slices (f64 sums, NaNs counted).
pub fn compare(actual: &[f32], expected: &[f32]) -> Comparison {
    assert_eq!(actual.len(), expected.len(), "compare: length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    let mut max_abs = 0f32;
    let mut max_abs_at = 0;
    let mut nan_count = 0;
    let emax = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut max_rel = 0f32;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        if a.is_nan() != e.is_nan() || a.is_infinite() != e.is_infinite() {
            nan_count += 1;
            continue;
        }
        if a.is_nan() || (a.is_infinite() && a == e) {
            continue;
        }
        let d = (a - e).abs();
        num += (d as f64) * (d as f64);
        den += (e as f64) * (e as f64);
        if d > max_abs {
            max_abs = d;
            max_abs_at = i;
        }
        max_rel = max_rel.max(d / e.abs().max(1e-6 * emax).max(f32::MIN_POSITIVE));
    }
    let rel_l2 = if den > 0.0 {
        (num / den).sqrt() as f32
    } else {
        num.sqrt() as f32
    };
    Comparison {
        len: actual.len(),
        rel_l2,
        max_abs,
        max_abs_at,
        max_rel,
        nan_count,
        first_actual: actual.iter().take(6).copied().collect(),
        first_expected: expected.iter().take(6).copied().collect(),
    }
}

impl Comparison {
    /// Whether rel L2 is within `tol` and no element is NaN where the expectation is not.
    pub fn passes(&self, tol: f32) -> bool {
        self.nan_count == 0 && self.rel_l2 <= tol
    }
    pub fn report(&self, what: &str, tol: f32) -> String {
        format!(
            "{what}: {} elements, rel L2 {:.3e} (tol {:.1e}, {:.0}% used), max abs {:.3e} at {}, \
             max rel {:.3e}, {} NaN/inf mismatches\n  actual   {:?}\n  expected {:?}",
            self.len,
            self.rel_l2,
            tol,
            100.0 * self.rel_l2 / tol,
            self.max_abs,
            self.max_abs_at,
            self.max_rel,
            self.nan_count,
            self.first_actual,
            self.first_expected,
        )
    }
}

/// Check a tensor against expected f32 values with tolerance `tol`; the error names `what`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &[f32], tol: f32) -> Result<Comparison> {
    let a = actual.to_vec_f32()?;
    if a.len() != expected.len() {
        return Err(crate::Error::invalid(
            "assert_close",
            format!(
                "{what}: {} actual vs {} expected elements",
                a.len(),
                expected.len()
            ),
        ));
    }
    let c = compare(&a, expected);
    if !c.passes(tol) {
        return Err(crate::Error::invalid("assert_close", c.report(what, tol)));
    }
    Ok(c)
}

/// Instantiate a test body `fn name(dev: &Device) -> Result<()>` for every device:
/// `test_device!(name, name_cpu, name_cuda);` makes a CPU `#[test]` always and a CUDA one
/// under `#[cfg(feature = "cuda")]` (candle's `test_utils.rs` pattern).
#[macro_export]
macro_rules! test_device {
    ($fn_name:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() -> $crate::Result<()> {
            $fn_name(&$crate::Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() -> $crate::Result<()> {
            $fn_name(&$crate::Device::Cuda(0))
        }
    };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_and_fails() {
        let c = compare(&[1.0, 2.0, 3.1], &[1.0, 2.0, 3.0]);
        assert!((c.max_abs - 0.1).abs() < 1e-6);
        assert_eq!(c.max_abs_at, 2);
        assert!(!c.passes(1e-3));
        assert!(c.passes(0.1));
        let n = compare(&[f32::NAN, 1.0], &[0.0, 1.0]);
        assert_eq!(n.nan_count, 1);
        assert!(!n.passes(1.0));
        assert!(c.report("x", 1e-3).contains("rel L2"));
    }

    #[test]
    fn rng_is_deterministic_and_roughly_normal() {
        let a = Rng::new(7).normal_vec(10_000, 1.0);
        assert_eq!(a, Rng::new(7).normal_vec(10_000, 1.0));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
