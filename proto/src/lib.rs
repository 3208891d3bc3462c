//! lava's wire protocols: `v1/worker.proto` (control plane) and `v1/frames.proto` (data plane).
