//! Communicators: collectives between ranks.
//!
//! - [`SocketComm`]: TCP between CPU ranks (processes or threads). Deterministic
//!   reductions, so sharded CPU runs can be compared with single-rank runs.
//! - `NcclComm` (feature `cuda`): NCCL through `cudarc::nccl::sys`, with our own
//!   all-to-all, split, non-blocking error checks and abort.

mod host;
pub mod socket;
mod wire;

use std::fmt;
use std::time::Duration;

pub use host::Reducible;
pub use socket::{SocketComm, SocketOptions};

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
