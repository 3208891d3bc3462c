//! Fused ops of the DiT block (model-spec §3.3.1): the residual / LayerNorm / modulation chain
//! and q/k RMSNorm + RoPE in one pass each, with the rounding points of the unfused ops, plus
//! the row-range copy and prefix attention the streaming KV cache uses without concatenating.

use super::ops::{dispatch, expect_shape, not_fp8, same_device};
use super::{ReadAll, Shape, Tensor, track};
use crate::device::{AttnSpec, BackendStorage, CpuStorage, CudaStorage, ResNormSpec, Storage};
use crate::{DType, Error, Result};

use super::ops::Pick;

/// What [`Tensor::res_norm_mod`] computes; see [`ResNormSpec`] for the arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct ResNormMod<'a> {
    /// `y` added to x before the norm (`x + y`, or `x + y·gate` with a gate).
    pub add: Option<&'a Tensor>,
    /// Per-group gate `[groups, cols]` (any shape with that element count).
    pub gate: Option<&'a Tensor>,
    /// Also return the residual `x (+ …)`, rounded to this dtype.
    pub keep_residual: Option<DType>,
    /// The dtype the residual is rounded to before the LayerNorm.
    pub ln_in: DType,
    /// LayerNorm affine parameters `[cols]`.
    pub weight: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
    pub eps: f32,
    /// The dtype the normalised value is rounded to before the modulation.
    pub norm: DType,
    /// Per-group (scale, shift) `[groups, cols]`: `n·(1 + scale) + shift`.
    pub modulate: Option<(&'a Tensor, &'a Tensor)>,
    pub out: DType,
}

impl Tensor {
    /// The block's residual → LayerNorm → modulate chain in one pass over x `[.., cols]`
    /// (rows grouped evenly by the gate/scale/shift tables' leading groups). Returns
    /// (the residual if `keep_residual`, the output), both shaped like x.
    pub fn res_norm_mod(&self, o: &ResNormMod<'_>) -> Result<(Option<Tensor>, Tensor)> {
        let (rows, cols) = self.shape().rows_cols();
        let mut all = vec![self];
        all.extend(o.add);
        all.extend(o.gate);
        all.extend(o.weight);
        all.extend(o.bias);
        if let Some((s, t)) = o.modulate {
            all.extend([s, t]);
        }
        same_device("res_norm_mod", &all)?;
        not_fp8("res_norm_mod", &all)?;
        if let Some(y) = o.add {
            expect_shape("res_norm_mod", y, self.shape())?;
        }
        for p in o.weight.iter().chain(o.bias.iter()) {
            expect_shape("res_norm_mod", p, &Shape::from(cols))?;
        }
        let tables: Vec<&Tensor> = o
            .gate
            .into_iter()
            .chain(o.modulate.into_iter().flat_map(|(s, t)| [s, t]))
            .collect();
        let groups = tables.first().map_or(1, |t| t.elem_count() / cols.max(1));
        for t in &tables {
            if t.elem_count() != groups * cols {
                return Err(Error::ShapeMismatch {
                    op: "res_norm_mod",
                    lhs: Shape::from((groups, cols)),
                    rhs: t.shape().clone(),
                });
            }
        }
        if o.gate.is_some() && o.add.is_none() {
            return Err(Error::invalid("res_norm_mod", "a gate without an addend"));
        }
        if groups == 0 || !rows.is_multiple_of(groups) {
            return Err(Error::invalid(
                "res_norm_mod",
                format!("{rows} rows do not split into {groups} groups"),
            ));
        }
        let spec = ResNormSpec {
            rows,
            cols,
            groups,
            eps: o.eps,
            res: o.keep_residual,
            ln_in: o.ln_in,
            norm: o.norm,
            out: o.out,
        };
        let (sc, sh) = (o.modulate.map(|m| m.0), o.modulate.map(|m| m.1));
        let g = ReadAll::new(&[Some(self), o.add, o.gate, o.weight, o.bias, sc, sh])?;
        let dev = self.device();
        let res_alloc = o
            .keep_residual
            .map(|d| track(&dev, d, rows * cols))
            .transpose()?;
        let out_alloc = track(&dev, o.out, rows * cols)?;
        let (res, out) = match g.get(0)? {
            Storage::Cpu(x) => {
                let (r, y) = run::<CpuStorage>(x, &g, &spec)?;
                (r.map(Storage::Cpu), Storage::Cpu(y))
            }
            Storage::Cuda(x) => {
                let (r, y) = run::<CudaStorage>(x, &g, &spec)?;
                (r.map(Storage::Cuda), Storage::Cuda(y))
            }
        };
        let res = match (res, res_alloc) {
            (Some(r), Some(a)) => Some(Tensor::wrap(r, self.shape().clone(), a, 1.0)),
            _ => None,
        };
        Ok((res, Tensor::wrap(out, self.shape().clone(), out_alloc, 1.0)))
    }

