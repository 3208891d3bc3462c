//! `head` (model-spec §3.3 steps 7–8): LayerNorm, per-frame modulation with
//! head.modulation + the time embedding, Linear in f32; then unpatchify.

use super::super::VarBuilder;
use super::attention::Linear;
use super::block::FrameRuns;
use super::config::WanConfig;
use crate::{DType, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Head {
    /// `head.modulation` `[1, 2, dim]` in f32: chunk 0 shift, chunk 1 scale.
    pub modulation: Tensor,
    /// `head.head` in f32 (never FP8).
    pub head: Linear,
    pub eps: f32,
    pub out_dim: usize,
}

impl Head {
    pub fn load(vb: &VarBuilder, c: &WanConfig) -> Result<Self> {
        Ok(Self {
            modulation: vb.get_as("modulation", &[1, 2, c.dim], DType::F32)?,
            head: Linear::load(&vb.pp("head"), 4 * c.out_dim, c.dim)?.to_f32()?,
            eps: c.eps,
            out_dim: c.out_dim,
        })
    }

    /// x `[1, t, dim]` (this rank's tokens, activation dtype), e `[F, dim]` f32, `runs`
    /// mapping tokens to frames → `[1, t, 4·out_dim]` in x's dtype.
    pub fn forward(&self, x: &Tensor, e: &Tensor, runs: &FrameRuns) -> Result<Tensor> {
        let act = x.dtype();
        let a = x.layer_norm(None, None, self.eps, act)?;
        let m = self.modulation.add(&e.unsqueeze(1)?)?;
        runs.map(&[&a], &[&m], |a, m| {
            let (shift, scale) = (m[0].narrow(1, 0, 1)?, m[0].narrow(1, 1, 1)?);
            let a = a[0].modulate(&scale, &shift, DType::F32)?;
            self.head.forward(&a)?.to_dtype(act)
        })
    }

    /// `[1, F·hp·wp, 4·C]` with per-token order (pt, ph, pw, c), c fastest →
    /// latents `[C, F, 2hp, 2wp]`.
    pub fn unpatchify(&self, y: &Tensor, frames: usize, hp: usize, wp: usize) -> Result<Tensor> {
        let c = self.out_dim;
        y.reshape(vec![frames, hp, wp, 1, 2, 2, c])?
            .permute(&[6, 0, 3, 1, 4, 2, 5])?
            .reshape((c, frames, 2 * hp, 2 * wp))
    }
}
