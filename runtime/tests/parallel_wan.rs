//! A real DiT block under TP and Ulysses: the tiny fixture checkpoint's `blocks.1`, loaded
//! per rank with the shard hints (only this rank's bytes) as `WanAttentionBlock::load` over
//! the rank's tp group, run behind a Ulysses core, matches the block loaded alone: f32 rel
//! L2 ≤ 1e-6, bf16 ≤ 1e-2. 15 tokens in 3 frames of 5: Ulysses chunks pad and cut frames, so
//! the per-frame modulation runs are irregular (`FrameRuns::chunk`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use runtime::comm::{SocketComm, SocketOptions};
use runtime::models::VarBuilder;
use runtime::models::wan::WanConfig;
use runtime::models::wan::block::{FrameRuns, SelfAttnKv, WanAttentionBlock};
use runtime::parallel::ulysses::sdpa;
use runtime::parallel::{Attention, Groups, Mesh, SeqShard, UlyssesKv, solo};
use runtime::testing::{Rng, compare, tolerance};
use runtime::weights::Checkpoint;
use runtime::{DType, Device, Result, Tensor};

const FRAMES: usize = 3;
const FSL: usize = 5; // 15 tokens: not a multiple of 2 or 4, so Ulysses pads.
const LAYER: usize = 1;

fn fixture() -> Checkpoint {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dit_tiny/checkpoint");
    Checkpoint::open(dir).unwrap()
}

fn cfg() -> WanConfig {
    WanConfig::from(&planner::ModelSpec::builtin("tiny").unwrap())
}

struct PlainKv;

impl SelfAttnKv for PlainKv {
    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        sdpa(q, k, v)
    }
}

fn run(tp: usize, sp: usize, dtype: DType) {
    let c = cfg();
    let d = c.dim;
    let mut rng = Rng::new(40 + tp as u64 * 10 + sp as u64);
    let dev = Device::Cpu;
    let x = rng.randn((1, FRAMES * FSL, d), 1.0, dtype, &dev).unwrap().0;
    let e0 = rng.randn((FRAMES, 6, d), 0.3, DType::F32, &dev).unwrap().0;
    let text = rng.randn((1, c.text_len, d), 1.0, dtype, &dev).unwrap().0;

    let ckpt = fixture();
    let vb = VarBuilder::new(&ckpt, None, dtype, dev);
    let full = WanAttentionBlock::load(&vb.pp(format!("blocks.{LAYER}")), &c, &solo()).unwrap();
    let runs = FrameRuns::uniform(FRAMES, FSL);
    let want = full
        .forward(
            LAYER,
            &x,
            &e0,
            &runs,
            &mut PlainKv,
            &full.text_kv(&text).unwrap(),
        )
        .unwrap()
        .to_vec_f32()
        .unwrap();

    let o = SocketOptions {
        timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(30),
    };
    let comms = SocketComm::local_group(tp * sp, o).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|world| {
            let (x, e0, text, c) = (x.clone(), e0.clone(), text.clone(), c.clone());
            std::thread::spawn(move || {
                let g = Groups::split(&world, &Mesh::new(1, 1, sp, tp).unwrap()).unwrap();
                let ckpt = fixture();
                let vb = VarBuilder::new(&ckpt, None, dtype, Device::Cpu);
                let core = if sp > 1 {
                    Attention::ulysses(g.sp.clone())
                } else {
                    Attention::local()
                };
                let block =
                    WanAttentionBlock::load(&vb.pp(format!("blocks.{LAYER}")), &c, &g.tp).unwrap();
                assert_eq!(block.self_attn.local_heads, c.num_heads / tp);
                let text_kv = block.text_kv(&text).unwrap();
                // DiT entry: split the tokens; runs of this chunk's frames.
                let seq = SeqShard::over(FRAMES * FSL, &g.sp).unwrap();
                let runs = FrameRuns::chunk(seq.offset(), seq.local_len(), FRAMES, FSL).unwrap();
                let xl = seq.split(&x, 1).unwrap();
                let mut kv = UlyssesKv {
                    attn: &core,
                    seq,
                    inner: &mut PlainKv,
                };
                let y = block
                    .forward(LAYER, &xl, &e0, &runs, &mut kv, &text_kv)
                    .unwrap();
                // DiT exit: gather.
                seq.gather(&y, 1, &g.sp).unwrap().to_vec_f32().unwrap()
            })
        })
        .collect();
    let tol = match dtype {
        DType::F32 => 1e-6,
        other => tolerance(other),
    };
    for (rank, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        let cmp = compare(&got, &want);
        assert!(
            cmp.rel_l2 <= tol,
            "tp{tp} sp{sp} {dtype:?} rank {rank}: rel L2 {} > {tol}: {cmp:?}",
            cmp.rel_l2
        );
    }
}

#[test]
fn wan_block_tp2_f32() {
    run(2, 1, DType::F32);
}

#[test]
fn wan_block_tp4_f32() {
    run(4, 1, DType::F32);
}

#[test]
fn wan_block_ulysses2_f32() {
    run(1, 2, DType::F32);
}

#[test]
fn wan_block_tp2_ulysses2_f32() {
    run(2, 2, DType::F32);
}

#[test]
fn wan_block_tp2_ulysses2_bf16() {
    run(2, 2, DType::BF16);
}
