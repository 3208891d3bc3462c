//! The math on one rank: tensors, devices, communicators, layers and the Live Avatar models.
//!
//! `runtime` knows no processes and no network servers: the worker crate turns a
//! rank of it into a process.
