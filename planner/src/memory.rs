//! Bytes per rank. The formulas are documented in docs/memory.md, which a test regenerates.
//!
//! Every component is either resident for the whole run or transient in one phase; a rank's
//! peak is the resident sum plus the largest phase:
//!   peak = Σ resident + max(startup, dit_call, vae_decode)
//! where startup runs the encoders, dit_call is one streaming DiT call (FSDP unshard buffers
//! and activations), and vae_decode is one block of the streaming VAE decode.

use serde::Serialize;

use crate::geometry::Geometry;
use crate::layout::{Layout, LayoutKind, Role, T5Placement, VaePlacement};
use crate::params::ModelParams;
use crate::spec::ModelSpec;

const BF16: u64 = 2;
const F32: u64 = 4;
/// NCCL's default 4 MiB buffer × 16 channels × send and receive, per communicator.
pub const NCCL_COMM_BYTES: u64 = 4 * (1 << 20) * 16 * 2;
/// FSDP keeps the block being computed and the next one being all-gathered.
pub const FSDP_BLOCKS_IN_FLIGHT: u64 = 2;
/// Offload streams blocks through a double buffer.
pub const OFFLOAD_BLOCKS_RESIDENT: u64 = 2;
/// lava encodes audio in windows of this many seconds.
pub const AUDIO_WINDOW_SECONDS: u64 = 30;

/// When a component occupies memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Resident,
    Startup,
    DitCall,
    VaeDecode,
}

/// What the bytes are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    DitWeights,
    DitF32Copies,
    FsdpRootUnshard,
    FsdpBlocksInFlight,
    KvNoisy,
    KvSink,
    TextKv,
    DitActivations,
    T5Weights,
    T5Activations,
    Wav2Vec2,
    VaeWeights,
    VaeDecoderCache,
    VaeDecodeWorkspace,
    VaeEncodeWorkspace,
    CommBuffers,
    CudaContext,
    LibraryWorkspace,
    AllocatorReserve,
}

impl Component {
    /// Per-generation stream state, allocated once the encoders and the VAE encode are done.
    pub fn is_stream_state(&self) -> bool {
        matches!(
            self,
            Component::KvNoisy | Component::KvSink | Component::TextKv | Component::VaeDecoderCache
        )
    }

    pub fn label(&self) -> &'static str {
        match self {
            Component::DitWeights => "DiT weights",
            Component::DitF32Copies => "DiT fp32 weight copies",
            Component::FsdpRootUnshard => "FSDP root unit unshard",
            Component::FsdpBlocksInFlight => "FSDP blocks in flight",
            Component::KvNoisy => "KV cache, noisy ring",
            Component::KvSink => "KV cache, sink",
            Component::TextKv => "text K/V cache",
            Component::DitActivations => "DiT call activations",
            Component::T5Weights => "umT5-XXL weights",
            Component::T5Activations => "umT5-XXL activations",
            Component::Wav2Vec2 => "wav2vec2 weights+activations",
            Component::VaeWeights => "VAE weights",
            Component::VaeDecoderCache => "VAE decoder causal caches",
            Component::VaeDecodeWorkspace => "VAE decode workspace",
            Component::VaeEncodeWorkspace => "VAE encode workspace+caches",
            Component::CommBuffers => "communication buffers",
            Component::CudaContext => "CUDA context",
            Component::LibraryWorkspace => "library workspaces",
            Component::AllocatorReserve => "allocator reserve",
        }
    }
}

/// One line of a rank's budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub component: Component,
    pub phase: Phase,
    pub bytes: u64,
    /// How the number was formed, in one line.
    pub detail: String,
}

/// The memory of one rank, without the GPU's own overheads (those depend on the GPU).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankMemory {
    pub items: Vec<Item>,
    /// The rank allocates its stream state (KV caches, text K/V, VAE decoder caches) after the
    /// startup work (encoders, VAE encode), as lava's workers do; the reference's layout keeps
    /// the conservative sum.
    pub stream_after_startup: bool,
}

impl RankMemory {
    fn push(&mut self, component: Component, phase: Phase, bytes: u64, detail: impl Into<String>) {
        if bytes > 0 {
            self.items.push(Item {
                component,
                phase,
                bytes,
                detail: detail.into(),
            });
        }
    }

    pub fn resident(&self) -> u64 {
        self.phase_sum(Phase::Resident)
    }

