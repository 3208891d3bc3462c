//! `CausalWanModel_S2V` configuration (model-spec §1.1), taken from the planner's model spec
//! (configs/models/*.toml) so there is one source of truth, and checked against the
//! checkpoint's config.json; plus the streaming geometry of one resolution (§3.1).

use crate::weights::CheckpointErrorKind;
use crate::{Error, Result};

/// Reference frame's temporal RoPE index in the prefill (§3.4).
pub const REF_TIME: i64 = 30;
/// Temporal RoPE indices of the four 4x frame-pack patches (§3.4).
pub const FRAMEPACK_TIMES_4X: [i64; 4] = [-19, -14, -9, -4];
/// §4.5: the relative distance of the reference frame is drawn from this range.
pub const RELATIVE_DIST_RANGE: std::ops::RangeInclusive<u32> = 4..=30;

/// The DiT's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct WanConfig {
    pub dim: usize,
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    pub text_dim: usize,
    pub text_len: usize,
    pub freq_dim: usize,
    pub cond_dim: usize,
    pub audio_dim: usize,
    /// wav2vec2 hidden states averaged by `casual_audio_encoder.weights` (25).
    pub audio_layers: usize,
    pub num_audio_token: usize,
    pub audio_inject_layers: Vec<usize>,
    /// Latent frames of the post / 2x / 4x frame-pack groups (1, 2, 16).
    pub framepack_buckets: [usize; 3],
    /// Video frames of motion context (73): the audio prefix length.
    pub motion_frames: usize,
    pub rope_max_positions: usize,
    /// Block LayerNorms, q/k RMSNorms, head LayerNorm, audio encoder LayerNorms.
    pub eps: f32,
    /// The audio injectors' AdaLayerNorm (diffusers default, §3.3.2).
    pub adain_eps: f32,
    pub rope_theta: f64,
}

impl From<&planner::ModelSpec> for WanConfig {
    fn from(spec: &planner::ModelSpec) -> Self {
        let d = &spec.dit;
        let u = |v: u64| v as usize;
        Self {
            dim: u(d.dim),
            ffn_dim: u(d.ffn_dim),
            num_heads: u(d.num_heads),
            num_layers: u(d.num_layers),
            in_dim: u(d.in_dim),
            out_dim: u(d.out_dim),
            text_dim: u(d.text_dim),
            text_len: u(d.text_len),
            freq_dim: u(d.freq_dim),
            cond_dim: u(d.cond_dim),
            audio_dim: u(d.audio_dim),
            audio_layers: u(d.audio_layers),
            num_audio_token: u(d.num_audio_token),
            audio_inject_layers: d.audio_inject_layers.iter().map(|&l| u(l)).collect(),
            framepack_buckets: d.framepack_buckets.map(u),
            motion_frames: u(d.motion_frames),
            rope_max_positions: u(d.rope_max_positions),
            eps: 1e-6,
            adain_eps: 1e-5,
            rope_theta: 10000.0,
        }
    }
}

