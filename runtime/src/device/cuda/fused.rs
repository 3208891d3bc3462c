//! The fused block ops on CUDA: `lava_res_norm_mod` (norm.cu) and `lava_rmsnorm_rope`
//! (rope.cu), one launch each.

use kernels::{In, Out, ResNormGeom, ResNormIo};

use super::{CudaStorage, kd, ke};
use crate::device::ResNormSpec;
use crate::{DType, Result};

fn inp(s: Option<&CudaStorage>) -> Option<In<'_>> {
    s.map(CudaStorage::input)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn res_norm_mod(
    x: &CudaStorage,
    y: Option<&CudaStorage>,
    gate: Option<&CudaStorage>,
    weight: Option<&CudaStorage>,
    bias: Option<&CudaStorage>,
    scale: Option<&CudaStorage>,
    shift: Option<&CudaStorage>,
    spec: &ResNormSpec,
) -> Result<(Option<CudaStorage>, CudaStorage)> {
    let (rows, cols) = (spec.rows, spec.cols);
    let _p = x.dev.span(|| {
        format!(
            "res_norm_mod {rows}x{cols} {}{}{}->{}",
            x.dtype.as_str(),
            if y.is_some() { "+y" } else { "" },
            if scale.is_some() { " mod" } else { "" },
            spec.out.as_str()
        )
    });
    let mut out = x.new_like(rows * cols, spec.out)?;
    let mut res = spec.res.map(|d| x.new_like(rows * cols, d)).transpose()?;
    let g = ResNormGeom {
        rows,
        n: cols,
        per_group: rows / spec.groups.max(1),
        eps: spec.eps,
        ln_in: kd(spec.ln_in),
        norm: kd(spec.norm),
    };
    let io = ResNormIo {
        x: x.input(),
        y: inp(y),
        gate: inp(gate),
        weight: inp(weight),
        bias: inp(bias),
        scale: inp(scale),
        shift: inp(shift),
        res: res.as_mut().map(|r| Out {
            buf: &mut r.buf,
            dtype: kd(r.dtype),
        }),
        out: out.output(),
    };
    x.k().res_norm_mod(x.s(), &g, io).map_err(ke)?;
    Ok((res, out))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rms_norm_rope(
    x: &CudaStorage,
    w: &CudaStorage,
    cos: &CudaStorage,
    sin: &CudaStorage,
    rows: usize,
    heads: usize,
    head_dim: usize,
    eps: f32,
    norm: DType,
    out_dtype: DType,
) -> Result<CudaStorage> {
    let _p = x.dev.span(|| {
        format!(
            "rms_norm_rope {rows}x{heads}x{head_dim} {}->{}",
            x.dtype.as_str(),
            out_dtype.as_str()
        )
    });
    let mut out = x.new_like(rows * heads * head_dim, out_dtype)?;
    x.k()
        .rms_norm_rope(
            x.s(),
            x.input(),
            w.input(),
            cos.input(),
            sin.input(),
            out.output(),
            rows,
            heads,
            head_dim,
            eps,
            kd(norm),
        )
        .map_err(ke)?;
    Ok(out)
}