    pub fn phase_sum(&self, phase: Phase) -> u64 {
        self.items
            .iter()
            .filter(|i| i.phase == phase)
            .map(|i| i.bytes)
            .sum()
    }

    /// Resident bytes that do not exist yet during the startup phase (see
    /// [`RankMemory::stream_after_startup`]).
    pub fn absent_at_startup(&self) -> u64 {
        if !self.stream_after_startup {
            return 0;
        }
        self.items
            .iter()
            .filter(|i| i.phase == Phase::Resident && i.component.is_stream_state())
            .map(|i| i.bytes)
            .sum()
    }

    /// The phase that sets the peak and the bytes above resident it costs there (the startup
    /// phase less what is not allocated yet).
    pub fn worst_phase(&self) -> (Phase, u64) {
        let absent = self.absent_at_startup();
        [Phase::Startup, Phase::DitCall, Phase::VaeDecode]
            .into_iter()
            .map(|p| {
                let b = self.phase_sum(p);
                (
                    p,
                    if p == Phase::Startup {
                        b.saturating_sub(absent)
                    } else {
                        b
                    },
                )
            })
            .fold((Phase::DitCall, 0), |a, b| if b.1 > a.1 { b } else { a })
    }

    /// Resident plus the largest phase.
    pub fn peak(&self) -> u64 {
        self.resident() + self.worst_phase().1
    }

    pub fn get(&self, c: Component) -> u64 {
        self.items
            .iter()
            .filter(|i| i.component == c)
            .map(|i| i.bytes)
            .sum()
    }
}

/// The workload parameters that size memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Workload {
    pub sample_steps: u64,
    pub clips: u64,
}

/// DiT weight bytes of one rank's share (before FSDP), split into root part and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DitShare {
    root: u64,
    block: u64,
    blocks: u64,
}

/// Weight bytes of one block on one TP rank.
fn block_bytes(spec: &ModelSpec, tp: u64, fp8: bool) -> u64 {
    let d = &spec.dit;
    let (dim, ffn) = (d.dim, d.ffn_dim);
    let w = if fp8 { 1 } else { BF16 };
    let linear_w = (8 * dim * dim + 2 * dim * ffn) / tp * w;
    let column_bias = (6 * dim + ffn) / tp * BF16; // q,k,v ×2 and ffn.0: sharded with their outputs
    let row_bias = 3 * dim * BF16; // o ×2 and ffn.2: replicated, added after the all-reduce
    let qk_norms = 4 * dim / tp * BF16; // full-width RMSNorm weights follow the head split
    let replicated = (2 * dim + 6 * dim) * BF16; // norm3 w+b, modulation
    let scales = if fp8 { 10 * F32 } else { 0 };
    linear_w + column_bias + row_bias + qk_norms + replicated + scales
}

/// Weight bytes of one audio injector layer on one TP rank.
fn injector_bytes(spec: &ModelSpec, tp: u64, fp8: bool) -> u64 {
    let dim = spec.dit.dim;
    let w = if fp8 { 1 } else { BF16 };
    let linear_w = 6 * dim * dim / tp * w; // q,k,v,o + AdaLN dim→2·dim
    let bias = (3 * dim + 2 * dim) / tp * BF16 + dim * BF16; // q,k,v + AdaLN sharded; o replicated
    let norms = 2 * dim / tp * BF16;
    let scales = if fp8 { 5 * F32 } else { 0 };
    linear_w + bias + norms + scales
}

fn dit_share(spec: &ModelSpec, p: &ModelParams, layout: &Layout, role: &Role) -> DitShare {
    let d = &spec.dit;
    let (tp, fp8) = (layout.tp, layout.fp8);
    let (first, last, l0, l1) = match role {
        Role::Dit {
            pp,
            layer_begin,
            layer_end,
            ..
        } => (*pp == 0, *pp + 1 == layout.pp, *layer_begin, *layer_end),
        Role::Vae => (true, true, 0, d.num_layers),
    };
    let injectors = d
        .audio_inject_layers
        .iter()
        .filter(|l| (l0..l1).contains(*l))
        .count() as u64;
    let dp = &p.dit;
    let mut root = injectors * injector_bytes(spec, tp, fp8);
    if first {
        // Embeddings, time MLPs, audio encoder and frame packer run on the first sub-stage; the
        // time projection is column-parallel under TP.
        root += (dp.patch_embedding
            + dp.cond_encoder
            + dp.text_embedding
            + dp.time_embedding
            + dp.trainable_cond_mask
            + dp.casual_audio_encoder
            + dp.frame_packer)
            * BF16
            + dp.time_projection / tp * BF16;
    }
    if last {
        root += dp.head * BF16;
    }
    DitShare {
        root,
        block: block_bytes(spec, tp, fp8),
        blocks: l1 - l0,
    }
}

