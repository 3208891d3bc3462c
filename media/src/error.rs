//! The one error type of the media crate.

use std::path::PathBuf;

pub type Result<T, E = MediaError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a JPEG or PNG image ({reason})")]
    NotAnImage { path: PathBuf, reason: String },
    #[error("{path}: cannot decode image: {reason}")]
    ImageDecode { path: PathBuf, reason: String },
    #[error("image size: {0}")]
    Size(#[from] planner::PlanError),
    #[error("{what}: the audio is empty (no samples)")]
    EmptyAudio { what: String },
    #[error("{what}: not a WAV, FLAC or MP3 file ({reason})")]
    UnknownAudioFormat { what: String, reason: String },
    #[error("{what}: cannot decode audio: {reason}")]
    AudioDecode { what: String, reason: String },
    #[error("audio stream: {0}")]
    AudioStream(String),
    #[error("resampling {from_hz} Hz to {to_hz} Hz: {reason}")]
    Resample {
        from_hz: u32,
        to_hz: u32,
        reason: String,
    },
    #[error("audio too short: {samples} samples at 16 kHz, wav2vec2 needs at least 400 (25 ms)")]
    AudioTooShort { samples: usize },
    #[error("frame mapping: {0}")]
    Frames(String),
    #[error(
        "ffmpeg not found at {path:?}: install it (Debian: apt-get install ffmpeg) or pass its path"
    )]
    FfmpegMissing { path: String },
    #[error("ffmpeg failed: {0}")]
    Ffmpeg(String),
    #[error("video writer: {0}")]
    Video(String),
}

impl MediaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MediaError::Io {
            path: path.into(),
            source,
        }
    }
}
