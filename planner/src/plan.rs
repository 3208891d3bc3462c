//! `plan`: model + GPUs + layout + workload → a per-rank `Plan`, or an `Infeasible` with numbers.

use serde::Serialize;

use crate::error::{PlanError, Result};
use crate::geometry::Geometry;
use crate::gpu::Gpu;
use crate::layout::{Layout, LayoutKind, Role, T5Placement, VaePlacement, mesh};
use crate::memory::{Component, Item, Phase, RankMemory, Workload, rank_memory};
use crate::params::ModelParams;
use crate::size::Resolution;
use crate::spec::ModelSpec;
use crate::time::{Estimate, estimate};

/// A validated planning request. Build it with [`Request::new`]: parse, don't validate.
#[derive(Debug, Clone)]
pub struct Request {
    pub model: ModelSpec,
    pub gpus: Vec<Gpu>,
    pub layout: Layout,
    pub resolution: Resolution,
    pub workload: Workload,
}

impl Request {
    /// Check everything that is bad input (as opposed to "does not fit").
    pub fn new(
        model: ModelSpec,
        gpus: Vec<Gpu>,
        layout: Layout,
        resolution: Resolution,
        workload: Workload,
    ) -> Result<Self> {
        if gpus.is_empty() {
            return Err(PlanError::Gpus {
                input: String::new(),
                reason: "no GPUs".into(),
            });
        }
        if workload.clips == 0 {
            return Err(PlanError::Workload("--num_clip must be at least 1".into()));
        }
        if workload.sample_steps == 0 {
            return Err(PlanError::Workload(
                "--sample_steps must be at least 1".into(),
            ));
        }
        layout.validate(&model, workload.sample_steps)?;
        let world = layout.world();
        if world > gpus.len() as u64 {
            return Err(PlanError::Layout(format!(
                "the layout needs {world} GPUs ({} DiT{}), but --gpus lists {}",
                layout.dit_gpus(),
                if layout.vae == VaePlacement::Dedicated {
                    " + 1 VAE"
                } else {
                    ""
                },
                gpus.len()
            )));
        }
        if layout.fp8
            && let Some(g) = gpus.iter().take(world as usize).find(|g| !g.has_fp8())
        {
            return Err(PlanError::Layout(format!(
                "--fp8 needs FP8 tensor cores; {} has none",
                g.label
            )));
        }
        Ok(Self {
            model,
            gpus,
            layout,
            resolution,
            workload,
        })
    }
}

/// One rank of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankPlan {
    pub rank: u64,
    pub role: Role,
    pub role_label: String,
    pub gpu: String,
    /// Model components, then the GPU's overheads (context, workspaces, allocator reserve).
    pub items: Vec<Item>,
    pub resident_bytes: u64,
    pub worst_phase: Phase,
    /// Resident stream state not yet allocated when the startup phase sets the peak.
    pub absent_at_startup_bytes: u64,
    /// Resident + worst phase (model components only).
    pub peak_bytes: u64,
    /// GPU memory minus context, workspaces and allocator reserve.
    pub usable_bytes: u64,
    /// Total memory as the driver reports it.
    pub capacity_bytes: u64,
}

impl RankPlan {
    pub fn fits(&self) -> bool {
        self.peak_bytes <= self.usable_bytes
    }

    /// Peak including the GPU overheads, comparable with the driver's total.
    pub fn total_bytes(&self) -> u64 {
        self.items
            .iter()
            .filter(|i| is_overhead(i.component))
            .map(|i| i.bytes)
            .sum::<u64>()
            + self.peak_bytes
    }

    /// The largest model component on this rank.
    pub fn largest(&self) -> Option<&Item> {
        self.items
            .iter()
            .filter(|i| !is_overhead(i.component))
            .max_by_key(|i| i.bytes)
    }
}

fn is_overhead(c: Component) -> bool {
    matches!(
        c,
        Component::CudaContext | Component::LibraryWorkspace | Component::AllocatorReserve
    )
}