/// lava keeps f32 copies (2 extra bytes per parameter) of the modules the reference runs in
/// fp32 autocast regions: time MLPs, head, audio encoder and the blocks' modulation vectors.
fn dit_f32_copies(spec: &ModelSpec, p: &ModelParams, layout: &Layout, role: &Role) -> u64 {
    let d = &spec.dit;
    let dp = &p.dit;
    let (first, last, layers) = match role {
        Role::Dit {
            pp,
            layer_begin,
            layer_end,
            ..
        } => (*pp == 0, *pp + 1 == layout.pp, layer_end - layer_begin),
        Role::Vae => return 0,
    };
    let mut params = layers * 6 * d.dim;
    if first {
        params += dp.time_embedding + dp.time_projection / layout.tp + dp.casual_audio_encoder;
    }
    if last {
        params += dp.head;
    }
    params * (F32 - BF16)
}

/// One DiT call's activation peak on one rank (documented in docs/memory.md §Activations).
fn dit_activations(
    spec: &ModelSpec,
    g: &Geometry,
    layout: &Layout,
    kind: LayoutKind,
) -> (u64, String) {
    let d = &spec.dit;
    let (dim, ffn) = (d.dim, d.ffn_dim);
    let (tp, sp) = (layout.tp, layout.ulysses);
    let t = g.lq.div_ceil(sp);
    let heads_r = d.num_heads / (tp * sp);
    let hd = d.head_dim();
    let a2a = if sp > 1 { 4 * t * dim / tp * BF16 } else { 0 };
    let rope = (g.lq + g.lc) * (hd / 2) * 2 * F32;
    let sink_roped = g.lc * heads_r * hd * BF16;
    // x, a, q/k/v, attention out and o out in bf16; the residual x₁ in fp32.
    let attn = t * (2 * dim + 2 * dim + 6 * dim / tp + 2 * dim / tp + 2 * dim)
        + t * 4 * dim
        + a2a
        + rope
        + sink_roped;
    let ffn_phase = t * (4 * dim + 2 * dim + 2 * ffn / tp + 2 * dim);
    let audio = t * (2 * dim + 4 * dim + 4 * dim / tp + 4 * dim / tp + 2 * dim);
    // lava's values live as [sink | ring] in the step cache and are read in place; the keys
    // (re-rotated sink + ring window) are assembled per layer in one scratch of Lc + window rows.
    let key_scratch = if kind == LayoutKind::Lava {
        g.lkv * heads_r * hd * BF16
    } else {
        0
    };
    let attn = attn + key_scratch;
    let mut peak = attn.max(ffn_phase).max(audio);
    let mut detail = format!("max(attn {attn}, ffn {ffn_phase}, audio {audio}) B at {t} tokens");
    if kind == LayoutKind::Liveavatar {
        // Eager reference: K/V concatenated with the sink and float64 complex RoPE temporaries.
        let extra = 2 * g.lkv * dim * BF16 + 2 * g.lq * dim * 8;
        peak += extra;
        detail.push_str(&format!(" + eager concat/rope {extra} B"));
    }
    if layout.pp > 1 {
        peak += t * dim * BF16;
        detail.push_str(" + pp boundary buffer");
    }
    (peak, detail)
}

/// A causal conv of the VAE, for caches, workspaces and FLOPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeConv {
    pub cin: u64,
    pub cout: u64,
    /// Kernel elements (27 for 3×3×3, 9 for 2-D 3×3, 3 for the temporal convs, 1 for 1×1×1).
    pub kernel: u64,
    pub h: u64,
    pub w: u64,
    /// Frames this conv sees per latent frame decoded (1, 2, 4).
    pub frames_per_latent: u64,
    /// Frames kept in its causal cache (2 for temporal kernel 3, 0 otherwise).
    pub cache_frames: u64,
    /// Bytes per cached element: float32 after norm/SiLU, bf16 on the residual stream.
    pub cache_elem_bytes: u64,
}

