//! Shared helpers for lava's benchmarks.
