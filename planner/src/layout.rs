//! Parallel layouts and the rank mesh.
//!
//! DiT GPUs form `stages × pp × ulysses × tp` ranks: `stages` TPP stages (timestep-forcing
//! pipeline parallelism, each running `sample_steps / stages` consecutive denoising steps with
//! its own step caches), each split into `pp` layer-pipeline sub-stages, each of those into
//! `ulysses` sequence-parallel ranks, each of those into `tp` tensor-parallel ranks. TP is the
//! innermost axis so its ranks are neighbours on NVLink. An optional dedicated VAE rank comes last.

use serde::Serialize;

use crate::error::{PlanError, Result};
use crate::spec::ModelSpec;

/// Which layout family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// lava's runtime: encoders placed once, caches sized from the geometry, text K/V cached.
    Lava,
    /// The official LiveAvatar code as it runs (model-spec §6.2): every rank builds the whole
    /// pipeline (the VAE rank keeps an idle DiT), T5 resident everywhere, the 3000-row sink buffer.
    Liveavatar,
}

/// Where the VAE runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VaePlacement {
    /// Its own rank after the DiT ranks (`--enable_vae_parallel`).
    Dedicated,
    /// On the DiT rank that produces the final latents (last stage, last pp sub-stage, tp 0, sp 0).
    Colocated,
}

/// Where the text encoder (and wav2vec2 with it) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum T5Placement {
    /// Resident on every GPU, as LiveAvatar's multi-GPU mode leaves it.
    Every,
    /// Resident on one rank (the VAE rank when dedicated, else rank 0); outputs sent once.
    One,
    /// On the host CPU; nothing on the GPUs.
    Cpu,
    /// No text or audio encoder runs: a run without a checkpoint derives the text context and
    /// the audio features (`lava generate` without `--ckpt_dir`).
    Absent,
}

/// A complete parallel layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layout {
    pub kind: LayoutKind,
    /// TPP stages.
    pub stages: u64,
    pub tp: u64,
    pub ulysses: u64,
    pub pp: u64,
    /// FSDP over each ulysses group: every rank keeps 1/ulysses of each unit.
    pub fsdp: bool,
    pub vae: VaePlacement,
    pub t5: T5Placement,
    pub fp8: bool,
    /// DiT block weights streamed from host memory (double-buffered).
    pub offload: bool,
}

impl Layout {
    pub fn dit_gpus(&self) -> u64 {
        self.stages * self.pp * self.ulysses * self.tp
    }

    pub fn world(&self) -> u64 {
        self.dit_gpus() + u64::from(self.vae == VaePlacement::Dedicated)
    }

    /// Check the layout against the model and the step count. Errors are bad input.
    pub fn validate(&self, spec: &ModelSpec, sample_steps: u64) -> Result<()> {
        let bad = |m: String| Err(PlanError::Layout(m));
        let d = &spec.dit;
        for (name, v) in [
            ("stages", self.stages),
            ("--tp", self.tp),
            ("--ulysses_size", self.ulysses),
            ("--pp", self.pp),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !sample_steps.is_multiple_of(self.stages) {
            return bad(format!(
                "sample_steps {sample_steps} does not divide into {} TPP stages (each stage runs the same number of steps)",
                self.stages
            ));
        }
        if !d.num_heads.is_multiple_of(self.tp) {
            return bad(format!(
                "--tp {} does not divide the {} attention heads",
                self.tp, d.num_heads
            ));
        }
        if !d.ffn_dim.is_multiple_of(self.tp) {
            return bad(format!(
                "--tp {} does not divide ffn_dim {}",
                self.tp, d.ffn_dim
            ));
        }
        if !d.num_heads.is_multiple_of(self.tp * self.ulysses) {
            return bad(format!(
                "--ulysses_size {} with --tp {} does not divide the {} attention heads (Ulysses splits heads: {} must divide {})",
                self.ulysses,
                self.tp,
                d.num_heads,
                self.tp * self.ulysses,
                d.num_heads
            ));
        }
        if self.pp > d.num_layers {
            return bad(format!(
                "--pp {} exceeds the {} DiT layers",
                self.pp, d.num_layers
            ));
        }
        if self.fsdp && self.ulysses < 2 {
            return bad(
                "--fsdp shards over the Ulysses group; it needs --ulysses_size of at least 2"
                    .into(),
            );
        }
        if self.kind == LayoutKind::Liveavatar {
            if self.tp != 1 || self.ulysses != 1 || self.pp != 1 || self.fsdp {
                return bad("--layout liveavatar is LiveAvatar's TPP: it takes no --tp, --pp, --ulysses_size or --fsdp".into());
            }
            if self.stages != sample_steps {
                return bad(format!(
                    "--layout liveavatar runs one denoising step per DiT GPU: {} DiT GPUs for {sample_steps} steps",
                    self.stages
                ));
            }
        }
        Ok(())
    }
}

/// What one rank does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum Role {
    Dit {
        stage: u64,
        /// First and one-past-last denoising step of this stage.
        step_begin: u64,
        step_end: u64,
        pp: u64,
        sp: u64,
        tp: u64,
        /// First and one-past-last DiT layer of this pp sub-stage.
        layer_begin: u64,
        layer_end: u64,
    },
    Vae,
}