/// The decoder's convs in execution order (model-spec §1.5): conv1, middle, up stages, head.
pub fn vae_decoder_convs(spec: &ModelSpec, height: u64, width: u64) -> Vec<VaeConv> {
    let v = &spec.vae;
    let (mut h, mut w, mut t) = (height / v.spatial_stride, width / v.spatial_stride, 1);
    let top = v.base_dim * v.dim_mult.last().copied().unwrap_or(1);
    let mut out = Vec::new();
    let c = |cin, cout, kernel, h, w, t, cache_frames, bytes| VaeConv {
        cin,
        cout,
        kernel,
        h,
        w,
        frames_per_latent: t,
        cache_frames,
        cache_elem_bytes: bytes,
    };
    let res = |out: &mut Vec<VaeConv>, cin: u64, cout: u64, h, w, t| {
        out.push(c(cin, cout, 27, h, w, t, 2, F32));
        out.push(c(cout, cout, 27, h, w, t, 2, F32));
        if cin != cout {
            out.push(c(cin, cout, 1, h, w, t, 0, 0));
        }
    };
    out.push(c(v.z_dim, top, 27, h, w, t, 2, BF16));
    res(&mut out, top, top, h, w, t);
    out.push(c(top, 3 * top, 1, h, w, t, 0, 0));
    out.push(c(top, top, 1, h, w, t, 0, 0));
    res(&mut out, top, top, h, w, t);
    let ddims: Vec<u64> = std::iter::once(top)
        .chain(v.dim_mult.iter().rev().map(|m| v.base_dim * m))
        .collect();
    let tup: Vec<bool> = v.temporal_downsample.iter().rev().copied().collect();
    let stages = v.dim_mult.len();
    for i in 0..stages {
        let cout = ddims[i + 1];
        let mut cin = if i == 0 { ddims[i] } else { ddims[i] / 2 };
        for _ in 0..=v.num_res_blocks {
            res(&mut out, cin, cout, h, w, t);
            cin = cout;
        }
        if i + 1 < stages {
            if tup.get(i).copied().unwrap_or(false) {
                out.push(c(cout, 2 * cout, 3, h, w, t, 2, BF16));
                t *= 2;
            }
            h *= 2;
            w *= 2;
            out.push(c(cout, cout / 2, 9, h, w, t, 0, 0));
        }
    }
    out.push(c(v.base_dim, 3, 27, h, w, t, 2, F32));
    out
}

/// Decoder cache (elements, bytes) at a resolution.
pub fn vae_decoder_cache(spec: &ModelSpec, height: u64, width: u64) -> (u64, u64) {
    vae_decoder_convs(spec, height, width)
        .iter()
        .fold((0, 0), |(e, b), c| {
            let n = c.cin * c.cache_frames * c.h * c.w;
            (e + n, b + n * c.cache_elem_bytes)
        })
}

/// Live bytes of the decoder's largest stage for one latent, as the runtime decodes it (norm and
/// SiLU fused into one pass that writes the conv input in bf16 behind the cached frames and
/// hands back the f32 frames to cache; `Resample` convs are plain per-frame 2-D convs):
/// - a conv after norm+SiLU (residual blocks, head), worst at a residual block's second conv:
///   the block input, the first conv's output (kept for the residual add), the conv input with
///   its cached frames (bf16), the new f32 cache frames and the old ones until replaced, the
///   conv output;
/// - an upsampling conv: its input before the nearest ×2, the upsampled input, the output;
/// - conv1, the time conv and 1×1 convs: input with its cached frames, output.
///
/// The earlier term charged every conv, the upsampling convs included, with f32 norm and SiLU
/// outputs; the upsampling conv at full resolution (192 channels) then came out 2.3× the real
/// peak (3.15 GB vs ≈ 1.39 GB at 704×384, measured 1.43 GB on an H200: docs/benchmarks.md).
pub fn vae_decode_workspace(spec: &ModelSpec, height: u64, width: u64) -> u64 {
    let peak_stage = vae_decoder_convs(spec, height, width)
        .iter()
        .map(|c| {
            let t = c.frames_per_latent;
            let (ein, eout) = (c.cin * c.h * c.w, c.cout * c.h * c.w);
            if c.cache_elem_bytes == F32 {
                let e = ein.max(eout);
                e * (3 * t * BF16 + (t + c.cache_frames) * BF16 + 2 * c.cache_frames * F32)
            } else if c.kernel == 9 {
                t * (ein / 4 + ein + eout) * BF16
            } else {
                ((t + c.cache_frames) * ein + t * eout) * BF16
            }
        })
        .max()
        .unwrap_or(0);
    // Plus the decoded block's frames in fp32 [3, 4·frames_per_block, H, W].
    peak_stage + 3 * 4 * spec.stream.frames_per_block * height * width * F32
}