    /// RMSNorm over the full width of x `[1, L, H, D]` (or `[L, H·D]`-shaped rows), × weight,
    /// then interleaved RoPE with per-token tables cos/sin `[L, D/2]`; equals
    /// `rms_norm(weight)` then `rope_interleaved(.., out)` (model-spec §3.3.3 steps 1–2).
    pub fn rms_norm_rope(
        &self,
        weight: &Tensor,
        eps: f32,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        out: DType,
    ) -> Result<Tensor> {
        let (rows, cols) = self.shape().rows_cols();
        same_device("rms_norm_rope", &[self, weight, cos, sin])?;
        not_fp8("rms_norm_rope", &[self, weight])?;
        if heads == 0 || !cols.is_multiple_of(heads) || !(cols / heads).is_multiple_of(2) {
            return Err(Error::invalid(
                "rms_norm_rope",
                format!("{cols} columns do not split into {heads} heads of even width"),
            ));
        }
        let hd = cols / heads;
        expect_shape("rms_norm_rope", weight, &Shape::from(cols))?;
        for t in [cos, sin] {
            expect_shape("rms_norm_rope", t, &Shape::from((rows, hd / 2)))?;
            if t.dtype() != DType::F32 {
                return Err(Error::DTypeMismatch {
                    op: "rms_norm_rope",
                    expected: DType::F32,
                    got: t.dtype(),
                });
            }
        }
        let norm = self.dtype().promote(weight.dtype());
        let g = ReadAll::new(&[Some(self), Some(weight), Some(cos), Some(sin)])?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.rms_norm_rope(
                S::pick(g.get(1)?)?,
                S::pick(g.get(2)?)?,
                S::pick(g.get(3)?)?,
                rows,
                heads,
                hd,
                eps,
                norm,
                out
            )))
        })
    }

    /// Copy rows `[src_row, src_row + n)` of `src` (dim 0) into rows `[dst_row, …)` of
    /// `self`, in place; rows are everything after dim 0 and must have equal sizes.
    pub fn copy_rows_from(
        &self,
        dst_row: usize,
        src: &Tensor,
        src_row: usize,
        n: usize,
    ) -> Result<()> {
        same_device("copy_rows_from", &[self, src])?;
        if self.same_storage(src) || src.dtype() != self.dtype() || self.rank() == 0 {
            return Err(Error::invalid(
                "copy_rows_from",
                "needs distinct buffers of one dtype",
            ));
        }
        let row = self.elem_count() / self.dims()[0].max(1);
        let src_rows = src.dims().first().copied().unwrap_or(0);
        if src.elem_count() != src_rows * row
            || src_row + n > src_rows
            || dst_row + n > self.dims()[0]
        {
            return Err(Error::ShapeMismatch {
                op: "copy_rows_from",
                lhs: self.shape().clone(),
                rhs: src.shape().clone(),
            });
        }
        let s = src.storage()?;
        let mut d = self.storage_mut()?;
        super::layout::copy2d(
            &s,
            &mut d,
            1,
            n * row,
            n * row,
            src_row * row,
            n * row,
            dst_row * row,
        )
    }

    /// Attention of q `[1, Lq, H, D]` over the first `lk` rows of the key/value buffers
    /// `[Lk_max, H, D]`, `[Lv_max, H, D]` (a cache whose valid keys form a prefix; keys are unmasked, so their
    /// order does not matter), scale 1/√D, output in q's dtype.
    pub fn attention_prefix(&self, k: &Tensor, v: &Tensor, lk: usize) -> Result<Tensor> {
        let (batch, lq, heads, head_dim) = self.dims4()?;
        let (kl, kh, kd) = k.dims3()?;
        let (vl, vh, vd) = v.dims3()?;
        if batch != 1 || (kh, kd) != (heads, head_dim) || (vh, vd) != (kh, kd) || lk > kl.min(vl) {
            return Err(Error::ShapeMismatch {
                op: "attention_prefix",
                lhs: self.shape().clone(),
                rhs: k.shape().clone(),
            });
        }
        same_device("attention_prefix", &[self, k, v])?;
        not_fp8("attention_prefix", &[self, k, v])?;
        if k.dtype() != self.dtype() || v.dtype() != self.dtype() {
            return Err(Error::DTypeMismatch {
                op: "attention_prefix",
                expected: self.dtype(),
                got: k.dtype(),
            });
        }
        let out = self.dtype();
        let spec = AttnSpec {
            batch: 1,
            lq,
            lk,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            bias_shared_over_batch: true,
            out,
        };
        let g = ReadAll::new(&[Some(self), Some(k), Some(v)])?;
        Tensor::produce(&self.device(), self.shape().clone(), out, 1.0, || {
            Ok(dispatch!(g.get(0)?, |x: S| x.attention(
                S::pick(g.get(1)?)?,
                S::pick(g.get(2)?)?,
                None,
                &spec
            )))
        })
    }
}

#[allow(clippy::type_complexity)]
fn run<S: Pick>(x: &S, g: &ReadAll<'_>, spec: &ResNormSpec) -> Result<(Option<S>, S)> {
    x.res_norm_mod(
        S::pick_opt(g.opt(1)?)?,
        S::pick_opt(g.opt(2)?)?,
        S::pick_opt(g.opt(3)?)?,
        S::pick_opt(g.opt(4)?)?,
        S::pick_opt(g.opt(5)?)?,
        S::pick_opt(g.opt(6)?)?,
        spec,
    )
}
