//! GEMM, convolutions and attention on CUDA: cuBLASLt for the products (with its bias and
//! GELU epilogues where the dtypes allow), im2col kernels for the convolutions, and the
//! FlashAttention-style kernel for bf16 attention with head dim 128 (a three-step cuBLASLt
//! + softmax path covers every other case: biases, other head dims, f32).

use kernels::gemm::{GemmDesc, LtEpilogue};
use kernels::{Act, Conv3dGeom, In, Out};

use super::{CudaStorage, kd, ke};
use crate::device::{
    AttnSpec, BackendStorage, Conv1dSpec, Conv3dSpec, Epilogue, GemmSpec, PadMode,
};
use crate::{DType, Error, Result};

fn out_of(s: &mut CudaStorage) -> Out<'_> {
    Out {
        buf: &mut s.buf,
        dtype: kd(s.dtype),
    }
}

/// Cast to bf16 (exact for fp8 e4m3 values), used when cuBLASLt refuses an fp8 shape.
fn widen_fp8(x: &CudaStorage) -> Result<CudaStorage> {
    x.cast(DType::BF16, 1.0)?.charge_workspace()
}

pub(super) fn gemm(
    a: &CudaStorage,
    b: &CudaStorage,
    bias: Option<&CudaStorage>,
    spec: &GemmSpec,
) -> Result<CudaStorage> {
    if a.dtype != b.dtype {
        return Err(Error::DTypeMismatch {
            op: "gemm",
            expected: a.dtype,
            got: b.dtype,
        });
    }
    let (m, n, k) = (spec.m, spec.n, spec.k);
    let _p = a.dev.span(|| {
        format!(
            "gemm {}x{m}x{n}x{k} {}->{} {:?}{}",
            spec.batch,
            a.dtype.as_str(),
            spec.out.as_str(),
            spec.epilogue,
            if bias.is_some() { "+bias" } else { "" }
        )
    });
    let mut out = a.new_like(spec.batch * m * n, spec.out)?;
    if out.len == 0 {
        return Ok(out);
    }
    let mut d = GemmDesc::new(kd(a.dtype), kd(spec.out), m, n, k, spec.trans_b);
    d.batch = spec.batch;
    d.stride_a = spec.a_batch_stride;
    d.stride_b = spec.b_batch_stride;
    d.stride_c = m * n;
    // cuBLASLt fuses the bias and GELU when the bias has the output's dtype; SiLU and
    // mixed dtypes take the f32 + epilogue-kernel path (still one rounding).
    let fused = spec.epilogue != Epilogue::Silu && bias.is_none_or(|x| x.dtype == spec.out);
    let dev = &a.dev;
    if fused {
        d.bias = bias.map(|x| kd(x.dtype));
        d.epilogue = match spec.epilogue {
            Epilogue::GeluTanh => LtEpilogue::GeluTanh,
            _ => LtEpilogue::None,
        };
        match dev.lt.matmul(
            &d,
            spec.alpha,
            a.input(),
            b.input(),
            bias.map(|x| x.input()),
            out_of(&mut out),
        ) {
            Ok(()) => return Ok(out),
            // fp8 shapes cuBLASLt refuses (k or leading dims not multiples of 16, B not
            // transposed) run in bf16, which holds every e4m3 value exactly.
            Err(kernels::Error::Unsupported { .. }) if a.dtype == DType::F8E4M3 => {
                return gemm(&widen_fp8(a)?, &widen_fp8(b)?, bias, spec);
            }
            Err(e) => return Err(ke(e)),
        }
    }
    let mut acc = a.scratch(spec.batch * m * n, DType::F32)?;
    d.out = kernels::DType::F32;
    match dev
        .lt
        .matmul(&d, spec.alpha, a.input(), b.input(), None, out_of(&mut acc))
    {
        Ok(()) => {}
        Err(kernels::Error::Unsupported { .. }) if a.dtype == DType::F8E4M3 => {
            return gemm(&widen_fp8(a)?, &widen_fp8(b)?, bias, spec);
        }
        Err(e) => return Err(ke(e)),
    }
    let act = match spec.epilogue {
        Epilogue::None => Act::None,
        Epilogue::GeluTanh => Act::GeluTanh,
        Epilogue::Silu => Act::Silu,
    };
    dev.kernels
        .bias_act(
            &dev.stream,
            Some(acc.input()),
            bias.map(|x| x.input()),
            out_of(&mut out),
            spec.batch * m,
            n,
            false,
            act,
        )
        .map_err(ke)?;
    Ok(out)
}

