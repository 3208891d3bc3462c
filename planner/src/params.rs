//! Parameter counts computed from a model's dimensions (model-spec §2.1).
//!
//! Module names follow the checkpoint (§2.3) so each line can be held beside the reference.

use serde::Serialize;

use crate::spec::{DitSpec, ModelSpec, T5Spec, VaeSpec, Wav2Vec2Spec};

/// Linear `i → o` with bias.
fn linear(i: u64, o: u64) -> u64 {
    i * o + o
}

/// Conv with `i` input and `o` output channels, `k` kernel elements, bias.
fn conv(i: u64, o: u64, k: u64) -> u64 {
    i * o * k + o
}

/// Parameters of the DiT by top-level module, as in model-spec §2.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DitParams {
    pub patch_embedding: u64,
    pub cond_encoder: u64,
    pub text_embedding: u64,
    pub time_embedding: u64,
    pub time_projection: u64,
    pub trainable_cond_mask: u64,
    /// One transformer block (identical for all layers).
    pub block: u64,
    pub blocks: u64,
    pub head: u64,
    /// One audio injector layer (cross-attention + its AdaLN linear).
    pub audio_injector_layer: u64,
    pub audio_injector: u64,
    pub casual_audio_encoder: u64,
    pub frame_packer: u64,
}

impl DitParams {
    pub fn new(d: &DitSpec) -> Self {
        let dim = d.dim;
        let patch = d.patch_features();
        // blocks.{i}: self_attn q,k,v,o + norm_q/k; cross_attn likewise; norm3 (w+b); ffn.0, ffn.2; modulation.
        let attn = 4 * linear(dim, dim) + 2 * dim;
        let block = 2 * attn + 2 * dim + linear(dim, d.ffn_dim) + linear(d.ffn_dim, dim) + 6 * dim;
        // injector.{j}: q,k,v,o + norm_q/k; injector_adain_layers.{j}.linear: dim → 2·dim.
        let audio_injector_layer = attn + linear(dim, 2 * dim);
        // casual_audio_encoder: weights [1, L, 1, 1]; conv1_local a→dim; conv1_global a→dim/T;
        // conv2 dim/T→dim/2; conv3 dim/2→dim (all kernel 3); final_linear; padding_tokens.
        let group = dim / d.num_audio_token;
        let casual_audio_encoder = d.audio_layers
            + conv(d.audio_dim, dim, 3)
            + conv(d.audio_dim, group, 3)
            + conv(group, dim / 2, 3)
            + conv(dim / 2, dim, 3)
            + linear(dim, dim)
            + dim;
        // frame_packer: proj (1,2,2), proj_2x (2,4,4), proj_4x (4,8,8): the patch scaled 1×, 2×, 4×.
        let kernel = patch / d.in_dim;
        let frame_packer = [1u64, 2, 4]
            .iter()
            .map(|s| conv(d.in_dim, dim, kernel * s * s * s))
            .sum();
        let n_inject = d.audio_inject_layers.len() as u64;
        Self {
            patch_embedding: conv(d.in_dim, dim, patch / d.in_dim),
            cond_encoder: conv(d.cond_dim, dim, patch / d.in_dim),
            text_embedding: linear(d.text_dim, dim) + linear(dim, dim),
            time_embedding: linear(d.freq_dim, dim) + linear(dim, dim),
            time_projection: linear(dim, 6 * dim),
            trainable_cond_mask: 3 * dim,
            block,
            blocks: block * d.num_layers,
            head: linear(dim, d.out_dim * patch / d.in_dim) + 2 * dim,
            audio_injector_layer,
            audio_injector: audio_injector_layer * n_inject,
            casual_audio_encoder,
            frame_packer,
        }
    }

    pub fn total(&self) -> u64 {
        self.blocks + self.root()
    }

    /// Everything outside `blocks.*`: the FSDP root unit (model-spec §7.3).
    pub fn root(&self) -> u64 {
        self.patch_embedding
            + self.cond_encoder
            + self.text_embedding
            + self.time_embedding
            + self.time_projection
            + self.trainable_cond_mask
            + self.head
            + self.audio_injector
            + self.casual_audio_encoder
            + self.frame_packer
    }

    /// The upstream Wan 14B part: embeddings, blocks and head.
    pub fn base(&self) -> u64 {
        self.patch_embedding
            + self.text_embedding
            + self.time_embedding
            + self.time_projection
            + self.blocks
            + self.head
    }
}

/// Weights of the linears LiveAvatar's `--fp8` stores as float8_e4m3fn (model-spec §8.1), per
/// block and per injector layer. Their biases stay bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fp8Params {
    /// self_attn q,k,v,o + cross_attn q,k,v,o + ffn.0 + ffn.2 weights of one block.
    pub block: u64,
    /// injector q,k,v,o + the AdaLN linear weight of one injector layer.
    pub injector_layer: u64,
    /// Number of converted linears in the whole DiT (460 for s2v-14b).
    pub linears: u64,
}

impl Fp8Params {
    pub fn new(d: &DitSpec) -> Self {
        let dd = d.dim * d.dim;
        let n_inject = d.audio_inject_layers.len() as u64;
        Self {
            block: 8 * dd + 2 * d.dim * d.ffn_dim,
            injector_layer: 4 * dd + 2 * dd,
            linears: 10 * d.num_layers + 5 * n_inject,
        }
    }
}

