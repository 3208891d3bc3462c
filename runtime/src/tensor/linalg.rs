//! GEMMs, convolutions, attention and rotary embedding on tensors.

use super::ops::{Pick, dispatch, expect_shape, not_fp8, same_device};
use super::{ReadAll, Tensor};
use crate::device::{
    AttnSpec, BackendStorage, Conv1dSpec, Conv3dSpec, CpuStorage, CudaStorage, Epilogue, GemmSpec,
    PadMode, Storage,
};
use crate::{DType, Error, Result, Shape};

/// Options of [`Tensor::conv1d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv1dOpts {
    pub stride: usize,
    pub groups: usize,
    /// Padding `(left, right)`; causal convolutions pad only on the left.
    pub pad: (usize, usize),
    pub pad_mode: PadMode,
}

impl Default for Conv1dOpts {
    fn default() -> Self {
        Self {
            stride: 1,
            groups: 1,
            pad: (0, 0),
            pad_mode: PadMode::Zeros,
        }
    }
}

/// Options of [`Tensor::conv3d`]: zero padding `(before, after)` per axis (t, h, w).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dOpts {
    pub stride: [usize; 3],
    pub pad: [(usize, usize); 3],
}

impl Default for Conv3dOpts {
    fn default() -> Self {
        Self {
            stride: [1; 3],
            pad: [(0, 0); 3],
        }
    }
}

fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch {
            op,
            expected: a.dtype(),
            got: b.dtype(),
        });
    }
    Ok(())
}

