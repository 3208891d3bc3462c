//! `lava plan`: the capacity-planning dry run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use planner::size::{AspectSource, Resolution, SizeArg, parse_aspect, resolve};
use planner::{
    Catalog, Layout, LayoutKind, ModelSpec, PlanError, Request, T5Placement, VaePlacement,
    Workload, render,
};

/// Exit codes of `lava plan` (shared with `lava generate`'s pre-launch check).
pub const EXIT_FITS: u8 = proto::exit::OK;
pub const EXIT_BAD_INPUT: u8 = proto::exit::BAD_INPUT;
pub const EXIT_INFEASIBLE: u8 = proto::exit::INFEASIBLE_PLAN;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// lava's runtime: encoders placed once, caches sized from the geometry.
    Lava,
    /// The official LiveAvatar code as it runs: TPP with a full pipeline on every rank.
    Liveavatar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum T5Arg {
    /// Resident on every GPU (LiveAvatar's multi-GPU mode).
    Every,
    /// Resident on one rank; outputs sent to the ranks that need them.
    One,
    /// On the host CPU.
    Cpu,
}

/// Flags named like LiveAvatar's where they mean the same.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// GPUs, in rank order: `5xH800`, `4xH100,1xL40S`, `H200`, or generic `5x24GB`.
    #[arg(long, env = "LAVA_GPUS")]
    pub gpus: String,
    /// Built-in model (s2v-14b, tiny) or a model spec TOML file.
    #[arg(long, default_value = "s2v-14b")]
    pub model: String,
    /// Target pixel area as WIDTH*HEIGHT (or WIDTHxHEIGHT); the aspect ratio comes from --image or --aspect.
    #[arg(long, default_value = "704*384")]
    pub size: String,
    /// Reference image; its aspect ratio decides H×W (model-spec §10.1).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Aspect ratio W:H to use instead of an image, e.g. 16:9.
    #[arg(long, conflicts_with = "image")]
    pub aspect: Option<String>,
    /// Take --size literally as WIDTHxHEIGHT (multiples of 16) instead of as an area.
    #[arg(long, alias = "exact_size", conflicts_with_all = ["image", "aspect"])]
    pub exact_size: bool,
    /// Video frames per clip.
    #[arg(long = "infer_frames", alias = "infer-frames", default_value_t = 48)]
    pub infer_frames: u64,
    /// Denoising steps per block.
    #[arg(long = "sample_steps", alias = "sample-steps", default_value_t = 4)]
    pub sample_steps: u64,
    /// Number of 48-frame clips to generate.
    #[arg(long = "num_clip", alias = "num-clip", default_value_t = 1)]
    pub num_clip: u64,
    /// GPUs for the DiT (stages × pp × ulysses × tp).
    #[arg(long = "num_gpus_dit", alias = "num-gpus-dit")]
    pub num_gpus_dit: Option<u64>,
    /// Ulysses sequence-parallel degree inside a stage (must divide the 40 heads with --tp).
    #[arg(long = "ulysses_size", alias = "ulysses-size")]
    pub ulysses_size: Option<u64>,
    /// Tensor-parallel degree inside a stage.
    #[arg(long)]
    pub tp: Option<u64>,
    /// Layer-pipeline degree inside a stage.
    #[arg(long)]
    pub pp: Option<u64>,
    /// Shard weights FSDP-style over each Ulysses group.
    #[arg(long)]
    pub fsdp: bool,
    /// Run the VAE on its own rank after the DiT ranks.
    #[arg(long = "enable_vae_parallel", alias = "enable-vae-parallel", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub enable_vae_parallel: Option<bool>,
    /// Stream DiT block weights from host memory.
    #[arg(long = "offload_model", alias = "offload-model", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub offload_model: Option<bool>,
    /// FP8 e4m3 weights for the DiT linears (model-spec §8.1).
    #[arg(long)]
    pub fp8: bool,
    /// Where the text encoder lives (default: one rank; every GPU under --layout liveavatar).
    #[arg(long, value_enum)]
    pub t5: Option<T5Arg>,
    /// Layout family.
    #[arg(long, value_enum)]
    pub layout: Option<LayoutArg>,
    /// Always list the best layouts for these GPUs, even when the requested one fits.
    #[arg(long)]
    pub propose: bool,
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
}

impl PlanArgs {
    /// True when no layout flag was given: the planner then picks the best layout itself.
    fn layout_unspecified(&self) -> bool {
        self.num_gpus_dit.is_none()
            && self.ulysses_size.is_none()
            && self.tp.is_none()
            && self.pp.is_none()
            && !self.fsdp
            && self.enable_vae_parallel.is_none()
            && self.offload_model.is_none()
            && self.t5.is_none()
            && self.layout.is_none()
    }
}

