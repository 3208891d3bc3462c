//! Time estimates from FLOPs and the GPU's rates. These are estimates, labelled as such
//! everywhere they are shown: achieved efficiency is an assumption until benchmarks replace it.

use serde::Serialize;

use crate::flops::{CallFlops, vae_decode_flops};
use crate::geometry::Geometry;
use crate::gpu::Gpu;
use crate::layout::{Layout, LayoutKind, Role, T5Placement, VaePlacement};
use crate::spec::ModelSpec;

/// Fraction of the dense peak assumed for GEMMs.
pub const GEMM_EFFICIENCY: f64 = 0.6;
/// Fraction of the bf16 peak assumed for attention.
pub const ATTENTION_EFFICIENCY: f64 = 0.5;
/// Fraction of the bf16 peak assumed for the VAE's convolutions.
pub const VAE_EFFICIENCY: f64 = 0.35;
/// Host throughput assumed for an encoder on the CPU.
pub const CPU_TFLOPS: f64 = 1.0;

/// Estimated timings of one plan, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Per TPP stage: time for one block (all its steps, pipelined over pp sub-stages).
    pub stage_block_s: Vec<f64>,
    /// Steady-state DiT call on the slowest rank of each stage.
    pub stage_call_s: Vec<f64>,
    /// The VAE decode of one block.
    pub vae_block_s: f64,
    /// Throughput period: one block per this many seconds.
    pub block_s: f64,
    pub fps: f64,
    /// Encoders, prefill, the first block through every stage and its decode.
    pub first_frame_s: f64,
    /// The stage (or "vae") that sets the pace.
    pub bottleneck: String,
    /// True when the GPU rates are nominal (a generic card).
    pub nominal_rates: bool,
}

fn rank_call_s(
    spec: &ModelSpec,
    g: &Geometry,
    layout: &Layout,
    role: &Role,
    gpu: &Gpu,
    lkv: u64,
) -> f64 {
    let Role::Dit {
        pp,
        layer_begin,
        layer_end,
        ..
    } = role
    else {
        return 0.0;
    };
    let d = &spec.dit;
    let f = CallFlops::streaming(spec, g, lkv, layout.kind == LayoutKind::Liveavatar);
    let frac = (layer_end - layer_begin) as f64 / d.num_layers as f64;
    let share = (layout.tp * layout.ulysses) as f64;
    let lin_rate = if layout.fp8 && gpu.has_fp8() {
        gpu.fp8_tflops
    } else {
        gpu.bf16_tflops
    } * 1e12;
    let bf16 = gpu.bf16_tflops * 1e12;
    let mut t = f.linear * frac / share / (lin_rate * GEMM_EFFICIENCY)
        + (f.self_attention + f.cross_attention) * frac / share / (bf16 * ATTENTION_EFFICIENCY);
    if *pp == 0 {
        t += f.other / (bf16 * GEMM_EFFICIENCY);
    }
    let layers = (layer_end - layer_begin) as f64;
    let link = gpu.link_gbs * 1e9;
    let tok = g.lq.div_ceil(layout.ulysses) as f64;
    let dim = d.dim as f64;
    if layout.tp > 1 {
        let tpf = layout.tp as f64;
        t += 3.0 * layers * 2.0 * (tpf - 1.0) / tpf * tok * dim * 2.0 / link;
    }
    if layout.ulysses > 1 {
        let spf = layout.ulysses as f64;
        t += layers * 4.0 * (spf - 1.0) / spf * tok * dim / layout.tp as f64 * 2.0 / link;
    }
    if layout.pp > 1 {
        t += g.lq as f64 * dim * 2.0 / link;
    }
    if layout.offload {
        let bytes = crate::params::DitParams::new(d).block as f64
            * frac
            * d.num_layers as f64
            * if layout.fp8 { 1.0 } else { 2.0 }
            / layout.tp as f64;
        t += bytes / (gpu.host_gbs * 1e9);
    }
    t
}

