//! umT5-XXL encoder (model-spec §1.3) from `models_t5_umt5-xxl-enc-bf16.pth`: T5 RMS norm,
//! per-layer relative position buckets, no 1/√d scaling, fp32 softmax, gated GELU-tanh FFN,
//! no biases. Names as in the checkpoint (§2.3): `token_embedding`, `blocks.{i}.{norm1, attn,
//! norm2, ffn, pos_embedding}`, `norm`.
//!
//! The encoder runs on the real tokens only: the reference pads to `text_len` and masks the
//! padded keys with the dtype's minimum, which gives them exactly zero softmax weight, so the
//! real rows are the same, and its output is cut to the real tokens anyway.

mod html_entities;
pub mod text;
pub mod tokenizer;

use planner::spec::T5Spec;

use crate::device::{BinaryOp, UnaryOp};
use crate::models::vars::{Vars, VarsRoot};
use crate::{DType, Error, Result, Tensor};
pub use tokenizer::{T5Tokenizer, Tokens};

/// Sizes (umT5-XXL: vocab 256 384, dim 4096, ffn 10 240, 64 heads, 24 layers, 32 buckets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5Config {
    pub vocab: usize,
    pub dim: usize,
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub num_buckets: usize,
    /// Largest distance with its own log bucket (128).
    pub max_distance: usize,
}

/// RMS norm epsilon of every T5 norm.
pub const T5_EPS: f32 = 1e-6;

impl T5Config {
    pub fn from_spec(s: &T5Spec) -> Self {
        Self {
            vocab: s.vocab as usize,
            dim: s.dim as usize,
            ffn_dim: s.ffn_dim as usize,
            num_heads: s.num_heads as usize,
            num_layers: s.num_layers as usize,
            num_buckets: s.num_buckets as usize,
            max_distance: 128,
        }
    }
}

/// Bidirectional T5 bucket of `rel = key − query`: half the buckets per sign; distances
/// below `half/2` exact, the rest log-spaced up to `max_distance` (then the last bucket).
pub fn relative_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let r = rel.unsigned_abs() as usize;
    let max_exact = half / 2;
    if r < max_exact {
        return base + r;
    }
    // f32 log over a (double) log constant, truncated toward zero, as the reference.
    let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
    let v = ((r as f32 / max_exact as f32).ln() / denom * (half - max_exact) as f32) as usize;
    base + (max_exact + v).min(half - 1)
}

#[derive(Debug)]
struct T5Block {
    norm1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    norm2: Tensor,
    gate: Tensor,
    fc1: Tensor,
    fc2: Tensor,
    /// `pos_embedding.embedding.weight` [buckets, heads] on the device, in the weights' dtype.
    pos: Tensor,
}

impl T5Block {
    fn load(vb: &Vars, c: &T5Config) -> Result<Self> {
        let (d, f) = (c.dim, c.ffn_dim);
        let a = vb.pp("attn");
        let pos = vb
            .pp("pos_embedding")
            .pp("embedding")
            .get("weight", &[c.num_buckets, c.num_heads])?;
        Ok(Self {
            norm1: vb.pp("norm1").get("weight", &[d])?,
            q: a.pp("q").get("weight", &[d, d])?,
            k: a.pp("k").get("weight", &[d, d])?,
            v: a.pp("v").get("weight", &[d, d])?,
            o: a.pp("o").get("weight", &[d, d])?,
            norm2: vb.pp("norm2").get("weight", &[d])?,
            gate: vb.pp("ffn").pp("gate").pp(0).get("weight", &[f, d])?,
            fc1: vb.pp("ffn").pp("fc1").get("weight", &[f, d])?,
            fc2: vb.pp("ffn").pp("fc2").get("weight", &[d, f])?,
            pos,
        })
    }

    /// Position bias [heads, l, l] in `act`: this layer's table rows gathered on the device
    /// by the bucket of every (query, key) pair (`buckets`, row-major [l, l]).
    fn position_bias(&self, buckets: &[u32], l: usize, act: DType) -> Result<Tensor> {
        let h = self.pos.dim(1)?;
        self.pos
            .index_select(buckets, 0)?
            .to_dtype(act)?
            .reshape((l, l, h))?
            .permute(&[2, 0, 1])
    }

    /// x [l, dim] in `act`; `buckets` as in [`T5Block::position_bias`].
    fn forward(&self, x: &Tensor, c: &T5Config, buckets: &[u32]) -> Result<Tensor> {
        let act = x.dtype();
        let (l, d) = x.dims2()?;
        let (h, hd) = (c.num_heads, d / c.num_heads);
        let y = x.rms_norm(Some(&self.norm1), T5_EPS)?;
        let heads = |w: &Tensor| -> Result<Tensor> {
            y.linear(w, None)?.reshape((l, h, hd))?.permute(&[1, 0, 2]) // [h, l, hd]
        };
        let (q, k, v) = (heads(&self.q)?, heads(&self.k)?, heads(&self.v)?);
        // Scores without 1/√d, plus the bias, in act; softmax in f32 rounded to act.
        let s = q.matmul(&k.transpose(1, 2)?)?;
        let s = s.binary_to(&self.position_bias(buckets, l, act)?, BinaryOp::Add, act)?;
        let p = s.softmax_last_to(act)?;
        let o = p.matmul(&v)?.permute(&[1, 0, 2])?.reshape((l, d))?;
        let x = x.add(&o.linear(&self.o, None)?)?;
        let y = x.rms_norm(Some(&self.norm2), T5_EPS)?;
        let g = y
            .linear(&self.gate, None)?
            .unary_to(UnaryOp::GeluTanh, act)?;
        let f = y.linear(&self.fc1, None)?.mul(&g)?;
        x.add(&f.linear(&self.fc2, None)?)
    }
}

/// The umT5 encoder stack.
#[derive(Debug)]
pub struct T5Encoder {
    cfg: T5Config,
    token_embedding: Tensor,
    blocks: Vec<T5Block>,
    norm: Tensor,
}

impl T5Encoder {
    /// Load from a source keyed like the `.pth`; weights converted to the root's dtype.
    pub fn load(root: &VarsRoot, cfg: T5Config) -> Result<Self> {
        let vb = root.vars();
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::load(&vb.pp("blocks").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let enc = Self {
            token_embedding: vb
                .pp("token_embedding")
                .get("weight", &[cfg.vocab, cfg.dim])?,
            norm: vb.pp("norm").get("weight", &[cfg.dim])?,
            blocks,
            cfg,
        };
        root.check_all_used(|_| false)?;
        Ok(enc)
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The encoder output of the real tokens `ids` (EOS included, no padding): `[L, dim]`.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::invalid("t5", "no tokens"));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab) {
            return Err(Error::invalid(
                "t5",
                format!(
                    "token id {bad} outside the vocabulary of {}",
                    self.cfg.vocab
                ),
            ));
        }
        let mut x = self.token_embedding.index_select(ids, 0)?;
        // The bucket of every (query, key) pair, shared by all layers (each has its own table).
        let l = ids.len() as i64;
        let buckets: Vec<u32> = (0..l * l)
            .map(|ij| {
                let (i, j) = (ij / l, ij % l);
                relative_bucket(j - i, self.cfg.num_buckets, self.cfg.max_distance) as u32
            })
            .collect();
        for b in &self.blocks {
            x = b.forward(&x, &self.cfg, &buckets)?;
        }
        x.rms_norm(Some(&self.norm), T5_EPS)
    }
}