/// Everything parsed and validated; the planner runs on this.
struct Parsed {
    model: ModelSpec,
    gpus: Vec<planner::Gpu>,
    resolution: Resolution,
    workload: Workload,
}

fn parse_common(a: &PlanArgs) -> Result<Parsed, PlanError> {
    let mut model = proto::plan::model_spec(&a.model)?;
    let catalog = Catalog::builtin()?;
    let gpus = catalog.parse_gpus(&a.gpus)?;
    let size = SizeArg::parse(&a.size)?;
    let source = if a.exact_size {
        AspectSource::Exact
    } else if let Some(path) = &a.image {
        let image_err = |reason: String| PlanError::Image {
            path: path.display().to_string(),
            reason,
        };
        let dim = imagesize::size(path)
            .map_err(|e| image_err(format!("not a readable JPEG/PNG image ({e})")))?;
        if dim.width == 0 || dim.height == 0 {
            return Err(image_err("the image has no pixels".into()));
        }
        AspectSource::Image {
            height: dim.height as u64,
            width: dim.width as u64,
        }
    } else if let Some(aspect) = &a.aspect {
        let (width, height) = parse_aspect(aspect)?;
        AspectSource::Aspect { width, height }
    } else {
        AspectSource::SizeString
    };
    let resolution = resolve(size, source)?;
    model.set_workload(a.infer_frames, a.sample_steps)?;
    if a.num_clip == 0 {
        return Err(PlanError::Workload("--num_clip must be at least 1".into()));
    }
    let workload = Workload {
        sample_steps: a.sample_steps,
        clips: a.num_clip,
    };
    Ok(Parsed {
        model,
        gpus,
        resolution,
        workload,
    })
}

fn explicit_layout(a: &PlanArgs, p: &Parsed) -> Result<Layout, PlanError> {
    let kind = match a.layout.unwrap_or(LayoutArg::Lava) {
        LayoutArg::Lava => LayoutKind::Lava,
        LayoutArg::Liveavatar => LayoutKind::Liveavatar,
    };
    let la = kind == LayoutKind::Liveavatar;
    let (tp, ulysses, pp) = (
        a.tp.unwrap_or(1),
        a.ulysses_size.unwrap_or(1),
        a.pp.unwrap_or(1),
    );
    for (name, v) in [("--tp", tp), ("--ulysses_size", ulysses), ("--pp", pp)] {
        if v == 0 {
            return Err(PlanError::Layout(format!("{name} must be at least 1")));
        }
    }
    let dedicated = a.enable_vae_parallel.unwrap_or(la);
    let n = p.gpus.len() as u64;
    let dit = match a.num_gpus_dit {
        Some(0) => {
            return Err(PlanError::Layout(
                "--num_gpus_dit must be at least 1".into(),
            ));
        }
        Some(d) => d,
        None if la => a.sample_steps,
        None => n
            .checked_sub(u64::from(dedicated))
            .filter(|d| *d > 0)
            .ok_or_else(|| {
                PlanError::Layout("--enable_vae_parallel needs at least 2 GPUs".into())
            })?,
    };
    let group = tp * ulysses * pp;
    if dit % group != 0 {
        return Err(PlanError::Layout(format!(
            "{dit} DiT GPUs do not split into groups of tp {tp} × ulysses {ulysses} × pp {pp} = {group}"
        )));
    }
    let stages = dit / group;
    if !a.sample_steps.is_multiple_of(stages) {
        return Err(PlanError::Layout(format!(
            "{dit} DiT GPUs / (tp {tp} × ulysses {ulysses} × pp {pp}) = {stages} TPP stages, but --sample_steps {} does not divide into {stages} stages{}",
            a.sample_steps,
            if dedicated || n <= dit || a.num_gpus_dit.is_some() {
                String::new()
            } else {
                "; add --enable_vae_parallel to give one GPU to the VAE".to_string()
            }
        )));
    }
    let t5 = match a.t5 {
        Some(T5Arg::Every) => T5Placement::Every,
        Some(T5Arg::One) => T5Placement::One,
        Some(T5Arg::Cpu) => T5Placement::Cpu,
        None if la => T5Placement::Every,
        None => T5Placement::One,
    };
    Ok(Layout {
        kind,
        stages,
        tp,
        ulysses,
        pp,
        fsdp: a.fsdp,
        vae: if dedicated {
            VaePlacement::Dedicated
        } else {
            VaePlacement::Colocated
        },
        t5,
        fp8: a.fp8,
        offload: a.offload_model.unwrap_or(false),
    })
}

