//! Ulysses sequence parallelism (model-spec §7.2, with the padding masked).
//!
//! At DiT entry the token sequence (and every per-token side tensor: RoPE tables, per-token
//! modulation) is zero-padded to a multiple of sp and split into equal contiguous chunks
//! ([`SeqShard::split`]). Inside each attention, an all-to-all turns this rank's tokens of
//! all (local) heads `[B, L/sp, H, d]` into all tokens of H/sp heads `[B, L, H/sp, d]`; the
//! attention core runs over the full sequence, and a second all-to-all returns
//! `[B, L/sp, H, d]` for the output projection. At exit the chunks are gathered and trimmed
//! ([`SeqShard::gather`]). Unlike the reference, the padding rows are dropped before the core,
//! so they are never attended to and sharded equals unsharded.

use super::SharedComm;
use crate::models::wan::block::SelfAttnKv;
use crate::{Error, Result, Tensor};

/// Where this rank's chunk sits in a sequence of `len` tokens padded to `padded` and split
/// over `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqShard {
    pub len: usize,
    pub padded: usize,
    pub rank: usize,
    pub world: usize,
}

impl SeqShard {
    pub fn new(len: usize, rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::invalid(
                "SeqShard",
                format!("rank {rank} of {world}"),
            ));
        }
        Ok(Self {
            len,
            padded: len.div_ceil(world) * world,
            rank,
            world,
        })
    }

    /// The whole sequence on one rank (no sequence parallelism).
    pub fn full(len: usize) -> Self {
        Self {
            len,
            padded: len,
            rank: 0,
            world: 1,
        }
    }

    /// This rank's chunk of a sequence split over `comm`.
    pub fn over(len: usize, comm: &SharedComm) -> Result<Self> {
        Self::new(len, comm.rank(), comm.world())
    }

    /// Tokens per rank, padding included.
    pub fn local_len(&self) -> usize {
        self.padded / self.world
    }

    /// Index of this rank's first token in the full sequence.
    pub fn offset(&self) -> usize {
        self.rank * self.local_len()
    }

    /// Real (non-padding) tokens in this rank's chunk.
    pub fn valid_local(&self) -> usize {
        self.len.saturating_sub(self.offset()).min(self.local_len())
    }

    /// This rank's chunk of `x` along `dim` (x's size there is `len`), zero-padded.
    pub fn split(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        self.check_len("SeqShard::split", x, dim, self.len)?;
        let (start, take) = (self.offset(), self.valid_local());
        let part = x.narrow(dim, start.min(self.len), take)?;
        pad_to(&part, dim, self.local_len())
    }

    /// The full sequence from every rank's chunk along `dim`, padding removed.
    pub fn gather(&self, x: &Tensor, dim: usize, comm: &SharedComm) -> Result<Tensor> {
        self.check_comm(comm)?;
        self.check_len("SeqShard::gather", x, dim, self.local_len())?;
        comm.all_gather(x, dim)?.narrow(dim, 0, self.len)
    }

    fn check_len(&self, op: &'static str, x: &Tensor, dim: usize, want: usize) -> Result<()> {
        let n = x.dim(dim)?;
        if n != want {
            return Err(Error::invalid(
                op,
                format!("dim {dim} of {:?} is {n}, expected {want}", x.shape()),
            ));
        }
        Ok(())
    }

    fn check_comm(&self, comm: &SharedComm) -> Result<()> {
        if comm.rank() != self.rank || comm.world() != self.world {
            return Err(Error::invalid(
                "SeqShard",
                format!(
                    "shard is rank {} of {}, communicator rank {} of {}",
                    self.rank,
                    self.world,
                    comm.rank(),
                    comm.world()
                ),
            ));
        }
        Ok(())
    }
}

/// `x` zero-padded along `dim` to `len`.
pub fn pad_to(x: &Tensor, dim: usize, len: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    if n == len {
        return Ok(x.clone());
    }
    if n > len {
        return Err(Error::invalid(
            "pad_to",
            format!("dim {dim} of {:?} is longer than {len}", x.shape()),
        ));
    }
    let mut zd = x.dims().to_vec();
    zd[dim] = len - n;
    let z = Tensor::zeros(zd, x.dtype(), &x.device())?;
    if n == 0 {
        return Ok(z);
    }
    Tensor::cat(&[x, &z], dim)
}