/// A plan that fits (or, inside [`Infeasible`], the attempt that did not).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub model: String,
    pub resolution: Resolution,
    pub geometry: Geometry,
    pub layout: Layout,
    pub workload: Workload,
    pub ranks: Vec<RankPlan>,
    pub estimate: Estimate,
    /// GPUs listed in `--gpus` that the layout does not use.
    pub idle_gpus: u64,
    pub notes: Vec<String>,
}

impl Plan {
    /// Highest peak / usable over all ranks.
    pub fn max_utilisation(&self) -> f64 {
        self.ranks
            .iter()
            .map(|r| r.peak_bytes as f64 / r.usable_bytes.max(1) as f64)
            .fold(0.0, f64::max)
    }

    /// One line describing the layout, e.g. `4 TPP stages × tp 2 + VAE rank, fp8, T5 on CPU`.
    pub fn layout_summary(&self) -> String {
        describe(&self.layout)
    }
}

/// Why a plan cannot run, with numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Infeasible {
    pub plan: Plan,
    pub shortfalls: Vec<Shortfall>,
    /// Reasons that are not about memory (e.g. the reference's fixed sink buffer overflowing).
    pub reasons: Vec<String>,
}

/// One rank that does not fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shortfall {
    pub rank: u64,
    pub role_label: String,
    pub gpu: String,
    pub need_bytes: u64,
    pub usable_bytes: u64,
    pub short_bytes: u64,
    pub largest_component: String,
    pub largest_bytes: u64,
    pub phase: Phase,
}

/// Plan a request. Pure arithmetic: no I/O, no GPU.
pub fn plan(req: &Request) -> std::result::Result<Plan, Box<Infeasible>> {
    let spec = &req.model;
    let params = ModelParams::new(spec);
    let g = Geometry::new(spec, req.resolution.height, req.resolution.width);
    let roles = mesh(&req.layout, spec.dit.num_layers, req.workload.sample_steps);
    let gpus: Vec<Gpu> = req.gpus.iter().take(roles.len()).cloned().collect();
    let memories = rank_memory(spec, &params, &g, &req.layout, &roles, &req.workload);
    let ranks: Vec<RankPlan> = roles
        .iter()
        .zip(memories)
        .zip(&gpus)
        .enumerate()
        .map(|(rank, ((role, mem), gpu))| rank_plan(rank as u64, role, mem, gpu))
        .collect();
    let mut reasons = Vec::new();
    let mut notes = Vec::new();
    if req.layout.kind == LayoutKind::Liveavatar {
        let rows = spec.stream.liveavatar_sink_rows;
        if g.lc > rows {
            reasons.push(format!(
                "the reference's sink buffer holds {rows} rows but H×W {}×{} needs Lc = {} sink tokens (it fails with a shape error after loading)",
                g.height, g.width, g.lc
            ));
        }
        let latents = req.workload.clips * spec.stream.latents_per_clip;
        if latents > spec.dit.rope_max_positions {
            reasons.push(format!(
                "{} clips need {latents} latent-frame RoPE positions; the reference's table has {}",
                req.workload.clips, spec.dit.rope_max_positions
            ));
        }
    }
    if req.resolution.height * req.resolution.width > 0 && g.fsl == 0 {
        reasons.push("the resolution gives no DiT tokens".into());
    }
    if req.layout.fsdp
        && let Some(r) = ranks.first()
    {
        let get = |c: Component| {
            r.items
                .iter()
                .filter(|i| i.component == c)
                .map(|i| i.bytes)
                .sum::<u64>()
        };
        let resident =
            get(Component::DitWeights) + get(Component::KvNoisy) + get(Component::KvSink);
        let root = get(Component::FsdpRootUnshard);
        notes.push(format!(
                "rank 0: DiT shard + KV caches = {:.2} GB resident; + FSDP root unshard {:.2} GB ({:.2} GiB) = {:.2} GB. \
                 Adding the GiB figure to the GB figure, {:.2} + {:.2} = {:.2} \"GB\", is the unit mix behind the quoted \"25.65 GB\" (model-spec §7.4)",
                resident as f64 / 1e9,
                root as f64 / 1e9,
                root as f64 / (1u64 << 30) as f64,
                (resident + root) as f64 / 1e9,
                round2(resident as f64 / 1e9),
                round2(root as f64 / (1u64 << 30) as f64),
                round2(resident as f64 / 1e9) + round2(root as f64 / (1u64 << 30) as f64),
            ));
    }
    let idle = req.gpus.len() as u64 - roles.len() as u64;
    if idle > 0 {
        notes.push(format!(
            "{idle} of the {} GPUs listed are not used by this layout",
            req.gpus.len()
        ));
    }
    let estimate = estimate(spec, &g, &req.layout, &roles, &gpus);
    let plan = Plan {
        model: spec.name.clone(),
        resolution: req.resolution.clone(),
        geometry: g,
        layout: req.layout.clone(),
        workload: req.workload,
        ranks,
        estimate,
        idle_gpus: idle,
        notes,
    };
    let shortfalls: Vec<Shortfall> = plan
        .ranks
        .iter()
        .filter(|r| !r.fits())
        .map(|r| {
            let (name, bytes) = r
                .largest()
                .map(|i| (i.component.label().to_string(), i.bytes))
                .unwrap_or_default();
            Shortfall {
                rank: r.rank,
                role_label: r.role_label.clone(),
                gpu: r.gpu.clone(),
                need_bytes: r.peak_bytes,
                usable_bytes: r.usable_bytes,
                short_bytes: r.peak_bytes - r.usable_bytes,
                largest_component: name,
                largest_bytes: bytes,
                phase: r.worst_phase,
            }
        })
        .collect();
    if shortfalls.is_empty() && reasons.is_empty() {
        Ok(plan)
    } else {
        Err(Box::new(Infeasible {
            plan,
            shortfalls,
            reasons,
        }))
    }
}

