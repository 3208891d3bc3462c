//! Element types: bf16, f16, f32 and fp8 e4m3 (with a per-tensor dequantisation scale).
//!
//! Every conversion from f32 rounds to nearest, ties to even (`half::bf16::from_f32` is RNE).
//! The fp8 conversion saturates to ±448 (the reference clamps to ±448 before its cast, so a
//! saturating cast of the unclamped value is the same function).

use half::{bf16, f16};

use super::CpuStorage;

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
    /// `float8_e4m3fn`: 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities, max 448.
    /// A tensor of this dtype carries a dequantisation scale (logical value = stored × scale).
    F8E4M3,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::F8E4M3 => 1,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::F8E4M3 => "f8e4m3",
        }
    }
    /// Result dtype of a binary op, as torch promotes floats: equal dtypes stay, anything
    /// with f32 is f32, bf16 with f16 is f32. fp8 never promotes (ops reject it).
    pub fn promote(self, other: DType) -> DType {
        if self == other { self } else { DType::F32 }
    }
    /// Round an f32 value to this dtype and back (for fp8: with unit scale).
    pub fn round_f32(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::BF16 => bf16::from_f32(v).to_f32(),
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::F8E4M3 => F8E4M3::from_f32(v).to_f32(),
        }
    }
}

/// Largest finite e4m3fn value.
pub const F8E4M3_MAX: f32 = 448.0;

/// One `float8_e4m3fn` value (raw bits).
#[derive(Clone, Copy, PartialEq, Eq, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct F8E4M3(pub u8);

impl std::fmt::Debug for F8E4M3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_f32())
    }
}

impl F8E4M3 {
    /// Round-to-nearest-even, saturating to ±448; NaN stays NaN (0x7F).
    pub fn from_f32(x: f32) -> Self {
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        if x.is_nan() {
            return F8E4M3(0x7F);
        }
        let a = x.abs();
        let mag = if a >= F8E4M3_MAX {
            0x7E
        } else if a < 2f32.powi(-6) {
            // Subnormals m·2^-9; q = 8 is exactly the smallest normal (code 0x08).
            (a * 512.0).round_ties_even() as u8
        } else {
            let e = ((a.to_bits() >> 23) as i32) - 127; // floor(log2 a), a is normal in f32
            let m = a / 2f32.powi(e); // in [1, 2), exact
            let q = ((m - 1.0) * 8.0).round_ties_even() as i32; // 0..=8, exact scaling
            let code = ((e + 7) << 3) + q; // q = 8 carries into the exponent
            code.min(0x7E) as u8
        };
        F8E4M3(sign | mag)
    }
    pub fn to_f32(self) -> f32 {
        F8_TO_F32[self.0 as usize]
    }
    fn decode(bits: u8) -> f32 {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((bits >> 3) & 0xF) as i32;
        let m = (bits & 7) as f32;
        if e == 15 && bits & 7 == 7 {
            return f32::NAN;
        }
        let v = if e == 0 {
            m * 2f32.powi(-9)
        } else {
            (1.0 + m / 8.0) * 2f32.powi(e - 7)
        };
        sign * v
    }
}

static F8_TO_F32: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|i| F8E4M3::decode(i as u8)));

/// Rust element types that tensors can be built from and read back as.
pub trait WithDType:
    Copy + Send + Sync + bytemuck::Pod + std::fmt::Debug + PartialEq + 'static
{
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even conversion (saturating for fp8).
    fn from_f32(v: f32) -> Self;
    fn into_cpu_storage(v: Vec<Self>) -> CpuStorage;
    fn cpu_slice(s: &CpuStorage) -> Option<&[Self]>;
    fn cpu_slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            fn to_f32(self) -> f32 {
                $to(self)
            }
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            fn into_cpu_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn cpu_slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn cpu_slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
with_dtype!(f32, F32, |x| x, |x| x);
with_dtype!(bf16, BF16, bf16::to_f32, bf16::from_f32);
with_dtype!(f16, F16, f16::to_f32, f16::from_f32);
with_dtype!(F8E4M3, F8E4M3, F8E4M3::to_f32, F8E4M3::from_f32);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_exhaustive_round_trip_and_rne() {
        // Every finite code decodes and re-encodes to itself.
        for b in 0u8..=255 {
            let v = F8E4M3(b).to_f32();
            if v.is_nan() {
                assert_eq!(b & 0x7F, 0x7F);
                continue;
            }
            let back = F8E4M3::from_f32(v).0;
            // -0 and +0 are distinct codes; both round-trip.
            assert_eq!(back, b, "code {b:#x} value {v}");
        }
        assert_eq!(F8E4M3::from_f32(448.0).0, 0x7E);
        assert_eq!(F8E4M3::from_f32(1e9).to_f32(), 448.0);
        assert_eq!(F8E4M3::from_f32(-500.0).to_f32(), -448.0);
        // Midpoint between 1.0 (mantissa 0) and 1.125 (mantissa 1) rounds to even: 1.0.
        assert_eq!(F8E4M3::from_f32(1.0625).to_f32(), 1.0);
        // Midpoint between 1.125 and 1.25 rounds to even mantissa 2: 1.25.
        assert_eq!(F8E4M3::from_f32(1.1875).to_f32(), 1.25);
        // Smallest subnormal 2^-9; half of it ties to 0.
        assert_eq!(F8E4M3::from_f32(2f32.powi(-9)).to_f32(), 2f32.powi(-9));
        assert_eq!(F8E4M3::from_f32(2f32.powi(-10)).to_f32(), 0.0);
        assert_eq!(
            F8E4M3::from_f32(1.5 * 2f32.powi(-10)).to_f32(),
            2f32.powi(-9)
        );
        // Rounding up from the largest subnormal lands on the smallest normal.
        assert_eq!(
            F8E4M3::from_f32(7.9 * 2f32.powi(-9)).to_f32(),
            2f32.powi(-6)
        );
        assert_eq!(F8E4M3(0x7E).to_f32(), 448.0);
    }

    #[test]
    fn e4m3_nearest_by_brute_force() {
        let finite: Vec<f32> = (0u8..0x7F).map(|b| F8E4M3(b).to_f32()).collect();
        let mut x = 0.0f32;
        while x < 460.0 {
            let got = F8E4M3::from_f32(x).to_f32();
            let best = finite
                .iter()
                .copied()
                .min_by(|a, b| (a - x).abs().total_cmp(&(b - x).abs()))
                .unwrap();
            assert!(
                (got - x).abs() <= (best - x).abs(),
                "x {x}: got {got}, best {best}"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn bf16_rounding_is_rne() {
        // 1 + 2^-8 is the midpoint between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(DType::BF16.round_f32(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            DType::BF16.round_f32(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2.0 * 2f32.powi(-7)
        );
    }
}
