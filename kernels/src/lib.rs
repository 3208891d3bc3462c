//! CUDA kernels for lava.
//!
//! Each kernel family lives in one `.cu` file under `kernels/cuda/`. With the `cuda`
//! feature, `build.rs` compiles them ahead of time; without it this crate is empty
//! so that the default build needs no CUDA toolkit.
