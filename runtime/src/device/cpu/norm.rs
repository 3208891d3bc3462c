//! Norms and rotary embedding, f32 statistics.

use rayon::prelude::*;

use crate::DType;

pub fn layer_norm(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Vec<f32> {
    let mut out = super::out_vec(rows * cols);
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let row = &x[r * cols..(r + 1) * cols];
        let mean = row.iter().sum::<f32>() / cols as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (j, d) in dst.iter_mut().enumerate() {
            let mut y = (row[j] - mean) * rstd;
            if let Some(w) = w {
                y *= w[j];
            }
            if let Some(b) = b {
                y += b[j];
            }
            *d = y;
        }
    });
    out
}

/// `mid`: the dtype the normalised value is rounded to before the weight multiply.
pub fn rms_norm(
    x: &[f32],
    w: Option<&[f32]>,
    rows: usize,
    cols: usize,
    eps: f32,
    mid: DType,
) -> Vec<f32> {
    let mut out = super::out_vec(rows * cols);
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let row = &x[r * cols..(r + 1) * cols];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        for (j, d) in dst.iter_mut().enumerate() {
            let n = mid.round_f32(row[j] * rs);
            *d = match w {
                Some(w) => n * w[j],
                None => n,
            };
        }
    });
    out
}

/// x `[n, c, s]`: L2-normalise over c, × sqrt(c) × gamma[c] (+ bias[c]).
pub fn channel_rms_norm(
    x: &[f32],
    gamma: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    s: usize,
) -> Vec<f32> {
    // Norms per (n, s), then rows (n, c) of length s.
    let mut norms = vec![0f32; n * s];
    norms
        .par_chunks_mut(s.max(1))
        .enumerate()
        .for_each(|(i, dst)| {
            for ch in 0..c {
                let row = &x[(i * c + ch) * s..][..s];
                for (d, v) in dst.iter_mut().zip(row) {
                    *d += v * v;
                }
            }
            for d in dst.iter_mut() {
                *d = d.sqrt().max(1e-12);
            }
        });
    let scale = (c as f32).sqrt();
    let mut out = super::out_vec(n * c * s);
    out.par_chunks_mut(s.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let (i, ch) = (r / c, r % c);
            let row = &x[r * s..][..s];
            let nr = &norms[i * s..][..s];
            for j in 0..s {
                let mut y = row[j] / nr[j] * scale * gamma[ch];
                if let Some(b) = bias {
                    y += b[ch];
                }
                dst[j] = y;
            }
        });
    out
}

/// x `[b, l, h, d]`, cos/sin `[l, d/2]`; f64 complex multiply, result rounded to f32.
#[allow(clippy::too_many_arguments)]
pub fn rope_interleaved(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    b: usize,
    l: usize,
    h: usize,
    d: usize,
) -> Vec<f32> {
    let mut out = super::out_vec(b * l * h * d);
    let half = d / 2;
    if h * d == 0 {
        return out;
    }
    out.par_chunks_mut(h * d)
        .enumerate()
        .for_each(|(row, dst)| {
            let t = row % l;
            let src = &x[row * h * d..][..h * d];
            for head in 0..h {
                for i in 0..half {
                    let (c, s) = (cos[t * half + i] as f64, sin[t * half + i] as f64);
                    let o = head * d + 2 * i;
                    let (re, im) = (src[o] as f64, src[o + 1] as f64);
                    dst[o] = (re * c - im * s) as f32;
                    dst[o + 1] = (re * s + im * c) as f32;
                }
            }
        });
    out
}