/// Smaller standard sizes to try when nothing fits at the requested one.
fn fallback_resolutions(p: &Parsed) -> Vec<Resolution> {
    let mut out = vec![p.resolution.clone()];
    if p.resolution.source == AspectSource::Exact {
        return out;
    }
    for s in ["704*384", "688*368", "384*256"] {
        if let Ok(size) = SizeArg::parse(s)
            && size.area() < p.resolution.size.area()
            && let Ok(r) = resolve(size, p.resolution.source.clone())
        {
            out.push(r);
        }
    }
    out
}

/// Run `lava plan`; returns the process exit code.
pub fn run(a: &PlanArgs) -> ExitCode {
    match run_inner(a) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("lava plan: {e}");
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "status": "bad_input", "error": e.to_string() })
                );
            }
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

fn run_inner(a: &PlanArgs) -> Result<u8, PlanError> {
    let p = parse_common(a)?;
    let mut auto = false;
    let layout = if a.layout_unspecified() {
        // Best layout of these GPUs at this size with the user's FP8 choice, if any fits.
        let best = planner::propose(
            &p.model,
            &p.gpus,
            std::slice::from_ref(&p.resolution),
            p.workload,
            64,
        )
        .into_iter()
        .find(|c| c.layout.fp8 == a.fp8 && !c.layout.offload);
        match best {
            Some(c) => {
                auto = true;
                c.layout
            }
            None => explicit_layout(a, &p).or_else(|_| {
                // Nothing fits and the defaults do not form a layout: show LiveAvatar's own.
                let mut la = PlanArgs {
                    layout: Some(LayoutArg::Liveavatar),
                    ..a.clone()
                };
                la.enable_vae_parallel = Some(p.gpus.len() as u64 > a.sample_steps);
                explicit_layout(&la, &p)
            })?,
        }
    } else {
        explicit_layout(a, &p)?
    };
    let req = Request::new(
        p.model.clone(),
        p.gpus.clone(),
        layout,
        p.resolution.clone(),
        p.workload,
    )?;
    match planner::plan(&req) {
        Ok(mut plan) => {
            if auto {
                plan.notes.insert(0, "no layout flags given: chose the best-estimated layout that fits (see --propose)".into());
            } else if a.layout.is_none() {
                plan.notes.push("this is lava's runtime; --layout liveavatar shows what the official code uses in the same TPP layout".into());
            }
            let proposals = if a.propose {
                planner::propose(&p.model, &p.gpus, &fallback_resolutions(&p), p.workload, 5)
            } else {
                Vec::new()
            };
            if a.json {
                println!(
                    "{}",
                    json(
                        &serde_json::json!({ "status": "fits", "plan": plan, "proposals": proposals })
                    )
                );
            } else {
                print!("{}", render::fits(&plan));
                if a.propose {
                    print!("{}", render::proposals_text(&proposals, &plan));
                }
            }
            Ok(EXIT_FITS)
        }
        Err(inf) => {
            let proposals =
                planner::propose(&p.model, &p.gpus, &fallback_resolutions(&p), p.workload, 5);
            if a.json {
                println!(
                    "{}",
                    json(&serde_json::json!({
                        "status": "infeasible",
                        "plan": inf.plan,
                        "shortfalls": inf.shortfalls,
                        "reasons": inf.reasons,
                        "proposals": proposals,
                    }))
                );
            } else {
                print!("{}", render::infeasible(&inf, &proposals));
            }
            Ok(EXIT_INFEASIBLE)
        }
    }
}

fn json(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v)
        .unwrap_or_else(|e| format!("{{\"status\":\"error\",\"error\":\"{e}\"}}"))
}

/// `lava generate`'s pre-launch check: the explicit layout of `a` planned at `a`'s size, with
/// the encoders where the workers run them (`encoders`: a checkpoint run; without one no
/// encoder runs). Prints the plan; `Err` is the exit code (bad input or infeasible, message
/// printed), and then nothing may be spawned.
pub fn plan_for_generate(
    a: &PlanArgs,
    encoders: bool,
) -> Result<(Layout, Resolution, ModelSpec, planner::Plan), u8> {
    let fail = |e: PlanError| {
        eprintln!("lava generate: {e}");
        EXIT_BAD_INPUT
    };
    let p = parse_common(a).map_err(fail)?;
    let mut layout = explicit_layout(a, &p).map_err(fail)?;
    if !encoders {
        layout.t5 = T5Placement::Absent;
    }
    let req = Request::new(
        p.model.clone(),
        p.gpus.clone(),
        layout.clone(),
        p.resolution.clone(),
        p.workload,
    )
    .map_err(fail)?;
    match planner::plan(&req) {
        Ok(plan) => {
            print!("{}", render::fits(&plan));
            Ok((layout, p.resolution, p.model, plan))
        }
        Err(inf) => {
            print!("{}", render::infeasible(&inf, &[]));
            eprintln!("lava generate: the plan does not fit; nothing was started");
            Err(EXIT_INFEASIBLE)
        }
    }
}
