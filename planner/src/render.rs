//! Human-readable rendering of plans: a table per rank (identical ranks grouped) with GB and
//! GiB columns, both always labelled.

use std::fmt::Write as _;

use crate::gpu::{GB, GIB};
use crate::memory::Phase;
use crate::plan::{Infeasible, Plan, RankPlan};
use crate::size::AspectSource;

pub fn gb(b: u64) -> f64 {
    b as f64 / GB as f64
}

pub fn gib(b: u64) -> f64 {
    b as f64 / GIB as f64
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Resident => "resident",
        Phase::Startup => "startup",
        Phase::DitCall => "dit call",
        Phase::VaeDecode => "vae decode",
    }
}

/// `12,345,678`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The header: model, size resolution, layout.
pub fn header(p: &Plan) -> String {
    let mut s = String::new();
    let r = &p.resolution;
    let g = &p.geometry;
    let source = match &r.source {
        AspectSource::Image { height, width } => format!("aspect of the {width}×{height} image"),
        AspectSource::Aspect { width, height } => format!("--aspect {width}:{height}"),
        AspectSource::SizeString => "aspect of the size string (no --image or --aspect)".into(),
        AspectSource::Exact => "taken literally (--exact-size)".into(),
    };
    let _ = writeln!(s, "model   {}", p.model);
    let _ = writeln!(
        s,
        "size    --size {}*{} (area {} px), {source}: effective H×W = {}×{}",
        r.size.width,
        r.size.height,
        r.size.area(),
        r.height,
        r.width
    );
    let _ = writeln!(
        s,
        "        latent {}×{}, {} tokens per latent frame, {} per call, {} sink tokens, {} keys per call",
        g.lat_h, g.lat_w, g.fsl, g.lq, g.lc, g.lkv
    );
    let _ = writeln!(
        s,
        "layout  {} ({} GPUs)",
        p.layout_summary(),
        p.layout.world()
    );
    for n in &p.notes {
        let _ = writeln!(s, "note    {n}");
    }
    s
}

fn same_budget(a: &RankPlan, b: &RankPlan) -> bool {
    a.gpu == b.gpu
        && a.items.len() == b.items.len()
        && a.items
            .iter()
            .zip(&b.items)
            .all(|(x, y)| x.component == y.component && x.bytes == y.bytes && x.phase == y.phase)
}

/// Per-rank tables, identical ranks grouped.
pub fn ranks(p: &Plan) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < p.ranks.len() {
        let first = &p.ranks[i];
        let mut j = i + 1;
        while j < p.ranks.len() && same_budget(first, &p.ranks[j]) {
            j += 1;
        }
        let who = if j - i == 1 {
            format!("rank {}: {}", first.rank, first.role_label)
        } else {
            let labels: Vec<String> = p.ranks[i..j].iter().map(|r| r.role_label.clone()).collect();
            format!(
                "ranks {}-{} (same budget): {}",
                first.rank,
                p.ranks[j - 1].rank,
                labels.join("; ")
            )
        };
        let _ = writeln!(s, "\n{who}  [{}]", first.gpu);
        let _ = writeln!(
            s,
            "  {:<32} {:<10} {:>9} {:>9}",
            "component", "phase", "GB", "GiB"
        );
        for it in first.items.iter().filter(|it| {
            !matches!(
                it.component,
                crate::Component::CudaContext
                    | crate::Component::LibraryWorkspace
                    | crate::Component::AllocatorReserve
            )
        }) {
            let _ = writeln!(
                s,
                "  {:<32} {:<10} {:>9.3} {:>9.3}",
                it.component.label(),
                phase(it.phase),
                gb(it.bytes),
                gib(it.bytes)
            );
        }
        let peak = first.peak_bytes;
        let before = if first.absent_at_startup_bytes > 0 {
            format!(
                " less {:.3} GB of caches not yet allocated",
                gb(first.absent_at_startup_bytes)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  {:<32} {:<10} {:>9.3} {:>9.3}   resident {:.3} GB{before} + {} phase",
            "peak",
            "",
            gb(peak),
            gib(peak),
            gb(first.resident_bytes),
            phase(first.worst_phase)
        );
        let _ = writeln!(
            s,
            "  {:<32} {:<10} {:>9.3} {:>9.3}   {:.0}% used; capacity {:.2} GB less context, workspaces, reserve",
            "usable",
            "",
            gb(first.usable_bytes),
            gib(first.usable_bytes),
            100.0 * peak as f64 / first.usable_bytes.max(1) as f64,
            gb(first.capacity_bytes)
        );
        i = j;
    }
    s
}

