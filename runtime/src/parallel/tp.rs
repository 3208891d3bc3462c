//! Tensor parallelism over heads and the FFN hidden dim (Megatron layout).
//!
//! Column-parallel q, k, v and ffn.0 keep rows `rank·n/tp ..` of their `[out, in]` weight and
//! bias, so each rank computes its own heads (or hidden units) from the replicated input and
//! no communication happens. Row-parallel o and ffn.2 keep the matching input columns; each
//! rank's partial product is all-reduced in f32 and the replicated bias is added once, after
//! the reduction. The q/k RMSNorms normalise over the full width (model-spec §3.3.1), so
//! [`ShardedRmsNorm`] all-reduces the per-token sum of squares of the head shards.

use super::{Shard, SharedComm, shard_of};
use crate::comm::ReduceOp;
use crate::device::{BinaryOp, Epilogue};
use crate::models::VarBuilder;
use crate::{DType, Error, Result, Tensor};

/// How a checkpoint tensor of a transformer block, an audio injector (the same attention
/// module, plus its AdaLN linear) or the time projection is split under tensor parallelism:
/// `None` means replicated. `name` is the full or
/// block-relative key, e.g. `blocks.3.self_attn.q.weight` or `ffn.2.bias`.
pub fn block_hint(name: &str, rank: usize, world: usize) -> Option<Shard> {
    let hint = |dim| Some(Shard { dim, rank, world });
    let parts: Vec<&str> = name.rsplitn(3, '.').collect();
    let (param, module) = match parts.as_slice() {
        [p, m, ..] => (*p, *m),
        _ => return None,
    };
    let parent = parts
        .get(2)
        .map_or("", |p| p.rsplit('.').next().unwrap_or(""));
    // Column-parallel with the (few-row) output all-gathered: the injectors' AdaLN linear
    // and the time projection ([`GatheredColumn`]).
    if (name.contains("injector_adain_layers.") && module == "linear")
        || (parent == "time_projection" && module == "1")
    {
        return matches!(param, "weight" | "bias").then_some(Shard {
            dim: 0,
            rank,
            world,
        });
    }
    match (parent, module, param) {
        // Column-parallel: rows are heads (q, k, v) or hidden units (ffn.0); the q/k norm
        // weights follow their heads.
        (_, "q" | "k" | "v" | "norm_q" | "norm_k", "weight" | "bias") => hint(0),
        ("ffn", "0", "weight" | "bias") => hint(0),
        // Row-parallel: input columns; the bias is added after the all-reduce.
        (_, "o", "weight") | ("ffn", "2", "weight") => hint(1),
        _ => None,
    }
}

/// A linear layer whose output features are split over the TP group (no communication).
#[derive(Debug, Clone)]
pub struct ColumnParallel {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl ColumnParallel {
    /// `weight`: this rank's rows `[out/tp, in]`; `bias`: the matching `[out/tp]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        check_bias("ColumnParallel", bias.as_ref(), out)?;
        Ok(Self { weight, bias })
    }

    /// Slices the full weight and bias (weights read once and scattered; tests).
    pub fn from_full(
        weight: &Tensor,
        bias: Option<&Tensor>,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        let h = |dim| Shard { dim, rank, world };
        Self::new(
            shard_of(weight, h(0))?,
            bias.map(|b| shard_of(b, h(0))).transpose()?,
        )
    }

    /// The loader's hint for the weight and for the bias: rows.
    pub fn hint(rank: usize, world: usize) -> Shard {
        Shard {
            dim: 0,
            rank,
            world,
        }
    }

    /// This rank's rows of `vb`'s `weight [out, inp]` and `bias [out]`, reading only their
    /// bytes (LoRA merged for that part).
    pub fn load(
        vb: &VarBuilder,
        out: usize,
        inp: usize,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        let h = Self::hint(rank, world);
        Self::new(
            vb.get_sharded("weight", &[out, inp], h)?,
            Some(vb.get_sharded("bias", &[out], h)?),
        )
    }

    /// Per-tensor FP8 e4m3 weight (model-spec §8.1); the bias keeps its dtype.
    pub fn quantize_fp8(&mut self) -> Result<()> {
        quantize(&mut self.weight)
    }

    /// `x [.., in]` (replicated) → `[.., out/tp]` in the weight's dtype (in x's dtype for
    /// an FP8 weight, as `Linear` does).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.dtype() == DType::F8E4M3 {
            return x.fp8_linear(&self.weight, self.bias.as_ref(), x.dtype());
        }
        x.to_dtype(self.weight.dtype())?
            .linear(&self.weight, self.bias.as_ref())
    }
}

