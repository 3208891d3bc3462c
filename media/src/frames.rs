//! wav2vec2 frames → 30 Hz → 25 fps video frames → clips (model-spec §10.3).
//!
//! Mirrors `linear_interpolation` and `get_audio_embed_bucket_fps` (m = 0) of LiveAvatar's
//! `wan_2_2/modules/s2v/audio_encoder.py`. Everything here is over per-frame feature arrays of
//! any width, laid out `[layers][frames][width]` like the stacked hidden states [25, T50, 1024].
//!
//! The align-corners interpolation spans the whole clip (its step is (T50−1)/(T30−1)), so the
//! reference mapping needs the total length; see docs/media.md for what that means live.

use crate::error::{MediaError, Result};

/// The reference's wav2vec2 rate and the intermediate "video_rate".
pub const WAV2VEC_HZ: f64 = 50.0;
pub const AUDIO_TRACK_HZ: f64 = 30.0;
/// Output video rate (cfg.sample_fps).
pub const VIDEO_FPS: u32 = 25;
/// Video frames per clip (infer_frames) and per block.
pub const CLIP_FRAMES: usize = 48;
pub const BLOCK_FRAMES: usize = 12;

/// wav2vec2 conv front end: receptive field 400 samples, stride 320 (16 kHz ⇒ 50 Hz).
pub fn wav2vec2_frames(samples_16k: usize) -> Result<usize> {
    if samples_16k < 400 {
        return Err(MediaError::AudioTooShort {
            samples: samples_16k,
        });
    }
    Ok((samples_16k - 400) / 320 + 1)
}

/// T30 = int(T50 / 50.0 · 30), in float64 as the reference computes it.
pub fn frames_30hz(t50: usize) -> usize {
    (t50 as f64 / WAV2VEC_HZ * AUDIO_TRACK_HZ) as usize
}

/// Number of clips: int(T30 / (48 · (30/25))) + 1 (float64, as the reference).
pub fn num_clips(t30: usize) -> usize {
    num_clips_for(t30, CLIP_FRAMES)
}

/// Number of clips of `clip_frames` video frames (`--infer_frames`): the reference's
/// int(T30 / (infer_frames · (30/25))) + 1.
pub fn num_clips_for(t30: usize, clip_frames: usize) -> usize {
    let scale = AUDIO_TRACK_HZ / f64::from(VIDEO_FPS);
    (t30 as f64 / (clip_frames.max(1) as f64 * scale)) as usize + 1
}

/// Index into the 30 Hz track for video frame k: round(6k/5). The fraction of 6k/5 is a
/// multiple of 0.2, so there are no ties and (6k + 2) div 5 is exact.
pub fn track_index(k: usize) -> usize {
    (6 * k + 2) / 5
}

/// The §10.3 counts for an input of `samples` at 16 kHz, known before wav2vec2 runs (so the
/// launcher can clamp `--num_clip` to `clips`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioTiming {
    pub samples: usize,
    /// wav2vec2 frames at 50 Hz.
    pub t50: usize,
    /// Frames of the interpolated 30 Hz track.
    pub t30: usize,
    /// nr: clips of 48 video frames the audio is bucketed into.
    pub clips: usize,
    /// Video frames k with round(6k/5) < T30, i.e. driven by real audio.
    pub audio_frames: usize,
}

pub fn timing(samples_16k: usize) -> Result<AudioTiming> {
    let t50 = wav2vec2_frames(samples_16k)?;
    let t30 = frames_30hz(t50);
    // (6k + 2) div 5 < T30 ⇔ 6k + 2 < 5·T30 ⇔ k < (5·T30 − 2)/6.
    let audio_frames = if t30 == 0 { 0 } else { (5 * t30 + 3) / 6 };
    Ok(AudioTiming {
        samples: samples_16k,
        t50,
        t30,
        clips: num_clips(t30),
        audio_frames,
    })
}

/// Per-frame features: `data` is `[layers][frames][width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub layers: usize,
    pub frames: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Features {
    pub fn new(layers: usize, frames: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != layers * frames * width {
            return Err(MediaError::Frames(format!(
                "{} values for [{layers}, {frames}, {width}]",
                data.len()
            )));
        }
        Ok(Self {
            layers,
            frames,
            width,
            data,
        })
    }

    fn frame(&self, layer: usize, t: usize) -> &[f32] {
        let o = (layer * self.frames + t) * self.width;
        &self.data[o..o + self.width]
    }
}

