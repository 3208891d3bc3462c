//! Models on the runtime's tensors: one folder per family, one file per component, names as
//! in the checkpoint and model-spec.md.

pub mod probe;
pub mod t5;
pub mod vae;
pub mod var_builder;
pub mod vars;
pub mod wan;
pub mod wav2vec2;

pub use var_builder::{FetchWeights, VarBuilder};
