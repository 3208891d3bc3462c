//! docs/memory.md's scenario table is generated from the planner; this test fails when the
//! two disagree. Regenerate with `LAVA_BLESS=1 cargo test -p planner --test memory_doc`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use planner::layout::{Layout, LayoutKind, T5Placement, VaePlacement};
use planner::render::gb;
use planner::size::AspectSource;
use planner::{Component, Plan};

struct Scenario {
    name: &'static str,
    command: &'static str,
    gpus: &'static str,
    size: &'static str,
    exact: bool,
    layout: Layout,
}

#[allow(clippy::too_many_arguments)]
fn lay(
    kind: LayoutKind,
    stages: u64,
    tp: u64,
    ulysses: u64,
    pp: u64,
    vae: VaePlacement,
    t5: T5Placement,
    fp8: bool,
) -> Layout {
    Layout {
        kind,
        stages,
        tp,
        ulysses,
        pp,
        fsdp: false,
        vae,
        t5,
        fp8,
        offload: false,
    }
}

fn scenarios() -> Vec<Scenario> {
    use LayoutKind::{Lava, Liveavatar};
    use T5Placement::{Cpu, Every, One};
    use VaePlacement::{Colocated, Dedicated};
    let mut seed = lay(Lava, 1, 1, 4, 1, Colocated, Cpu, false);
    seed.fsdp = true;
    vec![
        Scenario {
            name: "LiveAvatar, 5×H800, fp8",
            command: "--gpus 5xH800 --size 720*400 --layout liveavatar --fp8",
            gpus: "5xH800",
            size: "720*400",
            exact: false,
            layout: lay(Liveavatar, 4, 1, 1, 1, Dedicated, Every, true),
        },
        Scenario {
            name: "LiveAvatar, 5×H800, bf16",
            command: "--gpus 5xH800 --size 720*400 --layout liveavatar",
            gpus: "5xH800",
            size: "720*400",
            exact: false,
            layout: lay(Liveavatar, 4, 1, 1, 1, Dedicated, Every, false),
        },
        Scenario {
            name: "LiveAvatar, 5×24 GB",
            command: "--gpus 5x24GB --size 704*384 --layout liveavatar",
            gpus: "5x24GB",
            size: "704*384",
            exact: false,
            layout: lay(Liveavatar, 4, 1, 1, 1, Dedicated, Every, false),
        },
        Scenario {
            name: "seed: FSDP 4, literal 720×400, 24 GB",
            command: "--gpus 4x24GB --size 720x400 --exact-size --num_gpus_dit 4 --ulysses_size 4 --fsdp --t5 cpu",
            gpus: "4x24GB",
            size: "720x400",
            exact: true,
            layout: seed,
        },
        Scenario {
            name: "lava TPP, 5×H800, fp8",
            command: "--gpus 5xH800 --size 704*384 --num_gpus_dit 4 --enable_vae_parallel --fp8",
            gpus: "5xH800",
            size: "704*384",
            exact: false,
            layout: lay(Lava, 4, 1, 1, 1, Dedicated, One, true),
        },
        Scenario {
            name: "lava, 1×H200",
            command: "--gpus H200 --size 704*384 --num_gpus_dit 1",
            gpus: "H200",
            size: "704*384",
            exact: false,
            layout: lay(Lava, 1, 1, 1, 1, Colocated, One, false),
        },
        Scenario {
            name: "lava TPP × TP, 8×H100",
            command: "--gpus 8xH100 --size 704*384 --tp 2",
            gpus: "8xH100",
            size: "704*384",
            exact: false,
            layout: lay(Lava, 4, 2, 1, 1, Colocated, One, false),
        },
        Scenario {
            name: "lava PP 4 + VAE, 5×24 GB, fp8",
            command: "--gpus 5x24GB --size 704*384 --num_gpus_dit 4 --pp 4 --enable_vae_parallel --fp8 --t5 cpu",
            gpus: "5x24GB",
            size: "704*384",
            exact: false,
            layout: lay(Lava, 1, 1, 1, 4, Dedicated, Cpu, true),
        },
    ]
}

fn run(s: &Scenario) -> (Plan, bool) {
    let source = if s.exact {
        AspectSource::Exact
    } else {
        AspectSource::SizeString
    };
    match common::plan_s2v(s.gpus, s.size, source, s.layout.clone()) {
        Ok(p) => (p, true),
        Err(inf) => (inf.plan, false),
    }
}

fn table() -> String {
    let mut out = String::from(
        "| scenario | `lava plan` flags | fullest rank | weights | KV caches | encoders | VAE | activations + unshard | peak | usable | verdict |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for s in scenarios() {
        let (p, fits) = run(&s);
        let r = p
            .ranks
            .iter()
            .max_by(|a, b| {
                (a.peak_bytes as f64 / a.usable_bytes as f64)
                    .total_cmp(&(b.peak_bytes as f64 / b.usable_bytes as f64))
            })
            .unwrap();
        let sum = |cs: &[Component]| -> u64 {
            r.items
                .iter()
                .filter(|i| cs.contains(&i.component))
                .map(|i| i.bytes)
                .sum()
        };
        let weights = sum(&[Component::DitWeights, Component::DitF32Copies]);
        let kv = sum(&[Component::KvNoisy, Component::KvSink, Component::TextKv]);
        let enc = sum(&[
            Component::T5Weights,
            Component::T5Activations,
            Component::Wav2Vec2,
        ]);
        let vae = sum(&[
            Component::VaeWeights,
            Component::VaeDecoderCache,
            Component::VaeDecodeWorkspace,
            Component::VaeEncodeWorkspace,
        ]);
        let act = sum(&[
            Component::DitActivations,
            Component::FsdpRootUnshard,
            Component::FsdpBlocksInFlight,
        ]);
        out.push_str(&format!(
            "| {} | `{}` | {} ({}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            s.name,
            s.command,
            r.rank,
            r.role_label.split(" pp").next().unwrap_or(""),
            gb(weights),
            gb(kv),
            gb(enc),
            gb(vae),
            gb(act),
            gb(r.peak_bytes),
            gb(r.usable_bytes),
            if fits { "fits" } else { "rejected" }
        ));
    }
    out
}

#[test]
fn memory_doc_table_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/memory.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let (begin, end) = ("<!-- scenarios:begin -->\n", "<!-- scenarios:end -->");
    let b = doc
        .find(begin)
        .expect("docs/memory.md lacks the scenarios:begin marker")
        + begin.len();
    let e = doc
        .find(end)
        .expect("docs/memory.md lacks the scenarios:end marker");
    let want = table();
    if std::env::var("LAVA_BLESS").as_deref() == Ok("1") {
        std::fs::write(path, format!("{}{}{}", &doc[..b], want, &doc[e..])).unwrap();
        return;
    }
    assert_eq!(
        &doc[b..e],
        want,
        "docs/memory.md is stale: run LAVA_BLESS=1 cargo test -p planner --test memory_doc"
    );
}