impl WanConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// Motion latents used by the frame packer (19).
    pub fn motion_latents(&self) -> usize {
        self.framepack_buckets.iter().sum()
    }

    /// Check the checkpoint's config.json against this config (fields it has).
    pub fn check_config_json(&self, json: &serde_json::Value, path: &str) -> Result<()> {
        let ints: [(&str, usize); 14] = [
            ("dim", self.dim),
            ("ffn_dim", self.ffn_dim),
            ("num_heads", self.num_heads),
            ("num_layers", self.num_layers),
            ("in_dim", self.in_dim),
            ("out_dim", self.out_dim),
            ("text_dim", self.text_dim),
            ("text_len", self.text_len),
            ("freq_dim", self.freq_dim),
            ("cond_dim", self.cond_dim),
            ("audio_dim", self.audio_dim),
            ("num_audio_token", self.num_audio_token),
            ("motion_frames", self.motion_frames),
            ("num_audio_layers", self.audio_layers),
        ];
        let mismatch = |field: &str, expected: String, got: String| Error::Checkpoint {
            path: path.to_string(),
            kind: CheckpointErrorKind::ConfigMismatch {
                field: field.to_string(),
                expected,
                got,
            },
        };
        for (field, want) in ints {
            if let Some(got) = json.get(field)
                && got.as_u64() != Some(want as u64)
            {
                return Err(mismatch(field, want.to_string(), got.to_string()));
            }
        }
        if let Some(got) = json.get("audio_inject_layers") {
            let want = serde_json::json!(self.audio_inject_layers);
            if *got != want {
                return Err(mismatch(
                    "audio_inject_layers",
                    want.to_string(),
                    got.to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Every tensor of the checkpoint with its shape (model-spec §2.3).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.dim, self.ffn_dim);
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |n: String, s: &[usize]| v.push((n, s.to_vec()));
        let attn = |add: &mut dyn FnMut(String, &[usize]), p: &str| {
            for m in ["q", "k", "v", "o"] {
                add(format!("{p}.{m}.weight"), &[d, d]);
                add(format!("{p}.{m}.bias"), &[d]);
            }
            add(format!("{p}.norm_q.weight"), &[d]);
            add(format!("{p}.norm_k.weight"), &[d]);
        };
        for (m, cin, k) in [
            ("patch_embedding", self.in_dim, [1, 2, 2]),
            ("cond_encoder", self.cond_dim, [1, 2, 2]),
            ("frame_packer.proj", self.in_dim, [1, 2, 2]),
            ("frame_packer.proj_2x", self.in_dim, [2, 4, 4]),
            ("frame_packer.proj_4x", self.in_dim, [4, 8, 8]),
        ] {
            add(format!("{m}.weight"), &[d, cin, k[0], k[1], k[2]]);
            add(format!("{m}.bias"), &[d]);
        }
        for (m, o, i) in [
            ("text_embedding.0", d, self.text_dim),
            ("text_embedding.2", d, d),
            ("time_embedding.0", d, self.freq_dim),
            ("time_embedding.2", d, d),
            ("time_projection.1", 6 * d, d),
            ("head.head", 4 * self.out_dim, d),
            ("casual_audio_encoder.encoder.final_linear", d, d),
        ] {
            add(format!("{m}.weight"), &[o, i]);
            add(format!("{m}.bias"), &[o]);
        }
        add("trainable_cond_mask.weight".into(), &[3, d]);
        add("head.modulation".into(), &[1, 2, d]);
        for i in 0..self.num_layers {
            let p = format!("blocks.{i}");
            add(format!("{p}.modulation"), &[1, 6, d]);
            attn(&mut add, &format!("{p}.self_attn"));
            attn(&mut add, &format!("{p}.cross_attn"));
            add(format!("{p}.norm3.weight"), &[d]);
            add(format!("{p}.norm3.bias"), &[d]);
            add(format!("{p}.ffn.0.weight"), &[f, d]);
            add(format!("{p}.ffn.0.bias"), &[f]);
            add(format!("{p}.ffn.2.weight"), &[d, f]);
            add(format!("{p}.ffn.2.bias"), &[d]);
        }
        for j in 0..self.audio_inject_layers.len() {
            attn(&mut add, &format!("audio_injector.injector.{j}"));
            let p = format!("audio_injector.injector_adain_layers.{j}.linear");
            add(format!("{p}.weight"), &[2 * d, d]);
            add(format!("{p}.bias"), &[2 * d]);
        }
        let q = d / 4;
        let enc = "casual_audio_encoder";
        add(format!("{enc}.weights"), &[1, self.audio_layers, 1, 1]);
        for (m, o, i) in [
            ("conv1_local", q * self.num_audio_token, self.audio_dim),
            ("conv1_global", q, self.audio_dim),
            ("conv2", d / 2, q),
            ("conv3", d, d / 2),
        ] {
            add(format!("{enc}.encoder.{m}.conv.weight"), &[o, i, 3]);
            add(format!("{enc}.encoder.{m}.conv.bias"), &[o]);
        }
        add(format!("{enc}.encoder.padding_tokens"), &[1, 1, 1, d]);
        v
    }
}

/// Token geometry of one resolution (model-spec §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamGeometry {
    /// Latent height and width (multiples of 8).
    pub lat_h: usize,
    pub lat_w: usize,
    /// Latent frames per block (3).
    pub frames_per_block: usize,
    /// Latent frames held by the noisy KV ring (12: one clip).
    pub ring_frames: usize,
}

impl StreamGeometry {
    pub fn new(
        lat_h: usize,
        lat_w: usize,
        frames_per_block: usize,
        ring_frames: usize,
    ) -> Result<Self> {
        if !lat_h.is_multiple_of(8) || !lat_w.is_multiple_of(8) || lat_h == 0 || lat_w == 0 {
            return Err(Error::invalid(
                "StreamGeometry",
                format!("latent {lat_h}x{lat_w}: height and width must be multiples of 8 (§10.1)"),
            ));
        }
        if frames_per_block == 0 || !ring_frames.is_multiple_of(frames_per_block) {
            return Err(Error::invalid(
                "StreamGeometry",
                format!("ring of {ring_frames} frames is not a multiple of {frames_per_block}"),
            ));
        }
        Ok(Self {
            lat_h,
            lat_w,
            frames_per_block,
            ring_frames,
        })
    }
    /// Patch grid (h/2, w/2).
    pub fn hp(&self) -> usize {
        self.lat_h / 2
    }
    pub fn wp(&self) -> usize {
        self.lat_w / 2
    }
    /// Tokens per latent frame.
    pub fn fsl(&self) -> usize {
        self.hp() * self.wp()
    }
    /// Query tokens of one streaming call.
    pub fn lq(&self) -> usize {
        self.frames_per_block * self.fsl()
    }
    /// Noisy KV ring length in tokens.
    pub fn ring_len(&self) -> usize {
        self.ring_frames * self.fsl()
    }
    /// Sink tokens: reference (fsl) + post (fsl) + 2x (h/4·w/4) + 4x (4·h/8·w/8).
    pub fn lc(&self) -> usize {
        2 * self.fsl()
            + (self.lat_h / 4) * (self.lat_w / 4)
            + 4 * (self.lat_h / 8) * (self.lat_w / 8)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn s2v_14b_geometry_and_tensor_count_match_the_spec() {
        let spec = planner::ModelSpec::builtin("s2v-14b").unwrap();
        let cfg = WanConfig::from(&spec);
        // §2.3: 1260 tensors.
        assert_eq!(cfg.expected_tensors().len(), 1260);
        assert_eq!(cfg.motion_latents(), 19);
        // §3.1, 704×384: latent 48×88.
        let g = StreamGeometry::new(48, 88, 3, 12).unwrap();
        assert_eq!(
            (g.fsl(), g.lq(), g.lc(), g.ring_len()),
            (1056, 3168, 2640, 12_672)
        );
        assert_eq!(g.ring_len() + g.lc(), 15_312);
        // 720×400 literal is not a multiple of 64 pixels (§0): rejected with a reason.
        let e = StreamGeometry::new(90, 50, 3, 12).unwrap_err().to_string();
        assert!(e.contains("multiples of 8"), "{e}");
    }
}
