//! The Live Avatar DiT (`CausalWanModel_S2V`, Wan2.2-S2V-14B + LiveAvatar LoRA), one file per
//! component, named like the checkpoint (model-spec §2.3) and the reference modules.
//!
//! Dtype flow: the activation dtype is the dtype the weights were loaded in. In bf16 the
//! eager flow of model-spec §3.3.1 applies (every rounding point is an explicit `out`
//! dtype); in f32 those roundings are no-ops, which is how the golden fixtures are made.

pub mod attention;
pub mod audio;
pub mod block;
pub mod cache;
pub mod config;
pub mod dit;
pub mod embed;
pub mod framepack;
pub mod head;
pub mod parts;
pub mod rope;
pub mod stream;

pub use cache::StepCache;
pub use config::{StreamGeometry, WanConfig};
pub use dit::{CausalWanModelS2V, Record, StreamCall, TextKv};
pub use stream::{ClipInputs, RelativeDist, StreamOutput, StreamRunner};
