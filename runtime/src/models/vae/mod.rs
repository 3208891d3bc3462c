//! The Wan2.1 VAE (`Wan2.1_VAE.pth`, model-spec §1.5): causal 3-D conv encoder and decoder,
//! latent normalisation, and the streaming decode of §6.4 (one latent at a time, caches kept
//! across calls as one continuous stream).
//!
//! ```text
//! encode: video [1, 3, 1+4k, H, W] ─ frame 0, then 4-frame chunks ─▶ Encoder3d ─▶ conv1 (1×1×1)
//!         ─▶ mean half [1, z, 1+k, H/8, W/8] ─▶ (μ − mean_c)·(1/std_c)
//! decode: z ─▶ z / (1/std_c) + mean_c ─▶ conv2 (1×1×1) ─ one latent at a time ─▶ Decoder3d
//!         ─▶ clamp [−1, 1]   (1 frame for the stream's first latent, then 4 per latent)
//! ```

pub mod decoder;
pub mod encoder;
pub mod layers;

use planner::spec::VaeSpec;

use crate::{DType, Device, Error, Result, Tensor};
pub use decoder::Decoder3d;
pub use encoder::Encoder3d;
use layers::{Caches, CausalConv3d, Resample, ResidualBlock};

/// Per-channel latent mean (§1.5).
pub const LATENT_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
/// Per-channel latent standard deviation (§1.5).
pub const LATENT_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

/// Architecture sizes (Wan2.1: z 16, base 96, mult (1, 2, 4, 4), 2 res blocks, (F, T, T)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeConfig {
    pub z_dim: usize,
    pub base_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub temporal_downsample: Vec<bool>,
}

impl VaeConfig {
    pub fn from_spec(s: &VaeSpec) -> Result<Self> {
        let cfg = Self {
            z_dim: s.z_dim as usize,
            base_dim: s.base_dim as usize,
            dim_mult: s.dim_mult.iter().map(|&m| m as usize).collect(),
            num_res_blocks: s.num_res_blocks as usize,
            temporal_downsample: s.temporal_downsample.clone(),
        };
        if cfg.z_dim != LATENT_MEAN.len()
            || cfg.dim_mult.is_empty()
            || cfg.temporal_downsample.len() + 1 != cfg.dim_mult.len()
        {
            return Err(Error::invalid(
                "vae config",
                format!(
                    "{cfg:?}: z_dim must be 16 and temporal_downsample one shorter than dim_mult"
                ),
            ));
        }
        Ok(cfg)
    }
    /// base · [1, mult...].
    pub fn encoder_dims(&self) -> Vec<usize> {
        std::iter::once(1)
            .chain(self.dim_mult.iter().copied())
            .map(|m| self.base_dim * m)
            .collect()
    }
    /// base · [mult_last, mult reversed...].
    pub fn decoder_dims(&self) -> Vec<usize> {
        let top = self.base_dim * self.dim_mult.last().copied().unwrap_or(1);
        std::iter::once(top)
            .chain(self.dim_mult.iter().rev().map(|m| self.base_dim * m))
            .collect()
    }
    /// Temporal compression 2^(number of temporal stages).
    pub fn temporal_stride(&self) -> usize {
        1 << self.temporal_downsample.iter().filter(|&&t| t).count()
    }
}

/// An element of `downsamples` / `upsamples`.
#[derive(Debug)]
pub(crate) enum Stage {
    Res(Box<ResidualBlock>),
    Resample(Box<Resample>),
}

impl Stage {
    fn forward(&self, x: &Tensor, caches: &mut Caches, act: DType) -> Result<Tensor> {
        match self {
            Stage::Res(r) => r.forward(x, caches, act),
            Stage::Resample(r) => r.forward(x, caches, act),
        }
    }
}

/// The whole VAE (`WanVAE_`); `act` is the activation dtype (bf16 in production, f32 golden).
#[derive(Debug)]
pub struct WanVae {
    cfg: VaeConfig,
    encoder: Encoder3d,
    conv1: CausalConv3d,
    conv2: CausalConv3d,
    decoder: Decoder3d,
    /// [1, z, 1, 1, 1] f32.
    mean: Tensor,
    inv_std: Tensor,
    act: DType,
}

/// The decoder's causal caches: one continuous output stream (never reset between clips).
#[derive(Debug, Default)]
pub struct DecodeStream {
    caches: Caches,
    latents: usize,
}

impl DecodeStream {
    pub fn new() -> Self {
        Self::default()
    }
    /// Latents decoded so far.
    pub fn latents(&self) -> usize {
        self.latents
    }
    /// (cache slots in use, bytes held).
    pub fn cache_usage(&self) -> (usize, usize) {
        self.caches.usage()
    }
}

