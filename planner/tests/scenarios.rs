//! Known-good and known-infeasible deployments, with exact bytes from model-spec.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use planner::layout::{Layout, LayoutKind, T5Placement, VaePlacement};
use planner::size::{AspectSource, SizeArg, resolve};
use planner::{Catalog, Component, Infeasible, ModelSpec, Plan, Workload};

fn layout(kind: LayoutKind, stages: u64, tp: u64, ulysses: u64, pp: u64) -> Layout {
    Layout {
        kind,
        stages,
        tp,
        ulysses,
        pp,
        fsdp: false,
        vae: VaePlacement::Dedicated,
        t5: if kind == LayoutKind::Liveavatar {
            T5Placement::Every
        } else {
            T5Placement::One
        },
        fp8: false,
        offload: false,
    }
}

fn run(gpus: &str, size: &str, source: AspectSource, l: Layout) -> Result<Plan, Box<Infeasible>> {
    common::plan_s2v(gpus, size, source, l)
}

fn get(p: &Plan, rank: usize, c: Component) -> u64 {
    p.ranks[rank]
        .items
        .iter()
        .filter(|i| i.component == c)
        .map(|i| i.bytes)
        .sum()
}

/// model-spec §7.4: FSDP over 4 GPUs at literal 720×400, one step cache's worth per GPU.
#[test]
fn seed_scenario_fsdp4_literal_720x400() {
    let mut l = layout(LayoutKind::Lava, 1, 1, 4, 1);
    l.fsdp = true;
    l.t5 = T5Placement::Cpu;
    l.vae = VaePlacement::Colocated;
    let inf = run("4x24GB", "720x400", AspectSource::Exact, l).unwrap_err();
    let p = &inf.plan;
    assert_eq!(
        (p.geometry.fsl, p.geometry.lc, p.geometry.ring),
        (1125, 2778, 13_500)
    );
    // DiT bf16 / 4 (FSDP pads each unit to a multiple of 4).
    assert_eq!(get(p, 1, Component::DitWeights), 8_147_877_805);
    assert_eq!(get(p, 1, Component::KvNoisy), 11_059_200_000);
    assert_eq!(get(p, 1, Component::KvSink), 2_275_737_600);
    let resident = 8_147_877_805 + 11_059_200_000 + 2_275_737_600u64;
    assert_eq!(format!("{:.2}", resident as f64 / 1e9), "21.48");
    let root = get(p, 1, Component::FsdpRootUnshard);
    assert_eq!(root, 4_479_966_898);
    assert_eq!(format!("{:.2}", root as f64 / (1u64 << 30) as f64), "4.17");
    assert_eq!(format!("{:.2}", (resident + root) as f64 / 1e9), "25.96");
    assert!(
        p.notes.iter().any(|n| n.contains("25.65")),
        "the unit mix is explained: {:?}",
        p.notes
    );
    // Rejected on 24 GB cards: 22.15 GB usable.
    assert_eq!(p.ranks[1].usable_bytes, 22_150_000_000);
    assert_eq!(inf.shortfalls.len(), 4);
    assert!(inf.shortfalls.iter().all(|s| s.need_bytes > s.usable_bytes));
}

/// model-spec §4.3: the reference's per-rank KV cache as allocated, 12.84 GB at 704×384.
#[test]
fn liveavatar_kv_cache_as_allocated() {
    let p = run(
        "5xH200",
        "704*384",
        AspectSource::SizeString,
        layout(LayoutKind::Liveavatar, 4, 1, 1, 1),
    )
    .unwrap();
    assert_eq!((p.resolution.height, p.resolution.width), (384, 704));
    let noisy = get(&p, 0, Component::KvNoisy);
    let sink = get(&p, 0, Component::KvSink);
    assert_eq!(noisy, 40 * 2 * 12_672 * 5120 * 2);
    assert_eq!(sink, 40 * 2 * 3000 * 5120 * 2);
    assert_eq!(format!("{:.2}", (noisy + sink) as f64 / 1e9), "12.84");
    // lava sizes the sink from the geometry instead: Lc = 2640 rows.
    let lava = run(
        "5xH200",
        "704*384",
        AspectSource::SizeString,
        layout(LayoutKind::Lava, 4, 1, 1, 1),
    )
    .unwrap();
    assert_eq!(get(&lava, 0, Component::KvSink), 40 * 2 * 2640 * 5120 * 2);
}

#[test]
fn liveavatar_on_five_24gb_cards_is_rejected() {
    let inf = run(
        "5x24GB",
        "704*384",
        AspectSource::SizeString,
        layout(LayoutKind::Liveavatar, 4, 1, 1, 1),
    )
    .unwrap_err();
    assert_eq!(
        inf.shortfalls.len(),
        5,
        "every rank holds the full DiT and T5"
    );
    assert!(
        inf.shortfalls
            .iter()
            .all(|s| s.largest_component == "DiT weights")
    );
}

