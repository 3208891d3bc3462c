//! Elementwise maps, broadcasting binary/ternary ops, reductions and softmax, in f32.

use rayon::prelude::*;

use crate::device::{BinaryOp, BroadcastLayout, ReduceOp, TernaryOp, UnaryOp};

/// torch's tanh-approximated GELU, in f32.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// erf in f64: Taylor series below 3 (≈1e-13 relative), continued fraction of erfc above.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let (x2, mut term, mut sum) = (a * a, a, a);
        for n in 1..200 {
            term *= -x2 / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        1.0 - erfc_large(a)
    };
    r.copysign(x)
}

/// erfc(x) for x ≥ 3 by the continued fraction x + (1/2)/(x + 1/(x + (3/2)/(x + …))).
fn erfc_large(x: f64) -> f64 {
    let mut t = x;
    for k in (1..=60).rev() {
        t = x + (k as f64 / 2.0) / t;
    }
    (-x * x).exp() / (std::f64::consts::PI.sqrt() * t)
}

/// torch's exact GELU: computed in f64 through erf/erfc (for accuracy of the negative tail),
/// rounded to f32.
pub fn gelu_erf(x: f32) -> f32 {
    let z = x as f64 / std::f64::consts::SQRT_2;
    let cdf = if z < -3.0 {
        0.5 * erfc_large(-z)
    } else {
        0.5 * (1.0 + erf(z))
    };
    (x as f64 * cdf) as f32
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn unary_fn(op: UnaryOp) -> impl Fn(f32) -> f32 + Sync {
    move |x| match op {
        UnaryOp::GeluTanh => gelu_tanh(x),
        UnaryOp::Gelu => gelu_erf(x),
        UnaryOp::Silu => silu(x),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sqr => x * x,
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Affine { mul, add } => x * mul + add,
        UnaryOp::Clamp { min, max } => x.max(min).min(max),
    }
}

pub fn unary(x: &[f32], op: UnaryOp) -> Vec<f32> {
    let f = unary_fn(op);
    x.par_iter().map(|&v| f(v)).collect()
}

/// Offsets of the first element of output row `row` (all dims but the last) per operand.
fn row_bases(layout: &BroadcastLayout, row: usize) -> [usize; 3] {
    let n = layout.dims.len();
    let mut bases = [0usize; 3];
    let mut rem = row;
    for d in (0..n.saturating_sub(1)).rev() {
        let i = rem % layout.dims[d];
        rem /= layout.dims[d];
        for (b, s) in bases.iter_mut().zip(&layout.strides) {
            *b += i * s[d];
        }
    }
    bases
}

/// Run `f(out_row, bases, last_strides)` for each output row in parallel.
fn for_rows(
    layout: &BroadcastLayout,
    f: impl Fn(&mut [f32], [usize; 3], [usize; 3]) + Sync,
) -> Vec<f32> {
    let total: usize = layout.dims.iter().product();
    let cols = layout.dims.last().copied().unwrap_or(1).max(1);
    let mut last = [0usize; 3];
    for (l, s) in last.iter_mut().zip(&layout.strides) {
        *l = s.last().copied().unwrap_or(0);
    }
    let mut out = super::out_vec(total);
    out.par_chunks_mut(cols)
        .enumerate()
        .for_each(|(row, dst)| f(dst, row_bases(layout, row), last));
    out
}

pub fn binary(a: &[f32], b: &[f32], op: BinaryOp, layout: &BroadcastLayout) -> Vec<f32> {
    let f = move |x: f32, y: f32| match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        BinaryOp::Maximum => x.max(y),
        BinaryOp::Minimum => x.min(y),
    };
    for_rows(layout, |dst, base, st| {
        for (j, d) in dst.iter_mut().enumerate() {
            *d = f(a[base[0] + j * st[0]], b[base[1] + j * st[1]]);
        }
    })
}

pub fn ternary(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    op: TernaryOp,
    layout: &BroadcastLayout,
) -> Vec<f32> {
    for_rows(layout, |dst, base, st| {
        for (j, d) in dst.iter_mut().enumerate() {
            let (x, y, z) = (
                a[base[0] + j * st[0]],
                b[base[1] + j * st[1]],
                c[base[2] + j * st[2]],
            );
            *d = match op {
                // Same op order as torch eager: (1 + scale), then ·x, then + shift.
                TernaryOp::Modulate => x * (1.0 + y) + z,
                TernaryOp::GatedResidual => x + y * z,
            };
        }
    })
}

pub fn reduce(x: &[f32], op: ReduceOp, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows)
        .into_par_iter()
        .map(|r| {
            let row = &x[r * cols..(r + 1) * cols];
            match op {
                ReduceOp::Sum => row.iter().sum(),
                ReduceOp::Mean => row.iter().sum::<f32>() / cols as f32,
                ReduceOp::Max => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                ReduceOp::AbsMax => row.iter().fold(0f32, |m, v| m.max(v.abs())),
            }
        })
        .collect()
}

pub fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

pub fn softmax(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    if cols > 0 {
        debug_assert_eq!(out.len(), rows * cols);
        out.par_chunks_mut(cols).for_each(softmax_row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_tabulated_values() {
        for (x, want) in [
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.9, 0.999_958_902_121_900_5),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
        }
        for (x, want) in [
            (3.0, 2.209_049_699_858_544e-5),
            (4.0, 1.541_725_790_028_002e-8),
        ] {
            assert!(((erfc_large(x) - want) / want).abs() < 1e-10, "erfc({x})");
        }
    }
}
