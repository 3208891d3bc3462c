//! A real DiT block under TP and Ulysses: the tiny fixture checkpoint's `blocks.1`, loaded
//! per rank with the shard hints (only this rank's bytes), run with the reference dtype flow
//! of `WanAttentionBlock::forward` (model-spec §3.3.1) written against the `parallel` layer
//! types, matches `WanAttentionBlock::forward` on one rank: f32 rel L2 ≤ 1e-6, bf16 ≤ 1e-2.
//! The modulation is expanded per token so that it splits with the sequence (under Ulysses a
//! rank's chunk need not align with latent frames).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use runtime::comm::{SocketComm, SocketOptions};
use runtime::device::BinaryOp;
use runtime::models::VarBuilder;
use runtime::models::wan::WanConfig;
use runtime::models::wan::block::{SelfAttnKv, WanAttentionBlock};
use runtime::parallel::ulysses::sdpa;
use runtime::parallel::{
    Attention, ColumnParallel, Groups, Mesh, RowParallel, SeqShard, SharedComm, TpAttention,
};
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

/// `blocks.{LAYER}` for this rank: TP-sharded attention and FFN, replicated modulation and
/// norm3, and the attention core chosen at construction.
struct ShardedBlock {
    modulation: Tensor,
    self_attn: TpAttention,
    cross_attn: TpAttention,
    norm3: (Tensor, Tensor),
    ffn_0: ColumnParallel,
    ffn_2: RowParallel,
    core: Attention,
    eps: f32,
}

impl ShardedBlock {
    fn load(vb: &VarBuilder, c: &WanConfig, tp: SharedComm, core: Attention) -> Self {
        let (d, h, eps) = (c.dim, c.num_heads, c.eps);
        let (r, n) = (tp.rank(), tp.world());
        Self {
            modulation: vb
                .get("modulation", &[1, 6, d])
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
            self_attn: TpAttention::load(&vb.pp("self_attn"), d, h, eps, tp.clone()).unwrap(),
            cross_attn: TpAttention::load(&vb.pp("cross_attn"), d, h, eps, tp.clone()).unwrap(),
            norm3: (
                vb.pp("norm3").get("weight", &[d]).unwrap(),
                vb.pp("norm3").get("bias", &[d]).unwrap(),
            ),
            ffn_0: ColumnParallel::load(&vb.pp("ffn").pp("0"), c.ffn_dim, d, r, n).unwrap(),
            ffn_2: RowParallel::load(&vb.pp("ffn").pp("2"), d, c.ffn_dim, tp).unwrap(),
            core,
            eps,
        }
    }

    /// x `[1, t, D]` this rank's tokens; `frame` the latent frame of each of them (padding
    /// rows take frame 0); e0 `[G, 6, D]` f32; text K/V of this rank's heads.
    fn forward(
        &self,
        x: &Tensor,
        frame: &[u32],
        e0: &Tensor,
        seq: &SeqShard,
        text_kv: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let act = x.dtype();
        let (_, t, d) = x.dims3()?;
        let per_token = |v: &Tensor| v.reshape((t, 1, d));
        let tokens = |v: &Tensor| v.reshape((1, t, d));
        let m = self.modulation.add(e0)?.index_select(frame, 0)?; // [t, 6, D]
        let c = |j: usize| m.narrow(1, j, 1);
        let (sh_sa, sc_sa, g_sa) = (c(0)?, c(1)?, c(2)?);
        let (sh_ff, sc_ff, g_ff) = (c(3)?, c(4)?, c(5)?);

        let a = x.layer_norm(None, None, self.eps, act)?;
        let a = tokens(&per_token(&a)?.modulate(&sc_sa, &sh_sa, act)?)?;
        let q = self.self_attn.query(&a)?;
        let (k, v) = self.self_attn.key_value(&a)?;
        let y = self.self_attn.out(&self.core.forward(&q, &k, &v, seq)?)?;
        let x1 = per_token(x)?.gated_residual(&per_token(&y)?, &g_sa, DType::F32)?;

        let (w3, b3) = &self.norm3;
        let u = tokens(&x1)?
            .to_dtype(act)?
            .layer_norm(Some(w3), Some(b3), self.eps, act)?;
        let q = self.cross_attn.query(&u)?;
        let o = self.cross_attn.out(&sdpa(&q, &text_kv.0, &text_kv.1)?)?;
        let x2 = tokens(&x1)?.binary_to(&o, BinaryOp::Add, DType::F32)?;

        let b = x2.layer_norm(None, None, self.eps, DType::F32)?;
        let b = tokens(&per_token(&b)?.modulate(&sc_ff, &sh_ff, act)?)?;
        let y2 = self.ffn_2.forward(&self.ffn_0.forward(&b)?.gelu_tanh()?)?;
        let x3 = per_token(&x2)?.gated_residual(&per_token(&y2)?, &g_ff, DType::F32)?;
        tokens(&x3)?.to_dtype(act)
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
    let full = WanAttentionBlock::load(&vb.pp(format!("blocks.{LAYER}")), &c).unwrap();
    let want = full
        .forward(LAYER, &x, &e0, &mut PlainKv, &full.text_kv(&text).unwrap())
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
                    ShardedBlock::load(&vb.pp(format!("blocks.{LAYER}")), &c, g.tp.clone(), core);
                assert_eq!(block.self_attn.local_heads, c.num_heads / tp);
                let text_kv = block.cross_attn.key_value(&text).unwrap();
                // DiT entry: split the tokens and their frame indices.
                let seq = SeqShard::over(FRAMES * FSL, &g.sp).unwrap();
                let frames: Vec<u32> = (0..seq.local_len())
                    .map(|i| ((seq.offset() + i) / FSL).min(FRAMES - 1) as u32)
                    .collect();
                let xl = seq.split(&x, 1).unwrap();
                let y = block.forward(&xl, &frames, &e0, &seq, &text_kv).unwrap();
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
