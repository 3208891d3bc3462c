//! Capacity planning.
