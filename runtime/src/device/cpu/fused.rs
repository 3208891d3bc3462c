//! References of the fused block ops: each is the unfused ops' arithmetic, step by step, with
//! their rounding points (so fused == unfused exactly on this backend).

use rayon::prelude::*;

use super::norm;
use crate::DType;
use crate::device::ResNormSpec;

/// See [`ResNormSpec`]: returns (residual as f32 values rounded to `res`, output as f32 values
/// to be rounded to `out` by the caller).
#[allow(clippy::too_many_arguments)]
pub fn res_norm_mod(
    x: &[f32],
    y: Option<&[f32]>,
    gate: Option<&[f32]>,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    scale: Option<&[f32]>,
    shift: Option<&[f32]>,
    s: &ResNormSpec,
) -> (Vec<f32>, Vec<f32>) {
    let (rows, cols) = (s.rows, s.cols);
    let per_group = rows / s.groups.max(1);
    let mut res = super::out_vec(rows * cols);
    res.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let g = r / per_group.max(1);
            let gate = gate.map(|t| &t[g * cols..][..cols]);
            for (j, d) in dst.iter_mut().enumerate() {
                let xv = x[r * cols + j];
                *d = match (y, gate) {
                    (Some(y), Some(gt)) => xv + y[r * cols + j] * gt[j],
                    (Some(y), None) => xv + y[r * cols + j],
                    _ => xv,
                };
            }
        });
    if let Some(d) = s.res {
        res.par_iter_mut().for_each(|v| *v = d.round_f32(*v));
    }
    let ln_in: Vec<f32> = res.par_iter().map(|&v| s.ln_in.round_f32(v)).collect();
    let mut n = norm::layer_norm(&ln_in, weight, bias, rows, cols, s.eps);
    n.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let g = r / per_group.max(1);
            for (j, v) in row.iter_mut().enumerate() {
                let m = s.norm.round_f32(*v);
                *v = match (scale, shift) {
                    (Some(sc), Some(sh)) => m * (1.0 + sc[g * cols + j]) + sh[g * cols + j],
                    _ => m,
                };
            }
        });
    (res, n)
}

/// `rms_norm` (normalised value rounded to `x_dtype`, × w, rounded to `norm`) then the
/// interleaved RoPE of [`norm::rope_interleaved`] over rows of `heads · head_dim`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_rope(
    x: &[f32],
    x_dtype: DType,
    w: &[f32],
    cos: &[f32],
    sin: &[f32],
    rows: usize,
    heads: usize,
    head_dim: usize,
    eps: f32,
    norm_dtype: DType,
) -> Vec<f32> {
    let cols = heads * head_dim;
    let mut m = norm::rms_norm(x, Some(w), rows, cols, eps, x_dtype);
    m.par_iter_mut().for_each(|v| *v = norm_dtype.round_f32(*v));
    norm::rope_interleaved(&m, cos, sin, 1, rows, heads, head_dim)
}
