//! The math on one rank: tensors, devices, communicators, layers and the Live Avatar models.
//!
//! `runtime` knows no processes and no network servers: the worker crate turns a
//! rank of it into a process.
//!
//! # Tour
//!
//! - [`Tensor`] (`tensor/`): one concrete, contiguous, row-major tensor type with a
//!   [`Shape`], a [`DType`] (bf16, f16, f32, fp8 e4m3 with a per-tensor dequantisation
//!   scale) and a [`Device`]. Ops validate shapes and devices, charge the output to the
//!   memory tracker, then dispatch on the storage enum.
//! - [`device`]: `Device { Cpu, Cuda(ordinal) }`, the `Storage` enum and the narrow
//!   [`device::BackendStorage`] trait, grouped by op family. `device/cpu.rs` is the
//!   reference backend; `device/cuda.rs` (feature `cuda`) the GPU one; without the feature
//!   `device/no_cuda.rs` makes every CUDA path return [`Error::CudaNotCompiled`].
//! - [`memory`]: live/peak bytes per category (weights, KV cache, activations, workspace,
//!   communication) per device, with reservations for a plan.
//! - [`testing`]: seeded PRNG, tolerance-aware comparison reports and `test_device!`.
//!
//! # Numerics
//!
//! Every op computes in f32 (f32 accumulation in sums, GEMMs, convolutions and attention)
//! and rounds once, round-to-nearest-even, into its output dtype, which the caller names
//! whenever the reference's dtype flow needs it (model-spec §3.3.1). Casts into fp8 saturate
//! at ±448.
//!
//! # Example
//!
//! ```
//! use runtime::{DType, Device, Tensor};
//!
//! # fn main() -> runtime::Result<()> {
//! let dev = Device::Cpu;
//! let x = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &dev)?;
//! let w = Tensor::from_vec(vec![1f32, 0., 0., 0., 1., 0.], (2, 3), &dev)?; // [out, in]
//! let y = x.linear(&w, None)?.to_dtype(DType::BF16)?; // x · wᵀ
//! assert_eq!(y.dims(), &[2, 2]);
//! assert_eq!(y.to_vec_f32()?, vec![1., 2., 4., 5.]);
//! # Ok(())
//! # }
//! ```

pub mod comm;
pub mod device;
mod error;
pub mod memory;
pub mod models;
pub mod parallel;
pub mod pth;
pub mod sampling;
pub mod tensor;
pub mod testing;
pub mod weights;

pub use device::Device;
pub use error::{Error, Result};
pub use tensor::{
    Conv1dOpts, Conv3dOpts, DType, F8E4M3, F8E4M3_MAX, ResNormMod, Shape, Tensor, WithDType,
};
