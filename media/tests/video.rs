//! MP4 output checked with ffprobe: size, rate, duration, streams, progressive fragments, the
//! audio offset, colours, and the H×W that the planner resolves for an image.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use media::MediaError;
use media::image::load_reference_image;
use media::video::{AudioIn, Mp4Options, Mp4Writer, rgb24_from_chw, write_wav_i16};
use planner::size::{AspectSource, SizeArg, resolve};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lava-media-video-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn tool(name: &str) -> &str {
    let flag = if name == "espeak-ng" {
        "--version"
    } else {
        "-version"
    };
    let ok = Command::new(name)
        .arg(flag)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{name} is needed for this test (Debian: apt-get install ffmpeg espeak-ng; .ci/run installs them)"
    );
    name
}

/// Speech from espeak-ng, ~3 s at 22.05 kHz.
fn speech(name: &str) -> PathBuf {
    let p = tmp(name);
    let st = Command::new(tool("espeak-ng"))
        .args(["-w"])
        .arg(&p)
        .arg("Hello, this is lava. The quick brown fox jumps over the lazy dog.")
        .status()
        .unwrap();
    assert!(st.success());
    p
}

fn ffprobe(path: &Path, count_frames: bool) -> serde_json::Value {
    let mut cmd = Command::new(tool("ffprobe"));
    cmd.args([
        "-v",
        "error",
        "-of",
        "json",
        "-show_streams",
        "-show_format",
    ]);
    if count_frames {
        cmd.arg("-count_frames");
    }
    let out = cmd.arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "ffprobe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The first stream of `kind`; None also when ffprobe printed no streams (a file still being
/// written can probe as `{}`).
fn stream<'a>(probe: &'a serde_json::Value, kind: &str) -> Option<&'a serde_json::Value> {
    probe["streams"]
        .as_array()?
        .iter()
        .find(|s| s["codec_type"] == kind)
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_str()
        .map_or_else(|| v.as_f64().unwrap(), |s| s.parse().unwrap())
}

/// A test pattern: frame t is a horizontal ramp in red, t-dependent green, constant blue.
fn pattern(t: usize, h: usize, w: usize) -> Vec<f32> {
    let mut f = vec![0f32; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            f[y * w + x] = x as f32 / w as f32 * 2.0 - 1.0;
            f[h * w + y * w + x] = ((t % 25) as f32 / 12.0 - 1.0).clamp(-1.0, 1.0);
            f[2 * h * w + y * w + x] = -0.5;
        }
    }
    f
}

#[test]
fn pixel_conversion_clamps_scales_and_truncates() {
    let chw = [-1.0f32, 1.0, 0.0, 2.0, -0.5, f32::NAN];
    // [3, 1, 2]: pixels (−1, 0, −0.5) and (1, 2, NaN).
    let mut out = Vec::new();
    rgb24_from_chw(&chw, 1, 2, &mut out).unwrap();
    assert_eq!(out, vec![0, 127, 63, 255, 255, 0]);
    assert!(rgb24_from_chw(&chw[..5], 1, 2, &mut out).is_err());
}

#[test]
fn mp4_with_audio_has_the_right_size_rate_duration_and_streams() {
    let audio = speech("speech.wav");
    let out = tmp("av.mp4");
    let (h, w) = (64usize, 96usize);
    let mut opts = Mp4Options::new(w as u32, h as u32);
    opts.audio = AudioIn::File(audio);
    let mut wr = Mp4Writer::create(&out, &opts).unwrap();
    // 4 blocks of 12 frames as [3, T, H, W] plus 2 single frames: 50 frames = 2.00 s.
    for b in 0..4 {
        let mut block = vec![0f32; 3 * 12 * h * w];
        for t in 0..12 {
            let f = pattern(b * 12 + t, h, w);
            for c in 0..3 {
                block[(c * 12 + t) * h * w..][..h * w].copy_from_slice(&f[c * h * w..][..h * w]);
            }
        }
        wr.write_block_cthw(&block, 12).unwrap();
    }
    wr.write_chw(&pattern(48, h, w)).unwrap();
    wr.write_chw(&pattern(49, h, w)).unwrap();
    let summary = wr.finish().unwrap();
    assert_eq!(summary.frames, 50);

    let p = ffprobe(&out, true);
    let v = stream(&p, "video").expect("a video stream");
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(96), Some(64))
    );
    assert_eq!(v["pix_fmt"], "yuv420p");
    assert_eq!(v["r_frame_rate"], "25/1");
    assert_eq!(v["avg_frame_rate"], "25/1");
    assert_eq!(num(&v["nb_read_frames"]), 50.0);
    assert_eq!(num(&v["duration"]), 2.0);
    let a = stream(&p, "audio").expect("an audio stream");
    assert_eq!(a["codec_name"], "aac");
    // -shortest alone (frame count unknown up front): the audio may overrun a little.
    let end = num(&a["start_time"]) + num(&a["duration"]);
    assert!((1.95..2.3).contains(&end), "audio ends at {end}");
    assert!(p["format"]["format_name"].as_str().unwrap().contains("mp4"));
}

