//! Non-causal multi-head attention: f32 scores, f32 softmax, f32 accumulation.

use rayon::prelude::*;

use super::elementwise::softmax_row;
use super::matmul::dot;
use crate::device::AttnSpec;

pub fn attention(q: &[f32], k: &[f32], v: &[f32], bias: Option<&[f32]>, s: &AttnSpec) -> Vec<f32> {
    let (h, d, lq, lk) = (s.heads, s.head_dim, s.lq, s.lk);
    let mut out = super::out_vec(s.batch * lq * h * d);
    if h * d == 0 {
        return out;
    }
    // One query token (all heads) per task.
    out.par_chunks_mut(h * d)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, i) = (row / lq, row % lq);
            let mut p = vec![0f32; lk];
            for head in 0..h {
                let qv = &q[((b * lq + i) * h + head) * d..][..d];
                for (j, pj) in p.iter_mut().enumerate() {
                    let kv = &k[((b * lk + j) * h + head) * d..][..d];
                    *pj = s.scale * dot(qv, kv);
                    if let Some(bias) = bias {
                        let bb = if s.bias_shared_over_batch { 0 } else { b };
                        *pj += bias[((bb * h + head) * lq + i) * lk + j];
                    }
                }
                softmax_row(&mut p);
                let o = &mut dst[head * d..(head + 1) * d];
                o.fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    let vv = &v[((b * lk + j) * h + head) * d..][..d];
                    for (x, y) in o.iter_mut().zip(vv) {
                        *x += pj * y;
                    }
                }
            }
        });
    out
}
