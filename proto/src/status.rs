//! Errors that cross processes: [`Error`] <-> [`tonic::Status`], with the rank attached.
//!
//! The status code alone is too coarse (several kinds share a gRPC code), so the kind and the
//! rank travel as ASCII metadata (`lava-error-kind`, `lava-rank`). A status from a peer that
//! did not set them (or from the transport) falls back to the code.

use std::fmt;

use tonic::{Code, Status};

/// Metadata key holding the rank that raised the error.
pub const RANK_KEY: &str = "lava-rank";
/// Metadata key holding the [`ErrorKind`] name.
pub const KIND_KEY: &str = "lava-error-kind";

/// What went wrong, in the terms the launcher needs to pick an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request was malformed or named missing files.
    BadInput,
    /// The request arrived in a lifecycle state that cannot serve it (Generate before Load).
    WrongState,
    /// The plan does not fit the hardware.
    Infeasible,
    /// Weights could not be loaded.
    LoadFailure,
    /// A peer rank or the launcher is gone.
    PeerLost,
    /// This build cannot do what was asked (e.g. model execution not compiled in yet).
    Unsupported,
    /// The operation was cancelled on request.
    Cancelled,
    /// Anything else: a bug or an unexpected environment failure.
    Internal,
}

impl ErrorKind {
    const ALL: [ErrorKind; 8] = [
        ErrorKind::BadInput,
        ErrorKind::WrongState,
        ErrorKind::Infeasible,
        ErrorKind::LoadFailure,
        ErrorKind::PeerLost,
        ErrorKind::Unsupported,
        ErrorKind::Cancelled,
        ErrorKind::Internal,
    ];

    /// Stable name, used on the wire and in messages.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::BadInput => "bad-input",
            ErrorKind::WrongState => "wrong-state",
            ErrorKind::Infeasible => "infeasible",
            ErrorKind::LoadFailure => "load-failure",
            ErrorKind::PeerLost => "peer-lost",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }

    /// Parses [`ErrorKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The gRPC code this kind travels as.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::BadInput => Code::InvalidArgument,
            ErrorKind::WrongState => Code::FailedPrecondition,
            ErrorKind::Infeasible => Code::ResourceExhausted,
            ErrorKind::LoadFailure => Code::DataLoss,
            ErrorKind::PeerLost => Code::Unavailable,
            ErrorKind::Unsupported => Code::Unimplemented,
            ErrorKind::Cancelled => Code::Cancelled,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The kind of a status that carries no `lava-error-kind` metadata.
    pub fn from_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::OutOfRange => {
                ErrorKind::BadInput
            }
            Code::FailedPrecondition => ErrorKind::WrongState,
            Code::ResourceExhausted => ErrorKind::Infeasible,
            Code::DataLoss => ErrorKind::LoadFailure,
            // A worker that cannot be reached has, for the job, died.
            Code::Unavailable => ErrorKind::PeerLost,
            Code::Unimplemented => ErrorKind::Unsupported,
            Code::Cancelled => ErrorKind::Cancelled,
            _ => ErrorKind::Internal,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failure that crossed (or will cross) a process boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A rank reported the failure.
    #[error("rank {rank}: {kind}: {message}")]
    Rank {
        /// The global rank that raised it.
        rank: u32,
        /// What kind of failure.
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
    /// A failure with no rank attached (the transport, or a peer that set no metadata).
    #[error("{kind}: {message}")]
    Unattributed {
        /// What kind of failure.
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failure raised by `rank`.
    pub fn rank(rank: u32, kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::Rank {
            rank,
            kind,
            message: message.into(),
        }
    }

    /// The rank that raised it, if known.
    pub fn rank_id(&self) -> Option<u32> {
        match self {
            Error::Rank { rank, .. } => Some(*rank),
            Error::Unattributed { .. } => None,
        }
    }

    /// What kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Rank { kind, .. } | Error::Unattributed { kind, .. } => *kind,
        }
    }

    /// The detail message.
    pub fn message(&self) -> &str {
        match self {
            Error::Rank { message, .. } | Error::Unattributed { message, .. } => message,
        }
    }

    /// Attaches `rank` to an unattributed error (a status from a call to that rank).
    pub fn or_rank(self, rank: u32) -> Self {
        match self {
            Error::Unattributed { kind, message } => Error::Rank {
                rank,
                kind,
                message,
            },
            attributed => attributed,
        }
    }

    /// The process exit code for this failure ([`crate::exit`]).
    pub fn exit_code(&self) -> u8 {
        crate::exit::for_kind(self.kind())
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let kind = err.kind();
        let mut status = Status::new(kind.code(), err.to_string());
        let meta = status.metadata_mut();
        if let Some(rank) = err.rank_id() {
            meta.insert(RANK_KEY, rank.into());
        }
        // Kind names are fixed ASCII, so the parse cannot fail.
        if let Ok(value) = kind.name().parse() {
            meta.insert(KIND_KEY, value);
        }
        status
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        let meta = status.metadata();
        let rank = meta
            .get(RANK_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let kind = meta
            .get(KIND_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorKind::from_name)
            .unwrap_or_else(|| ErrorKind::from_code(status.code()));
        // The message of a status we built already starts with "rank N: kind: "; strip it
        // so the round trip does not repeat it.
        let mut message = status.message().to_string();
        if let Some(rank) = rank {
            let prefix = format!("rank {rank}: {kind}: ");
            if let Some(rest) = message.strip_prefix(&prefix) {
                message = rest.to_string();
            }
        }
        match rank {
            Some(rank) => Error::Rank {
                rank,
                kind,
                message,
            },
            None => Error::Unattributed { kind, message },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_status_with_its_rank() {
        for kind in ErrorKind::ALL {
            let err = Error::rank(7, kind, "detail");
            let status = Status::from(err.clone());
            assert_eq!(status.code(), kind.code());
            assert_eq!(Error::from(status), err);
        }
    }

    #[test]
    fn plain_status_falls_back_to_its_code() {
        let err = Error::from(Status::unavailable("connection refused"));
        assert_eq!(err.rank_id(), None);
        assert_eq!(err.kind(), ErrorKind::PeerLost);
        assert_eq!(err.or_rank(2).rank_id(), Some(2));
        assert_eq!(
            Error::from(Status::unknown("?")).kind(),
            ErrorKind::Internal
        );
    }

    #[test]
    fn kinds_map_to_distinct_exit_codes_where_the_launcher_needs_them() {
        use crate::exit;
        assert_eq!(
            Error::rank(0, ErrorKind::PeerLost, "").exit_code(),
            exit::PEER_LOST
        );
        assert_eq!(
            Error::rank(0, ErrorKind::LoadFailure, "").exit_code(),
            exit::LOAD_FAILURE
        );
        assert_eq!(
            Error::rank(0, ErrorKind::Infeasible, "").exit_code(),
            exit::INFEASIBLE_PLAN
        );
        assert_eq!(
            Error::rank(0, ErrorKind::BadInput, "").exit_code(),
            exit::BAD_INPUT
        );
        assert_eq!(
            Error::rank(0, ErrorKind::Internal, "").exit_code(),
            exit::INTERNAL
        );
    }
}
