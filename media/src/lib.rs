//! Media in and out for lava, shared by the worker and the launcher (no CUDA here).
//!
//! - [`image`]: reference JPEG/PNG → size selection (through `planner::size`) → Pillow-exact
//!   bilinear resize → torchvision centre crop with zero padding → [3, H, W] in [−1, 1]
//!   (model-spec §10.1).
//! - [`audio`]: WAV (hound), FLAC and MP3 (symphonia) → mono → 16 kHz (rubato), whole-file or
//!   chunk by chunk with identical results; [`frames`]: the wav2vec2 frame count, the
//!   50 Hz → 30 Hz → 25 fps mapping and the clip bucketing of §10.3 over per-frame features.
//! - [`video`]: progressive H.264 + AAC fragmented MP4 through the system ffmpeg (§6.5).
//!
//! See docs/media.md for the decisions (A/V offset, tiny images, decoder differences).

pub mod audio;
pub mod error;
pub mod frames;
pub mod image;
mod pipe;
pub mod video;

pub use error::{MediaError, Result};