/// umT5-XXL encoder parameters (model-spec §1.3).
pub fn t5_params(t: &T5Spec) -> u64 {
    let layer = 4 * t.dim * t.dim     // attn q, k, v, o (no biases)
        + 2 * t.dim                   // norm1, norm2
        + 3 * t.dim * t.ffn_dim       // ffn gate.0, fc1, fc2
        + t.num_buckets * t.num_heads; // pos_embedding [32, heads]
    t.vocab * t.dim + t.num_layers * layer + t.dim
}

/// Wan2.1 VAE parameters (model-spec §1.5), split into encoder and decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VaeParams {
    pub encoder: u64,
    pub decoder: u64,
    /// The 1×1×1 convs around the latent (conv1 on 2·z, conv2 on z).
    pub latent_convs: u64,
}

impl VaeParams {
    pub fn total(&self) -> u64 {
        self.encoder + self.decoder + self.latent_convs
    }
}

/// Residual block: RMS norm, CausalConv3d k3, RMS norm, CausalConv3d k3, 1×1×1 shortcut if widths differ.
fn vae_res(i: u64, o: u64) -> u64 {
    i + conv(i, o, 27) + o + conv(o, o, 27) + if i != o { conv(i, o, 1) } else { 0 }
}

/// Single-head spatial attention: RMS norm, to_qkv 1×1, proj 1×1.
fn vae_attn(c: u64) -> u64 {
    c + conv(c, 3 * c, 1) + conv(c, c, 1)
}

pub fn vae_params(v: &VaeSpec) -> VaeParams {
    let dims: Vec<u64> = std::iter::once(1)
        .chain(v.dim_mult.iter().copied())
        .map(|m| v.base_dim * m)
        .collect();
    let stages = v.dim_mult.len();
    let top = *dims.last().unwrap_or(&v.base_dim);
    // Encoder: conv1 3→base; per stage num_res_blocks residual blocks then a 2-D (and maybe temporal) down.
    let mut enc = conv(3, v.base_dim, 27);
    for i in 0..stages {
        let (mut cin, cout) = (dims[i], dims[i + 1]);
        for _ in 0..v.num_res_blocks {
            enc += vae_res(cin, cout);
            cin = cout;
        }
        if i + 1 < stages {
            enc += conv(cout, cout, 9);
            if v.temporal_downsample.get(i).copied().unwrap_or(false) {
                enc += conv(cout, cout, 3);
            }
        }
    }
    enc += 2 * vae_res(top, top) + vae_attn(top) + top + conv(top, 2 * v.z_dim, 27);
    // Decoder: mirrored widths; stages after the first take half the width (the upsample halves it).
    let mut dec = conv(v.z_dim, top, 27) + 2 * vae_res(top, top) + vae_attn(top);
    let ddims: Vec<u64> = std::iter::once(top)
        .chain(v.dim_mult.iter().rev().map(|m| v.base_dim * m))
        .collect();
    let tup: Vec<bool> = v.temporal_downsample.iter().rev().copied().collect();
    for i in 0..stages {
        let cout = ddims[i + 1];
        let mut cin = if i == 0 { ddims[i] } else { ddims[i] / 2 };
        for _ in 0..=v.num_res_blocks {
            dec += vae_res(cin, cout);
            cin = cout;
        }
        if i + 1 < stages {
            dec += conv(cout, cout / 2, 9);
            if tup.get(i).copied().unwrap_or(false) {
                dec += conv(cout, 2 * cout, 3);
            }
        }
    }
    dec += v.base_dim + conv(v.base_dim, 3, 27);
    VaeParams {
        encoder: enc,
        decoder: dec,
        latent_convs: conv(2 * v.z_dim, 2 * v.z_dim, 1) + conv(v.z_dim, v.z_dim, 1),
    }
}

/// wav2vec2 encoder parameters used for hidden states (no CTC head), model-spec §1.4.
pub fn wav2vec2_params(w: &Wav2Vec2Spec) -> u64 {
    // Feature extractor: conv layers with bias and a LayerNorm (weight + bias) each.
    let mut fe = 0;
    let mut cin = 1;
    for k in &w.conv_kernel {
        fe += conv(cin, w.conv_dim, *k) + 2 * w.conv_dim;
        cin = w.conv_dim;
    }
    let projection = 2 * w.conv_dim + linear(w.conv_dim, w.hidden);
    // Positional conv with weight norm: weight_g [1, 1, k], weight_v [hidden, hidden/groups, k], bias.
    let pos = w.pos_conv_kernel
        + w.hidden * (w.hidden / w.pos_conv_groups) * w.pos_conv_kernel
        + w.hidden;
    let layer = 4 * linear(w.hidden, w.hidden)
        + 2 * w.hidden
        + linear(w.hidden, w.ffn_dim)
        + linear(w.ffn_dim, w.hidden)
        + 2 * w.hidden;
    // + encoder LayerNorm + masked_spec_embed.
    fe + projection + pos + w.num_layers * layer + 2 * w.hidden + w.hidden
}

/// All parameter counts of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelParams {
    pub dit: DitParams,
    pub fp8: Fp8Params,
    pub t5: u64,
    pub vae: VaeParams,
    pub wav2vec2: u64,
}

impl ModelParams {
    pub fn new(m: &ModelSpec) -> Self {
        Self {
            dit: DitParams::new(&m.dit),
            fp8: Fp8Params::new(&m.dit),
            t5: t5_params(&m.t5),
            vae: vae_params(&m.vae),
            wav2vec2: wav2vec2_params(&m.wav2vec2),
        }
    }
}
