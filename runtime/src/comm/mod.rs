//! Communicators: collectives between ranks.
//!
//! [`Comm`] is the one interface layers use (`ColumnParallel`, `RowParallel`, Ulysses
//! attention, pipeline stage boundaries). Its tensor-level methods validate their
//! arguments, short-circuit at world size 1 and move the communicated dim to the front;
//! a backend only implements the `*_raw` primitives on the leading dim.
//!
//! - [`SocketComm`]: TCP between CPU ranks (processes or threads). Deterministic
//!   reductions, so sharded CPU runs can be compared with single-rank runs.
//! - `NcclComm` (feature `cuda`): NCCL through `cudarc::nccl::sys`, with our own
//!   all-to-all, split, non-blocking error checks and abort.

mod cpu;
mod host;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod socket;
mod wire;

use std::fmt;
use std::time::Duration;

pub use host::Reducible;
#[cfg(feature = "cuda")]
pub use nccl::{NcclComm, NcclId};
pub use socket::{SocketComm, SocketOptions};

use crate::memory::{Category, scope};
use crate::{DType, Error, Result, Shape, Tensor};

/// Element-wise reduction of a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// What went wrong in a communicator operation; carried by `Error::Comm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommErrorKind {
    /// The link to `peer` closed or failed: the peer died or aborted.
    PeerLost { peer: usize, detail: String },
    /// Nothing arrived from `peer` (or NCCL did not finish) within the timeout.
    Timeout {
        peer: Option<usize>,
        after: Duration,
    },
    /// [`abort`](SocketComm::abort) was called on this communicator.
    Aborted,
    /// An earlier operation failed; the communicator cannot be used any more.
    Broken,
    /// Ranks disagree about the sequence of operations or their sizes.
    Protocol(String),
    /// Setting the group up failed (listen, connect, rank table).
    Rendezvous(String),
    /// A caller error detected before any data moved.
    InvalidArgument(String),
    /// The backend does not support this (dtype, device, operation).
    Unsupported(String),
    /// An error reported by NCCL or the CUDA driver.
    Backend(String),
}

impl fmt::Display for CommErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommErrorKind::PeerLost { peer, detail } => {
                write!(f, "lost peer rank {peer}: {detail}")
            }
            CommErrorKind::Timeout {
                peer: Some(p),
                after,
            } => {
                write!(f, "timed out after {after:?} waiting for peer rank {p}")
            }
            CommErrorKind::Timeout { peer: None, after } => write!(f, "timed out after {after:?}"),
            CommErrorKind::Aborted => write!(f, "communicator was aborted"),
            CommErrorKind::Broken => {
                write!(f, "communicator is unusable after an earlier failure")
            }
            CommErrorKind::Protocol(m) => write!(f, "protocol error: {m}"),
            CommErrorKind::Rendezvous(m) => write!(f, "rendezvous failed: {m}"),
            CommErrorKind::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            CommErrorKind::Unsupported(m) => write!(f, "unsupported: {m}"),
            CommErrorKind::Backend(m) => write!(f, "{m}"),
        }
    }
}

impl CommErrorKind {
    /// The peer this failure points at, when there is one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommErrorKind::PeerLost { peer, .. } => Some(*peer),
            CommErrorKind::Timeout { peer, .. } => *peer,
            _ => None,
        }
    }
}

/// Collectives between the ranks of one group. See the module docs.
///
/// All ranks of the group must call the same collectives in the same order with
/// tensors of equal shape and dtype (`all_gather`, `reduce_scatter` and `all_to_all`
/// take the local shard). A failed collective leaves the communicator unusable.
/// At world size 1 the collectives return their input (sharing its buffer), after
/// the same argument checks as at any other size.
pub trait Comm: Send + Sync + fmt::Debug {
    /// This rank's index in the group, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world(&self) -> usize;
    /// Deadline of each later operation (NCCL: of each wait on it).
    fn timeout(&self) -> Duration;
    fn set_timeout(&self, timeout: Duration);
    /// Tears the communicator down; blocked and later operations fail.
    fn abort(&self);
    /// Collective: ranks passing the same `color` form a sub-group, ranked by
    /// `(key, rank())`.
    fn split(&self, color: u32, key: u32) -> Result<Box<dyn Comm>>;

