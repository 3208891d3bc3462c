//! The whole DiT built for one rank of a parallel layout (`CausalWanModelS2V::load_rank`)
//! against the single-rank model: the tiny fixture checkpoint with its LoRA (or seeded random
//! weights), f32, ranks as threads over `SocketComm`. Each run is a prefill, three streaming
//! calls (the third wraps the 2-block ring), a re-prefill with a new reference latent and one
//! more call; every rank's flow predictions must match within rel L2 1e-6.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use runtime::comm::{SocketComm, SocketOptions};
use runtime::models::VarBuilder;
use runtime::models::wan::block::FrameRuns;
use runtime::models::wan::{CausalWanModelS2V, StreamCall, StreamGeometry, WanConfig};
use runtime::parallel::{DitLayout, Groups, Mesh};
use runtime::testing::{Rng, compare};
use runtime::weights::{Checkpoint, Lora, LoraConfig, RandomWeights};
use runtime::{DType, Device, Tensor};

const TOL: f32 = 1e-6;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dit_tiny")
}

fn cfg() -> WanConfig {
    WanConfig::from(&planner::ModelSpec::builtin("tiny").unwrap())
}

/// Latent 8×8 (16 tokens per frame, Lq 48, Lc 40), 3-frame blocks, a ring of 2 blocks.
fn geometry() -> StreamGeometry {
    StreamGeometry::new(8, 8, 3, 6).unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Weights {
    /// The fixture checkpoint with its LoRA merged at load.
    Fixture,
    /// Seeded random weights (what `lava generate` runs without a checkpoint).
    Random,
}

/// The inputs of one run, identical on every rank.
#[derive(Clone)]
struct Inputs {
    context: Tensor,
    refs: [Tensor; 2],
    motion: Tensor,
    x: Vec<Tensor>,
    audio: Vec<Tensor>,
    cond: Tensor,
}

const CALLS: usize = 4;

fn inputs() -> Inputs {
    let (c, g, dev) = (cfg(), geometry(), Device::Cpu);
    let mut rng = Rng::new(11);
    let mut r = |shape: Vec<usize>| rng.randn(shape, 1.0, DType::F32, &dev).unwrap().0;
    let (h, w) = (g.lat_h, g.lat_w);
    Inputs {
        context: r(vec![7, c.text_dim]),
        refs: [r(vec![c.in_dim, 1, h, w]), r(vec![c.in_dim, 1, h, w])],
        motion: r(vec![c.in_dim, 5, h, w]),
        x: (0..CALLS).map(|_| r(vec![c.in_dim, 3, h, w])).collect(),
        audio: (0..CALLS)
            .map(|_| r(vec![1, c.audio_layers, c.audio_dim, 12]))
            .collect(),
        cond: r(vec![c.cond_dim, 3, h, w]),
    }
}

/// Prefill, calls 0..3 (call 2 wraps the ring), re-prefill, call 3: the flow predictions.
fn generate(model: &CausalWanModelS2V, inp: &Inputs) -> Vec<Vec<f32>> {
    let g = geometry();
    let text = model
        .text_kv(&model.embed_text(&inp.context).unwrap())
        .unwrap();
    let mut cache = model.new_step_cache(g).unwrap();
    let mut out = Vec::new();
    for (i, (x, audio)) in inp.x.iter().zip(&inp.audio).enumerate() {
        if i == 0 || i == CALLS - 1 {
            let r = &inp.refs[usize::from(i != 0)];
            model
                .prefill(&mut cache, r, &inp.motion, &text, None)
                .unwrap();
        }
        let call = StreamCall {
            x,
            t: [1000.0, 857.7, 602.2, 8.9][i],
            cond_states: &inp.cond,
            audio,
            current_start: i * g.lq(),
            relative_dist: 4 + 7 * i as u32,
        };
        let v = model
            .forward_stream(&mut cache, &call, &text, None)
            .unwrap();
        assert_eq!(v.dims(), x.dims());
        out.push(v.to_vec_f32().unwrap());
    }
    out
}

fn with_model<T>(
    weights: Weights,
    dtype: DType,
    layout: &DitLayout,
    f: impl FnOnce(&CausalWanModelS2V) -> T,
) -> T {
    let c = cfg();
    // F8E4M3: bf16 weights with the --fp8 linears (§8.1).
    let (dtype, fp8) = match dtype {
        DType::F8E4M3 => (DType::BF16, true),
        d => (d, false),
    };
    let quantized = |mut m: CausalWanModelS2V| {
        if fp8 {
            m.quantize_fp8().unwrap();
        }
        m
    };
    match weights {
        Weights::Fixture => {
            let ckpt = Checkpoint::open(fixtures().join("checkpoint")).unwrap();
            let lora = Lora::open(
                fixtures().join("lora/liveavatar.safetensors"),
                LoraConfig {
                    rank: 4,
                    alpha: 2.0,
                },
            )
            .unwrap();
            let m = quantized(
                CausalWanModelS2V::from_checkpoint_rank(
                    &c,
                    &ckpt,
                    Some(&lora),
                    dtype,
                    Device::Cpu,
                    layout,
                )
                .unwrap(),
            );
            f(&m)
        }
        Weights::Random => {
            let rw = RandomWeights::new(5, c.expected_tensors());
            let vb = VarBuilder::random(&rw, dtype, Device::Cpu);
            f(&quantized(
                CausalWanModelS2V::load_rank(&c, &vb, layout).unwrap(),
            ))
        }
    }
}

/// Runs `mesh` (one TPP stage) on threads and compares every rank with one rank, in f32.
fn run(mesh: Mesh, fsdp: bool, weights: Weights) {
    run_in(mesh, fsdp, weights, DType::F32, TOL);
}

fn run_in(mesh: Mesh, fsdp: bool, weights: Weights, dtype: DType, tol: f32) {
    let inp = inputs();
    let want = with_model(weights, dtype, &DitLayout::single(), |m| generate(m, &inp));
    let o = SocketOptions {
        timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(30),
    };
    let c = cfg();
    let handles: Vec<_> = SocketComm::local_group(mesh.world(), o)
        .unwrap()
        .into_iter()
        .map(|world| {
            let (inp, c) = (inp.clone(), c.clone());
            std::thread::spawn(move || {
                let g = Groups::split(&world, &mesh).unwrap();
                let layout = DitLayout::new(&g, &mesh, c.num_layers, fsdp).unwrap();
                with_model(weights, dtype, &layout, |m| {
                    let cc = m.cache_config().unwrap();
                    assert_eq!(cc.num_heads, c.num_heads / (mesh.tp * mesh.sp));
                    assert_eq!(cc.head_dim(), c.head_dim());
                    assert_eq!(cc.num_layers, m.block_range().len());
                    if fsdp {
                        assert!(m.blocks.is_empty() && m.root.is_none());
                    } else {
                        // Only this sub-stage's blocks and root parts are held.
                        let (l, r) = (m.layout(), m.root.as_ref().unwrap());
                        assert_eq!(m.blocks.len(), m.block_range().len());
                        assert_eq!(r.embed.is_some(), l.is_first());
                        assert_eq!(r.head.is_some(), l.is_last());
                        let inject = c.audio_inject_layers.iter();
                        let held = inject.filter(|&&i| m.block_range().contains(&i)).count();
                        assert_eq!(r.audio_injector.injector.len(), held);
                        // The time projection and the AdaLN linears are tp-sharded by rows.
                        let rows = |w: &Tensor| w.dims()[0] * mesh.tp;
                        if let Some(e) = &r.embed {
                            assert_eq!(rows(&e.time.projection_1.col.weight), 6 * c.dim);
                        }
                        for a in &r.audio_injector.injector_adain_layers {
                            assert_eq!(rows(&a.col.weight), 2 * c.dim);
                        }
                    }
                    generate(m, &inp)
                })
            })
        })
        .collect();
    let mut worst = 0f32;
    for (rank, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            let cmp = compare(a, e);
            worst = worst.max(cmp.rel_l2);
            assert!(
                cmp.rel_l2 <= tol,
                "{mesh:?} fsdp {fsdp} {weights:?} {dtype:?}: rank {rank} call {i}: {cmp:?}"
            );
        }
    }
    eprintln!("{mesh:?} fsdp {fsdp} {weights:?} {dtype:?}: worst rel L2 {worst:.2e}");
}

