//! What one DiT rank holds and runs: its tp, Ulysses and layer-pipeline placement and whether
//! its weights are FSDP-sharded ([`DitLayout`]), built from a [`Groups`] or alone
//! ([`DitLayout::single`], every group a [`SoloComm`]). `CausalWanModelS2V::load_rank` takes
//! it and builds the model from the matching layer types.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Groups, Mesh, SharedComm, StageBoundary};
use crate::comm::{Comm, CommErrorKind, ReduceOp};
use crate::{DType, Error, Result, Shape, Tensor};

/// This rank's layer-pipeline sub-stage: its boundary to the neighbouring sub-stages and the
/// blocks it runs (planner `layer_range`).
#[derive(Debug, Clone)]
pub struct PipelineStage {
    pub boundary: StageBoundary,
    pub blocks: Range<usize>,
}

/// The parallel layout of one DiT rank.
#[derive(Debug, Clone)]
pub struct DitLayout {
    /// Tensor-parallel group (heads and FFN hidden units split over it).
    pub tp: SharedComm,
    /// Ulysses group (the token sequence split over it); FSDP shards over it too.
    pub sp: SharedComm,
    /// `None`: one sub-stage holding every block.
    pub pp: Option<PipelineStage>,
    /// Keep 1/sp of every unit (each block, and the root part) and all-gather it when used.
    pub fsdp: bool,
}

impl DitLayout {
    /// One rank holding the whole model: today's unsharded DiT.
    pub fn single() -> Self {
        Self {
            tp: solo(),
            sp: solo(),
            pp: None,
            fsdp: false,
        }
    }

    /// The layout of the rank whose groups are `groups` (from [`Groups::split`] /
    /// [`Groups::split_dit`]) in `mesh`, for a DiT of `num_layers` blocks.
    pub fn new(groups: &Groups, mesh: &Mesh, num_layers: usize, fsdp: bool) -> Result<Self> {
        if fsdp && mesh.sp < 2 {
            return Err(Error::invalid(
                "DitLayout",
                "FSDP shards over the Ulysses group; it needs a Ulysses degree of at least 2",
            ));
        }
        if mesh.pp > num_layers {
            return Err(Error::invalid(
                "DitLayout",
                format!("{} pp sub-stages for {num_layers} blocks", mesh.pp),
            ));
        }
        let pp = (mesh.pp > 1).then(|| {
            let (a, b) = planner::layout::layer_range(
                num_layers as u64,
                mesh.pp as u64,
                groups.coord.pp as u64,
            );
            PipelineStage {
                boundary: StageBoundary::new(groups.pp.clone()),
                blocks: a as usize..b as usize,
            }
        });
        Ok(Self {
            tp: groups.tp.clone(),
            sp: groups.sp.clone(),
            pp,
            fsdp,
        })
    }

    /// Blocks this rank runs.
    pub fn blocks(&self, num_layers: usize) -> Range<usize> {
        self.pp.as_ref().map_or(0..num_layers, |p| p.blocks.clone())
    }

    /// Whether this rank runs the embeddings (first pp sub-stage).
    pub fn is_first(&self) -> bool {
        self.pp.as_ref().is_none_or(|p| p.boundary.is_first())
    }

    /// Whether this rank runs the head (last pp sub-stage).
    pub fn is_last(&self) -> bool {
        self.pp.as_ref().is_none_or(|p| p.boundary.is_last())
    }

    /// Heads of each attention this rank keeps in its KV caches: H/(tp·sp).
    pub fn cache_heads(&self, num_heads: usize) -> Result<usize> {
        let n = self.tp.world() * self.sp.world();
        if !num_heads.is_multiple_of(n) {
            return Err(Error::invalid(
                "DitLayout",
                format!("{num_heads} heads do not split over tp × sp = {n}"),
            ));
        }
        Ok(num_heads / n)
    }
}

/// A communicator of one rank, for layouts without that kind of parallelism.
pub fn solo() -> SharedComm {
    Arc::new(SoloComm::default())
}

/// A group of one: every collective returns its input (the [`Comm`] defaults short-circuit at
/// world size 1); there is no peer to send to.
#[derive(Debug)]
pub struct SoloComm {
    timeout: Mutex<Duration>,
}

impl Default for SoloComm {
    fn default() -> Self {
        Self {
            timeout: Mutex::new(Duration::from_secs(600)),
        }
    }
}

impl SoloComm {
    fn no_peer(&self, op: &'static str) -> Error {
        crate::comm::comm_error(
            self,
            op,
            CommErrorKind::InvalidArgument("a group of one rank has no peer".into()),
        )
    }
}

impl Comm for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn timeout(&self) -> Duration {
        self.timeout.lock().map_or(Duration::ZERO, |t| *t)
    }
    fn set_timeout(&self, timeout: Duration) {
        if let Ok(mut t) = self.timeout.lock() {
            *t = timeout;
        }
    }
    fn abort(&self) {}
    fn split(&self, _color: u32, _key: u32) -> Result<Box<dyn Comm>> {
        Ok(Box::new(Self::default()))
    }
    // The defaults never call these at world size 1.
    fn all_reduce_raw(&self, _x: &Tensor, _op: ReduceOp) -> Result<Tensor> {
        Err(self.no_peer("all_reduce"))
    }
    fn all_gather_raw(&self, _x: &Tensor) -> Result<Tensor> {
        Err(self.no_peer("all_gather"))
    }
    fn reduce_scatter_raw(&self, _x: &Tensor, _op: ReduceOp) -> Result<Tensor> {
        Err(self.no_peer("reduce_scatter"))
    }
    fn all_to_all_raw(&self, _x: &Tensor) -> Result<Tensor> {
        Err(self.no_peer("all_to_all"))
    }
    fn broadcast_raw(&self, _x: &Tensor, _root: usize) -> Result<Tensor> {
        Err(self.no_peer("broadcast"))
    }
    fn send_raw(&self, _x: &Tensor, _peer: usize) -> Result<()> {
        Err(self.no_peer("send"))
    }
    fn recv_raw(&self, _shape: &Shape, _dtype: DType, _peer: usize) -> Result<Tensor> {
        Err(self.no_peer("recv"))
    }
    fn barrier_raw(&self) -> Result<()> {
        Ok(())
    }
}
