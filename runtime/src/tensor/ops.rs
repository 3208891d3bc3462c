//! Tensor ops: validation, output allocation (charged to the memory tracker before the
//! backend runs) and enum dispatch to the backend. Elementwise, reductions, norms and casts
//! live here; see `layout.rs` and `linalg.rs` for the rest.
//!
//! Dtype rules (every op): math in f32, one round-to-nearest-even into the output dtype.
//! Binary/ternary ops promote like torch (equal dtypes stay, mixed → f32) unless an explicit
//! `out` is given. fp8 tensors are rejected by compute ops other than casts and GEMMs.

use super::{ReadAll, Shape, Tensor, track};
use crate::device::{
    BackendStorage, BinaryOp, BroadcastLayout, CpuStorage, CudaStorage, ReduceOp, Storage,
    TernaryOp, UnaryOp,
};
use crate::{DType, Device, Error, F8E4M3_MAX, Result};

/// Selects the matching variant of another operand's [`Storage`] inside a dispatch arm.
pub(crate) trait Pick: BackendStorage {
    fn pick(s: &Storage) -> Result<&Self>;
    fn pick_opt(s: Option<&Storage>) -> Result<Option<&Self>> {
        s.map(Self::pick).transpose()
    }
}

impl Pick for CpuStorage {
    fn pick(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cpu(x) => Ok(x),
            Storage::Cuda(x) => Err(Error::DeviceMismatch {
                op: "dispatch",
                lhs: Device::Cpu,
                rhs: x.device(),
            }),
        }
    }
}

impl Pick for CudaStorage {
    fn pick(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cuda(x) => Ok(x),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op: "dispatch",
                lhs: Device::Cuda(0),
                rhs: Device::Cpu,
            }),
        }
    }
}

/// `dispatch!(storage_ref, |x: S| expr)`: run `expr` with `x` the concrete storage and `S`
/// its type, wrapping the result back into a [`Storage`].
macro_rules! dispatch {
    ($a:expr, |$x:ident : $T:ident| $body:expr) => {
        match $a {
            Storage::Cpu($x) => {
                #[allow(dead_code)]
                type $T = CpuStorage;
                Storage::Cpu($body?)
            }
            Storage::Cuda($x) => {
                #[allow(dead_code)]
                type $T = CudaStorage;
                Storage::Cuda($body?)
            }
        }
    };
}
pub(crate) use dispatch;

pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            return Err(Error::DeviceMismatch {
                op,
                lhs: d,
                rhs: t.device(),
            });
        }
    }
    Ok(d)
}

pub(crate) fn not_fp8(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    match ts.iter().find(|t| t.dtype() == DType::F8E4M3) {
        Some(_) => Err(Error::UnsupportedDType {
            op,
            dtype: DType::F8E4M3,
        }),
        None => Ok(()),
    }
}

pub(crate) fn expect_shape(op: &'static str, t: &Tensor, want: &Shape) -> Result<()> {
    if t.shape() != want {
        return Err(Error::ShapeMismatch {
            op,
            lhs: want.clone(),
            rhs: t.shape().clone(),
        });
    }
    Ok(())
}

impl Tensor {
    /// Allocate-and-run helper: charge `elems` of `dtype`, then wrap what `f` produced.
    pub(crate) fn produce(
        device: &Device,
        shape: Shape,
        dtype: DType,
        scale: f32,
        f: impl FnOnce() -> Result<Storage>,
    ) -> Result<Tensor> {
        let alloc = track(device, dtype, shape.elem_count())?;
        let st = f()?;
        Ok(Tensor::wrap(st, shape, alloc, scale))
    }

    // === Casts ===

