//! `Decoder3d`: one latent frame `[1, z, 1, h, w]` → 1 (first) or 4 video frames, with the
//! causal caches of a continuous stream (model-spec §6.4).

use super::layers::{AttentionBlock, Caches, CausalConv3d, ResampleMode, ResidualBlock, RmsNorm};
use super::{Stage, VaeConfig};
use crate::models::vars::Vars;
use crate::{DType, Result, Tensor};

#[derive(Debug)]
pub struct Decoder3d {
    conv1: CausalConv3d,
    middle: (ResidualBlock, AttentionBlock, ResidualBlock),
    upsamples: Vec<Stage>,
    head_norm: RmsNorm,
    head_conv: CausalConv3d,
}

impl Decoder3d {
    pub fn load(vb: &Vars, cfg: &VaeConfig) -> Result<Self> {
        let dims = cfg.decoder_dims();
        let top = dims[0];
        let stages = cfg.dim_mult.len();
        let tup: Vec<bool> = cfg.temporal_downsample.iter().rev().copied().collect();
        let us = vb.pp("upsamples");
        let mut upsamples = Vec::new();
        for i in 0..stages {
            // Stages after the first take half the width: the upsample conv halves it.
            let mut cin = if i == 0 { dims[i] } else { dims[i] / 2 };
            let cout = dims[i + 1];
            for _ in 0..=cfg.num_res_blocks {
                let vb = us.pp(upsamples.len());
                upsamples.push(Stage::Res(Box::new(ResidualBlock::load(&vb, cin, cout)?)));
                cin = cout;
            }
            if i + 1 < stages {
                let mode = if tup[i] {
                    ResampleMode::Upsample3d
                } else {
                    ResampleMode::Upsample2d
                };
                let vb = us.pp(upsamples.len());
                upsamples.push(Stage::Resample(Box::new(super::layers::Resample::load(
                    &vb, cout, mode,
                )?)));
            }
        }
        let last = dims[stages];
        let m = vb.pp("middle");
        let h = vb.pp("head");
        Ok(Self {
            conv1: CausalConv3d::load(&vb.pp("conv1"), cfg.z_dim, top, [3; 3], [1; 3])?,
            middle: (
                ResidualBlock::load(&m.pp(0), top, top)?,
                AttentionBlock::load(&m.pp(1), top)?,
                ResidualBlock::load(&m.pp(2), top, top)?,
            ),
            upsamples,
            head_norm: RmsNorm::load(&h.pp(0), last, false)?,
            head_conv: CausalConv3d::load(&h.pp(2), last, 3, [3; 3], [1; 3])?,
        })
    }

    /// One latent frame (after conv2) through the cached decoder, output in `act`.
    pub fn forward(&self, x: &Tensor, caches: &mut Caches, act: DType) -> Result<Tensor> {
        caches.rewind();
        let mut x = self.conv1.forward_cached(x, caches, act)?;
        x = self.middle.0.forward(&x, caches, act)?;
        x = self.middle.1.forward(&x, act)?;
        x = self.middle.2.forward(&x, caches, act)?;
        for s in &self.upsamples {
            x = s.forward(&x, caches, act)?;
        }
        self.head_conv
            .forward_normed(&self.head_norm, &x, caches, act)
    }
}
