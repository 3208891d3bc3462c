//! Parallel layouts as layer types and load-time shard hints (style-anchors §8 rule 6).
//!
//! A block is written once; what makes it tensor-, sequence-, pipeline- or FSDP-parallel is
//! which types it was built from, never a branch in its `forward`:
//!
//! - [`tp`]: [`ColumnParallel`] / [`RowParallel`] linears over heads and the FFN hidden dim
//!   (the row output is all-reduced), [`ShardedRmsNorm`] (full-width RMSNorm of head-sharded
//!   activations: the sum of squares is all-reduced), [`TpAttention`] (q, k, v, o and the q/k
//!   norms for this rank's heads).
//! - [`ulysses`]: [`SeqShard`] (zero-pad the sequence to a multiple of sp, split it at DiT
//!   entry, gather it at exit) and [`Attention`] (`local()` or `ulysses(comm)`: all-to-all of
//!   q/k/v from `[L/sp, H, d]` to `[L, H/sp, d]` and back around the attention core).
//! - [`pipeline`]: [`StageBoundary`], activations (and small side tensors) sent from one layer
//!   range to the next.
//! - [`fsdp`]: [`ShardedUnit`], 1/N of a flat parameter buffer per rank, all-gathered just
//!   before use and freed after.
//!
//! [`Mesh`] is the rank layout of planner/src/layout.rs `mesh` (stage → pp → sp → tp, tp
//! innermost) and [`Groups`] splits a world communicator into the tp, sp and pp groups of one
//! rank. [`Shard`] is the loader's hint ([`crate::weights::ShardHint`]): which part of which
//! dim this rank reads. docs/parallelism.md has the whole picture.

pub mod fsdp;
pub mod layout;
pub mod pipeline;
pub mod tp;
pub mod ulysses;

use std::sync::Arc;

pub use crate::weights::ShardHint as Shard;
pub use fsdp::{FlatLayout, Gathered, Piece, ShardedUnit};
pub use layout::{DitLayout, PipelineStage, SoloComm, solo};
pub use pipeline::StageBoundary;
pub use tp::{ColumnParallel, GatheredColumn, RowParallel, ShardedRmsNorm, TpAttention};
pub use ulysses::{Attention, SeqShard, UlyssesKv};

use crate::comm::Comm;
use crate::{DType, Device, Error, Result, Shape, Tensor};

/// A communicator shared by the layers of one rank.
pub type SharedComm = Arc<dyn Comm>;

/// The part of `x` that `hint` assigns to its rank: dim `hint.dim` cut into `hint.world`
/// equal contiguous pieces. The in-memory twin of `Checkpoint::tensor_shard` (for weights read
/// once and scattered, and for tests).
pub fn shard_of(x: &Tensor, hint: Shard) -> Result<Tensor> {
    let n = x.dim(hint.dim)?;
    if hint.world == 0 || hint.rank >= hint.world || !n.is_multiple_of(hint.world) {
        return Err(Error::invalid(
            "shard_of",
            format!(
                "dim {} of {:?} does not split into {} parts (rank {})",
                hint.dim,
                x.shape(),
                hint.world,
                hint.rank
            ),
        ));
    }
    let part = n / hint.world;
    x.narrow(hint.dim, hint.rank * part, part)
}

/// Weights read once and scattered (a rank whose node lacks the checkpoint): `root` passes
/// the full tensor, the others `None`; everyone passes its full `shape` and `dtype`. Returns
/// this rank's part along `dim` (cut like [`shard_of`]), or the whole tensor for `None`
/// (replicated), on the communicator's `device`. Collective over `comm`, point to point from
/// the root.
pub fn scatter_from(
    comm: &dyn Comm,
    root: usize,
    full: Option<&Tensor>,
    shape: &Shape,
    dtype: DType,
    dim: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let (rank, world) = (comm.rank(), comm.world());
    let mine = rank == root;
    let bad = |msg: String| Error::invalid("scatter_from", msg);
    match (mine, full) {
        (true, None) => return Err(bad(format!("root {root} has no tensor to scatter"))),
        (false, Some(_)) => return Err(bad(format!("rank {rank} is not the root {root}"))),
        (true, Some(t)) if t.shape() != shape || t.dtype() != dtype => {
            return Err(bad(format!(
                "root tensor {:?} {:?}, expected {shape:?} {dtype:?}",
                t.shape(),
                t.dtype()
            )));
        }
        _ => {}
    }
    let Some(dim) = dim else {
        let x = match full {
            Some(t) => t.clone(),
            None => Tensor::zeros(shape.clone(), dtype, device)?,
        };
        return comm.broadcast(&x, root);
    };
    let hint = |r| Shard {
        dim,
        rank: r,
        world,
    };
    match full {
        Some(t) => {
            for r in (0..world).filter(|&r| r != root) {
                comm.send(&shard_of(t, hint(r))?, r)?;
            }
            shard_of(t, hint(root))
        }
        None => {
            let n = shape.dim(dim)?;
            if !n.is_multiple_of(world) {
                return Err(bad(format!(
                    "dim {dim} of {shape:?} does not split {world} ways"
                )));
            }
            let mut part = shape.dims().to_vec();
            part[dim] = n / world;
            comm.recv(&Shape::from(part), dtype, root)
        }
    }
}