/// A last clip past the end of the speech (zero-padded audio, §10.3): every frame is written
/// and the AAC track runs to the video's end in silence, with or without a known length.
#[test]
fn audio_shorter_than_the_video_is_padded_with_silence() {
    let wav = tmp("short.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&wav, spec).unwrap();
    for i in 0..8_000 {
        // 0.5 s of a 440 Hz tone.
        let v = (i as f32 * 440.0 * std::f32::consts::TAU / 16_000.0).sin();
        w.write_sample((v * 8_000.0) as i16).unwrap();
    }
    w.finalize().unwrap();
    for (name, expected) in [("short-open.mp4", None), ("short-exact.mp4", Some(60))] {
        let out = tmp(name);
        let mut opts = Mp4Options::new(64, 64);
        opts.audio = AudioIn::File(wav.clone());
        opts.expected_frames = expected;
        let mut wr = Mp4Writer::create(&out, &opts).unwrap();
        // 60 frames = 2.4 s of video against 0.5 s of audio, pushed in blocks with pauses so
        // that ffmpeg reaches the audio's end while frames are still coming.
        for b in 0..5 {
            for t in 0..12 {
                wr.write_chw(&pattern(12 * b + t, 64, 64)).unwrap();
            }
            wr.flush().unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        assert_eq!(wr.finish().unwrap().frames, 60, "{name}");
        let p = ffprobe(&out, true);
        assert_eq!(num(&stream(&p, "video").unwrap()["nb_read_frames"]), 60.0);
        let a = stream(&p, "audio").expect("an audio stream");
        let end = num(&a["start_time"]) + num(&a["duration"]);
        assert!((2.35..2.7).contains(&end), "{name}: audio ends at {end}");
    }
}

#[test]
fn known_frame_count_cuts_the_audio_to_the_video() {
    let out = tmp("av-exact.mp4");
    let mut opts = Mp4Options::new(64, 64);
    opts.audio = AudioIn::File(speech("speech-exact.wav"));
    opts.expected_frames = Some(45);
    let mut wr = Mp4Writer::create(&out, &opts).unwrap();
    for t in 0..45 {
        wr.write_chw(&pattern(t, 64, 64)).unwrap();
    }
    wr.finish().unwrap();
    let p = ffprobe(&out, false);
    let a = stream(&p, "audio").unwrap();
    let end = num(&a["start_time"]) + num(&a["duration"]);
    assert!(
        (end - 1.8).abs() < 0.03,
        "audio ends at {end}, video at 1.8"
    );
    assert_eq!(num(&stream(&p, "video").unwrap()["duration"]), 1.8);
    // The container's duration counts the AAC priming too (one 1024-sample frame).
    let dur = num(&p["format"]["duration"]);
    assert!((1.79..1.8 + 0.07).contains(&dur), "duration {dur}");
    assert!(p["format"]["format_name"].as_str().unwrap().contains("mp4"));
}

#[test]
fn colours_survive_the_encode() {
    let out = tmp("colour.mp4");
    let (h, w) = (64usize, 64usize);
    let mut wr = Mp4Writer::create(&out, &Mp4Options::new(w as u32, h as u32)).unwrap();
    // Flat red, then flat blue: catches an RGB/BGR swap or a wrong plane order.
    for (r, g, b) in [(0.8f32, -1.0f32, -1.0f32), (-1.0, -1.0, 0.8)] {
        let mut f = vec![r; h * w];
        f.extend(vec![g; h * w]);
        f.extend(vec![b; h * w]);
        for _ in 0..12 {
            wr.write_chw(&f).unwrap();
        }
    }
    wr.finish().unwrap();
    let raw = Command::new(tool("ffmpeg"))
        .args(["-v", "error", "-i"])
        .arg(&out)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(raw.status.success());
    let frame = h * w * 3;
    assert_eq!(raw.stdout.len(), 24 * frame);
    let mean = |f: usize, c: usize| {
        let px = &raw.stdout[f * frame..(f + 1) * frame];
        px.iter()
            .skip(c)
            .step_by(3)
            .map(|&v| f64::from(v))
            .sum::<f64>()
            / (h * w) as f64
    };
    // 0.8 ⇒ ⌊0.9 · 255⌋ = 229; −1 ⇒ 0 (yuv420p round trip: a few levels).
    for (f, want) in [(5, [229.0, 0.0, 0.0]), (18, [0.0, 0.0, 229.0])] {
        for (c, w) in want.iter().enumerate() {
            let m = mean(f, c);
            assert!((m - w).abs() < 8.0, "frame {f} channel {c}: {m} vs {w}");
        }
    }
}

#[test]
fn mp4_size_is_what_the_planner_resolves_for_the_image() {
    let size = SizeArg::parse("704*384").unwrap();
    let img = load_reference_image(&data("boy.jpg"), size).unwrap();
    let planned = resolve(
        size,
        AspectSource::Image {
            height: 400,
            width: 720,
        },
    )
    .unwrap();
    let out = tmp("ref.mp4");
    let (h, w) = (img.height(), img.width());
    let mut wr = Mp4Writer::create(&out, &Mp4Options::new(w as u32, h as u32)).unwrap();
    for _ in 0..12 {
        wr.write_chw(&img.pixels).unwrap();
    }
    wr.finish().unwrap();
    let p = ffprobe(&out, false);
    let v = stream(&p, "video").unwrap();
    assert_eq!(
        (v["height"].as_u64().unwrap(), v["width"].as_u64().unwrap()),
        (planned.height, planned.width)
    );
    assert_eq!((planned.height, planned.width), (384, 704));
    assert!(stream(&p, "audio").is_none());
}

#[test]
fn audio_is_advanced_by_three_frames() {
    // A click at 0.52 s must sit at 0.40 s in the MP4 with audio_skip_frames = 3 (and stay at
    // 0.52 s with 0, the reference's mux).
    let rate = 16000u32;
    let mut pcm = vec![0f32; rate as usize * 2];
    let click = (0.52 * f64::from(rate)) as usize;
    for s in &mut pcm[click..click + 16] {
        *s = 0.9;
    }
    let wav = tmp("click.wav");
    write_wav_i16(&wav, &pcm, rate, 1).unwrap();
    for (skip, want) in [(3u32, 0.40f64), (0, 0.52)] {
        let out = tmp(&format!("click{skip}.mp4"));
        let mut opts = Mp4Options::new(64, 64);
        opts.audio = AudioIn::File(wav.clone());
        opts.audio_skip_frames = skip;
        let mut wr = Mp4Writer::create(&out, &opts).unwrap();
        for t in 0..40 {
            wr.write_chw(&pattern(t, 64, 64)).unwrap();
        }
        wr.finish().unwrap();
        let dec = Command::new(tool("ffmpeg"))
            .args(["-v", "error", "-i"])
            .arg(&out)
            .args(["-vn", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"])
            .output()
            .unwrap();
        assert!(dec.status.success());
        let s: Vec<f32> = dec
            .stdout
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // The AAC encoder's priming samples carry negative timestamps (an edit list).
        let start = num(&stream(&ffprobe(&out, false), "audio").unwrap()["start_time"]);
        let peak = s
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, _)| i as f64 / 16000.0 + start)
            .unwrap();
        assert!(
            (peak - want).abs() < 0.005,
            "skip {skip}: click at {peak} s, want {want}"
        );
    }
}

#[test]
fn finished_blocks_are_on_disk_while_writing() {
    let out = tmp("progressive.mp4");
    let (h, w) = (64usize, 64usize);
    let mut opts = Mp4Options::new(w as u32, h as u32);
    opts.audio = AudioIn::File(speech("speech-progressive.wav"));
    let mut wr = Mp4Writer::create(&out, &opts).unwrap();
    for t in 0..36 {
        wr.write_chw(&pattern(t, h, w)).unwrap();
    }
    wr.flush().unwrap();
    // Three blocks pushed: the first two must become readable without closing the writer.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut frames = 0.0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let probe = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-of",
                "json",
                "-count_frames",
                "-show_streams",
            ])
            .arg(&out)
            .output()
            .unwrap();
        if let Ok(p) = serde_json::from_slice::<serde_json::Value>(&probe.stdout)
            && let Some(v) = stream(&p, "video")
            && v.get("nb_read_frames").is_some()
        {
            frames = num(&v["nb_read_frames"]);
            if frames >= 24.0 {
                break;
            }
        }
    }
    assert!(
        frames >= 24.0,
        "only {frames} frames readable while writing"
    );
    // ffmpeg killed (a crash, no finalisation): what was on disk stays playable.
    wr.kill().unwrap();
    let p = ffprobe(&out, true);
    assert!(num(&stream(&p, "video").unwrap()["nb_read_frames"]) >= 24.0);
}