    /// Cast to `dtype` (RNE). From fp8 the scale is applied; into fp8 the cast saturates
    /// at ±448 with unit scale (use [`Tensor::quantize_fp8`] for scaled quantisation).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        self.cast_scaled(dtype, self.fp8_scale(), 1.0)
    }

    /// `round_to(dtype, stored · mul)`, result tagged with fp8 dequant scale `out_scale`.
    fn cast_scaled(&self, dtype: DType, mul: f32, out_scale: f32) -> Result<Tensor> {
        let a = self.storage()?;
        Tensor::produce(
            &self.device(),
            self.shape().clone(),
            dtype,
            out_scale,
            || Ok(dispatch!(&*a, |x: S| x.cast(dtype, mul))),
        )
    }

    /// Per-tensor dynamic fp8 quantisation as the reference does it (model-spec §8.1):
    /// amax = max|x|, s = min(448 / max(amax, 1e-12), 448), stored = sat_e4m3(x·s) with x·s
    /// formed in f32, dequant scale 1/s.
    pub fn quantize_fp8(&self) -> Result<Tensor> {
        not_fp8("quantize_fp8", &[self])?;
        let amax = self.abs_max()?;
        let s = (F8E4M3_MAX / amax.max(1e-12)).min(F8E4M3_MAX);
        self.cast_scaled(DType::F8E4M3, s, 1.0 / s)
    }

    // === Elementwise ===

    /// `op(self)` in f32, rounded to `out`.
    pub fn unary_to(&self, op: UnaryOp, out: DType) -> Result<Tensor> {
        not_fp8("unary", &[self])?;
        let a = self.storage()?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(&*a, |x: S| x.unary(op, out)))
        })
    }
    fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        self.unary_to(op, self.dtype())
    }
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluTanh)
    }
    /// Exact (erf) GELU, as wav2vec2 uses.
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Gelu)
    }
    pub fn clamp(&self, min: f32, max: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Clamp { min, max })
    }
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Silu)
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp)
    }
    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg)
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Abs)
    }
    pub fn sqr(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqr)
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt)
    }
    pub fn recip(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Recip)
    }
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Tanh)
    }
    /// `x·mul + add`.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine { mul, add })
    }

    fn layout_for(op: &'static str, ts: &[&Tensor]) -> Result<BroadcastLayout> {
        let mut out = ts[0].shape().clone();
        for t in &ts[1..] {
            out = out.broadcast_with(t.shape(), op)?;
        }
        Ok(BroadcastLayout {
            strides: ts
                .iter()
                .map(|t| t.shape().broadcast_strides(&out))
                .collect(),
            dims: out.dims().to_vec(),
        })
    }

    /// Broadcasting `op(self, rhs)` in f32, rounded to `out`.
    pub fn binary_to(&self, rhs: &Tensor, op: BinaryOp, out: DType) -> Result<Tensor> {
        same_device("binary", &[self, rhs])?;
        not_fp8("binary", &[self, rhs])?;
        let layout = Self::layout_for("binary", &[self, rhs])?;
        let g = ReadAll::new(&[Some(self), Some(rhs)])?;
        Tensor::produce(&self.device(), layout.dims.clone().into(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.binary(
                S::pick(g.get(1)?)?,
                op,
                &layout,
                out
            )))
        })
    }
    fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        self.binary_to(rhs, op, self.dtype().promote(rhs.dtype()))
    }
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Maximum)
    }
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Minimum)
    }

    fn ternary_to(&self, b: &Tensor, c: &Tensor, op: TernaryOp, out: DType) -> Result<Tensor> {
        same_device("ternary", &[self, b, c])?;
        not_fp8("ternary", &[self, b, c])?;
        let layout = Self::layout_for("ternary", &[self, b, c])?;
        let g = ReadAll::new(&[Some(self), Some(b), Some(c)])?;
        Tensor::produce(&self.device(), layout.dims.clone().into(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.ternary(
                S::pick(g.get(1)?)?,
                S::pick(g.get(2)?)?,
                op,
                &layout,
                out
            )))
        })
    }

    /// adaLN modulate `x·(1 + scale) + shift` (broadcasting), f32 math, rounded to `out`.
    pub fn modulate(&self, scale: &Tensor, shift: &Tensor, out: DType) -> Result<Tensor> {
        self.ternary_to(scale, shift, TernaryOp::Modulate, out)
    }

    /// Gated residual `x + y·gate` (broadcasting), f32 math, rounded to `out`.
    pub fn gated_residual(&self, y: &Tensor, gate: &Tensor, out: DType) -> Result<Tensor> {
        self.ternary_to(y, gate, TernaryOp::GatedResidual, out)
    }

    // === Reductions and softmax over the last dim ===

    /// f32 tensor of shape `dims[..rank-1]` (f32 accumulation).
    pub fn reduce_last(&self, op: ReduceOp) -> Result<Tensor> {
        not_fp8("reduce", &[self])?;
        let (rows, cols) = self.shape().rows_cols();
        let dims = &self.dims()[..self.rank().saturating_sub(1)];
        let a = self.storage()?;
        Tensor::produce(&self.device(), dims.into(), DType::F32, 1.0, || {
            Ok(dispatch!(&*a, |x: S| x.reduce(op, rows, cols)))
        })
    }
    pub fn sum_last(&self) -> Result<Tensor> {
        self.reduce_last(ReduceOp::Sum)
    }
    pub fn mean_last(&self) -> Result<Tensor> {
        self.reduce_last(ReduceOp::Mean)
    }
    pub fn max_last(&self) -> Result<Tensor> {
        self.reduce_last(ReduceOp::Max)
    }
    /// Reduce over any dim (moved last by a copy first); f32 result without that dim.
    pub fn reduce_dim(&self, dim: usize, op: ReduceOp) -> Result<Tensor> {
        let r = self.rank();
        if dim >= r {
            return Err(Error::DimOutOfRange {
                op: "reduce_dim",
                dim,
                shape: self.shape().clone(),
            });
        }
        if dim + 1 == r {
            return self.reduce_last(op);
        }
        let mut perm: Vec<usize> = (0..r).filter(|&d| d != dim).collect();
        perm.push(dim);
        self.permute(&perm)?.reduce_last(op)
    }
    pub fn sum_dim(&self, dim: usize) -> Result<Tensor> {
        self.reduce_dim(dim, ReduceOp::Sum)
    }
    pub fn mean_dim(&self, dim: usize) -> Result<Tensor> {
        self.reduce_dim(dim, ReduceOp::Mean)
    }

    /// max |x| over the whole tensor, read back to the host (synchronises).
    pub fn abs_max(&self) -> Result<f32> {
        let flat = self.reshape((1, self.elem_count()))?;
        Ok(flat.reduce_last(ReduceOp::AbsMax)?.to_vec_f32()?[0] * self.fp8_scale())
    }

    /// Softmax over the last dim (f32 math), rounded to the input dtype.
    pub fn softmax_last(&self) -> Result<Tensor> {
        self.softmax_last_to(self.dtype())
    }
    pub fn softmax_last_to(&self, out: DType) -> Result<Tensor> {
        not_fp8("softmax", &[self])?;
        let (rows, cols) = self.shape().rows_cols();
        let a = self.storage()?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(&*a, |x: S| x.softmax(rows, cols, out)))
        })
    }

    // === Norms ===

    /// LayerNorm over the last dim with f32 statistics (biased variance), optional affine
    /// applied in f32, one rounding to `out`. The reference's `WanLayerNorm` on a bf16 input
    /// is `out = BF16`; on an f32 residual it is `out = F32`.
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
        out: DType,
    ) -> Result<Tensor> {
        let (rows, cols) = self.shape().rows_cols();
        let mut all = vec![self];
        all.extend(weight);
        all.extend(bias);
        same_device("layer_norm", &all)?;
        not_fp8("layer_norm", &all)?;
        for p in weight.iter().chain(bias.iter()) {
            expect_shape("layer_norm", p, &Shape::from(cols))?;
        }
        let g = ReadAll::new(&[Some(self), weight, bias])?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.layer_norm(
                S::pick_opt(g.opt(1)?)?,
                S::pick_opt(g.opt(2)?)?,
                rows,
                cols,
                eps,
                out
            )))
        })
    }

    /// RMSNorm over the full last dim (model-spec §3.3.1): `n = x·rsqrt(mean(x²) + eps)` in
    /// f32, rounded to x's dtype, then `n · weight` rounded to `promote(x, weight)`.
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        let (rows, cols) = self.shape().rows_cols();
        let out = weight.map_or(self.dtype(), |w| self.dtype().promote(w.dtype()));
        let mut all = vec![self];
        all.extend(weight);
        same_device("rms_norm", &all)?;
        not_fp8("rms_norm", &all)?;
        if let Some(w) = weight {
            expect_shape("rms_norm", w, &Shape::from(cols))?;
        }
        let g = ReadAll::new(&[Some(self), weight])?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.rms_norm(
                S::pick_opt(g.opt(1)?)?,
                rows,
                cols,
                eps,
                out
            )))
        })
    }

    /// The Wan VAE channel RMS norm on x `[N, C, ...]`: `x / max(‖x‖₂ over C, 1e-12) ·
    /// sqrt(C) · gamma (+ bias)`, all in f32 (the reference runs it in fp32 under autocast),
    /// rounded to `out`. `gamma`, `bias`: `[C]`.
    pub fn channel_rms_norm(
        &self,
        gamma: &Tensor,
        bias: Option<&Tensor>,
        out: DType,
    ) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::UnexpectedRank {
                op: "channel_rms_norm",
                expected: 2,
                got: self.shape().clone(),
            });
        }
        let (n, c) = (self.dims()[0], self.dims()[1]);
        let s = self.elem_count() / (n * c).max(1);
        let mut all = vec![self, gamma];
        all.extend(bias);
        same_device("channel_rms_norm", &all)?;
        not_fp8("channel_rms_norm", &all)?;
        for p in std::iter::once(gamma).chain(bias) {
            expect_shape("channel_rms_norm", p, &Shape::from(c))?;
        }
        let g = ReadAll::new(&[Some(self), Some(gamma), bias])?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.channel_rms_norm(
                S::pick(g.get(1)?)?,
                S::pick_opt(g.opt(2)?)?,
                n,
                c,
                s,
                out
            )))
        })
    }
}
