//! Audio decode and the 16 kHz front end: formats, must-work inputs, clear errors, and the
//! chunk-by-chunk path giving the whole-file samples.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use media::MediaError;
use media::audio::{
    AudioStream, DecodedAudio, decode_bytes, decode_file, load_16k_mono, to_16k_mono,
};
use media::frames::wav2vec2_frames;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lava-media-audio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn sine(freq: f64, rate: u32, n: usize, amp: f64) -> Vec<f64> {
    (0..n)
        .map(|i| amp * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin())
        .collect()
}

fn write_wav_int(path: &Path, rate: u32, channels: u16, bits: u16, frames: &[Vec<i32>]) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: bits,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for f in frames {
        for &s in f {
            match bits {
                8 => w.write_sample(s as i8).unwrap(),
                16 => w.write_sample(s as i16).unwrap(),
                _ => w.write_sample(s).unwrap(),
            }
        }
    }
    w.finalize().unwrap();
}

/// Largest |error| against `want` away from the edges.
fn max_err_interior(got: &[f32], want: &[f64], margin: usize) -> f64 {
    assert_eq!(got.len(), want.len());
    got[margin..got.len() - margin]
        .iter()
        .zip(&want[margin..want.len() - margin])
        .map(|(&g, &w)| (f64::from(g) - w).abs())
        .fold(0.0, f64::max)
}

#[test]
fn integer_wav_is_scaled_like_libsndfile() {
    for (bits, value) in [
        (8u16, -100i32),
        (16, -12345),
        (24, 4_000_000),
        (32, -2_000_000_000),
    ] {
        let p = tmp(&format!("int{bits}.wav"));
        write_wav_int(&p, 16000, 2, bits, &[vec![value, 1], vec![0, -1]]);
        let a = decode_file(&p).unwrap();
        assert_eq!(
            (a.sample_rate, a.channels, a.frames()),
            (16000, 2, 2),
            "{bits}-bit"
        );
        let scale = 2f64.powi(i32::from(bits) - 1);
        assert_eq!(
            a.samples[0],
            (f64::from(value) / scale) as f32,
            "{bits}-bit"
        );
        assert_eq!(a.samples[3], (-1.0 / scale) as f32, "{bits}-bit");
    }
}

