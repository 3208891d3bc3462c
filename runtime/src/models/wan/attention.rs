//! The plain linear layer of the parts that are never tensor-parallel (embeddings, time MLPs,
//! head, AdaLN, audio encoder) and the attention kernel call. The attention module shared by
//! self-attention, text cross-attention and the audio injectors (q/k/v/o with full-width q/k
//! RMSNorm, model-spec §3.3.1) is `parallel::TpAttention`: at tp = 1 it is the unsharded one.

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

/// Unmasked multi-head attention with scale 1/√head_dim, output in q's dtype.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dims()[q.rank() - 1];
    q.attention(k, v, None, 1.0 / (d as f32).sqrt(), q.dtype())
}
