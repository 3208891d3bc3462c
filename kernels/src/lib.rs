//! CUDA kernels for lava.
//!
//! Each kernel family lives in one `.cu` file under `kernels/cuda/`. With the `cuda`
//! feature, `build.rs` compiles them ahead of time with nvcc into an sm_90a cubin plus a
//! compute_90 PTX fallback, embeds both, and this crate exposes:
//! - [`Kernels`]: the loaded modules of one context, with typed, bounds-checked launchers
//!   (elementwise, norms, softmax, reductions, RoPE, im2col, attention);
//! - [`gemm::Lt`]: a cuBLASLt wrapper (bf16/f16/f32/fp8 GEMMs, bias and GELU epilogues,
//!   descriptors and the chosen algorithm cached per shape);
//! - [`probe`]: what CUDA libraries this process can load, without panicking.
//!
//! The cuBLASLt wrapper lives here rather than in `runtime` so that every unsafe FFI call
//! and raw device pointer of the project sits in one crate behind safe, checked functions;
//! `runtime` and the benchmarks only see slices, dtypes and shapes.
//!
//! Without the `cuda` feature this crate is empty, so the default build needs no CUDA.
#![cfg_attr(not(feature = "cuda"), allow(unused))]

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cudnn")]
pub mod cudnn;
#[cfg(feature = "cudnn")]
pub mod cudnn_conv;
#[cfg(feature = "cuda")]
mod elementwise;
#[cfg(feature = "cuda")]
mod error;
#[cfg(feature = "cuda")]
pub mod gemm;
#[cfg(feature = "cuda")]
mod module;
#[cfg(feature = "cuda")]
pub mod probe;
#[cfg(feature = "cuda")]
mod rows;
#[cfg(feature = "cuda")]
mod vae;

#[cfg(feature = "cuda")]
pub use attention::AttnArgs;
#[cfg(feature = "cuda")]
pub use cudarc;
#[cfg(feature = "cuda")]
pub use elementwise::{BinaryOp, Strided, StridedMut, TernaryOp, UnaryOp, contiguous_strides};
#[cfg(feature = "cuda")]
pub use error::{Error, Result};
#[cfg(feature = "cuda")]
pub use module::{DType, In, Kernels, Out, keep_pool_memory};
#[cfg(feature = "cuda")]
pub use rows::{Act, Conv3dGeom, ReduceOp, ResNormGeom, ResNormIo, RopeArgs};
