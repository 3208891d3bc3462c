//! The one error type of the `runtime` crate.

use crate::{DType, Device, Shape};

/// Errors of tensor construction, op validation, backends and memory accounting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === Shape errors ===
    #[error("{op}: shape mismatch, lhs {lhs:?}, rhs {rhs:?}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
    },
    #[error("{op}: cannot broadcast {lhs:?} with {rhs:?}")]
    BroadcastIncompatible {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
    },
    #[error("{op}: dim {dim} out of range for shape {shape:?}")]
    DimOutOfRange {
        op: &'static str,
        dim: usize,
        shape: Shape,
    },
    #[error("{op}: expected rank {expected}, got shape {got:?}")]
    UnexpectedRank {
        op: &'static str,
        expected: usize,
        got: Shape,
    },
    #[error("{op}: element count {got} does not match shape {shape:?}")]
    ElementCount {
        op: &'static str,
        got: usize,
        shape: Shape,
    },
    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    // === Dtype and device errors ===
    #[error("{op}: dtype mismatch, expected {expected:?}, got {got:?}")]
    DTypeMismatch {
        op: &'static str,
        expected: DType,
        got: DType,
    },
    #[error("{op}: dtype {dtype:?} is not supported here")]
    UnsupportedDType { op: &'static str, dtype: DType },
    #[error("{op}: device mismatch, {lhs:?} vs {rhs:?}")]
    DeviceMismatch {
        op: &'static str,
        lhs: Device,
        rhs: Device,
    },
    #[error("this build has no CUDA support: rebuild with `--features cuda`")]
    CudaNotCompiled,
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{op} is not implemented on {device:?}")]
    NotImplemented { op: &'static str, device: Device },

    // === Memory accounting ===
    #[error(
        "allocation of {bytes} B ({category:?}) on {device:?} exceeds the reservation: \
         live {live} B + {bytes} B > reserved {reserved} B"
    )]
    OutOfReservation {
        device: Device,
        category: crate::memory::Category,
        bytes: usize,
        live: usize,
        reserved: usize,
    },

    // === Communication ===
    #[error("rank {rank}: {op} failed: {kind}")]
    Comm {
        rank: usize,
        op: &'static str,
        kind: crate::comm::CommErrorKind,
    },

    // === Checkpoints ===
    #[error("checkpoint {path}: {kind}")]
    Checkpoint {
        path: String,
        kind: crate::weights::CheckpointErrorKind,
    },

    // === PyTorch .pth archives ===
    #[error("{path}: {msg}")]
    Pth { path: String, msg: String },

    // === Other ===
    #[error("tensor storage lock poisoned")]
    LockPoisoned,
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Self::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}
