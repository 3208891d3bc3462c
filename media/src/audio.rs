//! Driving audio: decode (WAV with hound, FLAC and MP3 with symphonia), downmix to mono,
//! resample to 16 kHz (rubato's FFT resampler), whole-file or chunk by chunk.
//!
//! The reference uses `librosa.load(path, sr=16000)`: float samples scaled like libsndfile
//! (integer PCM / 2^(bits−1)), channels averaged, then soxr. The scaling and the downmix are the
//! same here; the resampler is not (rubato vs soxr), see docs/media.md.
//!
//! [`AudioStream`] is the one resampling path: [`load_16k_mono`] pushes the whole file through
//! it, a live server pushes chunks as they arrive, and both give the same samples.

use std::io::Cursor;
use std::path::Path;

use audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler, WindowFunction};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::error::{MediaError, Result};

/// wav2vec2's input rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// Target input frames per resampler call.
const CHUNK_TARGET: usize = 4096;

/// One FFT block of rubato's `Fft` (sub_chunks = 1) per call, sized to an *even* multiple of
/// the rate pair's input period: with an odd input block the resampler's true delay is half an
/// input sample more than the whole number of output frames it reports and trims, so the
/// output would lag by e.g. 0.18 samples at 44.1 kHz (a 1 kHz sine then errs by 3.5 %).
fn fft_chunk(rate_in: u32) -> usize {
    let (mut a, mut b) = (rate_in, SAMPLE_RATE);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let unit = 2 * (rate_in / a) as usize;
    unit * ((CHUNK_TARGET + unit / 2) / unit).max(1)
}

/// Decoded audio as it was stored: interleaved f32 in [−1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    pub sample_rate: u32,
    pub channels: usize,
    pub samples: Vec<f32>,
}

impl DecodedAudio {
    pub fn frames(&self) -> usize {
        self.samples.len() / self.channels.max(1)
    }
}

/// Decode a WAV, FLAC or MP3 file; the format is taken from the bytes, not the name.
pub fn decode_file(path: &Path) -> Result<DecodedAudio> {
    let bytes = std::fs::read(path).map_err(|e| MediaError::io(path, e))?;
    decode_bytes(bytes, &path.display().to_string())
}

/// [`decode_file`] on bytes in memory; `what` names them in errors.
pub fn decode_bytes(bytes: Vec<u8>, what: &str) -> Result<DecodedAudio> {
    if bytes.is_empty() {
        return Err(MediaError::EmptyAudio { what: what.into() });
    }
    let audio = if bytes.starts_with(b"RIFF") || bytes.starts_with(b"RIFX") {
        decode_wav(&bytes, what)?
    } else if bytes.starts_with(b"fLaC") || is_mp3(&bytes) {
        decode_symphonia(bytes, what)?
    } else {
        return Err(MediaError::UnknownAudioFormat {
            what: what.into(),
            reason: format!(
                "unrecognised leading bytes {:02x?}",
                &bytes[..bytes.len().min(8)]
            ),
        });
    };
    if audio.samples.is_empty() {
        return Err(MediaError::EmptyAudio { what: what.into() });
    }
    Ok(audio)
}

/// An ID3v2 tag or an MPEG audio frame sync (11 set bits) at the start.
fn is_mp3(b: &[u8]) -> bool {
    b.starts_with(b"ID3") || (b.len() >= 2 && b[0] == 0xFF && (b[1] & 0xE0) == 0xE0)
}

fn decode_wav(bytes: &[u8], what: &str) -> Result<DecodedAudio> {
    let err = |e: hound::Error| MediaError::AudioDecode {
        what: what.into(),
        reason: format!("WAV: {e}"),
    };
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(err)?;
    let spec = reader.spec();
    if spec.channels == 0 || spec.sample_rate == 0 {
        return Err(MediaError::AudioDecode {
            what: what.into(),
            reason: format!(
                "WAV header: {} channels at {} Hz",
                spec.channels, spec.sample_rate
            ),
        });
    }
    let samples = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?,
        hound::SampleFormat::Int => {
            // libsndfile's float view: value / 2^(bits−1) (8-bit WAV is unsigned; hound
            // already recentres it).
            let scale = 1.0 / f64::from(1u32 << (spec.bits_per_sample.clamp(1, 32) - 1));
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| (f64::from(v) * scale) as f32))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?
        }
    };
    Ok(DecodedAudio {
        sample_rate: spec.sample_rate,
        channels: usize::from(spec.channels),
        samples,
    })
}