impl Role {
    /// Short name used in tables, process titles and logs, e.g. `dit s0 pp0 sp1 tp0` or `vae`.
    pub fn label(&self) -> String {
        match self {
            Role::Dit {
                stage,
                step_begin,
                step_end,
                pp,
                sp,
                tp,
                ..
            } => {
                let steps = if step_end - step_begin == 1 {
                    format!("step {step_begin}")
                } else {
                    format!("steps {step_begin}-{}", step_end - 1)
                };
                let mut s = format!("dit stage {stage} ({steps})");
                for (name, v) in [("pp", pp), ("sp", sp), ("tp", tp)] {
                    s.push_str(&format!(" {name}{v}"));
                }
                s
            }
            Role::Vae => "vae".to_string(),
        }
    }
}

/// Layers of pp sub-stage `p` of `pp`: the first `L % pp` sub-stages take one extra layer.
pub fn layer_range(layers: u64, pp: u64, p: u64) -> (u64, u64) {
    let (base, extra) = (layers / pp, layers % pp);
    let begin = p * base + p.min(extra);
    (begin, begin + base + u64::from(p < extra))
}

/// The role of every rank, in rank order.
pub fn mesh(layout: &Layout, layers: u64, sample_steps: u64) -> Vec<Role> {
    let per_stage = sample_steps / layout.stages.max(1);
    let mut roles = Vec::new();
    for stage in 0..layout.stages {
        for pp in 0..layout.pp {
            let (layer_begin, layer_end) = layer_range(layers, layout.pp, pp);
            for sp in 0..layout.ulysses {
                for tp in 0..layout.tp {
                    roles.push(Role::Dit {
                        stage,
                        step_begin: stage * per_stage,
                        step_end: (stage + 1) * per_stage,
                        pp,
                        sp,
                        tp,
                        layer_begin,
                        layer_end,
                    });
                }
            }
        }
    }
    if layout.vae == VaePlacement::Dedicated {
        roles.push(Role::Vae);
    }
    roles
}

/// The rank that hosts a co-located VAE: the first rank of the last stage's last pp sub-stage.
pub fn colocated_vae_rank(layout: &Layout) -> u64 {
    let per_pp = layout.ulysses * layout.tp;
    let stage_base = (layout.stages - 1) * layout.pp * per_pp;
    stage_base + (layout.pp - 1) * per_pp
}

/// The rank that hosts the text and audio encoders under `T5Placement::One`: the decoding rank
/// (the VAE rank, or the rank hosting the co-located VAE), which encodes once and sends the
/// results to the DiT ranks, as `lava generate`'s workers do.
pub fn encoder_rank(layout: &Layout) -> u64 {
    match layout.vae {
        VaePlacement::Dedicated => layout.world() - 1,
        VaePlacement::Colocated => colocated_vae_rank(layout),
    }
}