/// f32 accumulator → `out` dtype with a per-channel bias (rows repeat every c_out).
fn finish_conv(
    acc: &CudaStorage,
    bias: Option<&CudaStorage>,
    out_dtype: DType,
    rows: usize,
    cols: usize,
) -> Result<CudaStorage> {
    let mut out = acc.new_like(rows * cols, out_dtype)?;
    let dev = &acc.dev;
    dev.kernels
        .bias_act(
            &dev.stream,
            Some(acc.input()),
            bias.map(|x| x.input()),
            out_of(&mut out),
            rows,
            cols,
            true,
            Act::None,
        )
        .map_err(ke)?;
    Ok(out)
}

fn gemm_dtype(x: &CudaStorage, w: &CudaStorage) -> Result<Option<(CudaStorage, CudaStorage)>> {
    if x.dtype != w.dtype {
        return Err(Error::DTypeMismatch {
            op: "conv",
            expected: w.dtype,
            got: x.dtype,
        });
    }
    // Convolutions on fp8 run in bf16 (exact widening).
    Ok(if x.dtype == DType::F8E4M3 {
        Some((widen_fp8(x)?, widen_fp8(w)?))
    } else {
        None
    })
}

pub(super) fn conv1d(
    x: &CudaStorage,
    w: &CudaStorage,
    bias: Option<&CudaStorage>,
    spec: &Conv1dSpec,
) -> Result<CudaStorage> {
    if let Some((x, w)) = gemm_dtype(x, w)? {
        return conv1d(&x, &w, bias, spec);
    }
    let g = spec.groups.max(1);
    let (cig, cog, kk, l_out) = (spec.c_in / g, spec.c_out / g, spec.kernel, spec.l_out());
    let dev = &x.dev;
    let mut col = x.scratch(spec.c_in * kk * l_out, x.dtype)?;
    let mut acc = x.scratch(spec.batch * spec.c_out * l_out, DType::F32)?;
    let mut d = GemmDesc::new(
        kd(x.dtype),
        kernels::DType::F32,
        cog,
        l_out,
        cig * kk,
        false,
    );
    d.batch = g;
    d.stride_a = cog * cig * kk;
    d.stride_b = cig * kk * l_out;
    d.stride_c = cog * l_out;
    for b in 0..spec.batch {
        dev.kernels
            .im2col1d(
                &dev.stream,
                x.input(),
                b * spec.c_in * spec.l_in,
                out_of(&mut col),
                spec.c_in,
                spec.l_in,
                kk,
                spec.stride,
                spec.pad_left,
                l_out,
                spec.pad_mode == PadMode::Replicate,
            )
            .map_err(ke)?;
        dev.lt
            .matmul_at(
                &d,
                1.0,
                (w.input(), 0),
                (col.input(), 0),
                None,
                (out_of(&mut acc), b * spec.c_out * l_out),
            )
            .map_err(ke)?;
    }
    finish_conv(&acc, bias, spec.out, spec.batch * spec.c_out, l_out)
}

pub(super) fn conv3d(
    x: &CudaStorage,
    w: &CudaStorage,
    bias: Option<&CudaStorage>,
    spec: &Conv3dSpec,
) -> Result<CudaStorage> {
    if let Some((x, w)) = gemm_dtype(x, w)? {
        return conv3d(&x, &w, bias, spec);
    }
    let _p = x.dev.span(|| {
        format!(
            "conv3d {}x{:?}->{} k{:?} {}",
            spec.c_in,
            spec.input,
            spec.c_out,
            spec.kernel,
            x.dtype.as_str()
        )
    });
    #[cfg(feature = "cudnn")]
    if let Some(y) = conv3d_cudnn(x, w, bias, spec)? {
        return Ok(y);
    }
    let od = spec.out_dims();
    let p: usize = od.iter().product();
    let kvol: usize = spec.kernel.iter().product();
    let vin: usize = spec.c_in * spec.input.iter().product::<usize>();
    let dev = &x.dev;
    let mut col = x.scratch(spec.c_in * kvol * p, x.dtype)?;
    let mut acc = x.scratch(spec.batch * spec.c_out * p, DType::F32)?;
    let d = GemmDesc::new(
        kd(x.dtype),
        kernels::DType::F32,
        spec.c_out,
        p,
        spec.c_in * kvol,
        false,
    );
    let i64s = |a: [usize; 3]| a.map(|v| v as i64);
    let geom = Conv3dGeom {
        c_in: spec.c_in as i64,
        input: i64s(spec.input),
        kernel: i64s(spec.kernel),
        stride: i64s(spec.stride),
        pad: i64s(spec.pad.map(|(before, _)| before)),
        out: i64s(od),
    };
    for b in 0..spec.batch {
        dev.kernels
            .im2col3d(&dev.stream, x.input(), b * vin, out_of(&mut col), &geom)
            .map_err(ke)?;
        dev.lt
            .matmul_at(
                &d,
                1.0,
                (w.input(), 0),
                (col.input(), 0),
                None,
                (out_of(&mut acc), b * spec.c_out * p),
            )
            .map_err(ke)?;
    }
    finish_conv(&acc, bias, spec.out, spec.batch * spec.c_out, p)
}

