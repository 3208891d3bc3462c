//! Sharded == unsharded at the layer level (issue 6 item 7): a small attention + FFN block
//! built from the `parallel` layer types, run with TP=2, Ulysses=2 and 4, TP×Ulysses, PP=2,
//! FSDP=2 and FSDP×Ulysses on SocketComm ranks in threads, against a reference written with
//! plain tensor ops on full weights. f32 throughout; rel L2 ≤ 1e-6.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use runtime::comm::{SocketComm, SocketOptions};
use runtime::parallel::tp::{AttentionWeights, block_hint};
use runtime::parallel::ulysses::sdpa;
use runtime::parallel::{
    Attention, ColumnParallel, Groups, Mesh, RowParallel, SeqShard, ShardedRmsNorm, ShardedUnit,
    SharedComm, StageBoundary, TpAttention, shard_of,
};
use runtime::testing::{Rng, compare};
use runtime::{DType, Device, Result, Tensor};

const D: usize = 64;
const HEADS: usize = 8;
const HD: usize = D / HEADS;
const FFN: usize = 96;
const EPS: f32 = 1e-6;
const TOL: f32 = 1e-6;

fn opts() -> SocketOptions {
    SocketOptions {
        timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(30),
    }
}

/// Runs `f(comm)` on one thread per rank of a loopback group; results in rank order.
fn on_threads<R: Send + 'static>(
    world: usize,
    f: impl Fn(SharedComm) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let comms = SocketComm::local_group(world, opts()).unwrap();
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(Arc::new(c) as SharedComm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn randn(rng: &mut Rng, shape: &[usize], std: f32) -> Tensor {
    rng.randn(shape.to_vec(), std, DType::F32, &Device::Cpu)
        .unwrap()
        .0
}

/// Full (unsharded) parameters of one block, checkpoint names.
#[derive(Debug, Clone)]
struct Weights(Vec<(String, Tensor)>);

impl Weights {
    fn random(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let s = 1.0 / (D as f32).sqrt();
        let mut w = Vec::new();
        for m in ["q", "k", "v", "o"] {
            w.push((format!("self_attn.{m}.weight"), randn(&mut rng, &[D, D], s)));
            w.push((format!("self_attn.{m}.bias"), randn(&mut rng, &[D], 0.1)));
        }
        for m in ["norm_q", "norm_k"] {
            let v = randn(&mut rng, &[D], 0.2).affine(1.0, 1.0).unwrap();
            w.push((format!("self_attn.{m}.weight"), v));
        }
        w.push(("ffn.0.weight".into(), randn(&mut rng, &[FFN, D], s)));
        w.push(("ffn.0.bias".into(), randn(&mut rng, &[FFN], 0.1)));
        let s2 = 1.0 / (FFN as f32).sqrt();
        w.push(("ffn.2.weight".into(), randn(&mut rng, &[D, FFN], s2)));
        w.push(("ffn.2.bias".into(), randn(&mut rng, &[D], 0.1)));
        Self(w)
    }
    fn get(&self, name: &str) -> &Tensor {
        &self.0.iter().find(|(n, _)| n == name).unwrap().1
    }
}

/// RoPE tables `[L, HD/2]` for positions 0..L.
fn rope(len: usize) -> (Tensor, Tensor) {
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for p in 0..len {
        for k in 0..HD / 2 {
            let a = p as f64 * 10000f64.powf(-2.0 * k as f64 / HD as f64);
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
    }
    let t = |v| Tensor::from_vec(v, (len, HD / 2), &Device::Cpu).unwrap();
    (t(c), t(s))
}

// ---- the reference: plain tensor ops on full weights ------------------------------------

fn reference(
    w: &Weights,
    x: &Tensor,
    cache: Option<&(Tensor, Tensor)>,
) -> (Tensor, (Tensor, Tensor)) {
    let l = x.dim(1).unwrap();
    let offset = cache.map_or(0, |c| c.0.dim(1).unwrap());
    let (cos, sin) = rope(offset + l);
    let (cos, sin) = (
        cos.narrow(0, offset, l).unwrap(),
        sin.narrow(0, offset, l).unwrap(),
    );
    let lin = |x: &Tensor, m: &str| {
        x.linear(
            w.get(&format!("{m}.weight")),
            Some(w.get(&format!("{m}.bias"))),
        )
        .unwrap()
    };
    let heads = |t: Tensor| t.reshape((1, l, HEADS, HD)).unwrap();
    let a = x.layer_norm(None, None, EPS, DType::F32).unwrap();
    let q = lin(&a, "self_attn.q")
        .rms_norm(Some(w.get("self_attn.norm_q.weight")), EPS)
        .unwrap();
    let k = lin(&a, "self_attn.k")
        .rms_norm(Some(w.get("self_attn.norm_k.weight")), EPS)
        .unwrap();
    let q = heads(q).rope_interleaved(&cos, &sin, DType::F32).unwrap();
    let k = heads(k).rope_interleaved(&cos, &sin, DType::F32).unwrap();
    let v = heads(lin(&a, "self_attn.v"));
    let (kk, vv) = match cache {
        Some((ck, cv)) => (
            Tensor::cat(&[ck, &k], 1).unwrap(),
            Tensor::cat(&[cv, &v], 1).unwrap(),
        ),
        None => (k.clone(), v.clone()),
    };
    let o = sdpa(&q, &kk, &vv).unwrap().reshape((1, l, D)).unwrap();
    let x1 = x.add(&lin(&o, "self_attn.o")).unwrap();
    let b = x1.layer_norm(None, None, EPS, DType::F32).unwrap();
    let y2 = lin(&lin(&b, "ffn.0").gelu_tanh().unwrap(), "ffn.2");
    (x1.add(&y2).unwrap(), (k, v))
}

// ---- the block under test: built from the parallel layer types ----------------------------

struct Block {
    attn: TpAttention,
    core: Attention,
    ffn_0: ColumnParallel,
    ffn_2: RowParallel,
}

impl Block {
    /// From full weights, keeping this rank's TP shard; `core` chosen by the caller.
    fn new(w: &Weights, tp: SharedComm, core: Attention) -> Self {
        let p = |m: &str| {
            (
                w.get(&format!("self_attn.{m}.weight")),
                w.get(&format!("self_attn.{m}.bias")),
            )
        };
        let aw = AttentionWeights {
            q: p("q"),
            k: p("k"),
            v: p("v"),
            o: p("o"),
            norm_q: w.get("self_attn.norm_q.weight"),
            norm_k: w.get("self_attn.norm_k.weight"),
        };
        let (r, n) = (tp.rank(), tp.world());
        Self {
            attn: TpAttention::from_full(aw, HEADS, EPS, tp.clone()).unwrap(),
            core,
            ffn_0: ColumnParallel::from_full(
                w.get("ffn.0.weight"),
                Some(w.get("ffn.0.bias")),
                r,
                n,
            )
            .unwrap(),
            ffn_2: RowParallel::from_full(w.get("ffn.2.weight"), Some(w.get("ffn.2.bias")), tp)
                .unwrap(),
        }
    }

    /// From this rank's TP shards (as `block_hint` cuts them), e.g. an FSDP-gathered unit.
    fn from_shards(w: &Weights, tp: SharedComm, core: Attention) -> Self {
        let t = |n: &str| w.get(n).clone();
        let col = |m: &str| {
            let m = format!("self_attn.{m}");
            ColumnParallel::new(t(&format!("{m}.weight")), Some(t(&format!("{m}.bias")))).unwrap()
        };
        let norm = |m: &str| {
            ShardedRmsNorm::new(t(&format!("self_attn.{m}.weight")), D, EPS, tp.clone()).unwrap()
        };
        let o = RowParallel::new(
            t("self_attn.o.weight"),
            Some(t("self_attn.o.bias")),
            tp.clone(),
        )
        .unwrap();
        let n = tp.world();
        Self {
            attn: TpAttention::new(
                col("q"),
                col("k"),
                col("v"),
                o,
                norm("norm_q"),
                norm("norm_k"),
                HEADS,
                n,
            )
            .unwrap(),
            core,
            ffn_0: ColumnParallel::new(t("ffn.0.weight"), Some(t("ffn.0.bias"))).unwrap(),
            ffn_2: RowParallel::new(t("ffn.2.weight"), Some(t("ffn.2.bias")), tp).unwrap(),
        }
    }

    /// x `[1, t, D]` this rank's tokens; rope tables `[t, HD/2]` split like x; `kv` the
    /// attention core (reads/writes a head-sharded cache).
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        seq: &SeqShard,
        kv: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let a = x.layer_norm(None, None, EPS, DType::F32)?;
        let q = self
            .attn
            .query(&a)?
            .rope_interleaved(&rope.0, &rope.1, DType::F32)?;
        let (k, v) = self.attn.key_value(&a)?;
        let k = k.rope_interleaved(&rope.0, &rope.1, DType::F32)?;
        let o = self.core.forward_with(&q, &k, &v, seq, kv)?;
        let x1 = x.add(&self.attn.out(&o)?)?;
        let b = x1.layer_norm(None, None, EPS, DType::F32)?;
        let y2 = self.ffn_2.forward(&self.ffn_0.forward(&b)?.gelu_tanh()?)?;
        x1.add(&y2)
    }
}

/// Two calls through one block: the first fills a KV cache (this rank's heads, the whole
/// sequence), the second attends to cache + its own keys and appends them. Returns both
/// outputs gathered, and the final cache shape.
fn two_calls(
    w: &Weights,
    xs: &[Tensor; 2],
    tp: SharedComm,
    sp: Option<SharedComm>,
) -> (Vec<Tensor>, Vec<usize>) {
    let core = match &sp {
        Some(c) => Attention::ulysses(c.clone()),
        None => Attention::local(),
    };
    let block = Block::new(w, tp, core);
    let mut cache: Option<(Tensor, Tensor)> = None;
    let mut outs = Vec::new();
    let mut offset = 0;
    for x in xs {
        let l = x.dim(1).unwrap();
        let seq = match &sp {
            Some(c) => SeqShard::over(l, c).unwrap(),
            None => SeqShard::full(l),
        };
        let (cos, sin) = rope(offset + l);
        let (cos, sin) = (
            cos.narrow(0, offset, l).unwrap(),
            sin.narrow(0, offset, l).unwrap(),
        );
        // Entry: split the sequence and the per-token tables the same way.
        let xl = seq.split(x, 1).unwrap();
        let tables = (seq.split(&cos, 0).unwrap(), seq.split(&sin, 0).unwrap());
        let prev = cache.take();
        let mut new_cache = None;
        let y = block
            .forward(&xl, &tables, &seq, |q, k, v| {
                let (kk, vv) = match &prev {
                    Some((ck, cv)) => (Tensor::cat(&[ck, k], 1)?, Tensor::cat(&[cv, v], 1)?),
                    None => (k.clone(), v.clone()),
                };
                let o = sdpa(q, &kk, &vv);
                new_cache = Some((kk, vv));
                o
            })
            .unwrap();
        cache = new_cache;
        // Exit: gather the sequence.
        let y = match &sp {
            Some(c) => seq.gather(&y, 1, c).unwrap(),
            None => y,
        };
        outs.push(y);
        offset += l;
    }
    let shape = cache.unwrap().0.dims().to_vec();
    (outs, shape)
}

fn inputs(seed: u64, lens: [usize; 2]) -> [Tensor; 2] {
    let mut rng = Rng::new(seed);
    [
        randn(&mut rng, &[1, lens[0], D], 1.0),
        randn(&mut rng, &[1, lens[1], D], 1.0),
    ]
}

fn references(w: &Weights, xs: &[Tensor; 2]) -> Vec<Vec<f32>> {
    let (y0, kv) = reference(w, &xs[0], None);
    let (y1, _) = reference(w, &xs[1], Some(&kv));
    vec![y0.to_vec_f32().unwrap(), y1.to_vec_f32().unwrap()]
}

fn assert_close(what: &str, got: &Tensor, want: &[f32]) {
    let c = compare(&got.to_vec_f32().unwrap(), want);
    assert!(
        c.rel_l2 <= TOL,
        "{what}: rel L2 {} > {TOL}: {c:?}",
        c.rel_l2
    );
}

/// TP × Ulysses mesh on `tp·sp` threads; every rank's outputs match the reference and its
/// cache holds `HEADS/(tp·sp)` heads of the whole sequence.
fn run_mesh(tp: usize, sp: usize, lens: [usize; 2]) {
    let w = Weights::random(7);
    let xs = inputs(11, lens);
    let want = references(&w, &xs);
    let (w2, xs2) = (w.clone(), xs.clone());
    let results = on_threads(tp * sp, move |world| {
        let mesh = Mesh::new(1, 1, sp, tp).unwrap();
        let g = Groups::split(world.as_ref(), &mesh).unwrap();
        let sp_comm = (sp > 1).then(|| g.sp.clone());
        two_calls(&w2, &xs2, g.tp.clone(), sp_comm)
    });
    for (rank, (outs, cache_shape)) in results.iter().enumerate() {
        let cached = lens[0] + lens[1];
        assert_eq!(
            cache_shape,
            &[1, cached, HEADS / (tp * sp), HD],
            "rank {rank} cache"
        );
        for (i, y) in outs.iter().enumerate() {
            assert_close(&format!("tp{tp} sp{sp} rank {rank} call {i}"), y, &want[i]);
        }
    }
}

#[test]
fn single_rank_layers_match_reference() {
    run_mesh(1, 1, [13, 7]);
}

#[test]
fn tensor_parallel_2_matches_unsharded() {
    run_mesh(2, 1, [13, 7]);
}

#[test]
fn ulysses_2_matches_unsharded_with_padding() {
    // 13 and 7 tokens do not divide by 2: the last chunk carries a padding row.
    run_mesh(1, 2, [13, 7]);
}

#[test]
fn ulysses_4_matches_unsharded_with_padding() {
    // 7 tokens over 4 ranks: 2 per rank, the last rank holds one real token.
    run_mesh(1, 4, [13, 7]);
}

#[test]
fn ulysses_4_with_a_rank_holding_only_padding() {
    // 5 tokens over 4 ranks: 2 per rank, rank 3 holds padding only.
    run_mesh(1, 4, [5, 3]);
}

#[test]
fn tensor_parallel_2_by_ulysses_2_matches_unsharded() {
    run_mesh(2, 2, [13, 5]);
}

#[test]
fn pipeline_2_matches_unsharded() {
    let ws = [Weights::random(21), Weights::random(22)];
    let x = inputs(23, [9, 1])[0].clone();
    let (y0, _) = reference(&ws[0], &x, None);
    let (want, _) = reference(&ws[1], &y0, None);
    let want = want.to_vec_f32().unwrap();
    let ws2 = ws.clone();
    let results = on_threads(2, move |world| {
        let g = Groups::split(world.as_ref(), &Mesh::new(1, 2, 1, 1).unwrap()).unwrap();
        let boundary = StageBoundary::new(g.pp.clone());
        let block = Block::new(&ws2[g.coord.pp], g.tp.clone(), Attention::local());
        let seq = SeqShard::full(9);
        // Sub-stage 0 embeds (here: takes x and builds the tables), sub-stage 1 receives
        // the activations with the tables that travel with them.
        let (h, tables) = if boundary.is_first() {
            (x.clone(), rope(9))
        } else {
            let mut r = boundary.recv().unwrap();
            let sin = r.pop().unwrap();
            let cos = r.pop().unwrap();
            (r.pop().unwrap(), (cos, sin))
        };
        let y = block.forward(&h, &tables, &seq, sdpa).unwrap();
        if boundary.is_last() {
            Some(y)
        } else {
            boundary.send(&[&y, &tables.0, &tables.1]).unwrap();
            None
        }
    });
    assert!(results[0].is_none());
    assert_close("pp2 output", results[1].as_ref().unwrap(), &want);
}

/// FSDP over the Ulysses group of a `tp`×`sp` mesh (the planner's layout): two blocks and a
/// root unit (a final projection); each rank keeps 1/sp of its TP shard of every unit. With
/// `ulysses` false the sp ranks each run the whole sequence (plain FSDP).
fn run_fsdp(sp: usize, tp: usize, ulysses: bool) {
    let ws = [Weights::random(31), Weights::random(32)];
    let mut rng = Rng::new(33);
    let proj = randn(&mut rng, &[D, D], 0.1);
    let x = inputs(34, [11, 1])[0].clone();
    let (y0, _) = reference(&ws[0], &x, None);
    let (y1, _) = reference(&ws[1], &y0, None);
    let want = y1.linear(&proj, None).unwrap().to_vec_f32().unwrap();
    let (ws2, proj2) = (ws.clone(), proj.clone());
    let results = on_threads(sp * tp, move |world| {
        let g = Groups::split(world.as_ref(), &Mesh::new(1, 1, sp, tp).unwrap()).unwrap();
        let fsdp = g.sp.clone();
        // What this rank would hold under TP alone, then 1/sp of it under FSDP.
        let tp_shards: Vec<Weights> = ws2
            .iter()
            .map(|w| {
                let part = |(n, t): &(String, Tensor)| {
                    let t = match block_hint(n, g.tp.rank(), tp) {
                        Some(h) => shard_of(t, h).unwrap(),
                        None => t.clone(),
                    };
                    (n.clone(), t)
                };
                Weights(w.0.iter().map(part).collect())
            })
            .collect();
        let units: Vec<ShardedUnit> = tp_shards
            .iter()
            .map(|w| ShardedUnit::from_full(&w.0, fsdp.clone()).unwrap())
            .collect();
        let root =
            ShardedUnit::from_full(&[("head.weight".into(), proj2.clone())], fsdp.clone()).unwrap();
        let held: usize = tp_shards[0].0.iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(units[0].shard().elem_count(), held.div_ceil(sp));

        let seq = if ulysses {
            SeqShard::over(11, &g.sp).unwrap()
        } else {
            SeqShard::full(11)
        };
        let core = || {
            if ulysses {
                Attention::ulysses(g.sp.clone())
            } else {
                Attention::local()
            }
        };
        let (cos, sin) = rope(11);
        let tables = (seq.split(&cos, 0).unwrap(), seq.split(&sin, 0).unwrap());
        // The root unit stays gathered for the whole forward.
        let root_full = root.gather().unwrap();
        let mut h = seq.split(&x, 1).unwrap();
        for unit in &units {
            let gathered = unit.gather().unwrap();
            let w = Weights(
                gathered
                    .names()
                    .map(|nm| (nm.to_string(), gathered.get(nm).unwrap().clone()))
                    .collect(),
            );
            let block = Block::from_shards(&w, g.tp.clone(), core());
            h = block.forward(&h, &tables, &seq, sdpa).unwrap();
            // `gathered`, `w` and the block drop here: the unsharded block is freed.
        }
        let h = if ulysses {
            seq.gather(&h, 1, &g.sp).unwrap()
        } else {
            h
        };
        h.linear(root_full.get("head.weight").unwrap(), None)
            .unwrap()
    });
    for (rank, y) in results.iter().enumerate() {
        let what = format!("fsdp{sp} tp{tp} ulysses={ulysses} rank {rank}");
        assert_close(&what, y, &want);
    }
}

#[test]
fn fsdp_2_matches_unsharded() {
    run_fsdp(2, 1, false);
}

#[test]
fn fsdp_over_ulysses_2_matches_unsharded() {
    run_fsdp(2, 1, true);
}

#[test]
fn fsdp_over_ulysses_2_by_tensor_parallel_2_matches_unsharded() {
    run_fsdp(2, 2, true);
}