fn rank_plan(rank: u64, role: &Role, mem: RankMemory, gpu: &Gpu) -> RankPlan {
    let resident = mem.resident();
    let (worst_phase, _) = mem.worst_phase();
    let peak = mem.peak();
    let absent_at_startup = if worst_phase == Phase::Startup {
        mem.absent_at_startup()
    } else {
        0
    };
    let mut items = mem.items;
    for (component, bytes, detail) in [
        (
            Component::CudaContext,
            gpu.context_bytes,
            "CUDA context and loaded modules",
        ),
        (
            Component::LibraryWorkspace,
            gpu.workspace_bytes,
            "cuBLASLt/cuDNN workspaces",
        ),
        (
            Component::AllocatorReserve,
            gpu.reserve_bytes,
            "headroom for allocator fragmentation",
        ),
    ] {
        items.push(Item {
            component,
            phase: Phase::Resident,
            bytes,
            detail: detail.into(),
        });
    }
    RankPlan {
        rank,
        role: *role,
        role_label: role.label(),
        gpu: gpu.name.clone(),
        items,
        resident_bytes: resident,
        absent_at_startup_bytes: absent_at_startup,
        worst_phase,
        peak_bytes: peak,
        usable_bytes: gpu.usable_bytes(),
        capacity_bytes: gpu.memory_bytes,
    }
}