#[test]
fn dropping_the_writer_still_leaves_a_complete_file() {
    let out = tmp("dropped.mp4");
    {
        let mut wr = Mp4Writer::create(&out, &Mp4Options::new(64, 64)).unwrap();
        for t in 0..30 {
            wr.write_chw(&pattern(t, 64, 64)).unwrap();
        }
    }
    let p = ffprobe(&out, true);
    assert_eq!(num(&stream(&p, "video").unwrap()["nb_read_frames"]), 30.0);
}

#[test]
fn missing_ffmpeg_and_bad_input_are_clear_errors() {
    let mut opts = Mp4Options::new(64, 64);
    opts.ffmpeg = Some(PathBuf::from("/nonexistent/bin/ffmpeg"));
    let e = Mp4Writer::create(&tmp("none.mp4"), &opts).unwrap_err();
    assert!(matches!(e, MediaError::FfmpegMissing { .. }), "{e:?}");
    assert!(e.to_string().contains("ffmpeg not found"), "{e}");

    let e = Mp4Writer::create(&tmp("odd.mp4"), &Mp4Options::new(63, 64)).unwrap_err();
    assert!(e.to_string().contains("even"), "{e}");

    let mut opts = Mp4Options::new(64, 64);
    opts.audio = AudioIn::File(tmp("no-such-audio.wav"));
    assert!(matches!(
        Mp4Writer::create(&tmp("noaudio.mp4"), &opts).unwrap_err(),
        MediaError::Io { .. }
    ));

    let mut wr = Mp4Writer::create(&tmp("short-frame.mp4"), &Mp4Options::new(64, 64)).unwrap();
    assert!(wr.write_rgb24(&[0u8; 10]).is_err());
    wr.write_rgb24(&vec![0u8; 64 * 64 * 3]).unwrap();
    wr.finish().unwrap();

    let wr = Mp4Writer::create(&tmp("empty.mp4"), &Mp4Options::new(64, 64)).unwrap();
    assert!(wr.finish().is_err(), "no frames is an error");
}