/// The attention core's placement, chosen when the model is built: on this rank's tokens
/// (`local`) or over a Ulysses group (`ulysses`). Blocks call [`Attention::forward_with`]
/// the same way in both cases.
#[derive(Debug, Clone)]
pub struct Attention {
    group: Option<SharedComm>,
}

impl Attention {
    pub fn local() -> Self {
        Self { group: None }
    }

    pub fn ulysses(comm: SharedComm) -> Self {
        Self { group: Some(comm) }
    }

    /// Ranks that share the sequence (1 when local).
    pub fn degree(&self) -> usize {
        self.group.as_ref().map_or(1, |c| c.world())
    }

    /// q, k, v `[B, t, H, d]` for this rank's tokens (`t = seq.local_len()`) → the output
    /// heads `[B, t, H, d]`. `core` sees the whole sequence (padding removed) for H/sp heads,
    /// `[B, seq.len, H/sp, d]`, and returns the attention output of that shape; it may read
    /// and write a KV cache sharded by heads.
    pub fn forward_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seq: &SeqShard,
        core: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Some(comm) = &self.group else {
            if seq.world != 1 {
                return Err(Error::invalid(
                    "Attention::local",
                    format!("sequence is split over {} ranks", seq.world),
                ));
            }
            return core(q, k, v);
        };
        seq.check_comm(comm)?;
        let heads = q.dim(2)?;
        if !heads.is_multiple_of(comm.world()) {
            return Err(Error::invalid(
                "Attention::ulysses",
                format!(
                    "{heads} heads do not split over Ulysses degree {} (sp must divide the heads)",
                    comm.world()
                ),
            ));
        }
        // [B, L/sp, H, d] → [B, L_pad, H/sp, d] → drop the padding rows.
        let to_heads = |x: &Tensor| -> Result<Tensor> {
            seq.check_len("Attention::ulysses", x, 1, seq.local_len())?;
            comm.all_to_all(x, 2, 1)?.narrow(1, 0, seq.len)
        };
        let o = core(&to_heads(q)?, &to_heads(k)?, &to_heads(v)?)?;
        comm.all_to_all(&pad_to(&o, 1, seq.padded)?, 1, 2)
    }

    /// Unmasked attention with scale 1/√d (the DiT's self-attention without a cache).
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, seq: &SeqShard) -> Result<Tensor> {
        self.forward_with(q, k, v, seq, sdpa)
    }
}

/// Unmasked multi-head attention with scale 1/√head_dim, output in q's dtype.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dims()[q.rank().saturating_sub(1)];
    q.attention(k, v, None, 1.0 / (d as f32).sqrt(), q.dtype())
}

/// The DiT's self-attention KV logic ([`SelfAttnKv`]: prefill or streaming cache) placed
/// behind a Ulysses exchange: `inner` sees the whole sequence for this rank's H/sp heads, so
/// it applies its RoPE tables and reads/writes a cache of H/sp heads (built with that many
/// heads) exactly as on one rank. With [`Attention::local`] it is `inner` unchanged.
pub struct UlyssesKv<'a> {
    pub attn: &'a Attention,
    pub seq: SeqShard,
    pub inner: &'a mut dyn SelfAttnKv,
}

impl SelfAttnKv for UlyssesKv<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let inner = &mut *self.inner;
        self.attn
            .forward_with(q, k, v, &self.seq, |q, k, v| inner.attend(layer, q, k, v))
    }

    /// Without a sequence split, `inner`'s own projection path (its fused q/k norms).
    fn attend_proj(
        &mut self,
        layer: usize,
        attn: &crate::parallel::TpAttention,
        a: &Tensor,
    ) -> Result<Tensor> {
        if self.attn.degree() == 1 && self.seq.world == 1 {
            return self.inner.attend_proj(layer, attn, a);
        }
        let q = attn.query(a)?;
        let (k, v) = attn.key_value(a)?;
        self.attend(layer, &q, &k, &v)
    }
}

impl std::fmt::Debug for UlyssesKv<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UlyssesKv")
            .field("attn", &self.attn)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}