/// A layout in one line.
pub fn describe(l: &Layout) -> String {
    let mut parts = Vec::new();
    let mut dit = format!(
        "{} TPP stage{}",
        l.stages,
        if l.stages == 1 { "" } else { "s" }
    );
    for (name, v) in [("tp", l.tp), ("ulysses", l.ulysses), ("pp", l.pp)] {
        if v > 1 {
            dit.push_str(&format!(" × {name} {v}"));
        }
    }
    if l.fsdp {
        dit.push_str(" (FSDP)");
    }
    parts.push(dit);
    parts.push(match l.vae {
        VaePlacement::Dedicated => "+ VAE rank".into(),
        VaePlacement::Colocated => "VAE co-located".to_string(),
    });
    if l.fp8 {
        parts.push("fp8".into());
    }
    parts.push(match l.t5 {
        T5Placement::Every => "T5 on every GPU".into(),
        T5Placement::One => "T5 on one rank".into(),
        T5Placement::Cpu => "T5 on CPU".to_string(),
        T5Placement::Absent => "no encoders".to_string(),
    });
    if l.offload {
        parts.push("blocks offloaded".into());
    }
    if l.kind == LayoutKind::Liveavatar {
        parts.insert(0, "liveavatar:".into());
    }
    parts.join(", ")
}

/// Layouts that fit the same GPUs (or a smaller size when nothing fits at the requested one),
/// best estimated FPS first.
pub fn propose(
    model: &ModelSpec,
    gpus: &[Gpu],
    resolutions: &[Resolution],
    workload: Workload,
    limit: usize,
) -> Vec<Plan> {
    let n = gpus.len() as u64;
    let fp8_ok = gpus.iter().all(Gpu::has_fp8);
    for res in resolutions {
        let mut found: Vec<Plan> = Vec::new();
        for vae in [VaePlacement::Dedicated, VaePlacement::Colocated] {
            let max_dit = n - u64::from(vae == VaePlacement::Dedicated);
            for dit in 1..=max_dit {
                for (stages, tp, ulysses, pp) in factorisations(model, workload.sample_steps, dit) {
                    for fsdp in [false, true] {
                        if fsdp && ulysses < 2 {
                            continue;
                        }
                        for fp8 in [false, true] {
                            if fp8 && !fp8_ok {
                                continue;
                            }
                            for t5 in [T5Placement::One, T5Placement::Cpu] {
                                for offload in [false, true] {
                                    let layout = Layout {
                                        kind: LayoutKind::Lava,
                                        stages,
                                        tp,
                                        ulysses,
                                        pp,
                                        fsdp,
                                        vae,
                                        t5,
                                        fp8,
                                        offload,
                                    };
                                    let Ok(req) = Request::new(
                                        model.clone(),
                                        gpus.to_vec(),
                                        layout,
                                        res.clone(),
                                        workload,
                                    ) else {
                                        continue;
                                    };
                                    if let Ok(p) = plan(&req) {
                                        found.push(p);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        if !found.is_empty() {
            found.sort_by(|a, b| {
                b.estimate
                    .fps
                    .total_cmp(&a.estimate.fps)
                    .then(a.layout.world().cmp(&b.layout.world()))
                    .then(a.max_utilisation().total_cmp(&b.max_utilisation()))
            });
            found.truncate(limit);
            return found;
        }
    }
    Vec::new()
}

/// (stages, tp, ulysses, pp) with stages dividing the steps and the product equal to `dit`.
fn factorisations(model: &ModelSpec, steps: u64, dit: u64) -> Vec<(u64, u64, u64, u64)> {
    let divisors = |n: u64| (1..=n).filter(move |d| n.is_multiple_of(*d));
    let mut out = Vec::new();
    for stages in divisors(steps) {
        if !dit.is_multiple_of(stages) {
            continue;
        }
        let rest = dit / stages;
        for tp in divisors(rest) {
            if !model.dit.num_heads.is_multiple_of(tp)
                || !model.dit.ffn_dim.is_multiple_of(tp)
                || tp > 8
            {
                continue;
            }
            for ulysses in divisors(rest / tp) {
                if !model.dit.num_heads.is_multiple_of(tp * ulysses) {
                    continue;
                }
                let pp = rest / tp / ulysses;
                if pp <= model.dit.num_layers {
                    out.push((stages, tp, ulysses, pp));
                }
            }
        }
    }
    out
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
