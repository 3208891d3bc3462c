//! `Encoder3d`: video `[1, 3, T, H, W]` → `[1, 2·z, T', H/8, W/8]` chunk by chunk with caches.

use super::layers::{AttentionBlock, Caches, CausalConv3d, ResampleMode, ResidualBlock, RmsNorm};
use super::{Stage, VaeConfig};
use crate::models::vars::Vars;
use crate::{DType, Result, Tensor};

#[derive(Debug)]
pub struct Encoder3d {
    conv1: CausalConv3d,
    downsamples: Vec<Stage>,
    middle: (ResidualBlock, AttentionBlock, ResidualBlock),
    head_norm: RmsNorm,
    head_conv: CausalConv3d,
}

impl Encoder3d {
    pub fn load(vb: &Vars, cfg: &VaeConfig) -> Result<Self> {
        let dims = cfg.encoder_dims();
        let conv1 = CausalConv3d::load(&vb.pp("conv1"), 3, dims[0], [3; 3], [1; 3])?;
        let mut downsamples = Vec::new();
        let ds = vb.pp("downsamples");
        let stages = cfg.dim_mult.len();
        for i in 0..stages {
            let (mut cin, cout) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let vb = ds.pp(downsamples.len());
                downsamples.push(Stage::Res(Box::new(ResidualBlock::load(&vb, cin, cout)?)));
                cin = cout;
            }
            if i + 1 < stages {
                let mode = if cfg.temporal_downsample[i] {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                let vb = ds.pp(downsamples.len());
                downsamples.push(Stage::Resample(Box::new(super::layers::Resample::load(
                    &vb, cout, mode,
                )?)));
            }
        }
        let top = dims[stages];
        let m = vb.pp("middle");
        let h = vb.pp("head");
        Ok(Self {
            conv1,
            downsamples,
            middle: (
                ResidualBlock::load(&m.pp(0), top, top)?,
                AttentionBlock::load(&m.pp(1), top)?,
                ResidualBlock::load(&m.pp(2), top, top)?,
            ),
            head_norm: RmsNorm::load(&h.pp(0), top, false)?,
            head_conv: CausalConv3d::load(&h.pp(2), top, 2 * cfg.z_dim, [3; 3], [1; 3])?,
        })
    }

    /// One chunk (1 frame first, then 4 frames) through the cached encoder.
    pub fn forward(&self, x: &Tensor, caches: &mut Caches, act: DType) -> Result<Tensor> {
        caches.rewind();
        let mut x = self.conv1.forward_cached(x, caches, act)?;
        for s in &self.downsamples {
            x = s.forward(&x, caches, act)?;
        }
        x = self.middle.0.forward(&x, caches, act)?;
        x = self.middle.1.forward(&x, act)?;
        x = self.middle.2.forward(&x, caches, act)?;
        self.head_conv
            .forward_normed(&self.head_norm, &x, caches, act)
    }
}