    // ---- backend primitives (world > 1, arguments already validated) ----------

    /// Element-wise reduction of `x` over all ranks.
    fn all_reduce_raw(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;
    /// `[world, *x.shape]`: every rank's `x` in rank order.
    fn all_gather_raw(&self, x: &Tensor) -> Result<Tensor>;
    /// `x` is `[world, *rest]`; returns this rank's slice `rest` of the reduction.
    fn reduce_scatter_raw(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;
    /// `x` is `[world, *rest]`; slice j goes to rank j; slice i of the result came
    /// from rank i.
    fn all_to_all_raw(&self, x: &Tensor) -> Result<Tensor>;
    /// Root's `x` on every rank.
    fn broadcast_raw(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    fn send_raw(&self, x: &Tensor, peer: usize) -> Result<()>;
    fn recv_raw(&self, shape: &Shape, dtype: DType, peer: usize) -> Result<Tensor>;
    fn barrier_raw(&self) -> Result<()>;

    // ---- the interface layers use -----------------------------------------------

    /// Element-wise sum/max/min over all ranks (bf16, f16, f32).
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        check_dtype(self, "all_reduce", x.dtype(), true)?;
        if self.world() == 1 {
            return Ok(x.clone());
        }
        self.all_reduce_raw(x, op)
    }

    /// Concatenation of every rank's `x` along `dim`, in rank order.
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        check_dtype(self, "all_gather", x.dtype(), false)?;
        let (outer, n, inner) = x.shape().split_at_dim(dim)?;
        let w = self.world();
        if w == 1 {
            return Ok(x.clone());
        }
        let g = {
            let _c = scope(Category::Communication);
            self.all_gather_raw(x)?
        };
        let mut out = x.dims().to_vec();
        out[dim] *= w;
        swap_outer(&g, w, outer, n * inner)?.reshape(out)
    }

    /// Reduces `x` over all ranks and keeps this rank's slice along `dim` (whose size
    /// must divide by the world size).
    fn reduce_scatter(&self, x: &Tensor, dim: usize, op: ReduceOp) -> Result<Tensor> {
        check_dtype(self, "reduce_scatter", x.dtype(), true)?;
        let (outer, n, inner) = x.shape().split_at_dim(dim)?;
        let w = self.world();
        check_divisible(self, "reduce_scatter", x.shape(), dim, n)?;
        if w == 1 {
            return Ok(x.clone());
        }
        let c = n / w;
        let _c = scope(Category::Communication);
        let staged = swap_outer(x, outer, w, c * inner)?;
        let mut out = x.dims().to_vec();
        out[dim] = c;
        self.reduce_scatter_raw(&staged.reshape(stacked(w, &out))?, op)?
            .reshape(out)
    }

    /// Ulysses exchange: `x` is cut into world equal chunks along `split_dim`, chunk j
    /// goes to rank j, and the chunks received are concatenated along `concat_dim` in
    /// rank order. E.g. `[seq/W, heads, d]` with split 1, concat 0 → `[seq, heads/W, d]`.
    fn all_to_all(&self, x: &Tensor, split_dim: usize, concat_dim: usize) -> Result<Tensor> {
        check_dtype(self, "all_to_all", x.dtype(), false)?;
        let (o_s, n, i_s) = x.shape().split_at_dim(split_dim)?;
        x.shape().dim(concat_dim)?;
        let w = self.world();
        check_divisible(self, "all_to_all", x.shape(), split_dim, n)?;
        if w == 1 {
            return Ok(x.clone());
        }
        let mut chunk = x.dims().to_vec();
        chunk[split_dim] = n / w;
        let chunk = Shape::from(chunk);
        let (o_c, m, i_c) = chunk.split_at_dim(concat_dim)?;
        let received = {
            let _c = scope(Category::Communication);
            let staged = swap_outer(x, o_s, w, (n / w) * i_s)?;
            self.all_to_all_raw(&staged.reshape(stacked(w, chunk.dims()))?)?
        };
        let mut out = chunk.dims().to_vec();
        out[concat_dim] *= w;
        swap_outer(&received, w, o_c, m * i_c)?.reshape(out)
    }

    /// Root's `x` on every rank; the others pass a tensor of the same shape and dtype
    /// (its values are ignored).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        check_dtype(self, "broadcast", x.dtype(), false)?;
        check_rank(self, "broadcast", root, true)?;
        if self.world() == 1 {
            return Ok(x.clone());
        }
        self.broadcast_raw(x, root)
    }

