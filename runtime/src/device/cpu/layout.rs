//! Exact element moves: strided copies, permutes, gathers, nearest upsampling.

use rayon::prelude::*;

use super::{CpuStorage, map_typed};
use crate::{Error, Result};

#[allow(clippy::too_many_arguments)]
pub fn copy2d(
    src: &CpuStorage,
    dst: &mut CpuStorage,
    rows: usize,
    cols: usize,
    src_stride: usize,
    src_offset: usize,
    dst_stride: usize,
    dst_offset: usize,
) -> Result<()> {
    fn go<T: Copy>(
        s: &[T],
        d: &mut [T],
        r: usize,
        c: usize,
        ss: usize,
        so: usize,
        ds: usize,
        dof: usize,
    ) -> Result<()> {
        if r == 0 || c == 0 {
            return Ok(());
        }
        let s_end = so + (r - 1) * ss + c;
        let d_end = dof + (r - 1) * ds + c;
        if s_end > s.len() || d_end > d.len() {
            return Err(Error::invalid(
                "copy2d",
                format!(
                    "range out of bounds: src {s_end}/{}, dst {d_end}/{}",
                    s.len(),
                    d.len()
                ),
            ));
        }
        for i in 0..r {
            d[dof + i * ds..dof + i * ds + c].copy_from_slice(&s[so + i * ss..so + i * ss + c]);
        }
        Ok(())
    }
    let a = (rows, cols, src_stride, src_offset, dst_stride, dst_offset);
    match (src, dst) {
        (CpuStorage::BF16(s), CpuStorage::BF16(d)) => go(s, d, a.0, a.1, a.2, a.3, a.4, a.5),
        (CpuStorage::F16(s), CpuStorage::F16(d)) => go(s, d, a.0, a.1, a.2, a.3, a.4, a.5),
        (CpuStorage::F32(s), CpuStorage::F32(d)) => go(s, d, a.0, a.1, a.2, a.3, a.4, a.5),
        (CpuStorage::F8E4M3(s), CpuStorage::F8E4M3(d)) => go(s, d, a.0, a.1, a.2, a.3, a.4, a.5),
        (s, d) => Err(Error::DTypeMismatch {
            op: "copy2d",
            expected: d.dtype(),
            got: s.dtype(),
        }),
    }
}

pub fn permute(src: &CpuStorage, dims: &[usize], perm: &[usize]) -> CpuStorage {
    fn go<T: Copy + Send + Sync>(s: &[T], dims: &[usize], perm: &[usize]) -> Vec<T> {
        let Some(&first) = s.first() else {
            return Vec::new();
        };
        let n = dims.len();
        let mut in_strides = vec![1usize; n];
        for i in (0..n.saturating_sub(1)).rev() {
            in_strides[i] = in_strides[i + 1] * dims[i + 1];
        }
        let out_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        // Stride in the input of each output dim.
        let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
        let last = out_dims.last().copied().unwrap_or(1).max(1);
        let last_stride = strides.last().copied().unwrap_or(1);
        let mut out = vec![first; s.len()];
        out.par_chunks_mut(last).enumerate().for_each(|(row, dst)| {
            let mut rem = row;
            let mut base = 0;
            for d in (0..n.saturating_sub(1)).rev() {
                base += (rem % out_dims[d]) * strides[d];
                rem /= out_dims[d];
            }
            for (j, o) in dst.iter_mut().enumerate() {
                *o = s[base + j * last_stride];
            }
        });
        out
    }
    map_typed!(src, |v| go(v, dims, perm))
}

pub fn index_select(
    src: &CpuStorage,
    outer: usize,
    dim: usize,
    inner: usize,
    ids: &[u32],
) -> Result<CpuStorage> {
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= dim) {
        return Err(Error::invalid(
            "index_select",
            format!("index {bad} out of range for dim of size {dim}"),
        ));
    }
    fn go<T: Copy>(s: &[T], outer: usize, dim: usize, inner: usize, ids: &[u32]) -> Vec<T> {
        let mut out = Vec::with_capacity(outer * ids.len() * inner);
        for o in 0..outer {
            for &i in ids {
                let b = (o * dim + i as usize) * inner;
                out.extend_from_slice(&s[b..b + inner]);
            }
        }
        out
    }
    Ok(map_typed!(src, |v| go(v, outer, dim, inner, ids)))
}

pub fn upsample_nearest2d(
    src: &CpuStorage,
    outer: usize,
    h: usize,
    w: usize,
    fh: usize,
    fw: usize,
) -> CpuStorage {
    fn go<T: Copy + Send + Sync + Default>(
        s: &[T],
        outer: usize,
        h: usize,
        w: usize,
        fh: usize,
        fw: usize,
    ) -> Vec<T> {
        let (oh, ow) = (h * fh, w * fw);
        let mut out = vec![T::default(); outer * oh * ow];
        out.par_chunks_mut(ow).enumerate().for_each(|(row, dst)| {
            let (o, y) = (row / oh, row % oh);
            let src_row = &s[(o * h + y / fh) * w..][..w];
            for (x, d) in dst.iter_mut().enumerate() {
                *d = src_row[x / fw];
            }
        });
        out
    }
    map_typed!(src, |v| go(v, outer, h, w, fh, fw))
}