/// Degrees of one job's DiT layout: TPP stages × layer-pipeline sub-stages × Ulysses × TP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    pub stages: usize,
    pub pp: usize,
    pub sp: usize,
    pub tp: usize,
}

/// One DiT rank's coordinates in a [`Mesh`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coord {
    pub stage: usize,
    pub pp: usize,
    pub sp: usize,
    pub tp: usize,
}

impl Mesh {
    pub fn new(stages: usize, pp: usize, sp: usize, tp: usize) -> Result<Self> {
        if stages == 0 || pp == 0 || sp == 0 || tp == 0 {
            return Err(Error::invalid(
                "Mesh",
                format!("degrees must be ≥ 1: stages {stages}, pp {pp}, sp {sp}, tp {tp}"),
            ));
        }
        Ok(Self { stages, pp, sp, tp })
    }

    /// Number of DiT ranks (a dedicated VAE rank comes after them).
    pub fn world(&self) -> usize {
        self.stages * self.pp * self.sp * self.tp
    }

    /// Rank of `c`: stage outermost, tp innermost (planner `mesh` order).
    pub fn rank(&self, c: Coord) -> usize {
        ((c.stage * self.pp + c.pp) * self.sp + c.sp) * self.tp + c.tp
    }

    pub fn coord(&self, rank: usize) -> Result<Coord> {
        if rank >= self.world() {
            return Err(Error::invalid(
                "Mesh",
                format!("rank {rank} is outside a {}-rank DiT mesh", self.world()),
            ));
        }
        Ok(Coord {
            tp: rank % self.tp,
            sp: (rank / self.tp) % self.sp,
            pp: (rank / (self.tp * self.sp)) % self.pp,
            stage: rank / (self.tp * self.sp * self.pp),
        })
    }
}

/// The communicators of one DiT rank: its tp group (same stage, pp, sp), its Ulysses group
/// (same stage, pp, tp) and its layer-pipeline group (same stage, sp, tp). Ranks inside each
/// group are ordered by the coordinate that varies.
#[derive(Debug, Clone)]
pub struct Groups {
    pub coord: Coord,
    pub tp: SharedComm,
    pub sp: SharedComm,
    pub pp: SharedComm,
}

impl Groups {
    /// Collective over a world that may end with ranks outside the DiT mesh (a dedicated VAE
    /// rank): every rank calls it; DiT ranks get their groups, the others `None`.
    pub fn split_dit(world: &dyn Comm, mesh: &Mesh) -> Result<Option<Self>> {
        let rank = world.rank();
        let key = u32::try_from(rank).map_err(|_| Error::invalid("Groups", "too many ranks"))?;
        let is_dit = rank < mesh.world();
        let dit = world.split(u32::from(!is_dit), key)?;
        if !is_dit {
            return Ok(None);
        }
        Self::split(dit.as_ref(), mesh).map(Some)
    }

    /// Collective over `world` (every DiT rank calls it, in the same order; a dedicated VAE
    /// rank must not): three splits.
    pub fn split(world: &dyn Comm, mesh: &Mesh) -> Result<Self> {
        if world.world() != mesh.world() {
            return Err(Error::invalid(
                "Groups::split",
                format!(
                    "communicator has {} ranks, the mesh {}",
                    world.world(),
                    mesh.world()
                ),
            ));
        }
        let c = mesh.coord(world.rank())?;
        let color = |a: usize, b: usize, cc: usize, nb: usize, nc: usize| {
            u32::try_from((a * nb + b) * nc + cc)
                .map_err(|_| Error::invalid("Groups", "too many ranks"))
        };
        let tp = world.split(color(c.stage, c.pp, c.sp, mesh.pp, mesh.sp)?, c.tp as u32)?;
        let sp = world.split(color(c.stage, c.pp, c.tp, mesh.pp, mesh.tp)?, c.sp as u32)?;
        let pp = world.split(color(c.stage, c.sp, c.tp, mesh.sp, mesh.tp)?, c.pp as u32)?;
        Ok(Self {
            coord: c,
            tp: Arc::from(tp),
            sp: Arc::from(sp),
            pp: Arc::from(pp),
        })
    }
}
