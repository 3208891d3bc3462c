//! tpp-bench's side tables: the planner's prediction for one rank (the lines of what the bench
//! builds), the per-rank report file the parent collects, and the latents comparison.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use planner::memory::{Component, Item, RankMemory};
use planner::size::{AspectSource, Resolution, SizeArg, resolve};
use planner::{Catalog, Layout, LayoutKind, ModelSpec, Request, T5Placement, VaePlacement};
use runtime::memory::{Category, MemoryStats, category_of, planned_bytes};

/// What one rank is expected to hold, from `planner::plan` for the bench's layout.
#[derive(Debug)]
pub struct RankPrediction {
    /// Per tracker category: resident lines plus the largest transient phase.
    pub per_category: [(Category, u64); 5],
    /// Resident + worst phase over the same lines (comparable with the tracker's total peak).
    pub peak: u64,
    /// The plan's own peak for this rank (every model line, encoders included if planned here).
    pub plan_peak: u64,
    /// Lines left out because the bench does not build them.
    pub left_out: Vec<String>,
}

/// The `lava plan` flags of this layout.
pub fn lava_plan_command(gpu: &str, world: usize, size: &str, tp: usize, clips: usize) -> String {
    let tp = if tp > 1 {
        format!(" --tp {tp}")
    } else {
        String::new()
    };
    format!(
        "lava plan --gpus {world}x{gpu} --size '{size}' --num_gpus_dit {world}{tp} --t5 cpu \
         --num_clip {clips}"
    )
}

pub fn resolution(size: &str) -> Result<Resolution> {
    Ok(resolve(SizeArg::parse(size)?, AspectSource::SizeString)?)
}

/// The plan of `stages` TPP stages × `tp`, VAE co-located (the last stage's first rank), T5 and
/// wav2vec2 off the GPUs (the bench runs no encoder), for rank `rank`. Without `vae` the VAE
/// lines are left out as well.
#[allow(clippy::too_many_arguments)]
pub fn predict(
    model: &ModelSpec,
    gpu: &str,
    size: &str,
    stages: usize,
    tp: usize,
    clips: usize,
    vae: bool,
    rank: usize,
) -> Result<RankPrediction> {
    let world = stages * tp;
    let gpus = Catalog::builtin()?.parse_gpus(&format!("{world}x{gpu}"))?;
    let layout = Layout {
        kind: LayoutKind::Lava,
        stages: stages as u64,
        tp: tp as u64,
        ulysses: 1,
        pp: 1,
        fsdp: false,
        vae: VaePlacement::Colocated,
        t5: T5Placement::Cpu,
        fp8: false,
        offload: false,
    };
    let work = planner::Workload {
        sample_steps: model.stream.sample_steps,
        clips: clips as u64,
    };
    let req = Request::new(model.clone(), gpus, layout, resolution(size)?, work)?;
    let plan = planner::plan(&req).map_err(|inf| {
        anyhow::anyhow!(
            "the planner finds the layout infeasible: {:?}",
            inf.shortfalls
        )
    })?;
    let r = plan
        .ranks
        .get(rank)
        .with_context(|| format!("the plan has no rank {rank}"))?;
    let built = |c: Component| match c {
        Component::VaeWeights | Component::VaeDecoderCache | Component::VaeDecodeWorkspace => vae,
        Component::VaeEncodeWorkspace
        | Component::T5Weights
        | Component::T5Activations
        | Component::Wav2Vec2 => false,
        _ => category_of(c).is_some(),
    };
    let (kept, dropped): (Vec<Item>, Vec<Item>) =
        r.items.iter().cloned().partition(|i| built(i.component));
    let mem = RankMemory {
        items: kept,
        stream_after_startup: true,
    };
    Ok(RankPrediction {
        per_category: planned_bytes(&mem),
        peak: mem.peak(),
        plan_peak: r.peak_bytes,
        left_out: dropped
            .iter()
            .filter(|i| category_of(i.component).is_some())
            .map(|i| format!("{:?} {} B", i.component, i.bytes))
            .collect(),
    })
}

