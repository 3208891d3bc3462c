//! Model specifications as data (configs/models/*.toml), one source of truth for the planner
//! and the runtime.

use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};

/// The whole Live Avatar model family member: DiT, streaming settings and the three encoders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub description: String,
    pub dit: DitSpec,
    pub stream: StreamSpec,
    pub t5: T5Spec,
    pub vae: VaeSpec,
    pub wav2vec2: Wav2Vec2Spec,
}

/// `CausalWanModel_S2V` (model-spec §1.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitSpec {
    pub dim: u64,
    pub ffn_dim: u64,
    pub num_heads: u64,
    pub num_layers: u64,
    pub patch_size: [u64; 3],
    pub in_dim: u64,
    pub out_dim: u64,
    pub text_dim: u64,
    pub text_len: u64,
    pub freq_dim: u64,
    pub cond_dim: u64,
    pub audio_dim: u64,
    pub audio_layers: u64,
    pub num_audio_token: u64,
    pub audio_inject_layers: Vec<u64>,
    pub framepack_buckets: [u64; 3],
    pub motion_frames: u64,
    pub rope_max_positions: u64,
}

impl DitSpec {
    pub fn head_dim(&self) -> u64 {
        self.dim / self.num_heads
    }

    /// Input features of one patch: in_dim · pt · ph · pw (64 for the real model).
    pub fn patch_features(&self) -> u64 {
        self.in_dim * self.patch_size.iter().product::<u64>()
    }

    /// Latent frames of motion context: (motion_frames + 3) / 4 (19 for 73 frames).
    pub fn motion_latents(&self) -> u64 {
        self.motion_frames.div_ceil(4)
    }
}

/// LiveAvatar's streaming settings (model-spec §1.2, §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    pub frames_per_block: u64,
    pub latents_per_clip: u64,
    pub infer_frames: u64,
    pub sample_fps: u64,
    pub sample_steps: u64,
    pub sample_shift: f64,
    pub liveavatar_sink_rows: u64,
}

/// umT5-XXL encoder (model-spec §1.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T5Spec {
    pub vocab: u64,
    pub dim: u64,
    pub ffn_dim: u64,
    pub num_heads: u64,
    pub num_layers: u64,
    pub num_buckets: u64,
}

/// Wan2.1 VAE (model-spec §1.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeSpec {
    pub z_dim: u64,
    pub base_dim: u64,
    pub dim_mult: Vec<u64>,
    pub num_res_blocks: u64,
    pub temporal_downsample: Vec<bool>,
    pub spatial_stride: u64,
    pub temporal_stride: u64,
}

/// wav2vec2-large-xlsr-53 (model-spec §1.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wav2Vec2Spec {
    pub conv_dim: u64,
    pub conv_kernel: Vec<u64>,
    pub conv_stride: Vec<u64>,
    pub hidden: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub ffn_dim: u64,
    pub pos_conv_kernel: u64,
    pub pos_conv_groups: u64,
    pub sample_rate: u64,
}

const BUILTIN: &[(&str, &str)] = &[
    ("s2v-14b", include_str!("../../configs/models/s2v-14b.toml")),
    ("tiny", include_str!("../../configs/models/tiny.toml")),
];

impl ModelSpec {
    /// Sets the per-request stream numbers: `infer_frames` video frames per clip (latent frames
    /// per clip = (infer_frames + 3 + motion_frames)/4 − motion latents, model-spec §1.2, a
    /// positive multiple of the block) and `sample_steps` denoising steps.
    pub fn set_workload(&mut self, infer_frames: u64, sample_steps: u64) -> Result<()> {
        let motion_latents = self.dit.motion_latents();
        let latents = (infer_frames + 3 + self.dit.motion_frames) / 4;
        let fpb = self.stream.frames_per_block;
        if infer_frames == 0
            || latents <= motion_latents
            || !(latents - motion_latents).is_multiple_of(fpb)
        {
            return Err(PlanError::Workload(format!(
                "--infer_frames {infer_frames} gives {} latent frames per clip, which is not a positive multiple of the {fpb}-frame block (48 gives 12)",
                latents.saturating_sub(motion_latents)
            )));
        }
        if sample_steps == 0 {
            return Err(PlanError::Workload(
                "--sample_steps must be at least 1".into(),
            ));
        }
        self.stream.latents_per_clip = latents - motion_latents;
        self.stream.infer_frames = infer_frames;
        self.stream.sample_steps = sample_steps;
        Ok(())
    }

    /// Names of the models compiled into the binary.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// A model compiled into the binary from configs/models/.
    pub fn builtin(name: &str) -> Result<Self> {
        let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) else {
            return Err(PlanError::ModelSpec {
                name: name.to_string(),
                reason: format!(
                    "not a built-in model (built-in: {})",
                    Self::builtin_names().join(", ")
                ),
            });
        };
        Self::from_toml(name, text)
    }

    /// Parse and validate a model spec.
    pub fn from_toml(name: &str, text: &str) -> Result<Self> {
        let spec: Self = toml::from_str(text).map_err(|e| PlanError::ModelSpec {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(PlanError::ModelSpec {
                name: self.name.clone(),
                reason,
            })
        };
        let d = &self.dit;
        if d.num_heads == 0 || !d.dim.is_multiple_of(d.num_heads) {
            return bad(format!(
                "dim {} is not divisible by num_heads {}",
                d.dim, d.num_heads
            ));
        }
        if !d.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even (RoPE pairs)",
                d.head_dim()
            ));
        }
        if d.num_audio_token == 0
            || !d.dim.is_multiple_of(d.num_audio_token)
            || !d.dim.is_multiple_of(2)
        {
            return bad(format!(
                "dim {} must split into num_audio_token {} groups",
                d.dim, d.num_audio_token
            ));
        }
        if let Some(l) = d.audio_inject_layers.iter().find(|l| **l >= d.num_layers) {
            return bad(format!(
                "audio_inject_layers names layer {l} of {}",
                d.num_layers
            ));
        }
        if d.num_layers == 0 || self.stream.frames_per_block == 0 || self.stream.sample_steps == 0 {
            return bad("num_layers, frames_per_block and sample_steps must be positive".into());
        }
        if !self
            .stream
            .latents_per_clip
            .is_multiple_of(self.stream.frames_per_block)
        {
            return bad("latents_per_clip must be a multiple of frames_per_block".into());
        }
        let v = &self.vae;
        if v.dim_mult.len() != v.temporal_downsample.len() + 1 {
            return bad("vae: temporal_downsample needs one entry per down stage".into());
        }
        let w = &self.wav2vec2;
        if w.conv_kernel.len() != w.conv_stride.len()
            || w.num_heads == 0
            || !w.hidden.is_multiple_of(w.num_heads)
        {
            return bad(
                "wav2vec2: conv_kernel/conv_stride lengths differ or heads do not divide hidden"
                    .into(),
            );
        }
        if w.hidden != d.audio_dim {
            return bad(format!(
                "wav2vec2 hidden {} differs from dit.audio_dim {}",
                w.hidden, d.audio_dim
            ));
        }
        if self.t5.dim != d.text_dim {
            return bad(format!(
                "t5 dim {} differs from dit.text_dim {}",
                self.t5.dim, d.text_dim
            ));
        }
        Ok(())
    }
}
