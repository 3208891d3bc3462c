//! Linear layers and the attention module shared by self-attention, text cross-attention and
//! the audio injectors: q/k/v/o projections with full-width q/k RMSNorm (model-spec §3.3.1).

use super::super::VarBuilder;
use crate::{DType, Result, Tensor};

/// `nn.Linear` with `[out, in]` weight; the input is cast to the weight's dtype first, as the
/// reference does (`F.linear(x.to(act), ...)`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(vb: &VarBuilder, out: usize, inp: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[out, inp])?,
            bias: Some(vb.get("bias", &[out])?),
        })
    }

    /// The same layer with f32 weights (the reference's fp32 autocast regions: time MLPs,
    /// head, audio encoder).
    pub fn to_f32(&self) -> Result<Self> {
        let _g = crate::memory::scope(crate::memory::Category::Weights);
        Ok(Self {
            weight: self.weight.to_dtype(DType::F32)?,
            bias: self
                .bias
                .as_ref()
                .map(|b| b.to_dtype(DType::F32))
                .transpose()?,
        })
    }

    /// Replace the weight by its per-tensor FP8 e4m3 quantisation (model-spec §8.1); the
    /// bias stays in its dtype.
    pub fn quantize_fp8(&mut self) -> Result<()> {
        if self.weight.dtype() != DType::F8E4M3 {
            let _g = crate::memory::scope(crate::memory::Category::Weights);
            self.weight = self.weight.quantize_fp8()?;
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.dtype() == DType::F8E4M3 {
            // §8.1: dynamic per-tensor activation scale, f32 accumulation, bf16 output, then
            // back to the input's dtype.
            return x.fp8_linear(&self.weight, self.bias.as_ref(), x.dtype());
        }
        x.to_dtype(self.weight.dtype())?
            .linear(&self.weight, self.bias.as_ref())
    }
}

/// `WanRMSNorm` over the full width: f32 statistics, rounded to x's dtype, × weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[dim])?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(Some(&self.weight), self.eps)
    }
}

/// `WanSelfAttention` / `WanCrossAttention` parameters (`q`, `k`, `v`, `o`, `norm_q`, `norm_k`).
#[derive(Debug, Clone)]
pub struct WanAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
    pub num_heads: usize,
}

impl WanAttention {
    pub fn load(vb: &VarBuilder, dim: usize, num_heads: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            q: Linear::load(&vb.pp("q"), dim, dim)?,
            k: Linear::load(&vb.pp("k"), dim, dim)?,
            v: Linear::load(&vb.pp("v"), dim, dim)?,
            o: Linear::load(&vb.pp("o"), dim, dim)?,
            norm_q: RmsNorm::load(&vb.pp("norm_q"), dim, eps)?,
            norm_k: RmsNorm::load(&vb.pp("norm_k"), dim, eps)?,
            num_heads,
        })
    }

    /// FP8 for q, k, v and o (§8.1).
    pub fn quantize_fp8(&mut self) -> Result<()> {
        for l in [&mut self.q, &mut self.k, &mut self.v, &mut self.o] {
            l.quantize_fp8()?;
        }
        Ok(())
    }

    /// `[.., L, dim]` → `[B, L, heads, head_dim]` with B the product of the leading dims.
    pub fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (l, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let b = x.elem_count() / (l * d).max(1);
        x.reshape((b, l, self.num_heads, d / self.num_heads))
    }

    /// RMSNorm_q(Wq·x) as heads.
    pub fn query(&self, x: &Tensor) -> Result<Tensor> {
        self.heads(&self.norm_q.forward(&self.q.forward(x)?)?)
    }

    /// (RMSNorm_k(Wk·x), Wv·x) as heads.
    pub fn key_value(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.heads(&self.norm_k.forward(&self.k.forward(x)?)?)?;
        let v = self.heads(&self.v.forward(x)?)?;
        Ok((k, v))
    }

    /// Output projection of attention heads `[B, L, H, d]` → `[B, L, dim]`.
    pub fn out(&self, heads: &Tensor) -> Result<Tensor> {
        let (b, l, h, d) = heads.dims4()?;
        self.o.forward(&heads.reshape((b, l, h * d))?)
    }
}

/// Unmasked multi-head attention with scale 1/√head_dim, output in q's dtype.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dims()[q.rank() - 1];
    q.attention(k, v, None, 1.0 / (d as f32).sqrt(), q.dtype())
}