pub fn pct(got: u64, want: u64) -> String {
    if want == 0 {
        return "—".into();
    }
    format!("{:+.1} %", 100.0 * (got as f64 - want as f64) / want as f64)
}

pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Lines `MEM category peak planned diff` for the tracker's stats beside the prediction.
pub fn memory_lines(st: &MemoryStats, p: &RankPrediction) -> Vec<String> {
    let mut out = Vec::new();
    for (c, planned) in p.per_category {
        let got = st.get(c).peak as u64;
        out.push(format!(
            "MEM {c:?} peak {got} planned {planned} ({:.2} / {:.2} GiB, {})",
            gib(got),
            gib(planned),
            pct(got, planned)
        ));
    }
    let total = st.total_peak as u64;
    out.push(format!(
        "MEM total peak {total} planned {} ({:.2} / {:.2} GiB, {}); plan's full rank peak {} B",
        p.peak,
        gib(total),
        gib(p.peak),
        pct(total, p.peak),
        p.plan_peak
    ));
    if !p.left_out.is_empty() {
        out.push(format!(
            "MEM plan lines not built by the bench: {}",
            p.left_out.join(", ")
        ));
    }
    out
}

/// A rank's report: `key value…` lines.
pub type Report = BTreeMap<String, String>;

pub fn write_report(path: &Path, items: &[(&str, String)]) -> Result<()> {
    let text: String = items.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn read_report(path: &Path) -> Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied()
}

fn read_f32(path: &str) -> Result<Vec<f32>> {
    let b = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    if b.len() % 4 != 0 {
        bail!("{path}: {} bytes is not a whole number of f32", b.len());
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (f64::from(*x) - f64::from(*y)).powi(2);
        den += f64::from(*y).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// `compare REFERENCE OTHER [--blocks N] [--tol X]`: rel L2 of OTHER against REFERENCE over the
/// whole file and per block; fails above the tolerance.
pub fn compare(args: &[String]) -> Result<()> {
    let (mut files, mut blocks, mut tol) = (Vec::new(), 1usize, 1e-2f64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--blocks" => blocks = it.next().context("--blocks needs a value")?.parse()?,
            "--tol" => tol = it.next().context("--tol needs a value")?.parse()?,
            f => files.push(f.to_string()),
        }
    }
    let [reference, other] = files.as_slice() else {
        bail!("usage: tpp-bench compare REFERENCE OTHER [--blocks N] [--tol X]");
    };
    let (a, b) = (read_f32(reference)?, read_f32(other)?);
    if a.len() != b.len() || a.is_empty() || blocks == 0 || a.len() % blocks != 0 {
        bail!(
            "{reference} has {} f32, {other} {}: not {blocks} equal blocks",
            a.len(),
            b.len()
        );
    }
    if b.iter().any(|x| !x.is_finite()) {
        bail!("{other} has non-finite values");
    }
    let n = a.len() / blocks;
    let per: Vec<f64> = (0..blocks)
        .map(|i| rel_l2(&b[i * n..(i + 1) * n], &a[i * n..(i + 1) * n]))
        .collect();
    let all = rel_l2(&b, &a);
    let worst = per.iter().copied().fold(0f64, f64::max);
    let ok = all <= tol && worst <= tol;
    println!(
        "COMPARE {other} vs {reference}: rel L2 {all:.3e}, worst block {worst:.3e} \
         (per block {}), tolerance {tol:.0e}: {}",
        per.iter()
            .map(|x| format!("{x:.2e}"))
            .collect::<Vec<_>>()
            .join(" "),
        if ok { "PASS" } else { "FAIL" }
    );
    if !ok {
        bail!("rel L2 above {tol}");
    }
    Ok(())
}