/// Encoding a 4-frame chunk at full resolution: the same live set as decoding at the last
/// stage, plus the encoder's causal caches (2 frames per cached conv at each stage).
pub fn vae_encode_workspace(spec: &ModelSpec, height: u64, width: u64) -> u64 {
    let v = &spec.vae;
    let (mut h, mut w) = (height, width);
    let dims: Vec<u64> = std::iter::once(1)
        .chain(v.dim_mult.iter().copied())
        .map(|m| v.base_dim * m)
        .collect();
    let mut cache = 3 * 2 * h * w * BF16;
    for i in 0..v.dim_mult.len() {
        cache +=
            (dims[i] + dims[i + 1] + 2 * dims[i + 1] * (v.num_res_blocks - 1)) * 2 * h * w * F32;
        if i + 1 < v.dim_mult.len() {
            h /= 2;
            w /= 2;
            if v.temporal_downsample.get(i).copied().unwrap_or(false) {
                cache += dims[i + 1] * h * w * BF16;
            }
        }
    }
    let t = 4;
    let live = v.base_dim * height * width * (t * (BF16 + F32 + F32 + BF16) + (t + 2) * BF16);
    cache + live
}

/// T5 activations for one prompt: hidden states, FFN, fp32 attention scores.
fn t5_activations(spec: &ModelSpec) -> u64 {
    let t = &spec.t5;
    let l = spec.dit.text_len;
    l * t.dim * 6 * BF16 + l * t.ffn_dim * 2 * BF16 + 2 * t.num_heads * l * l * F32
}

/// wav2vec2 on `seconds` of audio: all hidden states kept, the FFN, the first conv's output.
fn wav2vec2_activations(spec: &ModelSpec, seconds: u64) -> u64 {
    let w = &spec.wav2vec2;
    let samples = seconds * w.sample_rate;
    let frames = samples / 320;
    let conv0 = w.conv_dim * samples / w.conv_stride.first().copied().unwrap_or(5) * F32;
    let states = (w.num_layers + 1) * frames * w.hidden * BF16;
    conv0.max(states + frames * (w.ffn_dim + 4 * w.hidden) * BF16)
}