#[test]
fn an_unwritable_output_is_an_ffmpeg_error_with_its_message() {
    let out = tmp("no-such-dir").join("x.mp4");
    let mut wr = Mp4Writer::create(&out, &Mp4Options::new(64, 64)).unwrap();
    // ffmpeg opens the output only after probing the input, so the failure shows on a write
    // (broken pipe) or at finish, with ffmpeg's own words either way.
    let mut result = Ok(());
    for t in 0..50 {
        result = wr.write_chw(&pattern(t, 64, 64));
        if result.is_err() {
            break;
        }
    }
    let err = match result {
        Err(e) => e,
        Ok(()) => wr.finish().unwrap_err(),
    };
    assert!(matches!(err, MediaError::Ffmpeg(_)), "{err:?}");
    assert!(
        err.to_string().contains("No such file or directory"),
        "{err}"
    );
}

/// Decoded speech as interleaved f32 (for the live-audio tests).
fn speech_pcm(name: &str) -> (Vec<f32>, u32, u16) {
    let a = media::audio::decode_file(&speech(name)).unwrap();
    (a.samples, a.sample_rate, a.channels as u16)
}

#[test]
fn live_audio_in_any_order_gives_a_complete_file() {
    let (pcm, rate, ch) = speech_pcm("speech-live.wav");
    let per_frame = (rate / 25) as usize * usize::from(ch);
    // Interleaved as a live server would, all audio first, all video first.
    for order in ["interleaved", "audio-first", "video-first"] {
        let out = tmp(&format!("live-{order}.mp4"));
        let mut opts = Mp4Options::new(64, 64);
        opts.audio = AudioIn::Live {
            sample_rate: rate,
            channels: ch,
        };
        let mut wr = Mp4Writer::create(&out, &opts).unwrap();
        let chunks: Vec<&[f32]> = pcm.chunks(per_frame).collect();
        match order {
            "interleaved" => {
                for (t, c) in chunks.iter().take(50).enumerate() {
                    wr.write_audio(c).unwrap();
                    wr.write_chw(&pattern(t, 64, 64)).unwrap();
                }
                for c in &chunks[50..] {
                    wr.write_audio(c).unwrap();
                }
            }
            "audio-first" => {
                wr.write_audio(&pcm).unwrap();
                for t in 0..50 {
                    wr.write_chw(&pattern(t, 64, 64)).unwrap();
                }
            }
            _ => {
                for t in 0..50 {
                    wr.write_chw(&pattern(t, 64, 64)).unwrap();
                }
                wr.write_audio(&pcm).unwrap();
            }
        }
        wr.finish().unwrap();
        let p = ffprobe(&out, true);
        let v = stream(&p, "video").unwrap();
        assert_eq!(num(&v["nb_read_frames"]), 50.0, "{order}");
        let a = stream(&p, "audio").expect("an audio stream");
        assert_eq!(a["codec_name"], "aac");
        let end = num(&a["start_time"]) + num(&a["duration"]);
        assert!((1.95..2.3).contains(&end), "{order}: audio ends at {end}");
    }
}