    /// Sends `x` to `peer`, which calls [`Comm::recv`] with its shape and dtype.
    fn send(&self, x: &Tensor, peer: usize) -> Result<()> {
        check_dtype(self, "send", x.dtype(), false)?;
        check_rank(self, "send", peer, false)?;
        self.send_raw(x, peer)
    }

    /// Receives a tensor of `shape` and `dtype` sent by `peer`.
    fn recv(&self, shape: &Shape, dtype: DType, peer: usize) -> Result<Tensor> {
        check_dtype(self, "recv", dtype, false)?;
        check_rank(self, "recv", peer, false)?;
        self.recv_raw(shape, dtype, peer)
    }

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.barrier_raw()
    }

    /// Waits until every queued operation has finished, within the timeout. Socket
    /// operations complete before they return, so only NCCL overrides this.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

pub(crate) fn comm_error<C: Comm + ?Sized>(c: &C, op: &'static str, kind: CommErrorKind) -> Error {
    Error::Comm {
        rank: c.rank(),
        op,
        kind,
    }
}

fn check_dtype<C: Comm + ?Sized>(
    c: &C,
    op: &'static str,
    dtype: DType,
    reduce: bool,
) -> Result<()> {
    // An fp8 shard carries its own scale; gathering shards with different scales into
    // one tensor has no single meaning, so fp8 is refused rather than guessed.
    if dtype == DType::F8E4M3 {
        let what = if reduce {
            "reductions"
        } else {
            "fp8 shards with per-rank scales"
        };
        return Err(comm_error(
            c,
            op,
            CommErrorKind::Unsupported(format!("{what}: communicate fp8 tensors as bf16 or f32")),
        ));
    }
    Ok(())
}

fn check_rank<C: Comm + ?Sized>(c: &C, op: &'static str, r: usize, self_ok: bool) -> Result<()> {
    if r >= c.world() || (!self_ok && r == c.rank()) {
        let want = if self_ok { "a rank" } else { "another rank" };
        return Err(comm_error(
            c,
            op,
            CommErrorKind::InvalidArgument(format!(
                "{r} is not {want} of this {}-rank group",
                c.world()
            )),
        ));
    }
    Ok(())
}

fn check_divisible<C: Comm + ?Sized>(
    c: &C,
    op: &'static str,
    shape: &Shape,
    dim: usize,
    n: usize,
) -> Result<()> {
    if !n.is_multiple_of(c.world()) {
        return Err(comm_error(
            c,
            op,
            CommErrorKind::InvalidArgument(format!(
                "dim {dim} of {shape:?} does not split into {} equal chunks",
                c.world()
            )),
        ));
    }
    Ok(())
}

/// `[world, *shard]`.
fn stacked(world: usize, shard: &[usize]) -> Vec<usize> {
    let mut s = Vec::with_capacity(shard.len() + 1);
    s.push(world);
    s.extend_from_slice(shard);
    s
}

/// `x` viewed as `[a, b, block]` → `[b, a, block]` (a copy unless a or b is 1).
fn swap_outer(x: &Tensor, a: usize, b: usize, block: usize) -> Result<Tensor> {
    let v = x.reshape([a, b, block])?;
    if a == 1 || b == 1 {
        return v.reshape([b, a, block]);
    }
    v.permute(&[1, 0, 2])
}
