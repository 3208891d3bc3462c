//! Capacity planning for Live Avatar: per-rank memory and time for a model, a GPU set and a
//! parallel layout, computed offline with no GPU.
//!
//! The planner knows arithmetic and nothing else: no processes, no CUDA, no files beyond the
//! data compiled in from `configs/`. The launcher accepts only a [`Plan`]; everything the
//! runtime allocates is predicted here first and checked against what it really uses.
//!
//! ```
//! use planner::{Catalog, Layout, LayoutKind, ModelSpec, Request, T5Placement, VaePlacement, Workload, plan};
//! use planner::size::{AspectSource, SizeArg, resolve};
//!
//! let model = ModelSpec::builtin("s2v-14b")?;
//! let gpus = Catalog::builtin()?.parse_gpus("5xH800")?;
//! let layout = Layout {
//!     kind: LayoutKind::Liveavatar, stages: 4, tp: 1, ulysses: 1, pp: 1, fsdp: false,
//!     vae: VaePlacement::Dedicated, t5: T5Placement::Every, fp8: true, offload: false,
//! };
//! let res = resolve(SizeArg::parse("720*400")?, AspectSource::SizeString)?;
//! let req = Request::new(model, gpus, layout, res, Workload { sample_steps: 4, clips: 1 })?;
//! let plan = plan(&req).map_err(|e| format!("{} ranks short", e.shortfalls.len()))?;
//! assert_eq!(plan.ranks.len(), 5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod error;
pub mod flops;
pub mod geometry;
pub mod gpu;
pub mod layout;
pub mod memory;
pub mod params;
pub mod plan;
pub mod render;
pub mod size;
pub mod spec;
pub mod time;

pub use error::{PlanError, Result};
pub use geometry::Geometry;
pub use gpu::{Catalog, GB, GIB, Gpu};
pub use layout::{Layout, LayoutKind, Role, T5Placement, VaePlacement};
pub use memory::{Component, Phase, Workload};
pub use params::ModelParams;
pub use plan::{Infeasible, Plan, RankPlan, Request, Shortfall, plan, propose};
pub use spec::ModelSpec;
