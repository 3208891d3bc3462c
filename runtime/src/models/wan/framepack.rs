//! `frame_packer` (FramePackMotioner, model-spec §4.2 step 2): the last 19 motion latents,
//! oldest first, split 16 / 2 / 1 and patchified by proj_4x (4×8×8), proj_2x (2×4×4) and
//! proj (1×2×2); sequence order post, 2x, 4x.

use super::super::VarBuilder;
use super::config::WanConfig;
use super::embed::PatchConv;
use crate::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct FramePacker {
    pub proj: PatchConv,
    pub proj_2x: PatchConv,
    pub proj_4x: PatchConv,
    /// Latents of the post / 2x / 4x groups (1, 2, 16).
    pub buckets: [usize; 3],
}

impl FramePacker {
    pub fn load(vb: &VarBuilder, c: &WanConfig) -> Result<Self> {
        Ok(Self {
            proj: PatchConv::load(&vb.pp("proj"), c.dim, c.in_dim, [1, 2, 2])?,
            proj_2x: PatchConv::load(&vb.pp("proj_2x"), c.dim, c.in_dim, [2, 4, 4])?,
            proj_4x: PatchConv::load(&vb.pp("proj_4x"), c.dim, c.in_dim, [4, 8, 8])?,
            buckets: c.framepack_buckets,
        })
    }

    /// Motion latents `[C, T, h, w]` (oldest first) → tokens `[1, Lc − fsl, dim]`.
    pub fn forward(&self, motion: &Tensor) -> Result<Tensor> {
        let [b1, b2, b4] = self.buckets;
        let n = b1 + b2 + b4;
        let (c, t, h, w) = motion.dims4()?;
        let m = if t >= n {
            motion.narrow(1, t - n, n)?
        } else {
            let zeros = Tensor::zeros((c, n - t, h, w), motion.dtype(), &motion.device())?;
            Tensor::cat(&[&zeros, motion], 1)?
        };
        let m4 = m.narrow(1, 0, b4)?;
        let m2 = m.narrow(1, b4, b2)?;
        let m1 = m.narrow(1, b4 + b2, b1)?;
        Tensor::cat(
            &[
                &self.proj.forward(&m1)?,
                &self.proj_2x.forward(&m2)?,
                &self.proj_4x.forward(&m4)?,
            ],
            1,
        )
    }
}