/// bf16/f16 convolutions through cuDNN (f32 stays on im2col + cuBLASLt: cuDNN may pick TF32
/// engines for f32). `None` when cuDNN is off or refuses the shape: the caller falls back.
#[cfg(feature = "cudnn")]
fn conv3d_cudnn(
    x: &CudaStorage,
    w: &CudaStorage,
    bias: Option<&CudaStorage>,
    spec: &Conv3dSpec,
) -> Result<Option<CudaStorage>> {
    let dev = &x.dev;
    let Ok(c) = &dev.conv else {
        return Ok(None);
    };
    if !matches!(x.dtype, DType::BF16 | DType::F16) || spec.out != x.dtype {
        return Ok(None);
    }
    let shape = kernels::cudnn_conv::ConvShape {
        batch: spec.batch,
        c_in: spec.c_in,
        c_out: spec.c_out,
        input: spec.input,
        kernel: spec.kernel,
        stride: spec.stride,
        pad: spec.pad,
        channels_last: false,
    };
    let p: usize = spec.out_dims().iter().product();
    let mut out = x.new_like(spec.batch * spec.c_out * p, spec.out)?;
    // A bias of another dtype is added by the epilogue kernel below.
    let fused = bias.filter(|b| b.dtype == x.dtype);
    let res = if c.channels_last() {
        // NCDHW → NDHWC around a channels-last cuDNN convolution.
        let pin: usize = spec.input.iter().product();
        let kvol: usize = spec.kernel.iter().product();
        let tr =
            |src: &CudaStorage, batch: usize, rows: usize, cols: usize| -> Result<CudaStorage> {
                let mut t = src.scratch(batch * rows * cols, src.dtype)?;
                dev.kernels
                    .transpose(&dev.stream, src.input(), out_of(&mut t), batch, rows, cols)
                    .map_err(ke)?;
                Ok(t)
            };
        let xt = tr(x, spec.batch, spec.c_in, pin)?;
        let wt = tr(w, spec.c_out, spec.c_in, kvol)?;
        let mut yt = x.scratch(spec.batch * spec.c_out * p, spec.out)?;
        let shape = kernels::cudnn_conv::ConvShape {
            channels_last: true,
            ..shape
        };
        let r = c.forward(
            xt.input(),
            wt.input(),
            fused.map(|b| b.input()),
            out_of(&mut yt),
            &shape,
        );
        if r.is_ok() {
            dev.kernels
                .transpose(
                    &dev.stream,
                    yt.input(),
                    out_of(&mut out),
                    spec.batch,
                    p,
                    spec.c_out,
                )
                .map_err(ke)?;
        }
        r
    } else {
        c.forward(
            x.input(),
            w.input(),
            fused.map(|b| b.input()),
            out_of(&mut out),
            &shape,
        )
    };
    let applied = match res {
        Ok(a) => a && fused.is_some(),
        Err(kernels::Error::Unsupported { .. }) => return Ok(None),
        Err(e) => return Err(ke(e)),
    };
    if let (Some(b), false) = (bias, applied) {
        dev.kernels
            .bias_act(
                &dev.stream,
                None,
                Some(b.input()),
                out_of(&mut out),
                spec.batch * spec.c_out,
                p,
                true,
                Act::None,
            )
            .map_err(ke)?;
    }
    Ok(Some(out))
}

/// The cuDNN convolution plans made so far on `dev` (shape, bias fusion, engine), for logs.
#[cfg(feature = "cudnn")]
pub(super) fn conv_plans(dev: &super::CudaDev) -> Vec<String> {
    match &dev.conv {
        Ok(c) => c.plans(),
        Err(e) => vec![format!("cuDNN conv off: {e}")],
    }
}