fn decode_symphonia(bytes: Vec<u8>, what: &str) -> Result<DecodedAudio> {
    let err = |e: SymError| MediaError::AudioDecode {
        what: what.into(),
        reason: e.to_string(),
    };
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut format = symphonia::default::get_probe()
        .probe(
            &Hint::new(),
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(err)?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| MediaError::AudioDecode {
            what: what.into(),
            reason: "no audio track".into(),
        })?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| MediaError::AudioDecode {
            what: what.into(),
            reason: "the audio track has no codec parameters".into(),
        })?;
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(params, &AudioDecoderOptions::default())
        .map_err(err)?;
    let mut out = DecodedAudio {
        sample_rate: 0,
        channels: 0,
        samples: Vec::new(),
    };
    let mut buf: Vec<f32> = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // A truncated last packet ends the stream; anything else is an error.
            Err(SymError::IoError(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.samples.is_empty() =>
            {
                break;
            }
            Err(e) => return Err(err(e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // One corrupt packet (e.g. a damaged MP3 frame) is skipped, as players do.
            Err(SymError::DecodeError(_)) => continue,
            Err(e) => return Err(err(e)),
        };
        let spec = decoded.spec();
        let (rate, ch) = (spec.rate(), spec.channels().count());
        if out.sample_rate == 0 {
            (out.sample_rate, out.channels) = (rate, ch);
        } else if (rate, ch) != (out.sample_rate, out.channels) {
            return Err(MediaError::AudioDecode {
                what: what.into(),
                reason: format!(
                    "stream changes from {} Hz × {} to {rate} Hz × {ch} mid-file",
                    out.sample_rate, out.channels
                ),
            });
        }
        buf.resize(decoded.samples_interleaved(), 0.0);
        decoded.copy_to_slice_interleaved(&mut buf);
        out.samples.extend_from_slice(&buf);
    }
    if out.channels == 0 || out.sample_rate == 0 {
        return Err(MediaError::EmptyAudio { what: what.into() });
    }
    Ok(out)
}

/// Average the channels of interleaved samples (librosa's `to_mono`).
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    interleaved
        .chunks_exact(channels)
        .map(|f| (f.iter().map(|&s| f64::from(s)).sum::<f64>() / channels as f64) as f32)
        .collect()
}

/// Whole-file path: decode, downmix, resample to 16 kHz mono.
pub fn load_16k_mono(path: &Path) -> Result<Vec<f32>> {
    let audio = decode_file(path)?;
    to_16k_mono(&audio)
}

/// Downmix and resample decoded audio to 16 kHz mono through one [`AudioStream`].
pub fn to_16k_mono(audio: &DecodedAudio) -> Result<Vec<f32>> {
    let mut stream = AudioStream::new(audio.sample_rate, audio.channels)?;
    let mut out = stream.push(&audio.samples)?;
    out.extend(stream.finish()?);
    Ok(out)
}

/// Incremental front end: interleaved chunks of any length in, 16 kHz mono out. The output is
/// independent of how the input was cut into chunks.
pub struct AudioStream {
    rate_in: u32,
    channels: usize,
    resampler: Option<Fft<f32>>,
    /// Samples of an incomplete frame left over from the last push.
    carry: Vec<f32>,
    /// Mono input not yet resampled.
    pending: Vec<f32>,
    /// Output frames still to drop at the start (the resampler's delay).
    to_trim: usize,
    frames_in: u64,
    frames_out: u64,
    out_buf: Vec<f32>,
}

impl std::fmt::Debug for AudioStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioStream")
            .field("rate_in", &self.rate_in)
            .field("channels", &self.channels)
            .field("frames_in", &self.frames_in)
            .field("frames_out", &self.frames_out)
            .finish_non_exhaustive()
    }
}