#[test]
fn live_audio_gets_the_same_three_frame_advance() {
    let rate = 16000u32;
    let mut pcm = vec![0f32; rate as usize * 2];
    let click = (0.52 * f64::from(rate)) as usize;
    for s in &mut pcm[click..click + 16] {
        *s = 0.9;
    }
    let out = tmp("click-live.mp4");
    let mut opts = Mp4Options::new(64, 64);
    opts.audio = AudioIn::Live {
        sample_rate: rate,
        channels: 1,
    };
    opts.expected_frames = Some(40);
    let mut wr = Mp4Writer::create(&out, &opts).unwrap();
    for (t, chunk) in pcm.chunks(640).enumerate() {
        wr.write_audio(chunk).unwrap();
        if t < 40 {
            wr.write_chw(&pattern(t, 64, 64)).unwrap();
        }
    }
    wr.finish().unwrap();
    let dec = Command::new(tool("ffmpeg"))
        .args(["-v", "error", "-i"])
        .arg(&out)
        .args(["-vn", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"])
        .output()
        .unwrap();
    let s: Vec<f32> = dec
        .stdout
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let start = num(&stream(&ffprobe(&out, false), "audio").unwrap()["start_time"]);
    let peak = s
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .map(|(i, _)| i as f64 / 16000.0 + start)
        .unwrap();
    assert!((peak - 0.40).abs() < 0.005, "click at {peak} s");
}

#[test]
fn live_audio_misuse_is_an_error() {
    let mut wr = Mp4Writer::create(&tmp("no-live.mp4"), &Mp4Options::new(64, 64)).unwrap();
    assert!(
        wr.write_audio(&[0.0; 4]).is_err(),
        "no live audio configured"
    );
    wr.write_chw(&pattern(0, 64, 64)).unwrap();
    wr.finish().unwrap();
    let mut opts = Mp4Options::new(64, 64);
    opts.audio = AudioIn::Live {
        sample_rate: 16000,
        channels: 2,
    };
    let mut wr = Mp4Writer::create(&tmp("live-odd.mp4"), &opts).unwrap();
    assert!(wr.write_audio(&[0.0; 3]).is_err(), "half a stereo frame");
    wr.write_audio(&[0.0; 3200]).unwrap();
    wr.write_chw(&pattern(0, 64, 64)).unwrap();
    wr.finish().unwrap();
}
