//! Shared helpers for lava's benchmarks: full-size models with seeded random weights whose
//! tensor names and shapes come from each model's own loader (`runtime::models::probe`), so
//! they cannot drift from the model code.

pub use runtime::models::probe::{RandomSource as Random, probe_tensors};