/// The estimate block.
pub fn estimates(p: &Plan) -> String {
    let e = &p.estimate;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nestimates (from FLOPs and rated GPU throughput at assumed efficiency{}; not measurements):",
        if e.nominal_rates {
            ", NOMINAL rates for a generic GPU"
        } else {
            ""
        }
    );
    for (i, (b, c)) in e.stage_block_s.iter().zip(&e.stage_call_s).enumerate() {
        let _ = writeln!(
            s,
            "  dit stage {i}: {:.0} ms per DiT call, {:.0} ms per block",
            c * 1e3,
            b * 1e3
        );
    }
    let _ = writeln!(s, "  vae: {:.0} ms per block decode", e.vae_block_s * 1e3);
    let _ = writeln!(
        s,
        "  ≈{:.1} FPS (one 12-frame block every {:.0} ms; pace set by {}), first frame after ≈{:.1} s",
        e.fps,
        e.block_s * 1e3,
        e.bottleneck,
        e.first_frame_s
    );
    s
}

/// Full report for a plan that fits.
pub fn fits(p: &Plan) -> String {
    let mut s = header(p);
    s.push_str(&ranks(p));
    s.push_str(&estimates(p));
    let _ = writeln!(
        s,
        "\nfits: every rank's peak is within its usable memory (max {:.0}%).",
        100.0 * p.max_utilisation()
    );
    s
}

/// Full report for an infeasible plan, with proposals.
pub fn infeasible(inf: &Infeasible, proposals: &[Plan]) -> String {
    let mut s = header(&inf.plan);
    s.push_str(&ranks(&inf.plan));
    let _ = writeln!(s, "\nDOES NOT FIT:");
    for r in &inf.reasons {
        let _ = writeln!(s, "  {r}");
    }
    for f in &inf.shortfalls {
        let _ = writeln!(
            s,
            "  rank {} ({}) on {}: needs {:.2} GB ({:.2} GiB) at its {} peak, {:.2} GB usable: short by {} B ({:.2} GB); largest component {} {:.2} GB",
            f.rank,
            f.role_label,
            f.gpu,
            gb(f.need_bytes),
            gib(f.need_bytes),
            phase(f.phase),
            gb(f.usable_bytes),
            thousands(f.short_bytes),
            gb(f.short_bytes),
            f.largest_component,
            gb(f.largest_bytes)
        );
    }
    s.push_str(&proposals_text(proposals, &inf.plan));
    s
}

/// Ranked proposals.
pub fn proposals_text(proposals: &[Plan], asked: &Plan) -> String {
    let mut s = String::new();
    if proposals.is_empty() {
        let _ = writeln!(
            s,
            "\nno layout of these GPUs fits this model at this size or the smaller standard sizes."
        );
        return s;
    }
    let _ = writeln!(
        s,
        "\nlayouts that fit these GPUs, best estimated FPS first:"
    );
    for (i, p) in proposals.iter().enumerate() {
        let size_note = if (p.resolution.height, p.resolution.width)
            != (asked.resolution.height, asked.resolution.width)
        {
            format!(
                " at H×W {}×{} (--size {}*{})",
                p.resolution.height,
                p.resolution.width,
                p.resolution.size.width,
                p.resolution.size.height
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  {}. {}{} — ≈{:.1} FPS, first frame ≈{:.1} s, fullest rank {:.0}% of usable",
            i + 1,
            p.layout_summary(),
            size_note,
            p.estimate.fps,
            p.estimate.first_frame_s,
            100.0 * p.max_utilisation()
        );
        let peaks: Vec<String> = p
            .ranks
            .iter()
            .map(|r| format!("r{} {:.2}", r.rank, gb(r.peak_bytes)))
            .collect();
        let _ = writeln!(s, "     peak GB per rank: {}", peaks.join(", "));
        let _ = writeln!(s, "     flags: {}", flags(p));
    }
    s
}

/// The `lava plan` flags that select a plan's layout.
pub fn flags(p: &Plan) -> String {
    let l = &p.layout;
    let mut f = vec![format!("--num_gpus_dit {}", l.dit_gpus())];
    if l.tp > 1 {
        f.push(format!("--tp {}", l.tp));
    }
    if l.ulysses > 1 {
        f.push(format!("--ulysses_size {}", l.ulysses));
    }
    if l.pp > 1 {
        f.push(format!("--pp {}", l.pp));
    }
    if l.fsdp {
        f.push("--fsdp".into());
    }
    if l.vae == crate::VaePlacement::Dedicated {
        f.push("--enable_vae_parallel".into());
    }
    if l.fp8 {
        f.push("--fp8".into());
    }
    // No flag selects Absent: it follows from running without a checkpoint.
    let t5 = match l.t5 {
        crate::T5Placement::Every => Some("every"),
        crate::T5Placement::One => Some("one"),
        crate::T5Placement::Cpu => Some("cpu"),
        crate::T5Placement::Absent => None,
    };
    if let Some(t5) = t5 {
        f.push(format!("--t5 {t5}"));
    }
    if l.offload {
        f.push("--offload_model".into());
    }
    f.join(" ")
}