fn quantize(w: &mut Tensor) -> Result<()> {
    if w.dtype() != DType::F8E4M3 {
        let _g = crate::memory::scope(crate::memory::Category::Weights);
        *w = w.quantize_fp8()?;
    }
    Ok(())
}

/// A column-parallel linear whose output is all-gathered over the tp group, so every rank
/// holds the whole result: for layers with a large weight and an output of a few rows (the
/// time projection, the injectors' AdaLN), which the planner counts as sharded.
#[derive(Debug, Clone)]
pub struct GatheredColumn {
    pub col: ColumnParallel,
    comm: SharedComm,
}

impl GatheredColumn {
    /// This rank's rows of `vb`'s `weight [out, inp]` and `bias [out]`.
    pub fn load(vb: &VarBuilder, out: usize, inp: usize, comm: SharedComm) -> Result<Self> {
        Ok(Self {
            col: ColumnParallel::load(vb, out, inp, comm.rank(), comm.world())?,
            comm,
        })
    }

    /// The same layer with f32 weights (the reference's fp32 autocast regions).
    pub fn to_f32(&self) -> Result<Self> {
        let _g = crate::memory::scope(crate::memory::Category::Weights);
        let c = &self.col;
        Ok(Self {
            col: ColumnParallel::new(
                c.weight.to_dtype(DType::F32)?,
                c.bias
                    .as_ref()
                    .map(|b| b.to_dtype(DType::F32))
                    .transpose()?,
            )?,
            comm: self.comm.clone(),
        })
    }

    pub fn quantize_fp8(&mut self) -> Result<()> {
        self.col.quantize_fp8()
    }

    /// `x [.., in]` (replicated) → `[.., out]`, this rank's columns computed, the rest
    /// gathered (each output element is the same dot product as unsharded).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.col.forward(x)?;
        self.comm.all_gather(&y, y.rank().saturating_sub(1))
    }
}

/// A linear layer whose input features are split over the TP group; the output is
/// all-reduced, so every rank holds the full, identical result.
#[derive(Debug, Clone)]
pub struct RowParallel {
    pub weight: Tensor,
    /// Replicated `[out]`, added after the reduction.
    pub bias: Option<Tensor>,
    comm: SharedComm,
}

impl RowParallel {
    /// `weight`: this rank's columns `[out, in/tp]`; `bias`: the full `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, comm: SharedComm) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        check_bias("RowParallel", bias.as_ref(), out)?;
        Ok(Self { weight, bias, comm })
    }

    pub fn from_full(weight: &Tensor, bias: Option<&Tensor>, comm: SharedComm) -> Result<Self> {
        let h = Self::hint(comm.rank(), comm.world());
        Self::new(shard_of(weight, h)?, bias.cloned(), comm)
    }

    /// The loader's hint for the weight (columns); the bias is read whole.
    pub fn hint(rank: usize, world: usize) -> Shard {
        Shard {
            dim: 1,
            rank,
            world,
        }
    }

    /// This rank's columns of `vb`'s `weight [out, inp]` and the whole `bias [out]`.
    pub fn load(vb: &VarBuilder, out: usize, inp: usize, comm: SharedComm) -> Result<Self> {
        let h = Self::hint(comm.rank(), comm.world());
        Self::new(
            vb.get_sharded("weight", &[out, inp], h)?,
            Some(vb.get("bias", &[out])?),
            comm,
        )
    }

    /// Per-tensor FP8 e4m3 weight (model-spec §8.1); the bias keeps its dtype.
    pub fn quantize_fp8(&mut self) -> Result<()> {
        quantize(&mut self.weight)
    }

    /// `x [.., in/tp]` (this rank's heads or hidden units) → `[.., out]` in the weight's
    /// dtype. The partial products are reduced in f32 and rounded once, as the unsharded GEMM
    /// with f32 accumulation rounds once. Alone in its group it is the plain linear (bias
    /// fused), so a world-1 model is the unsharded one.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fp8 = self.weight.dtype() == DType::F8E4M3;
        if self.comm.world() == 1 {
            return match fp8 {
                true => x.fp8_linear(&self.weight, self.bias.as_ref(), x.dtype()),
                false => x
                    .to_dtype(self.weight.dtype())?
                    .linear(&self.weight, self.bias.as_ref()),
            };
        }
        // FP8: each rank scales its own activation shard (per-tensor, §8.1); the result is
        // rounded to x's dtype as `Linear` does.
        let (xin, dt) = match fp8 {
            true => (x.quantize_fp8()?, x.dtype()),
            false => (x.to_dtype(self.weight.dtype())?, self.weight.dtype()),
        };
        let partial = xin.linear_ex(&self.weight, None, Epilogue::None, DType::F32)?;
        let sum = self.comm.all_reduce(&partial, ReduceOp::Sum)?;
        match &self.bias {
            Some(b) => sum.binary_to(b, BinaryOp::Add, dt),
            None => sum.to_dtype(dt),
        }
    }
}

