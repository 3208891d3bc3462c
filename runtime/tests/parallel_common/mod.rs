//! The block and reference shared by the sharded == unsharded tests: on SocketComm ranks in
//! threads (parallel.rs) and on NcclComm ranks, one process per GPU (parallel_nccl.rs).

#![allow(dead_code)]

use runtime::comm::Comm;
use runtime::parallel::tp::AttentionWeights;
use runtime::parallel::ulysses::sdpa;
use runtime::parallel::{
    Attention, ColumnParallel, Groups, Mesh, RowParallel, SeqShard, ShardedRmsNorm, SharedComm,
    TpAttention,
};
use runtime::testing::{Rng, compare};
use runtime::{DType, Device, Result, Tensor};

pub const D: usize = 64;
pub const HEADS: usize = 8;
pub const HD: usize = D / HEADS;
pub const FFN: usize = 96;
pub const EPS: f32 = 1e-6;
pub const TOL: f32 = 1e-6;

pub fn randn(rng: &mut Rng, shape: &[usize], std: f32) -> Tensor {
    rng.randn(shape.to_vec(), std, DType::F32, &Device::Cpu)
        .unwrap()
        .0
}

/// Full (unsharded) parameters of one block, checkpoint names.
#[derive(Debug, Clone)]
pub struct Weights(pub Vec<(String, Tensor)>);

impl Weights {
    pub fn random(seed: u64) -> Self {
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
    pub fn get(&self, name: &str) -> &Tensor {
        &self.0.iter().find(|(n, _)| n == name).unwrap().1
    }
}

/// RoPE tables `[L, HD/2]` for positions 0..L.
pub fn rope(len: usize) -> (Tensor, Tensor) {
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

pub fn reference(
    w: &Weights,
    x: &Tensor,
    cache: Option<&(Tensor, Tensor)>,
) -> (Tensor, (Tensor, Tensor)) {
    let l = x.dim(1).unwrap();
    let offset = cache.map_or(0, |c| c.0.dim(1).unwrap());
    let (cos, sin) = rope(offset + l);
    let (cos, sin) = (
        cos.narrow(0, offset, l)
            .unwrap()
            .to_device(&x.device())
            .unwrap(),
        sin.narrow(0, offset, l)
            .unwrap()
            .to_device(&x.device())
            .unwrap(),
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

pub struct Block {
    attn: TpAttention,
    core: Attention,
    ffn_0: ColumnParallel,
    ffn_2: RowParallel,
}

impl Block {
    /// From full weights, keeping this rank's TP shard; `core` chosen by the caller.
    pub fn new(w: &Weights, tp: SharedComm, core: Attention) -> Self {
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
    pub fn from_shards(w: &Weights, tp: SharedComm, core: Attention) -> Self {
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
    pub fn forward(
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
pub fn two_calls(
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
            cos.narrow(0, offset, l)
                .unwrap()
                .to_device(&x.device())
                .unwrap(),
            sin.narrow(0, offset, l)
                .unwrap()
                .to_device(&x.device())
                .unwrap(),
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
        outs.push(y.to_device(&Device::Cpu).unwrap());
        offset += l;
    }
    let shape = cache.unwrap().0.dims().to_vec();
    (outs, shape)
}

pub fn inputs(seed: u64, lens: [usize; 2]) -> [Tensor; 2] {
    let mut rng = Rng::new(seed);
    [
        randn(&mut rng, &[1, lens[0], D], 1.0),
        randn(&mut rng, &[1, lens[1], D], 1.0),
    ]
}

/// The unsharded outputs of the two calls (on the device of `w` and `xs`).
pub fn references(w: &Weights, xs: &[Tensor; 2]) -> Vec<Vec<f32>> {
    let (y0, kv) = reference(w, &xs[0], None);
    let (y1, _) = reference(w, &xs[1], Some(&kv));
    vec![y0.to_vec_f32().unwrap(), y1.to_vec_f32().unwrap()]
}

pub fn assert_close(what: &str, got: &Tensor, want: &[f32]) {
    let c = compare(&got.to_vec_f32().unwrap(), want);
    assert!(
        c.rel_l2 <= TOL,
        "{what}: rel L2 {} > {TOL}: {c:?}",
        c.rel_l2
    );
}

impl Weights {
    pub fn to_device(&self, dev: &Device) -> Self {
        Self(
            self.0
                .iter()
                .map(|(n, t)| (n.clone(), t.to_device(dev).unwrap()))
                .collect(),
        )
    }
}

/// One rank of a TP × Ulysses mesh over `world` on `dev`: splits the groups, moves the
/// weights and inputs to `dev` and runs [`two_calls`]; outputs come back on the CPU.
pub fn mesh_rank(
    world: &dyn Comm,
    tp: usize,
    sp: usize,
    w: &Weights,
    xs: &[Tensor; 2],
    dev: &Device,
) -> (Vec<Tensor>, Vec<usize>) {
    let g = Groups::split(world, &Mesh::new(1, 1, sp, tp).unwrap()).unwrap();
    let sp_comm = (sp > 1).then(|| g.sp.clone());
    let xs = [xs[0].to_device(dev).unwrap(), xs[1].to_device(dev).unwrap()];
    two_calls(&w.to_device(dev), &xs, g.tp.clone(), sp_comm)
}

/// Checks one rank's [`mesh_rank`] result against the reference.
pub fn check_mesh_rank(
    rank: usize,
    tp: usize,
    sp: usize,
    lens: [usize; 2],
    result: &(Vec<Tensor>, Vec<usize>),
    want: &[Vec<f32>],
) {
    let (outs, cache_shape) = result;
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