impl AudioStream {
    pub fn new(sample_rate: u32, channels: usize) -> Result<Self> {
        if sample_rate == 0 || channels == 0 {
            return Err(MediaError::AudioStream(format!(
                "{channels} channels at {sample_rate} Hz"
            )));
        }
        let resampler = if sample_rate == SAMPLE_RATE {
            None
        } else {
            Some(
                Fft::<f32>::new_custom(
                    sample_rate as usize,
                    SAMPLE_RATE as usize,
                    fft_chunk(sample_rate),
                    1,
                    1,
                    WindowFunction::BlackmanHarris2,
                    FixedSync::Input,
                )
                .map_err(|e| MediaError::Resample {
                    from_hz: sample_rate,
                    to_hz: SAMPLE_RATE,
                    reason: e.to_string(),
                })?,
            )
        };
        let to_trim = resampler.as_ref().map_or(0, |r| r.output_delay());
        let out_max = resampler.as_ref().map_or(0, |r| r.output_frames_max());
        Ok(Self {
            rate_in: sample_rate,
            channels,
            resampler,
            carry: Vec::new(),
            pending: Vec::new(),
            to_trim,
            frames_in: 0,
            frames_out: 0,
            out_buf: vec![0.0; out_max],
        })
    }

    /// 16 kHz frames the whole input so far will have once finished: ⌈n · 16000 / rate⌉.
    fn expected_out(&self) -> u64 {
        (self.frames_in * u64::from(SAMPLE_RATE)).div_ceil(u64::from(self.rate_in))
    }

    /// Push interleaved samples; returns the 16 kHz mono samples that became available.
    pub fn push(&mut self, interleaved: &[f32]) -> Result<Vec<f32>> {
        let mono = if self.carry.is_empty() && interleaved.len().is_multiple_of(self.channels) {
            downmix(interleaved, self.channels)
        } else {
            self.carry.extend_from_slice(interleaved);
            let whole = self.carry.len() / self.channels * self.channels;
            let mono = downmix(&self.carry[..whole], self.channels);
            self.carry.drain(..whole);
            mono
        };
        self.frames_in += mono.len() as u64;
        if self.resampler.is_none() {
            self.frames_out += mono.len() as u64;
            return Ok(mono);
        }
        self.pending.extend_from_slice(&mono);
        let mut out = Vec::new();
        while let Some(need) = self.resampler.as_ref().map(|r| r.input_frames_next()) {
            if self.pending.len() < need {
                break;
            }
            let consumed = self.process(need, None, &mut out)?;
            self.pending.drain(..consumed);
        }
        Ok(out)
    }

    /// Flush the tail (the last partial chunk and the resampler's delay).
    pub fn finish(mut self) -> Result<Vec<f32>> {
        if !self.carry.is_empty() {
            return Err(MediaError::AudioStream(format!(
                "{} samples left over: the input ended inside a frame of {} channels",
                self.carry.len(),
                self.channels
            )));
        }
        let mut out = Vec::new();
        let Some(need) = self.resampler.as_ref().map(|r| r.input_frames_next()) else {
            return Ok(out);
        };
        let expected = self.expected_out();
        let partial = self.pending.len();
        if partial > 0 {
            self.pending.resize(need, 0.0);
            self.process(need, Some(partial), &mut out)?;
        }
        self.pending.clear();
        self.pending.resize(need, 0.0);
        while self.frames_out < expected {
            self.process(need, Some(0), &mut out)?;
        }
        let excess = (self.frames_out - expected) as usize;
        out.truncate(out.len() - excess.min(out.len()));
        self.frames_out = expected;
        Ok(out)
    }

    /// One resampler call on `pending[..need]`; appends the output after trimming the delay.
    fn process(
        &mut self,
        need: usize,
        partial: Option<usize>,
        out: &mut Vec<f32>,
    ) -> Result<usize> {
        let (rate_in, channels) = (self.rate_in, 1);
        let err = |reason: String| MediaError::Resample {
            from_hz: rate_in,
            to_hz: SAMPLE_RATE,
            reason,
        };
        let Some(r) = self.resampler.as_mut() else {
            return Ok(0);
        };
        let input = InterleavedSlice::new(&self.pending[..need], channels, need)
            .map_err(|e| err(e.to_string()))?;
        let n_out = self.out_buf.len();
        let mut output = InterleavedSlice::new_mut(&mut self.out_buf[..], channels, n_out)
            .map_err(|e| err(e.to_string()))?;
        let indexing = Indexing {
            input_offset: 0,
            output_offset: 0,
            partial_len: partial,
            active_channels_mask: None,
        };
        let (consumed, produced) = r
            .process_into_buffer(&input, &mut output, Some(&indexing))
            .map_err(|e| err(e.to_string()))?;
        let skip = self.to_trim.min(produced);
        self.to_trim -= skip;
        out.extend_from_slice(&self.out_buf[skip..produced]);
        self.frames_out += (produced - skip) as u64;
        Ok(consumed)
    }
}