fn check_bias(op: &'static str, bias: Option<&Tensor>, out: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [out] => Err(Error::invalid(
            op,
            format!("bias {:?} does not match {out} output features", b.shape()),
        )),
        _ => Ok(()),
    }
}

/// `WanRMSNorm` over the full width of activations whose last dim is split over the TP group
/// (this rank's heads): `x·rsqrt(Σ_all x² / full_dim + eps)` with the per-token sum of squares
/// all-reduced in f32, rounded to x's dtype, × this rank's slice of the weight.
#[derive(Debug, Clone)]
pub struct ShardedRmsNorm {
    pub weight: Tensor,
    pub full_dim: usize,
    pub eps: f32,
    comm: SharedComm,
}

impl ShardedRmsNorm {
    /// `weight`: this rank's `[full_dim/tp]` slice.
    pub fn new(weight: Tensor, full_dim: usize, eps: f32, comm: SharedComm) -> Result<Self> {
        let n = weight.dims()[..].iter().product::<usize>();
        if weight.rank() != 1 || n * comm.world() != full_dim {
            return Err(Error::invalid(
                "ShardedRmsNorm",
                format!(
                    "weight {:?} is not a 1/{} slice of width {full_dim}",
                    weight.shape(),
                    comm.world()
                ),
            ));
        }
        Ok(Self {
            weight,
            full_dim,
            eps,
            comm,
        })
    }

    pub fn from_full(weight: &Tensor, eps: f32, comm: SharedComm) -> Result<Self> {
        let full = weight.dim(0)?;
        let h = Shard {
            dim: 0,
            rank: comm.rank(),
            world: comm.world(),
        };
        Self::new(shard_of(weight, h)?, full, eps, comm)
    }

    /// This rank's slice of `vb`'s `weight [full_dim]`.
    pub fn load(vb: &VarBuilder, full_dim: usize, eps: f32, comm: SharedComm) -> Result<Self> {
        let h = Shard {
            dim: 0,
            rank: comm.rank(),
            world: comm.world(),
        };
        Self::new(
            vb.get_sharded("weight", &[full_dim], h)?,
            full_dim,
            eps,
            comm,
        )
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.comm.world() == 1 {
            // The fused kernel; same formula.
            return x.rms_norm(Some(&self.weight), self.eps);
        }
        let (rows, cols) = x.shape().rows_cols();
        let x2 = x.reshape((rows, cols))?;
        let ss = x2.to_dtype(DType::F32)?.sqr()?.sum_last()?;
        let ss = self.comm.all_reduce(&ss, ReduceOp::Sum)?;
        let inv = ss
            .affine(1.0 / self.full_dim as f32, self.eps)?
            .sqrt()?
            .recip()?
            .reshape((rows, 1))?;
        let n = x2.binary_to(&inv, BinaryOp::Mul, x.dtype())?;
        n.mul(&self.weight)?.reshape(x.shape().clone())
    }
}

/// Attention projections of `WanSelfAttention` / `WanCrossAttention` for this rank's heads:
/// column-parallel q, k, v with full-width q/k norms, row-parallel o. Same methods as the
/// unsharded module, so block code does not change.
#[derive(Debug, Clone)]
pub struct TpAttention {
    pub q: ColumnParallel,
    pub k: ColumnParallel,
    pub v: ColumnParallel,
    pub o: RowParallel,
    pub norm_q: ShardedRmsNorm,
    pub norm_k: ShardedRmsNorm,
    /// Heads on this rank (num_heads / tp).
    pub local_heads: usize,
    pub head_dim: usize,
}

/// The full (unsharded) tensors of one attention module, in checkpoint layout.
#[derive(Debug, Clone, Copy)]
pub struct AttentionWeights<'a> {
    pub q: (&'a Tensor, &'a Tensor),
    pub k: (&'a Tensor, &'a Tensor),
    pub v: (&'a Tensor, &'a Tensor),
    pub o: (&'a Tensor, &'a Tensor),
    pub norm_q: &'a Tensor,
    pub norm_k: &'a Tensor,
}