/// Estimate a plan's timings. `gpus[rank]` is the GPU of each rank.
pub fn estimate(
    spec: &ModelSpec,
    g: &Geometry,
    layout: &Layout,
    roles: &[Role],
    gpus: &[Gpu],
) -> Estimate {
    let steps_per_stage = (spec.stream.sample_steps.max(1) / layout.stages.max(1)).max(1) as f64;
    let vae_rank = match layout.vae {
        VaePlacement::Dedicated => roles.len() - 1,
        VaePlacement::Colocated => crate::layout::colocated_vae_rank(layout) as usize,
    };
    let vae_gpu = &gpus[vae_rank.min(gpus.len() - 1)];
    let frames = spec.stream.frames_per_block;
    let vae_flops = frames as f64 * vae_decode_flops(spec, g.height, g.width);
    let vae_block_s = vae_flops / (vae_gpu.bf16_tflops * 1e12 * VAE_EFFICIENCY);
    let mut stage_call_s = vec![0.0f64; layout.stages as usize];
    let mut stage_first_s = vec![0.0f64; layout.stages as usize];
    let mut stage_block_s = vec![0.0f64; layout.stages as usize];
    for (rank, role) in roles.iter().enumerate() {
        if let Role::Dit { stage, .. } = role {
            let s = *stage as usize;
            let call = rank_call_s(spec, g, layout, role, &gpus[rank], g.lkv);
            let first = rank_call_s(spec, g, layout, role, &gpus[rank], g.lkv_clip0(0));
            stage_call_s[s] = stage_call_s[s].max(call);
            stage_first_s[s] += first / (layout.ulysses * layout.tp) as f64;
            let mut block = steps_per_stage * call;
            if layout.vae == VaePlacement::Colocated && rank == vae_rank {
                block += vae_block_s;
            }
            stage_block_s[s] = stage_block_s[s].max(block);
        }
    }
    let mut block_s = stage_block_s.iter().copied().fold(0.0, f64::max);
    let mut bottleneck = stage_block_s
        .iter()
        .enumerate()
        .fold((0, 0.0), |a, (i, t)| if *t > a.1 { (i, *t) } else { a })
        .0
        .to_string();
    bottleneck = format!("dit stage {bottleneck}");
    if layout.vae == VaePlacement::Dedicated && vae_block_s > block_s {
        block_s = vae_block_s;
        bottleneck = "vae".into();
    }
    let fps = (4 * frames) as f64 / block_s;
    // First frame: encoders, prefill of each stage's caches (stages in parallel), then the first
    // block through every stage and its decode.
    let bf16 = gpus[0].bf16_tflops * 1e12;
    let t5_flops = 2.0 * crate::params::t5_params(&spec.t5) as f64 * spec.dit.text_len as f64;
    let t5_s = match layout.t5 {
        T5Placement::Cpu => t5_flops / (CPU_TFLOPS * 1e12),
        T5Placement::Absent => 0.0,
        T5Placement::Every | T5Placement::One => t5_flops / (bf16 * GEMM_EFFICIENCY),
    };
    let encode_frames = 1 + spec.dit.motion_frames;
    let encode_s = vae_decode_flops(spec, g.height, g.width) / spec.vae.temporal_stride as f64
        * encode_frames as f64
        / (vae_gpu.bf16_tflops * 1e12 * VAE_EFFICIENCY);
    let prefill = CallFlops::prefill(spec, g, layout.kind == LayoutKind::Liveavatar);
    let share = (layout.tp * layout.ulysses) as f64;
    let prefill_s = steps_per_stage * prefill.total() / share / (bf16 * GEMM_EFFICIENCY);
    let first_block: f64 = stage_first_s.iter().map(|s| s * steps_per_stage).sum();
    let first_frame_s = t5_s + encode_s + prefill_s + first_block + vae_block_s;
    Estimate {
        stage_block_s,
        stage_call_s,
        vae_block_s,
        block_s,
        fps,
        first_frame_s,
        bottleneck,
        nominal_rates: gpus.iter().any(|g| g.generic),
    }
}