impl Tensor {
    fn gemm_raw(
        &self,
        b: &Tensor,
        bias: Option<&Tensor>,
        spec: GemmSpec,
        out_shape: Shape,
    ) -> Result<Tensor> {
        let mut all = vec![self, b];
        all.extend(bias);
        same_device("gemm", &all)?;
        same_dtype("gemm", self, b)?;
        if let Some(bias) = bias {
            not_fp8("gemm bias", &[bias])?;
            expect_shape("gemm bias", bias, &Shape::from(spec.n))?;
        }
        let g = ReadAll::new(&[Some(self), Some(b), bias])?;
        let out = spec.out;
        Tensor::produce(&self.device(), out_shape, out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.gemm(
                S::pick(g.get(1)?)?,
                S::pick_opt(g.opt(2)?)?,
                &spec
            )))
        })
    }

    /// Batched matmul `[.., m, k] @ [.., k, n]` (equal leading dims, or a 2-D rhs shared by
    /// the batch); f32 accumulation, rounded to `self`'s dtype. fp8 operands need [`Tensor::matmul_to`].
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_to(rhs, 1.0, self.dtype())
    }

    /// `alpha · self @ rhs` rounded to `out`; fp8 operands contribute their scales to alpha.
    pub fn matmul_to(&self, rhs: &Tensor, alpha: f32, out: DType) -> Result<Tensor> {
        let err = || Error::ShapeMismatch {
            op: "matmul",
            lhs: self.shape().clone(),
            rhs: rhs.shape().clone(),
        };
        if self.rank() < 2 || rhs.rank() < 2 {
            return Err(err());
        }
        let (r, rr) = (self.rank(), rhs.rank());
        let (m, k) = (self.dims()[r - 2], self.dims()[r - 1]);
        let (k2, n) = (rhs.dims()[rr - 2], rhs.dims()[rr - 1]);
        let batch_dims = &self.dims()[..r - 2];
        let shared = rr == 2;
        if k != k2 || (!shared && rhs.dims()[..rr - 2] != *batch_dims) {
            return Err(err());
        }
        let batch: usize = batch_dims.iter().product();
        let spec = GemmSpec {
            batch,
            m,
            n,
            k,
            a_batch_stride: m * k,
            b_batch_stride: if shared { 0 } else { k * n },
            trans_b: false,
            alpha: alpha * self.fp8_scale() * rhs.fp8_scale(),
            epilogue: Epilogue::None,
            out,
        };
        let mut od = batch_dims.to_vec();
        od.extend([m, n]);
        self.gemm_raw(rhs, None, spec, od.into())
    }

    /// `x @ wᵀ + bias` with `w` `[n, k]` (checkpoint layout), rounded to x's dtype.
    pub fn linear(&self, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.linear_ex(w, bias, Epilogue::None, self.dtype())
    }

    /// `epilogue(x @ wᵀ · (scale_x·scale_w) + bias)` with the epilogue applied to the f32 value
    /// and one rounding to `out`. Note: the reference rounds a Linear's output to bf16
    /// *before* its GELU; use `Epilogue::None` then [`Tensor::gelu_tanh`] for that flow.
    pub fn linear_ex(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        epilogue: Epilogue,
        out: DType,
    ) -> Result<Tensor> {
        let (n, k) = w.dims2()?;
        if self.rank() == 0 || self.dims()[self.rank() - 1] != k {
            return Err(Error::ShapeMismatch {
                op: "linear",
                lhs: self.shape().clone(),
                rhs: w.shape().clone(),
            });
        }
        let m = self.elem_count() / k.max(1);
        let spec = GemmSpec {
            batch: 1,
            m,
            n,
            k,
            a_batch_stride: 0,
            b_batch_stride: 0,
            trans_b: true,
            alpha: self.fp8_scale() * w.fp8_scale(),
            epilogue,
            out,
        };
        let mut od = self.dims().to_vec();
        *od.last_mut().unwrap_or(&mut 0) = n;
        self.gemm_raw(w, bias, spec, od.into())
    }

    /// The reference's FP8 linear (model-spec §8.1): quantise x per tensor
    /// ([`Tensor::quantize_fp8`]), multiply with the fp8 weight (f32 accumulation), scale by
    /// both dequant scales, add the bias, round to bf16 (`_scaled_mm`'s out dtype), then cast
    /// to `out` (the reference casts back to the input's dtype).
    pub fn fp8_linear(&self, w: &Tensor, bias: Option<&Tensor>, out: DType) -> Result<Tensor> {
        if w.dtype() != DType::F8E4M3 {
            return Err(Error::DTypeMismatch {
                op: "fp8_linear",
                expected: DType::F8E4M3,
                got: w.dtype(),
            });
        }
        let xq = self.quantize_fp8()?;
        xq.linear_ex(w, bias, Epilogue::None, DType::BF16)?
            .to_dtype(out)
    }

    /// 1-d convolution, x `[B, Cin, L]`, w `[Cout, Cin/groups, K]`, bias `[Cout]` → `[B, Cout, L']`.
    pub fn conv1d(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        o: Conv1dOpts,
        out: DType,
    ) -> Result<Tensor> {
        let (batch, c_in, l_in) = self.dims3()?;
        let (c_out, cig, kernel) = w.dims3()?;
        let bad = |msg: String| Error::invalid("conv1d", msg);
        if o.groups == 0
            || o.stride == 0
            || c_in % o.groups != 0
            || c_out % o.groups != 0
            || cig != c_in / o.groups
        {
            return Err(bad(format!(
                "x {:?}, w {:?}, groups {}",
                self.shape(),
                w.shape(),
                o.groups
            )));
        }
        if l_in + o.pad.0 + o.pad.1 < kernel || (o.pad_mode == PadMode::Replicate && l_in == 0) {
            return Err(bad(format!(
                "input length {l_in} too short for kernel {kernel}"
            )));
        }
        let spec = Conv1dSpec {
            batch,
            c_in,
            c_out,
            l_in,
            kernel,
            stride: o.stride,
            groups: o.groups,
            pad_left: o.pad.0,
            pad_right: o.pad.1,
            pad_mode: o.pad_mode,
            out,
        };
        self.conv_common(
            "conv1d",
            w,
            bias,
            c_out,
            vec![batch, c_out, spec.l_out()],
            out,
            |x, wv, b| {
                Ok(dispatch!(x, |s: S| s.conv1d(
                    S::pick(wv)?,
                    S::pick_opt(b)?,
                    &spec
                )))
            },
        )
    }

    /// 3-d convolution with zero padding, x `[B, Cin, T, H, W]`, w `[Cout, Cin, kt, kh, kw]`.
    /// Causal temporal padding is `pad[0] = (2, 0)` (or the cached past frames concatenated
    /// in front by the caller); a 2-d per-frame conv is `kernel[0] = 1`.
    pub fn conv3d(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        o: Conv3dOpts,
        out: DType,
    ) -> Result<Tensor> {
        let (batch, c_in, t, h, wd) = self.dims5()?;
        let (c_out, ci, kt, kh, kw) = w.dims5()?;
        let input = [t, h, wd];
        let kernel = [kt, kh, kw];
        let fits =
            (0..3).all(|i| input[i] + o.pad[i].0 + o.pad[i].1 >= kernel[i] && o.stride[i] > 0);
        if ci != c_in || !fits {
            return Err(Error::invalid(
                "conv3d",
                format!("x {:?}, w {:?}, {o:?}", self.shape(), w.shape()),
            ));
        }
        let spec = Conv3dSpec {
            batch,
            c_in,
            c_out,
            input,
            kernel,
            stride: o.stride,
            pad: o.pad,
            out,
        };
        let [a, b, c] = spec.out_dims();
        self.conv_common(
            "conv3d",
            w,
            bias,
            c_out,
            vec![batch, c_out, a, b, c],
            out,
            |x, wv, bs| {
                Ok(dispatch!(x, |s: S| s.conv3d(
                    S::pick(wv)?,
                    S::pick_opt(bs)?,
                    &spec
                )))
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_common(
        &self,
        op: &'static str,
        w: &Tensor,
        bias: Option<&Tensor>,
        c_out: usize,
        out_dims: Vec<usize>,
        out_dtype: DType,
        f: impl FnOnce(&Storage, &Storage, Option<&Storage>) -> Result<Storage>,
    ) -> Result<Tensor> {
        let mut all = vec![self, w];
        all.extend(bias);
        same_device(op, &all)?;
        not_fp8(op, &all)?;
        same_dtype(op, self, w)?;
        if let Some(b) = bias {
            expect_shape(op, b, &Shape::from(c_out))?;
        }
        let out = Shape::from(out_dims);
        let g = ReadAll::new(&[Some(self), Some(w), bias])?;
        Tensor::produce(&self.device(), out, out_dtype, 1.0, || {
            f(g.get(0)?, g.get(1)?, g.opt(2)?)
        })
    }

    /// Non-causal multi-head attention `softmax(scale·q·kᵀ + bias)·v`.
    /// q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]` (same dtype), optional f32 bias `[B or 1, H, Lq, Lk]`
    /// (relative-position bias, key mask as −inf); out `[B, Lq, H, D]` rounded to `out`.
    pub fn attention(
        &self,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        scale: f32,
        out: DType,
    ) -> Result<Tensor> {
        let (batch, lq, heads, head_dim) = self.dims4()?;
        let (kb, lk, kh, kd) = k.dims4()?;
        if (kb, kh, kd) != (batch, heads, head_dim) || v.dims() != k.dims() {
            return Err(Error::ShapeMismatch {
                op: "attention",
                lhs: self.shape().clone(),
                rhs: k.shape().clone(),
            });
        }
        let mut all = vec![self, k, v];
        all.extend(bias);
        same_device("attention", &all)?;
        not_fp8("attention", &all)?;
        same_dtype("attention", self, k)?;
        same_dtype("attention", self, v)?;
        let mut shared = true;
        if let Some(b) = bias {
            if b.dtype() != DType::F32 {
                return Err(Error::DTypeMismatch {
                    op: "attention bias",
                    expected: DType::F32,
                    got: b.dtype(),
                });
            }
            shared = b.dims()[..1] == [1];
            let want = Shape::from((if shared { 1 } else { batch }, heads, lq, lk));
            expect_shape("attention bias", b, &want)?;
        }
        let spec = AttnSpec {
            batch,
            lq,
            lk,
            heads,
            head_dim,
            scale,
            bias_shared_over_batch: shared,
            out,
        };
        let g = ReadAll::new(&[Some(self), Some(k), Some(v), bias])?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.attention(
                S::pick(g.get(1)?)?,
                S::pick(g.get(2)?)?,
                S::pick_opt(g.opt(3)?)?,
                &spec
            )))
        })
    }

    /// Interleaved-pair RoPE (model-spec §3.4) on x `[B, L, H, D]` with per-token f32 tables
    /// cos/sin `[L, D/2]` (already rounded as the caller wants, e.g. to f16): the complex
    /// product is formed in f64, rounded to f32, then to `out`.
    pub fn rope_interleaved(&self, cos: &Tensor, sin: &Tensor, out: DType) -> Result<Tensor> {
        let (b, l, h, d) = self.dims4()?;
        if d % 2 != 0 {
            return Err(Error::invalid(
                "rope_interleaved",
                format!("odd head dim {d}"),
            ));
        }
        same_device("rope_interleaved", &[self, cos, sin])?;
        not_fp8("rope_interleaved", &[self])?;
        for t in [cos, sin] {
            expect_shape("rope_interleaved", t, &Shape::from((l, d / 2)))?;
            if t.dtype() != DType::F32 {
                return Err(Error::DTypeMismatch {
                    op: "rope_interleaved",
                    expected: DType::F32,
                    got: t.dtype(),
                });
            }
        }
        let g = ReadAll::new(&[Some(self), Some(cos), Some(sin)])?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.rope_interleaved(
                S::pick(g.get(1)?)?,
                S::pick(g.get(2)?)?,
                b,
                l,
                h,
                d,
                out
            )))
        })
    }
}