impl TpAttention {
    /// Built from shards a loader read with [`block_hint`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        q: ColumnParallel,
        k: ColumnParallel,
        v: ColumnParallel,
        o: RowParallel,
        norm_q: ShardedRmsNorm,
        norm_k: ShardedRmsNorm,
        num_heads: usize,
        tp: usize,
    ) -> Result<Self> {
        if num_heads == 0 || !num_heads.is_multiple_of(tp) {
            return Err(Error::invalid(
                "TpAttention",
                format!("{num_heads} heads do not split over tp {tp}"),
            ));
        }
        let local_heads = num_heads / tp;
        let width = q.weight.dims2()?.0;
        if !width.is_multiple_of(local_heads) {
            return Err(Error::invalid(
                "TpAttention",
                format!("q width {width} is not {local_heads} heads"),
            ));
        }
        Ok(Self {
            q,
            k,
            v,
            o,
            norm_q,
            norm_k,
            local_heads,
            head_dim: width / local_heads,
        })
    }

    /// Slices full weights for this rank of `comm` (weights read once and scattered; tests).
    pub fn from_full(
        w: AttentionWeights,
        num_heads: usize,
        eps: f32,
        comm: SharedComm,
    ) -> Result<Self> {
        let (r, n) = (comm.rank(), comm.world());
        let col = |p: (&Tensor, &Tensor)| ColumnParallel::from_full(p.0, Some(p.1), r, n);
        Self::new(
            col(w.q)?,
            col(w.k)?,
            col(w.v)?,
            RowParallel::from_full(w.o.0, Some(w.o.1), comm.clone())?,
            ShardedRmsNorm::from_full(w.norm_q, eps, comm.clone())?,
            ShardedRmsNorm::from_full(w.norm_k, eps, comm.clone())?,
            num_heads,
            n,
        )
    }

    /// This rank's heads of a `WanSelfAttention` / `WanCrossAttention` (`q`, `k`, `v`, `o`,
    /// `norm_q`, `norm_k` under `vb`), `dim` wide; only this rank's bytes are read.
    pub fn load(
        vb: &VarBuilder,
        dim: usize,
        num_heads: usize,
        eps: f32,
        comm: SharedComm,
    ) -> Result<Self> {
        let (r, n) = (comm.rank(), comm.world());
        let col = |m: &str| ColumnParallel::load(&vb.pp(m), dim, dim, r, n);
        let norm = |m: &str| ShardedRmsNorm::load(&vb.pp(m), dim, eps, comm.clone());
        Self::new(
            col("q")?,
            col("k")?,
            col("v")?,
            RowParallel::load(&vb.pp("o"), dim, dim, comm.clone())?,
            norm("norm_q")?,
            norm("norm_k")?,
            num_heads,
            n,
        )
    }

    /// FP8 for q, k, v and o (§8.1).
    pub fn quantize_fp8(&mut self) -> Result<()> {
        self.q.quantize_fp8()?;
        self.k.quantize_fp8()?;
        self.v.quantize_fp8()?;
        self.o.quantize_fp8()
    }

    /// `[.., L, width/tp]` → `[B, L, heads/tp, head_dim]`.
    pub fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 {
            return Err(Error::UnexpectedRank {
                op: "TpAttention::heads",
                expected: 3,
                got: x.shape().clone(),
            });
        }
        let l = dims[dims.len() - 2];
        let b = x.elem_count() / (l * self.local_heads * self.head_dim).max(1);
        x.reshape((b, l, self.local_heads, self.head_dim))
    }

    /// RMSNorm_q(Wq·x) as this rank's heads.
    pub fn query(&self, x: &Tensor) -> Result<Tensor> {
        self.heads(&self.norm_q.forward(&self.q.forward(x)?)?)
    }

    /// (RMSNorm_k(Wk·x), Wv·x) as this rank's heads.
    pub fn key_value(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.heads(&self.norm_k.forward(&self.k.forward(x)?)?)?;
        let v = self.heads(&self.v.forward(x)?)?;
        Ok((k, v))
    }

    /// Output projection of this rank's heads `[B, L, H/tp, d]` → `[B, L, dim]` (all-reduced).
    pub fn out(&self, heads: &Tensor) -> Result<Tensor> {
        let (b, l, h, d) = heads.dims4()?;
        self.o.forward(&heads.reshape((b, l, h * d))?)
    }
}
