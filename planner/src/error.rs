//! The planner's error type: bad input, caught before any arithmetic that depends on it.

/// Input the planner cannot plan for. Each message is one line meant for a user.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PlanError {
    // -- sizes --------------------------------------------------------------------------
    #[error("invalid --size {input:?}: {reason}")]
    Size { input: String, reason: String },
    #[error("invalid --aspect {input:?}: expected W:H with positive integers, e.g. 16:9")]
    Aspect { input: String },

    #[error("cannot use --image {path}: {reason}")]
    Image { path: String, reason: String },

    // -- GPUs -----------------------------------------------------------------------------
    #[error("invalid --gpus {input:?}: {reason}")]
    Gpus { input: String, reason: String },
    #[error("unknown GPU {name:?}; known: {known} (or a generic size such as 24GB or 80GiB)")]
    UnknownGpu { name: String, known: String },

    // -- layout ---------------------------------------------------------------------------
    #[error("invalid layout: {0}")]
    Layout(String),

    // -- workload -------------------------------------------------------------------------
    #[error("invalid workload: {0}")]
    Workload(String),

    // -- data files -----------------------------------------------------------------------
    #[error("model spec {name}: {reason}")]
    ModelSpec { name: String, reason: String },
    #[error("GPU catalog: {0}")]
    Catalog(String),
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;