/// The official requirements: 48 GB-class per DiT rank with FP8, 80 GB-class without.
#[test]
fn liveavatar_on_h800_matches_official_requirements() {
    let mut l = layout(LayoutKind::Liveavatar, 4, 1, 1, 1);
    l.fp8 = true;
    let p = run("5xH800", "720*400", AspectSource::SizeString, l.clone()).unwrap();
    let fp8_peak = p.ranks[0].total_bytes() as f64 / 1e9;
    assert!(
        (40.0..=50.0).contains(&fp8_peak),
        "fp8 DiT rank {fp8_peak:.2} GB"
    );
    l.fp8 = false;
    let p = run("5xH800", "720*400", AspectSource::SizeString, l.clone()).unwrap();
    let bf16_peak = p.ranks[0].total_bytes() as f64 / 1e9;
    assert!(
        (55.0..=80.0).contains(&bf16_peak),
        "bf16 DiT rank {bf16_peak:.2} GB"
    );
    // And the bf16 layout does not fit 48 GB cards.
    assert!(run("5xL40S", "720*400", AspectSource::SizeString, l).is_err());
}

/// The reference's 3000-row sink buffer overflows above fsl 1200 (model-spec §4.3, §10.1).
#[test]
fn liveavatar_sink_buffer_overflow_is_a_reason() {
    let inf = run(
        "5xH200",
        "480*832",
        AspectSource::Aspect {
            width: 832,
            height: 448,
        },
        layout(LayoutKind::Liveavatar, 4, 1, 1, 1),
    )
    .unwrap_err();
    assert!(
        inf.reasons.iter().any(|r| r.contains("3000 rows")),
        "{:?}",
        inf.reasons
    );
    // lava sizes the sink from the geometry: the same size fits on H200s.
    assert!(
        run(
            "5xH200",
            "480*832",
            AspectSource::Aspect {
                width: 832,
                height: 448
            },
            layout(LayoutKind::Lava, 4, 1, 1, 1)
        )
        .is_ok()
    );
}

#[test]
fn a_layout_that_fits_24gb_cards_is_proposed() {
    let model = ModelSpec::builtin("s2v-14b").unwrap();
    let gpus = Catalog::builtin().unwrap().parse_gpus("5x24GB").unwrap();
    let res = resolve(SizeArg::parse("704*384").unwrap(), AspectSource::SizeString).unwrap();
    let props = planner::propose(
        &model,
        &gpus,
        &[res],
        Workload {
            sample_steps: 4,
            clips: 1,
        },
        5,
    );
    assert!(!props.is_empty());
    for p in &props {
        assert!(p.ranks.iter().all(|r| r.fits()));
    }
    // Ranked by estimated FPS.
    assert!(
        props
            .windows(2)
            .all(|w| w[0].estimate.fps >= w[1].estimate.fps)
    );
}

#[test]
fn one_and_eight_gpus() {
    let mut one = layout(LayoutKind::Lava, 1, 1, 1, 1);
    one.vae = VaePlacement::Colocated;
    let p = run("H200", "704*384", AspectSource::SizeString, one).unwrap();
    assert_eq!(p.ranks.len(), 1);
    // Single GPU keeps all four step caches (model-spec §6.8).
    assert_eq!(
        get(&p, 0, Component::KvNoisy),
        4 * 40 * 2 * 12_672 * 5120 * 2
    );
    let mut eight = layout(LayoutKind::Lava, 4, 2, 1, 1);
    eight.vae = VaePlacement::Colocated;
    let p = run("8xH100", "704*384", AspectSource::SizeString, eight).unwrap();
    assert_eq!(p.ranks.len(), 8);
    // TP 2 halves the heads of each cache.
    assert_eq!(
        get(&p, 0, Component::KvNoisy),
        40 * 2 * 12_672 * 20 * 128 * 2
    );
}

#[test]
fn pipeline_stages_split_layers() {
    let p = run(
        "5xH100",
        "704*384",
        AspectSource::SizeString,
        layout(LayoutKind::Lava, 1, 1, 1, 4),
    )
    .unwrap();
    let layers: Vec<(u64, u64)> = p
        .ranks
        .iter()
        .filter_map(|r| match r.role {
            planner::Role::Dit {
                layer_begin,
                layer_end,
                ..
            } => Some((layer_begin, layer_end)),
            planner::Role::Vae => None,
        })
        .collect();
    assert_eq!(layers, vec![(0, 10), (10, 20), (20, 30), (30, 40)]);
    // The first stage carries the embeddings, the last the head: weights differ.
    assert_ne!(
        get(&p, 0, Component::DitWeights),
        get(&p, 1, Component::DitWeights)
    );
}