impl WanVae {
    /// Load from a source keyed like `Wan2.1_VAE.pth`; weights converted to `act`. Every
    /// tensor of the source must belong to the model.
    pub fn load(root: &crate::models::vars::VarsRoot, cfg: VaeConfig) -> Result<Self> {
        let vb = root.vars();
        let z = cfg.z_dim;
        let dev = vb.device();
        let act = vb.dtype();
        let vae = Self {
            encoder: Encoder3d::load(&vb.pp("encoder"), &cfg)?,
            conv1: CausalConv3d::load(&vb.pp("conv1"), 2 * z, 2 * z, [1; 3], [1; 3])?,
            conv2: CausalConv3d::load(&vb.pp("conv2"), z, z, [1; 3], [1; 3])?,
            decoder: Decoder3d::load(&vb.pp("decoder"), &cfg)?,
            mean: Tensor::from_vec(LATENT_MEAN.to_vec(), (1, z, 1, 1, 1), &dev)?,
            // The reference keeps 1/std as its scale and divides by it to decode.
            inv_std: Tensor::from_vec(
                LATENT_STD.iter().map(|s| 1.0 / s).collect::<Vec<f32>>(),
                (1, z, 1, 1, 1),
                &dev,
            )?,
            act,
            cfg,
        };
        root.check_all_used(|_| false)?;
        Ok(vae)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Normalised latent means of `video` `[1, 3, 1 + 4k, H, W]` in [−1, 1] (H, W multiples
    /// of 8): `[1, z, 1 + k, H/8, W/8]` f32. Encoder caches are fresh for each call.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = video.dims5()?;
        let ts = self.cfg.temporal_stride();
        let ss = 1 << (self.cfg.dim_mult.len() - 1);
        if b != 1 || c != 3 || t == 0 || (t - 1) % ts != 0 || h % ss != 0 || w % ss != 0 {
            return Err(Error::invalid(
                "vae encode",
                format!(
                    "video {:?}: want [1, 3, 1 + {ts}k, H, W] with H, W multiples of {ss}",
                    video.dims()
                ),
            ));
        }
        let mut caches = Caches::new();
        let mut outs =
            vec![
                self.encoder
                    .forward(&video.narrow(2, 0, 1)?, &mut caches, self.act)?,
            ];
        for i in 0..(t - 1) / ts {
            let chunk = video.narrow(2, 1 + ts * i, ts)?;
            outs.push(self.encoder.forward(&chunk, &mut caches, self.act)?);
        }
        let refs: Vec<&Tensor> = outs.iter().collect();
        let mu = self
            .conv1
            .forward(&Tensor::cat(&refs, 2)?, None, self.act)?
            .narrow(1, 0, self.cfg.z_dim)?
            .to_dtype(DType::F32)?;
        mu.sub(&self.mean)?.mul(&self.inv_std)
    }

    /// Encode one frame `[1, 3, 1, H, W]` repeated `n = 1 + 4k` times: the reference image
    /// (n = 1) and the 73-frame motion context (19 latents) of model-spec §4.6 and §10.2.
    pub fn encode_repeated(&self, frame: &Tensor, n: usize) -> Result<Tensor> {
        if frame.dims5()?.2 != 1 || n == 0 {
            return Err(Error::invalid(
                "vae encode_repeated",
                format!("frame {:?} × {n}: want one frame, n ≥ 1", frame.dims()),
            ));
        }
        let copies: Vec<&Tensor> = std::iter::repeat_n(frame, n).collect();
        self.encode(&Tensor::cat(&copies, 2)?)
    }

    /// Decode latents `z` `[1, z, n, h, w]` (normalised) one at a time through `stream`'s
    /// caches: `[1, 3, frames, 8h, 8w]` f32 in [−1, 1], frames = 4n, or 4n − 3 when these are
    /// the stream's first latents.
    pub fn decode_stream(&self, stream: &mut DecodeStream, z: &Tensor) -> Result<Tensor> {
        let (b, c, n, _, _) = z.dims5()?;
        if b != 1 || c != self.cfg.z_dim || n == 0 {
            return Err(Error::invalid(
                "vae decode",
                format!(
                    "latents {:?}: want [1, {}, n ≥ 1, h, w]",
                    z.dims(),
                    self.cfg.z_dim
                ),
            ));
        }
        let z = z
            .to_dtype(DType::F32)?
            .div(&self.inv_std)?
            .add(&self.mean)?;
        let x = self.conv2.forward(&z, None, self.act)?;
        let mut outs = Vec::with_capacity(n);
        for i in 0..n {
            let frames = self
                .decoder
                .forward(&x.narrow(2, i, 1)?, &mut stream.caches, self.act)?;
            outs.push(frames.to_dtype(DType::F32)?.clamp(-1.0, 1.0)?);
            stream.latents += 1;
        }
        let refs: Vec<&Tensor> = outs.iter().collect();
        Tensor::cat(&refs, 2)
    }

    /// Prime `stream` with latents whose frames are discarded (the first 7 motion latents, §6.4).
    pub fn prime(&self, stream: &mut DecodeStream, z: &Tensor) -> Result<()> {
        self.decode_stream(stream, z).map(|_| ())
    }

    pub fn device(&self) -> Device {
        self.mean.device()
    }
}
