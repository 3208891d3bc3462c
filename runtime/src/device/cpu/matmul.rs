//! GEMM and convolutions with f32 accumulation.

use rayon::prelude::*;

use super::elementwise::{gelu_tanh, silu};
use crate::device::{Conv1dSpec, Conv3dSpec, Epilogue, GemmSpec, PadMode};

/// Dot product with eight f32 partial sums (fixed order, so results are deterministic).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail
}

fn epilogue(v: f32, e: Epilogue) -> f32 {
    match e {
        Epilogue::None => v,
        Epilogue::GeluTanh => gelu_tanh(v),
        Epilogue::Silu => silu(v),
    }
}

pub fn gemm(a: &[f32], b: &[f32], bias: Option<&[f32]>, s: &GemmSpec) -> Vec<f32> {
    let (m, n, k) = (s.m, s.n, s.k);
    // B as [n, k] rows per batch, so every output is one contiguous dot product.
    let b_batches = if s.b_batch_stride == 0 { 1 } else { s.batch };
    let bt: Vec<std::borrow::Cow<'_, [f32]>> = (0..b_batches)
        .into_par_iter()
        .map(|i| {
            let src = &b[i * s.b_batch_stride..][..n * k];
            if s.trans_b {
                std::borrow::Cow::Borrowed(src)
            } else {
                let mut t = vec![0f32; n * k];
                for kk in 0..k {
                    for j in 0..n {
                        t[j * k + kk] = src[kk * n + j];
                    }
                }
                std::borrow::Cow::Owned(t)
            }
        })
        .collect();
    let mut out = super::out_vec(s.batch * m * n);
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let (bi, i) = (row / m.max(1), row % m.max(1));
        let arow = &a[bi * s.a_batch_stride + i * k..][..k];
        let bm = &bt[if s.b_batch_stride == 0 { 0 } else { bi }];
        for (j, d) in dst.iter_mut().enumerate() {
            let mut v = s.alpha * dot(arow, &bm[j * k..(j + 1) * k]);
            if let Some(bias) = bias {
                v += bias[j];
            }
            *d = epilogue(v, s.epilogue);
        }
    });
    out
}

pub fn conv1d(x: &[f32], w: &[f32], bias: Option<&[f32]>, s: &Conv1dSpec) -> Vec<f32> {
    let l_out = s.l_out();
    let (cig, cog) = (s.c_in / s.groups, s.c_out / s.groups);
    let l_in = s.l_in as isize;
    let mut out = super::out_vec(s.batch * s.c_out * l_out);
    if l_out == 0 {
        return out;
    }
    out.par_chunks_mut(l_out)
        .enumerate()
        .for_each(|(row, dst)| {
            let (bi, co) = (row / s.c_out, row % s.c_out);
            let g = co / cog;
            // Gather the receptive field per output step into a padded column, then dot.
            let mut col = vec![0f32; cig * s.kernel];
            let wrow = &w[co * cig * s.kernel..][..cig * s.kernel];
            for (t, d) in dst.iter_mut().enumerate() {
                for ci in 0..cig {
                    let xrow = &x[(bi * s.c_in + g * cig + ci) * s.l_in..][..s.l_in];
                    for kk in 0..s.kernel {
                        let p = (t * s.stride + kk) as isize - s.pad_left as isize;
                        col[ci * s.kernel + kk] = if (0..l_in).contains(&p) {
                            xrow[p as usize]
                        } else {
                            match s.pad_mode {
                                PadMode::Zeros => 0.0,
                                PadMode::Replicate => xrow[p.clamp(0, l_in - 1) as usize],
                            }
                        };
                    }
                }
                *d = dot(&col, wrow) + bias.map_or(0.0, |b| b[co]);
            }
        });
    out
}

pub fn conv3d(x: &[f32], w: &[f32], bias: Option<&[f32]>, s: &Conv3dSpec) -> Vec<f32> {
    let [ot, oh, ow] = s.out_dims();
    let [it, ih, iw] = s.input;
    let [kt, kh, kw] = s.kernel;
    let plane = ot * oh * ow;
    let ksz = s.c_in * kt * kh * kw;
    let mut out = super::out_vec(s.batch * s.c_out * plane);
    if plane == 0 {
        return out;
    }
    // One output position at a time: gather its zero-padded receptive field (im2col row) and
    // dot it with each filter. Parallel over (batch, output frame, output row).
    let rows: Vec<(usize, usize, usize)> = (0..s.batch)
        .flat_map(|b| (0..ot).flat_map(move |t| (0..oh).map(move |y| (b, t, y))))
        .collect();
    let results: Vec<Vec<f32>> = rows
        .par_iter()
        .map(|&(b, t, y)| {
            let mut col = vec![0f32; ksz];
            let mut res = vec![0f32; s.c_out * ow];
            for xo in 0..ow {
                for ci in 0..s.c_in {
                    for a in 0..kt {
                        let ti = (t * s.stride[0] + a) as isize - s.pad[0].0 as isize;
                        for bb in 0..kh {
                            let yi = (y * s.stride[1] + bb) as isize - s.pad[1].0 as isize;
                            for c in 0..kw {
                                let xi = (xo * s.stride[2] + c) as isize - s.pad[2].0 as isize;
                                let inside = (0..it as isize).contains(&ti)
                                    && (0..ih as isize).contains(&yi)
                                    && (0..iw as isize).contains(&xi);
                                col[((ci * kt + a) * kh + bb) * kw + c] = if inside {
                                    x[(((b * s.c_in + ci) * it + ti as usize) * ih + yi as usize)
                                        * iw
                                        + xi as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                }
                for co in 0..s.c_out {
                    res[co * ow + xo] =
                        dot(&col, &w[co * ksz..(co + 1) * ksz]) + bias.map_or(0.0, |bv| bv[co]);
                }
            }
            res
        })
        .collect();
    for (&(b, t, y), res) in rows.iter().zip(results) {
        for co in 0..s.c_out {
            let o = ((b * s.c_out + co) * ot + t) * oh * ow + y * ow;
            out[o..o + ow].copy_from_slice(&res[co * ow..(co + 1) * ow]);
        }
    }
    out
}