fn mesh(pp: usize, sp: usize, tp: usize) -> Mesh {
    Mesh::new(1, pp, sp, tp).unwrap()
}

#[test]
fn dit_tp2() {
    run(mesh(1, 1, 2), false, Weights::Fixture);
}

#[test]
fn dit_ulysses2() {
    run(mesh(1, 2, 1), false, Weights::Fixture);
}

#[test]
fn dit_ulysses4() {
    run(mesh(1, 4, 1), false, Weights::Fixture);
}

#[test]
fn dit_pp2() {
    run(mesh(2, 1, 1), false, Weights::Fixture);
}

#[test]
fn dit_fsdp2() {
    run(mesh(1, 2, 1), true, Weights::Fixture);
}

#[test]
fn dit_tp2_pp2() {
    run(mesh(2, 1, 2), false, Weights::Fixture);
}

#[test]
fn dit_tp2_ulysses2_fsdp_random_weights() {
    run(mesh(1, 2, 2), true, Weights::Random);
}

#[test]
fn dit_pp2_ulysses2_fsdp() {
    run(mesh(2, 2, 1), true, Weights::Fixture);
}

/// bf16 weights and activations: the f32 all-reduces keep TP×Ulysses within bf16 rounding.
#[test]
fn dit_tp2_ulysses2_bf16() {
    run_in(mesh(1, 2, 2), false, Weights::Fixture, DType::BF16, 1e-2);
}

