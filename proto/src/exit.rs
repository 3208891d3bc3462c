//! Process exit codes of `lava` and `lava-worker`, defined once for both binaries.
//!
//! | code | meaning |
//! | ---- | ------- |
//! | 0 | success (including a drain requested by SIGTERM/SIGINT or Shutdown) |
//! | 1 | internal error: a bug or an unexpected environment failure |
//! | 2 | bad input: invalid flags, files or environment (clap's usage errors are 2 too) |
//! | 3 | infeasible plan: the planner refused the layout; nothing was spawned |
//! | 4 | load failure: a rank could not load its weights |
//! | 5 | peer lost: a rank (or the launcher) died, so the job cannot continue |

use crate::ErrorKind;

/// Success.
pub const OK: u8 = 0;
/// A bug or an unexpected failure of the environment.
pub const INTERNAL: u8 = 1;
/// Invalid flags, files or environment.
pub const BAD_INPUT: u8 = 2;
/// The planner refused the layout (`lava plan` uses it too).
pub const INFEASIBLE_PLAN: u8 = 3;
/// A rank could not load its weights.
pub const LOAD_FAILURE: u8 = 4;
/// A rank, or the launcher, died; SPMD ranks cannot continue without it.
pub const PEER_LOST: u8 = 5;

/// Name of an exit code, for messages.
pub fn name(code: u8) -> &'static str {
    match code {
        OK => "ok",
        INTERNAL => "internal error",
        BAD_INPUT => "bad input",
        INFEASIBLE_PLAN => "infeasible plan",
        LOAD_FAILURE => "load failure",
        PEER_LOST => "peer lost",
        _ => "unknown",
    }
}

/// The exit code a process ends with when it fails with an error of this kind.
pub fn for_kind(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::BadInput | ErrorKind::Unsupported => BAD_INPUT,
        ErrorKind::Infeasible => INFEASIBLE_PLAN,
        ErrorKind::LoadFailure => LOAD_FAILURE,
        ErrorKind::PeerLost => PEER_LOST,
        ErrorKind::WrongState | ErrorKind::Cancelled | ErrorKind::Internal => INTERNAL,
    }
}