/// The memory of every rank for a layout (without GPU overheads).
pub fn rank_memory(
    spec: &ModelSpec,
    p: &ModelParams,
    g: &Geometry,
    layout: &Layout,
    roles: &[Role],
    work: &Workload,
) -> Vec<RankMemory> {
    let la = layout.kind == LayoutKind::Liveavatar;
    let world = roles.len() as u64;
    let enc_rank = crate::layout::encoder_rank(layout);
    let vae_rank = match layout.vae {
        VaePlacement::Dedicated => world - 1,
        VaePlacement::Colocated => crate::layout::colocated_vae_rank(layout),
    };
    let d = &spec.dit;
    let hd = d.head_dim();
    let steps_per_stage = work.sample_steps / layout.stages;
    roles
        .iter()
        .enumerate()
        .map(|(rank, role)| {
            let rank = rank as u64;
            let mut m = RankMemory {
                items: Vec::new(),
                stream_after_startup: !la,
            };
            // The LiveAvatar VAE rank builds the whole pipeline too (model-spec §6.2).
            let holds_dit = matches!(role, Role::Dit { .. }) || la;
            if holds_dit {
                let share = dit_share(spec, p, layout, role);
                let blocks = share.blocks * share.block;
                let wname = if layout.fp8 { "fp8 linears, bf16 rest" } else { "bf16" };
                if layout.offload {
                    let res = share.root + OFFLOAD_BLOCKS_RESIDENT.min(share.blocks) * share.block;
                    m.push(Component::DitWeights, Phase::Resident, res, format!("root part + {OFFLOAD_BLOCKS_RESIDENT} of {} blocks streamed from host ({wname})", share.blocks));
                } else if layout.fsdp {
                    let sp = layout.ulysses;
                    let res = share.root.div_ceil(sp) + share.blocks * share.block.div_ceil(sp);
                    m.push(Component::DitWeights, Phase::Resident, res, format!("1/{sp} of root + {} blocks ({wname}, FSDP)", share.blocks));
                    m.push(Component::FsdpRootUnshard, Phase::DitCall, share.root, "root unit materialised for the whole forward");
                    m.push(Component::FsdpBlocksInFlight, Phase::DitCall, FSDP_BLOCKS_IN_FLIGHT.min(share.blocks) * share.block, format!("{FSDP_BLOCKS_IN_FLIGHT} blocks all-gathered (current + prefetch)"));
                } else {
                    m.push(Component::DitWeights, Phase::Resident, share.root + blocks, format!("root part + {} blocks of {} B ({wname}, 1/{} TP)", share.blocks, share.block, layout.tp));
                }
            }
            if !la {
                m.push(
                    Component::DitF32Copies,
                    Phase::Resident,
                    dit_f32_copies(spec, p, layout, role),
                    "time MLPs, head, audio encoder, modulation kept in f32 (+2 B/param)",
                );
            }
            if let Role::Dit { layer_begin, layer_end, .. } = role {
                let layers = layer_end - layer_begin;
                let heads_r = d.num_heads / (layout.tp * layout.ulysses);
                let per_token = layers * 2 * heads_r * hd * BF16;
                let sink_rows = if la { spec.stream.liveavatar_sink_rows } else { g.lc };
                m.push(Component::KvNoisy, Phase::Resident, steps_per_stage * g.ring * per_token, format!("{steps_per_stage} step cache(s) × {} tokens × {layers} layers × k,v × {heads_r} heads × {hd} × bf16", g.ring));
                m.push(Component::KvSink, Phase::Resident, steps_per_stage * sink_rows * per_token, format!("{steps_per_stage} step cache(s) × {sink_rows} sink rows{}", if la { " (hard-coded)" } else { " (Lc)" }));
                if !la {
                    m.push(Component::TextKv, Phase::Resident, layers * 2 * g.text_len * d.dim / layout.tp * BF16, format!("{layers} layers × k,v × {} text tokens, computed once", g.text_len));
                }
                let (act, detail) = dit_activations(spec, g, layout, layout.kind);
                m.push(Component::DitActivations, Phase::DitCall, act, detail);
            }
            // Encoders.
            let has_t5 = match layout.t5 {
                T5Placement::Every => true,
                T5Placement::One => rank == enc_rank,
                T5Placement::Cpu | T5Placement::Absent => false,
            };
            if has_t5 {
                m.push(Component::T5Weights, Phase::Resident, p.t5 * BF16, "bf16, resident");
                m.push(Component::T5Activations, Phase::Startup, t5_activations(spec), "one prompt, once per generation");
                let seconds = if la { (work.clips * spec.stream.infer_frames).div_ceil(spec.stream.sample_fps) } else { AUDIO_WINDOW_SECONDS };
                let how = if la { "whole audio in one pass, as the reference does" } else { "audio in windows" };
                m.push(Component::Wav2Vec2, Phase::Startup, p.wav2vec2 * BF16 + wav2vec2_activations(spec, seconds), format!("bf16 weights + {seconds} s of audio ({how})"));
            }
            // VAE: the reference keeps it on every rank (each encodes the reference image).
            let vae_here = rank == vae_rank;
            if vae_here || la {
                m.push(Component::VaeWeights, Phase::Resident, p.vae.total() * BF16, "encoder + decoder, bf16");
                m.push(Component::VaeEncodeWorkspace, Phase::Startup, vae_encode_workspace(spec, g.height, g.width), "reference image and 73-frame motion context, 4-frame chunks");
            }
            if vae_here {
                let (elems, bytes) = vae_decoder_cache(spec, g.height, g.width);
                m.push(Component::VaeDecoderCache, Phase::Resident, bytes, format!("{elems} cached elements, fp32 after norm/SiLU, bf16 on the residual stream"));
                m.push(Component::VaeDecodeWorkspace, Phase::VaeDecode, vae_decode_workspace(spec, g.height, g.width), "largest decoder stage for one latent + the block's frames");
            }
            // Communicators: the world (TPP latents, broadcasts) and each parallel group.
            let mut comms = u64::from(world > 1);
            if matches!(role, Role::Dit { .. }) {
                comms += u64::from(layout.tp > 1) + u64::from(layout.ulysses > 1);
            }
            let latent = d.in_dim * spec.stream.frames_per_block * g.lat_h * g.lat_w * BF16;
            m.push(Component::CommBuffers, Phase::Resident, comms * NCCL_COMM_BYTES + if world > 1 { 2 * latent } else { 0 }, format!("{comms} NCCL communicator(s) + latent send/recv buffers"));
            m
        })
        .collect()
}
