//! Token geometry of one streaming DiT call (model-spec §3.1).

use serde::Serialize;

use crate::spec::ModelSpec;

/// Everything about a resolution that sizes caches and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// Pixel height × width.
    pub height: u64,
    pub width: u64,
    /// Latent h × w (VAE stride).
    pub lat_h: u64,
    pub lat_w: u64,
    /// DiT tokens per latent frame: (h/2)·(w/2).
    pub fsl: u64,
    /// Query tokens of one streaming call: frames_per_block · fsl.
    pub lq: u64,
    /// Sink ("cond") tokens: reference + frame-pack post, 2x and 4x groups.
    pub lc: u64,
    /// Noisy KV ring: latents_per_clip · fsl.
    pub ring: u64,
    /// Keys of a steady-state call: ring + lc.
    pub lkv: u64,
    /// Text tokens after padding.
    pub text_len: u64,
}

impl Geometry {
    pub fn new(spec: &ModelSpec, height: u64, width: u64) -> Self {
        let stride = spec.vae.spatial_stride;
        let (lat_h, lat_w) = (height / stride, width / stride);
        let [_, ph, pw] = spec.dit.patch_size;
        let fsl = (lat_h / ph) * (lat_w / pw);
        let [_, b2, b4] = spec.dit.framepack_buckets;
        // 2x group: b2 latents in 2-frame patches of 4×4; 4x group: b4 latents in 4-frame patches of 8×8.
        let two_x = (b2 / 2) * (lat_h / (2 * ph)) * (lat_w / (2 * pw));
        let four_x = (b4 / 4) * (lat_h / (4 * ph)) * (lat_w / (4 * pw));
        let lc = fsl + fsl + two_x + four_x;
        let lq = spec.stream.frames_per_block * fsl;
        let ring = spec.stream.latents_per_clip * fsl;
        Self {
            height,
            width,
            lat_h,
            lat_w,
            fsl,
            lq,
            lc,
            ring,
            lkv: ring + lc,
            text_len: spec.dit.text_len,
        }
    }

    /// Keys of call `block` (0-based) of clip 0, before the ring is full.
    pub fn lkv_clip0(&self, block: u64) -> u64 {
        ((block + 1) * self.lq).min(self.ring) + self.lc
    }
}
