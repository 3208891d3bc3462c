//! FLOPs of the DiT, the VAE decoder and the encoders (model-spec §3.5–3.6, §1.5).
//!
//! FLOPs = 2 × multiply-accumulates. lava caches the text K/V and the text embedding once per
//! generation, so a streaming call does not recompute them (the reference does: +2.2 TFLOPs).

use serde::Serialize;

use crate::geometry::Geometry;
use crate::spec::ModelSpec;

/// FLOPs of one DiT call, split by kind so they can be timed at different rates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CallFlops {
    /// Block linears on video tokens (self q,k,v,o; cross q,o; FFN) and the audio q,o,k,v.
    pub linear: f64,
    /// Self-attention QKᵀ and PV.
    pub self_attention: f64,
    /// Text and audio cross-attention scores and values.
    pub cross_attention: f64,
    /// Embeddings, time MLPs, AdaLN, head, audio encoder.
    pub other: f64,
}

impl CallFlops {
    pub fn total(&self) -> f64 {
        self.linear + self.self_attention + self.cross_attention + self.other
    }

    /// One streaming call with `lkv` keys per layer; `recompute_text` adds the reference's
    /// per-call text embedding and text K/V projections.
    pub fn streaming(spec: &ModelSpec, g: &Geometry, lkv: u64, recompute_text: bool) -> Self {
        let d = &spec.dit;
        let (dim, ffn, layers) = (d.dim as f64, d.ffn_dim as f64, d.num_layers as f64);
        let lq = g.lq as f64;
        let n_inj = d.audio_inject_layers.len() as f64;
        let frames = spec.stream.frames_per_block as f64;
        let audio_tokens = frames * (d.num_audio_token + 1) as f64;
        let text = g.text_len as f64;
        // Per token per block: self q,k,v,o + cross q,o = 6·D², FFN 2·D·F.
        let block_linear = 2.0 * lq * (6.0 * dim * dim + 2.0 * dim * ffn) * layers;
        let audio_linear =
            n_inj * (2.0 * 2.0 * lq * dim * dim + 2.0 * 2.0 * audio_tokens * dim * dim);
        let self_attention = 4.0 * lq * lkv as f64 * dim * layers;
        let cross_attention = 4.0 * lq * text * dim * layers
            + n_inj * 4.0 * lq * (d.num_audio_token + 1) as f64 * dim;
        let patch = d.patch_features() as f64;
        let mut other = 2.0 * 2.0 * lq * patch * dim                 // patch + cond embedding
            + 2.0 * 2.0 * frames * ((d.freq_dim as f64) * dim + dim * dim) // time_embedding (2 rows per frame)
            + 2.0 * 2.0 * frames * dim * 6.0 * dim                     // time_projection
            + n_inj * 2.0 * frames * dim * 2.0 * dim                   // AdaLN linears
            + 2.0 * lq * dim * (d.out_dim * 4) as f64                  // head
            + audio_encoder_flops(spec);
        let mut linear = block_linear + audio_linear;
        if recompute_text {
            other += 2.0 * text * (d.text_dim as f64 * dim + dim * dim);
            linear += 2.0 * 2.0 * text * dim * dim * layers;
        }
        Self {
            linear,
            self_attention,
            cross_attention,
            other,
        }
    }

    /// The prefill ("sink") pass over the Lc cond tokens: no audio, no head (§4.2).
    pub fn prefill(spec: &ModelSpec, g: &Geometry, recompute_text: bool) -> Self {
        let d = &spec.dit;
        let (dim, ffn, layers) = (d.dim as f64, d.ffn_dim as f64, d.num_layers as f64);
        let lc = g.lc as f64;
        let text = g.text_len as f64;
        let text_kv = if recompute_text {
            2.0 * 2.0 * text * dim * dim * layers
        } else {
            0.0
        };
        Self {
            linear: 2.0 * lc * (6.0 * dim * dim + 2.0 * dim * ffn) * layers + text_kv,
            self_attention: 4.0 * lc * lc * dim * layers,
            cross_attention: 4.0 * lc * text * dim * layers,
            other: 2.0 * lc * d.patch_features() as f64 * dim * 4.0,
        }
    }
}

/// CausalAudioEncoder per call: convs over 85 → 43 → 22 steps, local and global paths.
fn audio_encoder_flops(spec: &ModelSpec) -> f64 {
    let d = &spec.dit;
    let (a, dim) = (d.audio_dim as f64, d.dim as f64);
    let group = dim / d.num_audio_token as f64;
    let t0 = (spec.dit.motion_frames + 4 * spec.stream.frames_per_block) as f64; // 73 + 12 = 85
    let t1 = (t0 / 2.0).ceil();
    let t2 = (t1 / 2.0).ceil();
    let local = t0 * a * dim * 3.0
        + d.num_audio_token as f64 * (t1 * group * dim / 2.0 * 3.0 + t2 * dim / 2.0 * dim * 3.0);
    let global = t0 * a * group * 3.0
        + t1 * group * dim / 2.0 * 3.0
        + t2 * dim / 2.0 * dim * 3.0
        + t2 * dim * dim;
    2.0 * (local + global)
}

/// FLOPs of the VAE decoder for one steady-state latent frame (4 video frames) at
/// `height × width` (convolution-dominated; model-spec §1.5 quotes ≈9.2 TFLOPs at 384×704).
pub fn vae_decode_flops(spec: &ModelSpec, height: u64, width: u64) -> f64 {
    crate::memory::vae_decoder_convs(spec, height, width)
        .iter()
        .map(|c| {
            2.0 * (c.cin * c.cout * c.kernel) as f64 * (c.frames_per_latent * c.h * c.w) as f64
        })
        .sum()
}