#[test]
fn float_wav_is_read_as_is() {
    let p = tmp("float.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 22050,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let mut w = hound::WavWriter::create(&p, spec).unwrap();
    for v in [0.25f32, -0.5, 0.125] {
        w.write_sample(v).unwrap();
    }
    w.finalize().unwrap();
    let a = decode_file(&p).unwrap();
    assert_eq!(a.samples, vec![0.25, -0.5, 0.125]);
    assert_eq!(a.sample_rate, 22050);
}

#[test]
fn downmix_averages_channels_then_16k() {
    // Stereo at 16 kHz (no resampling): left 0.5, right −0.25 ⇒ 0.125.
    let a = DecodedAudio {
        sample_rate: 16000,
        channels: 2,
        samples: [0.5f32, -0.25].repeat(1000),
    };
    let mono = to_16k_mono(&a).unwrap();
    assert_eq!(mono.len(), 1000);
    assert!(mono.iter().all(|&v| v == 0.125));
}

#[test]
fn resampling_44k1_keeps_time_alignment_and_length() {
    // A 1 kHz sine resampled to 16 kHz must equal the 1 kHz sine sampled at 16 kHz: a delay
    // trimmed wrongly by one sample would give errors of ~0.2.
    let n = 44100 * 2 + 123;
    let x = sine(1000.0, 44100, n, 0.5);
    let a = DecodedAudio {
        sample_rate: 44100,
        channels: 1,
        samples: x.iter().map(|&v| v as f32).collect(),
    };
    let y = to_16k_mono(&a).unwrap();
    let want_len = (n as u64 * 16000).div_ceil(44100) as usize;
    assert_eq!(y.len(), want_len);
    let want = sine(1000.0, 16000, want_len, 0.5);
    let err = max_err_interior(&y, &want, 200);
    assert!(err < 5e-4, "max interior error {err}");
}

#[test]
fn eight_bit_three_channel_8k_wav_works() {
    let path = data("speech_8k_3ch_u8.wav");
    let a = decode_file(&path).unwrap();
    assert_eq!((a.sample_rate, a.channels), (8000, 3));
    assert!(a.samples.iter().all(|v| (-1.0..1.0).contains(v)));
    let y = load_16k_mono(&path).unwrap();
    assert_eq!(y.len(), a.frames() * 2, "8 kHz → 16 kHz doubles the length");
    let rms = (y.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / y.len() as f64).sqrt();
    assert!(rms > 0.01, "speech survives: rms {rms}");
    // ~2.6 s of speech ⇒ the wav2vec2 frame count of §10.3.
    let t50 = wav2vec2_frames(y.len()).unwrap();
    assert_eq!(t50, (y.len() - 400) / 320 + 1);
    assert!((125..=135).contains(&t50), "{t50}");
}

#[test]
fn ninety_six_khz_stereo_flac_works() {
    let path = data("tone_96k_stereo.flac");
    let a = decode_file(&path).unwrap();
    assert_eq!((a.sample_rate, a.channels, a.frames()), (96000, 2, 48000));
    let y = load_16k_mono(&path).unwrap();
    assert_eq!(y.len(), 8000);
    // ffmpeg's sine source: amplitude 1/8, left 440 Hz, right 660 Hz; mono = their mean.
    let l = sine(440.0, 16000, 8000, 0.125);
    let r = sine(660.0, 16000, 8000, 0.125);
    let want: Vec<f64> = l.iter().zip(&r).map(|(a, b)| (a + b) / 2.0).collect();
    let err = max_err_interior(&y, &want, 300);
    assert!(err < 5e-4, "max interior error {err}");
}

#[test]
fn mp3_decodes_through_symphonia() {
    let y = load_16k_mono(&data("speech_44k.mp3")).unwrap();
    let secs = y.len() as f64 / 16000.0;
    assert!((2.5..2.8).contains(&secs), "{secs} s");
    let wav = load_16k_mono(&data("speech_8k_3ch_u8.wav")).unwrap();
    assert!((y.len() as f64 - wav.len() as f64).abs() < 0.1 * 16000.0);
}

#[test]
fn chunked_input_gives_the_whole_file_samples() {
    for name in [
        "tone_96k_stereo.flac",
        "speech_8k_3ch_u8.wav",
        "speech_44k.mp3",
    ] {
        let a = decode_file(&data(name)).unwrap();
        let whole = to_16k_mono(&a).unwrap();
        // Chunk lengths that are not multiples of the channel count or the resampler's chunk.
        for sizes in [
            vec![1usize],
            vec![7, 4096, 333],
            vec![100_003],
            vec![1023, 1, 2],
        ] {
            let mut s = AudioStream::new(a.sample_rate, a.channels).unwrap();
            let mut out = Vec::new();
            let (mut pos, mut i) = (0, 0);
            while pos < a.samples.len() {
                let n = sizes[i % sizes.len()].min(a.samples.len() - pos);
                out.extend(s.push(&a.samples[pos..pos + n]).unwrap());
                pos += n;
                i += 1;
            }
            out.extend(s.finish().unwrap());
            assert_eq!(out.len(), whole.len(), "{name} {sizes:?}");
            assert!(out == whole, "{name} {sizes:?}: samples differ");
        }
    }
}

#[test]
fn streaming_output_arrives_before_the_end() {
    let a = decode_file(&data("tone_96k_stereo.flac")).unwrap();
    let mut s = AudioStream::new(a.sample_rate, a.channels).unwrap();
    let half = s.push(&a.samples[..a.samples.len() / 2]).unwrap();
    // 0.25 s in ⇒ most of 4000 samples out already (less the resampler's latency).
    assert!(half.len() > 3000, "{}", half.len());
}

#[test]
fn input_ending_inside_a_frame_is_an_error() {
    let mut s = AudioStream::new(16000, 2).unwrap();
    s.push(&[0.1, 0.2, 0.3]).unwrap();
    let e = s.finish().unwrap_err();
    assert!(e.to_string().contains("inside a frame"), "{e}");
}

#[test]
fn corrupt_wav_is_a_clear_error() {
    let good = std::fs::read(data("speech_8k_3ch_u8.wav")).unwrap();
    // Garbage after a RIFF tag.
    let mut junk = b"RIFF\x24\x00\x00\x00WAVEjunk".to_vec();
    junk.extend_from_slice(&[0x55; 40]);
    let e = decode_bytes(junk, "junk.wav").unwrap_err();
    assert!(matches!(e, MediaError::AudioDecode { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with("junk.wav: cannot decode audio"),
        "{e}"
    );
    // Header cut in the middle.
    let e = decode_bytes(good[..30].to_vec(), "cut-header.wav").unwrap_err();
    assert!(matches!(e, MediaError::AudioDecode { .. }), "{e:?}");
    // Data chunk cut in the middle of a 3-channel frame.
    let e = decode_bytes(good[..good.len() - 1000 - 1].to_vec(), "cut-data.wav").unwrap_err();
    assert!(matches!(e, MediaError::AudioDecode { .. }), "{e:?}");
    // Not audio at all.
    let e = decode_bytes(b"hello, world".to_vec(), "text.wav").unwrap_err();
    assert!(matches!(e, MediaError::UnknownAudioFormat { .. }), "{e:?}");
}

#[test]
fn empty_audio_is_a_clear_error() {
    let p = tmp("zero-bytes.wav");
    std::fs::write(&p, b"").unwrap();
    let e = load_16k_mono(&p).unwrap_err();
    assert!(matches!(e, MediaError::EmptyAudio { .. }), "{e:?}");
    assert!(e.to_string().contains("empty"), "{e}");
    // A valid WAV with no samples.
    let p = tmp("no-samples.wav");
    write_wav_int(&p, 16000, 1, 16, &[]);
    let e = load_16k_mono(&p).unwrap_err();
    assert!(matches!(e, MediaError::EmptyAudio { .. }), "{e:?}");
    // Too short for one wav2vec2 frame.
    let p = tmp("short.wav");
    write_wav_int(&p, 16000, 1, 16, &vec![vec![100]; 399]);
    let y = load_16k_mono(&p).unwrap();
    let e = wav2vec2_frames(y.len()).unwrap_err();
    assert!(e.to_string().contains("at least 400"), "{e}");
}

#[test]
fn common_rates_resample_without_a_fractional_delay() {
    for rate in [
        8000u32, 11025, 22050, 24000, 32000, 44100, 48000, 88200, 96000,
    ] {
        let n = rate as usize + 777;
        let x = sine(500.0, rate, n, 0.5);
        let a = DecodedAudio {
            sample_rate: rate,
            channels: 1,
            samples: x.iter().map(|&v| v as f32).collect(),
        };
        let y = to_16k_mono(&a).unwrap();
        let want = sine(500.0, 16000, y.len(), 0.5);
        assert_eq!(
            y.len() as u64,
            (n as u64 * 16000).div_ceil(u64::from(rate)),
            "{rate}"
        );
        let err = max_err_interior(&y, &want, 300);
        assert!(err < 5e-4, "{rate} Hz: max interior error {err}");
    }
}