pub(super) fn attention(
    q: &CudaStorage,
    k: &CudaStorage,
    v: &CudaStorage,
    bias: Option<&CudaStorage>,
    spec: &AttnSpec,
) -> Result<CudaStorage> {
    let dev = &q.dev;
    let (b, lq, lk, h, hd) = (spec.batch, spec.lq, spec.lk, spec.heads, spec.head_dim);
    let _p = dev.span(|| {
        format!(
            "attention b{b} lq{lq} lk{lk} h{h} d{hd} {}",
            q.dtype.as_str()
        )
    });
    let bf16 = bias.is_none()
        && [q.dtype, k.dtype, v.dtype, spec.out]
            .iter()
            .all(|&d| d == DType::BF16)
        && lq <= i32::MAX as usize
        && lk <= i32::MAX as usize;
    #[cfg(feature = "cudnn")]
    if bf16 && let Ok(c) = &dev.cudnn {
        let mut out = q.new_like(b * lq * h * hd, DType::BF16)?;
        let args = kernels::AttnArgs::contiguous_hd(lq, lk, h, hd);
        // A shape cuDNN refuses falls through to the kernels below.
        if c.attention(
            q.input(),
            k.input(),
            v.input(),
            out_of(&mut out),
            &args,
            b,
            h,
            hd,
            spec.scale,
        )
        .is_ok()
        {
            return Ok(out);
        }
    }
    if bf16 && hd == 128 {
        let mut out = q.new_like(b * lq * h * hd, DType::BF16)?;
        let args = kernels::AttnArgs::contiguous(lq, lk, h);
        dev.kernels
            .attention(
                &dev.stream,
                q.input(),
                k.input(),
                v.input(),
                out_of(&mut out),
                args,
                b,
                h,
                spec.scale,
            )
            .map_err(ke)?;
        return Ok(out);
    }
    if q.dtype != k.dtype || q.dtype != v.dtype || q.dtype == DType::F8E4M3 {
        return Err(Error::UnsupportedDType {
            op: "attention (cuda)",
            dtype: q.dtype,
        });
    }
    // S = scale·Q·Kᵀ per head (f32), + bias, softmax (f32), O = P·V (f32), one rounding.
    let ld = h * hd;
    let mut s_desc = GemmDesc::new(kd(q.dtype), kernels::DType::F32, lq, lk, hd, true);
    s_desc.batch = h;
    (s_desc.lda, s_desc.ldb, s_desc.ldc) = (ld, ld, lk);
    (s_desc.stride_a, s_desc.stride_b, s_desc.stride_c) = (hd, hd, lq * lk);
    let mut o_desc = GemmDesc::new(kernels::DType::F32, kernels::DType::F32, lq, hd, lk, false);
    o_desc.batch = h;
    (o_desc.lda, o_desc.ldb, o_desc.ldc) = (lk, ld, ld);
    (o_desc.stride_a, o_desc.stride_b, o_desc.stride_c) = (lq * lk, hd, hd);
    let v32 = if v.dtype == DType::F32 {
        None
    } else {
        Some(v.cast(DType::F32, 1.0)?.charge_workspace()?)
    };
    let v32 = v32.as_ref().unwrap_or(v);
    // o32 is the result itself when f32 is asked for (charged by the tensor layer).
    let mut o32 = if spec.out == DType::F32 {
        q.new_like(b * lq * h * hd, DType::F32)?
    } else {
        q.scratch(b * lq * h * hd, DType::F32)?
    };
    let mut scores = q.scratch(h * lq * lk, DType::F32)?;
    let mut probs = q.scratch(h * lq * lk, DType::F32)?;
    for bi in 0..b {
        dev.lt
            .matmul_at(
                &s_desc,
                spec.scale,
                (q.input(), bi * lq * ld),
                (k.input(), bi * lk * ld),
                None,
                (out_of(&mut scores), 0),
            )
            .map_err(ke)?;
        let summed = match bias {
            Some(bias) => {
                // bias [b or 1, h, lq, lk]: scores + bias[bi] (exact f32 add, then softmax).
                let off = if spec.bias_shared_over_batch {
                    0
                } else {
                    bi * h * lq * lk
                };
                let n = h * lq * lk;
                let mut summed = q.scratch(n, DType::F32)?;
                dev.kernels
                    .binary(
                        &dev.stream,
                        kernels::BinaryOp::Add,
                        kernels::Strided {
                            src: scores.input(),
                            offset: 0,
                            strides: &[1],
                        },
                        kernels::Strided {
                            src: In {
                                buf: &bias.buf,
                                dtype: kd(bias.dtype),
                            },
                            offset: off,
                            strides: &[1],
                        },
                        kernels::StridedMut {
                            dst: out_of(&mut summed),
                            offset: 0,
                            strides: &[1],
                        },
                        &[n],
                    )
                    .map_err(ke)?;
                Some(summed)
            }
            None => None,
        };
        let src = summed.as_ref().unwrap_or(&scores);
        dev.kernels
            .softmax(&dev.stream, src.input(), out_of(&mut probs), h * lq, lk)
            .map_err(ke)?;
        dev.lt
            .matmul_at(
                &o_desc,
                1.0,
                (probs.input(), 0),
                (v32.input(), bi * lk * ld),
                None,
                (out_of(&mut o32), bi * lq * ld),
            )
            .map_err(ke)?;
    }
    if spec.out == DType::F32 {
        Ok(o32)
    } else {
        o32.cast(spec.out, 1.0)
    }
}