/// `--fp8` under tp: each rank quantises its own weight shard and scales its own activation
/// shard before the row-parallel GEMMs, so the scales differ from one rank's; within fp8
/// tolerance of the single-rank fp8 model.
#[test]
fn dit_tp2_fp8() {
    let tol = runtime::testing::tolerance(DType::F8E4M3);
    run_in(mesh(1, 1, 2), false, Weights::Fixture, DType::F8E4M3, tol);
}

#[test]
fn frame_runs_cut_at_frames_and_padding() {
    // 3 frames of 5 tokens, chunks of 8 (padded to 16).
    let a = FrameRuns::chunk(0, 8, 3, 5).unwrap();
    let b = FrameRuns::chunk(8, 8, 3, 5).unwrap();
    assert_eq!(a, FrameRuns::chunk(0, 8, 3, 5).unwrap());
    assert_eq!((a.len(), b.len()), (8, 8));
    assert_eq!(format!("{a:?}"), "FrameRuns { runs: [(0, 5), (1, 3)] }");
    // 2 of frame 1, 5 of frame 2, 1 padding row on the last frame's vector.
    assert_eq!(
        format!("{b:?}"),
        "FrameRuns { runs: [(1, 2), (2, 5), (2, 1)] }"
    );
    assert_eq!(
        FrameRuns::chunk(0, 15, 3, 5).unwrap(),
        FrameRuns::uniform(3, 5)
    );
    assert!(FrameRuns::chunk(0, 4, 0, 5).is_err());
}

#[test]
fn layouts_that_cannot_work_are_refused() {
    let o = SocketOptions::default();
    let world = SocketComm::local_group(1, o).unwrap().remove(0);
    let m = mesh(1, 1, 1);
    let g = Groups::split(&world, &m).unwrap();
    // FSDP shards over the Ulysses group.
    let e = DitLayout::new(&g, &m, 3, true).unwrap_err().to_string();
    assert!(e.contains("Ulysses"), "{e}");
    // More sub-stages than blocks.
    assert!(DitLayout::new(&g, &mesh(4, 1, 1), 3, false).is_err());
    assert_eq!(DitLayout::single().blocks(3), 0..3);
    // 4 heads do not split over tp 3: refused before anything is read or communicated.
    let c = cfg();
    let handles: Vec<_> = SocketComm::local_group(3, o)
        .unwrap()
        .into_iter()
        .map(|world| {
            let c = c.clone();
            std::thread::spawn(move || {
                let m = mesh(1, 1, 3);
                let g = Groups::split(&world, &m).unwrap();
                let layout = DitLayout::new(&g, &m, c.num_layers, false).unwrap();
                let rw = RandomWeights::new(5, c.expected_tensors());
                let vb = VarBuilder::random(&rw, DType::F32, Device::Cpu);
                CausalWanModelS2V::load_rank(&c, &vb, &layout)
                    .unwrap_err()
                    .to_string()
            })
        })
        .collect();
    for h in handles {
        let e = h.join().unwrap();
        assert!(e.contains("heads do not split"), "{e}");
    }
}