/// `F.interpolate(mode='linear', align_corners=True)` along time to `t_out` frames, with the
/// arithmetic of PyTorch's upsample_linear1d kernel (float scale and weights).
pub fn interpolate_align_corners(x: &Features, t_out: usize) -> Features {
    let (l, t_in, d) = (x.layers, x.frames, x.width);
    let mut data = vec![0f32; l * t_out * d];
    if t_in == 0 || t_out == 0 {
        return Features {
            layers: l,
            frames: t_out,
            width: d,
            data: if t_in == 0 { data } else { Vec::new() },
        };
    }
    let scale = if t_out > 1 {
        (t_in - 1) as f32 / (t_out - 1) as f32
    } else {
        0.0
    };
    for layer in 0..l {
        for t in 0..t_out {
            let dst = &mut data[(layer * t_out + t) * d..][..d];
            if t_in == t_out {
                dst.copy_from_slice(x.frame(layer, t));
                continue;
            }
            let real = scale * t as f32;
            let i0 = real as usize;
            let step = usize::from(i0 < t_in - 1);
            let l1 = real - i0 as f32;
            let l0 = 1.0 - l1;
            let (a, b) = (x.frame(layer, i0), x.frame(layer, i0 + step));
            for ((o, &va), &vb) in dst.iter_mut().zip(a).zip(b) {
                *o = l0 * va + l1 * vb;
            }
        }
    }
    Features {
        layers: l,
        frames: t_out,
        width: d,
        data,
    }
}

/// Per-video-frame audio features for whole clips, `data` is `[layers][width][frames]` like the
/// reference's [1, 25, 1024, nr·48].
#[derive(Debug, Clone, PartialEq)]
pub struct ClipFeatures {
    pub layers: usize,
    pub width: usize,
    /// nr: clips the audio covers (⌊T30 / 57.6⌋ + 1).
    pub clips: usize,
    /// Video frames that carry real audio (the rest, up to clips · 48, are zeros).
    pub audio_frames: usize,
    pub data: Vec<f32>,
}

impl ClipFeatures {
    pub fn frames(&self) -> usize {
        self.clips * CLIP_FRAMES
    }

    /// The slice the DiT consumes for block `b` of clip `r`: video frames
    /// [48r + 12b, +12), laid out `[layers][width][12]`.
    pub fn block(&self, clip: usize, block: usize) -> Result<Vec<f32>> {
        if clip >= self.clips || block >= CLIP_FRAMES / BLOCK_FRAMES {
            return Err(MediaError::Frames(format!(
                "block {block} of clip {clip}: the audio has {} clips of {} blocks",
                self.clips,
                CLIP_FRAMES / BLOCK_FRAMES
            )));
        }
        let f = self.frames();
        let start = clip * CLIP_FRAMES + block * BLOCK_FRAMES;
        let mut out = Vec::with_capacity(self.layers * self.width * BLOCK_FRAMES);
        for row in 0..self.layers * self.width {
            out.extend_from_slice(&self.data[row * f + start..][..BLOCK_FRAMES]);
        }
        Ok(out)
    }
}

/// The whole §10.3 mapping from wav2vec2 hidden states at 50 Hz: interpolate to 30 Hz, pick
/// track frame round(6k/5) for video frame k, zero beyond the audio, pad to whole clips.
pub fn clip_features(hidden_50hz: &Features) -> Result<ClipFeatures> {
    if hidden_50hz.frames == 0 {
        return Err(MediaError::Frames("no wav2vec2 frames".into()));
    }
    let t30 = frames_30hz(hidden_50hz.frames);
    let track = interpolate_align_corners(hidden_50hz, t30);
    let clips = num_clips(t30);
    let frames = clips * CLIP_FRAMES;
    // get_sample_indices clips to the padded length ⌈nr·48/25·30⌉ − 1; a bound never reached
    // for k < nr·48 but kept for fidelity.
    let padded = (frames as f64 / f64::from(VIDEO_FPS) * AUDIO_TRACK_HZ).ceil() as usize;
    let (l, d) = (track.layers, track.width);
    let mut data = vec![0f32; l * d * frames];
    let mut audio_frames = 0;
    for k in 0..frames {
        let bi = track_index(k).min(padded.saturating_sub(1));
        if bi >= t30 {
            continue;
        }
        audio_frames = k + 1;
        for layer in 0..l {
            let src = track.frame(layer, bi);
            for (c, &v) in src.iter().enumerate() {
                data[(layer * d + c) * frames + k] = v;
            }
        }
    }
    Ok(ClipFeatures {
        layers: l,
        width: d,
        clips,
        audio_frames,
        data,
    })
}

/// Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation of the whole input:
/// (x − mean) / sqrt(var + 1e−7), statistics in float64.
pub fn wav2vec2_input_values(samples_16k: &[f32]) -> Vec<f32> {
    if samples_16k.is_empty() {
        return Vec::new();
    }
    let n = samples_16k.len() as f64;
    let mean = samples_16k.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = samples_16k
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let inv = 1.0 / (var + 1e-7).sqrt();
    samples_16k
        .iter()
        .map(|&v| ((f64::from(v) - mean) * inv) as f32)
        .collect()
}
