//! `WanAttentionBlock` (model-spec §3.3.1) with the reference's eager dtype flow: bf16 between
//! blocks, an f32 residual inside, norm1 output rounded to the activation dtype before the
//! modulation, norm2 on the f32 residual without rounding.

use super::super::VarBuilder;
use super::attention::{Linear, WanAttention, sdpa};
use super::config::WanConfig;
use crate::{DType, Result, Tensor};

/// Where the self-attention keys and values come from and go to: the prefill stores the sink,
/// a streaming call writes its block into the ring and attends to ring + sink.
pub trait SelfAttnKv {
    /// q, k, v: RMS-normed heads `[1, L, H, d]` (not yet rotated) of layer `layer`; returns
    /// the attention output heads `[1, L, H, d]`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
}

/// One of the `blocks.{i}`.
#[derive(Debug, Clone)]
pub struct WanAttentionBlock {
    pub modulation: Tensor,
    pub self_attn: WanAttention,
    pub cross_attn: WanAttention,
    pub norm3_weight: Tensor,
    pub norm3_bias: Tensor,
    pub ffn_0: Linear,
    pub ffn_2: Linear,
    pub eps: f32,
}

impl WanAttentionBlock {
    pub fn load(vb: &VarBuilder, c: &WanConfig) -> Result<Self> {
        let d = c.dim;
        Ok(Self {
            modulation: vb.get_as("modulation", &[1, 6, d], DType::F32)?,
            self_attn: WanAttention::load(&vb.pp("self_attn"), d, c.num_heads, c.eps)?,
            cross_attn: WanAttention::load(&vb.pp("cross_attn"), d, c.num_heads, c.eps)?,
            norm3_weight: vb.pp("norm3").get("weight", &[d])?,
            norm3_bias: vb.pp("norm3").get("bias", &[d])?,
            ffn_0: Linear::load(&vb.pp("ffn").pp("0"), c.ffn_dim, d)?,
            ffn_2: Linear::load(&vb.pp("ffn").pp("2"), d, c.ffn_dim)?,
            eps: c.eps,
        })
    }

    /// Text K/V of this block's cross-attention (constant for a generation).
    pub fn text_kv(&self, text: &Tensor) -> Result<(Tensor, Tensor)> {
        self.cross_attn.key_value(text)
    }

    /// x `[1, L, dim]` in the activation dtype; e0 `[G, 6, dim]` f32 for G equal token groups
    /// (latent frames); `text_kv` from [`WanAttentionBlock::text_kv`].
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        e0: &Tensor,
        kv: &mut dyn SelfAttnKv,
        text_kv: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let act = x.dtype();
        let (_, seq, d) = x.dims3()?;
        let g = e0.dim(0)?;
        let grouped = |t: &Tensor| t.reshape((g, seq / g, d));
        let tokens = |t: &Tensor| t.reshape((1, seq, d));
        // Chunks 0..5: shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn.
        let m = self.modulation.add(e0)?;
        let c = |j: usize| m.narrow(1, j, 1);
        let (sh_sa, sc_sa, g_sa) = (c(0)?, c(1)?, c(2)?);
        let (sh_ff, sc_ff, g_ff) = (c(3)?, c(4)?, c(5)?);

        let a = x.layer_norm(None, None, self.eps, act)?;
        let a = tokens(&grouped(&a)?.modulate(&sc_sa, &sh_sa, act)?)?;
        let q = self.self_attn.query(&a)?;
        let (k, v) = self.self_attn.key_value(&a)?;
        let y = self.self_attn.out(&kv.attend(layer, &q, &k, &v)?)?;
        let x1 = grouped(x)?.gated_residual(&grouped(&y)?, &g_sa, DType::F32)?;

        let u = tokens(&x1)?.to_dtype(act)?.layer_norm(
            Some(&self.norm3_weight),
            Some(&self.norm3_bias),
            self.eps,
            act,
        )?;
        let q = self.cross_attn.query(&u)?;
        let o = self.cross_attn.out(&sdpa(&q, &text_kv.0, &text_kv.1)?)?;
        let x2 = tokens(&x1)?.binary_to(&o, crate::device::BinaryOp::Add, DType::F32)?;

        let b = x2.layer_norm(None, None, self.eps, DType::F32)?;
        let b = tokens(&grouped(&b)?.modulate(&sc_ff, &sh_ff, act)?)?;
        let y2 = self.ffn_2.forward(&self.ffn_0.forward(&b)?.gelu_tanh()?)?;
        let x3 = grouped(&x2)?.gated_residual(&grouped(&y2)?, &g_ff, DType::F32)?;
        tokens(&x3)?.to_dtype(act)
    }
}
