//! Frames → H.264 MP4 at 25 fps with the driving audio as AAC, through the system ffmpeg
//! (ffmpeg-sidecar without its download feature).
//!
//! Written progressively: raw RGB frames go to ffmpeg's stdin as blocks arrive and the output
//! is a fragmented MP4 (`frag_keyframe+delay_moov`: the moov waits for the first fragment so
//! it can carry the AAC priming edit list) with a keyframe at every block boundary and
//! no encoder lookahead (`-tune zerolatency`), so each finished block is on disk as a playable
//! fragment once the next block's first frame is encoded. If this process dies, ffmpeg sees
//! EOF and finalises the file; if ffmpeg itself is killed, only the fragment in progress is
//! lost. Audio comes from a file or live ([`AudioIn`]). See docs/media.md for the audio offset
//! (`audio_skip_frames`).

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use ffmpeg_sidecar::child::FfmpegChild;
use ffmpeg_sidecar::command::FfmpegCommand;
use ffmpeg_sidecar::event::{FfmpegEvent, LogLevel};

use crate::error::{MediaError, Result};
use crate::pipe::{Feeder, Fifo};

/// Where the muxed audio comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum AudioIn {
    /// Video only.
    None,
    /// The driving audio file (any format ffmpeg reads).
    File(PathBuf),
    /// Pushed with [`Mp4Writer::write_audio`] as it arrives: interleaved f32 samples.
    Live { sample_rate: u32, channels: u16 },
}

/// Options of [`Mp4Writer`].
#[derive(Debug, Clone)]
pub struct Mp4Options {
    /// The ffmpeg binary; `None`: ffmpeg-sidecar's rule (next to the executable, else `PATH`).
    pub ffmpeg: Option<PathBuf>,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Frames per block: the keyframe (and fragment) interval.
    pub block_frames: u32,
    /// Driving audio, muxed as AAC.
    pub audio: AudioIn,
    /// Video frames' worth of audio (1/fps each) cut from the start of the audio. The reference
    /// drops the first 3 generated frames but muxes the audio from 0, so its video leads by
    /// 120 ms; 3 here puts every frame next to the audio that drove it, 0 reproduces the
    /// reference.
    pub audio_skip_frames: u32,
    /// When the final frame count is known up front, the audio is cut to exactly that length.
    /// Otherwise `-shortest` ends it, which in ffmpeg 5.1 lets the AAC track run up to ~0.25 s
    /// past the last video frame.
    pub expected_frames: Option<u64>,
    pub crf: u32,
    pub preset: String,
    pub audio_bitrate: String,
}

impl Mp4Options {
    /// lava's defaults: 25 fps, 12-frame blocks, audio in sync (skip 3 frames), crf 18.
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            ffmpeg: None,
            width,
            height,
            fps: 25,
            block_frames: 12,
            audio: AudioIn::None,
            audio_skip_frames: 3,
            expected_frames: None,
            crf: 18,
            preset: "veryfast".into(),
            audio_bitrate: "192k".into(),
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoSummary {
    pub path: PathBuf,
    pub frames: u64,
}

/// A progressive MP4 writer around one ffmpeg process.
pub struct Mp4Writer {
    child: FfmpegChild,
    video: Feeder,
    /// Live audio: its feeder, FIFO and channel count.
    audio: Option<(Feeder, Fifo, u16)>,
    events: Option<JoinHandle<Vec<String>>>,
    path: PathBuf,
    frame_bytes: usize,
    width: u32,
    height: u32,
    frames: u64,
    done: bool,
}

impl std::fmt::Debug for Mp4Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mp4Writer")
            .field("path", &self.path)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

/// The ffmpeg that [`Mp4Options::ffmpeg`] names, checked by running `-version`.
pub fn check_ffmpeg(ffmpeg: Option<&Path>) -> Result<PathBuf> {
    let path = ffmpeg.map_or_else(ffmpeg_sidecar::paths::ffmpeg_path, Path::to_path_buf);
    let ok = std::process::Command::new(&path)
        .arg("-version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(path)
    } else {
        Err(MediaError::FfmpegMissing {
            path: path.display().to_string(),
        })
    }
}

impl Mp4Writer {
    pub fn create(path: &Path, opts: &Mp4Options) -> Result<Self> {
        let (w, h) = (opts.width, opts.height);
        if w == 0 || h == 0 || w % 2 != 0 || h % 2 != 0 {
            return Err(MediaError::Video(format!(
                "{w}×{h}: H.264 in yuv420p needs even, non-zero width and height"
            )));
        }
        if opts.fps == 0 || opts.block_frames == 0 {
            return Err(MediaError::Video("fps and block_frames must be > 0".into()));
        }
        if let AudioIn::File(a) = &opts.audio
            && !a.is_file()
        {
            return Err(MediaError::io(
                a,
                std::io::Error::new(std::io::ErrorKind::NotFound, "audio file not found"),
            ));
        }
        let ffmpeg = check_ffmpeg(opts.ffmpeg.as_deref())?;
        let g = opts.block_frames.to_string();
        let mut cmd = FfmpegCommand::new_with_path(&ffmpeg);
        cmd.hide_banner()
            .args(["-f", "rawvideo", "-pix_fmt", "rgb24"])
            .args(["-s", &format!("{w}x{h}"), "-r", &opts.fps.to_string()])
            .input("-");
        let mut fifo = None;
        match &opts.audio {
            AudioIn::None => {}
            AudioIn::File(audio) => {
                cmd.input(audio.as_os_str());
            }
            AudioIn::Live {
                sample_rate,
                channels,
            } => {
                if *sample_rate == 0 || *channels == 0 {
                    return Err(MediaError::Video(format!(
                        "live audio: {channels} channels at {sample_rate} Hz"
                    )));
                }
                let f = Fifo::new("audio")?;
                cmd.args(["-f", "f32le", "-ar", &sample_rate.to_string()])
                    .args(["-ac", &channels.to_string()])
                    .input(f.path.as_os_str());
                fifo = Some((f, *channels));
            }
        }
        if opts.audio != AudioIn::None {
            cmd.args(["-map", "0:v:0", "-map", "1:a:0"]);
            let fps = f64::from(opts.fps);
            let start = f64::from(opts.audio_skip_frames) / fps;
            let end = opts
                .expected_frames
                .map(|n| format!(":end={}", start + n as f64 / fps))
                .unwrap_or_default();
            // apad: audio shorter than the video (its last clip is zero-padded, §10.3) must not
            // end the mux under -shortest while frames are still being written; it ends in
            // silence instead.
            cmd.args([
                "-af",
                &format!("apad,atrim=start={start}{end},asetpts=PTS-STARTPTS"),
            ]);
            cmd.codec_audio("aac")
                .args(["-b:a", &opts.audio_bitrate, "-shortest"]);
        } else {
            cmd.args(["-map", "0:v:0"]);
        }
        cmd.codec_video("libx264")
            .pix_fmt("yuv420p")
            .crf(opts.crf)
            .preset(&opts.preset)
            .args(["-tune", "zerolatency", "-g", &g, "-keyint_min", &g])
            .args(["-sc_threshold", "0", "-r", &opts.fps.to_string()])
            .args(["-movflags", "frag_keyframe+delay_moov+default_base_moof"])
            .args(["-flush_packets", "1", "-f", "mp4"])
            .overwrite()
            .output(path.as_os_str());
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                MediaError::FfmpegMissing {
                    path: ffmpeg.display().to_string(),
                }
            } else {
                MediaError::Ffmpeg(format!("spawning {}: {e}", ffmpeg.display()))
            }
        })?;
        let Some(stdin) = child.take_stdin() else {
            let _ = child.kill();
            return Err(MediaError::Ffmpeg("ffmpeg's stdin is not piped".into()));
        };
        let video = Feeder::new(stdin);
        let audio = fifo.map(|(f, ch)| (Feeder::fifo(f.path.clone()), f, ch));
        let mut iter = child
            .iter()
            .map_err(|e| MediaError::Ffmpeg(format!("reading ffmpeg's log: {e}")))?;
        // ffmpeg blocks once its stderr pipe is full, so the log is drained on its own thread.
        let events = std::thread::spawn(move || {
            let mut errors = Vec::new();
            for ev in iter.by_ref() {
                match ev {
                    FfmpegEvent::Log(LogLevel::Error | LogLevel::Fatal, msg) => errors.push(msg),
                    FfmpegEvent::Error(msg) => errors.push(msg),
                    _ => {}
                }
            }
            errors
        });
        let frame_bytes = w as usize * h as usize * 3;
        Ok(Self {
            child,
            video,
            audio,
            events: Some(events),
            path: path.to_path_buf(),
            frame_bytes,
            width: w,
            height: h,
            frames: 0,
            done: false,
        })
    }

    pub fn frames_written(&self) -> u64 {
        self.frames
    }

    /// One frame of `height × width × 3` RGB bytes (queued; ffmpeg is fed on its own thread).
    pub fn write_rgb24(&mut self, rgb: &[u8]) -> Result<()> {
        self.send_frame(rgb.to_vec())
    }

    fn send_frame(&mut self, rgb: Vec<u8>) -> Result<()> {
        if rgb.len() != self.frame_bytes {
            return Err(MediaError::Video(format!(
                "frame of {} bytes, expected {}×{}×3 = {}",
                rgb.len(),
                self.height,
                self.width,
                self.frame_bytes
            )));
        }
        self.video.send(rgb)?;
        self.frames += 1;
        Ok(())
    }

    /// One frame as [3, H, W] floats in [−1, 1] (converted as the reference does).
    pub fn write_chw(&mut self, chw: &[f32]) -> Result<()> {
        let mut rgb = Vec::with_capacity(self.frame_bytes);
        rgb24_from_chw(chw, self.height as usize, self.width as usize, &mut rgb)?;
        self.send_frame(rgb)
    }

    /// Live audio ([`AudioIn::Live`]): interleaved samples in [−1, 1], any amount per call.
    pub fn write_audio(&mut self, interleaved: &[f32]) -> Result<()> {
        let Some((feeder, _, channels)) = &self.audio else {
            return Err(MediaError::Video(
                "write_audio needs Mp4Options::audio = AudioIn::Live".into(),
            ));
        };
        if !interleaved.len().is_multiple_of(usize::from(*channels)) {
            return Err(MediaError::Video(format!(
                "{} samples is not a whole number of {channels}-channel frames",
                interleaved.len()
            )));
        }
        feeder.send(interleaved.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A decoded block [3, T, H, W] in [−1, 1]; flushed to ffmpeg before returning.
    pub fn write_block_cthw(&mut self, block: &[f32], frames: usize) -> Result<()> {
        let (h, w) = (self.height as usize, self.width as usize);
        if block.len() != 3 * frames * h * w {
            return Err(MediaError::Video(format!(
                "block of {} values, expected 3×{frames}×{h}×{w}",
                block.len()
            )));
        }
        let mut chw = vec![0f32; 3 * h * w];
        for t in 0..frames {
            for c in 0..3 {
                let src = &block[(c * frames + t) * h * w..][..h * w];
                chw[c * h * w..][..h * w].copy_from_slice(src);
            }
            self.write_chw(&chw)?;
        }
        self.flush()
    }

    /// Frames are handed to ffmpeg as they are queued; this reports a failed ffmpeg early.
    pub fn flush(&mut self) -> Result<()> {
        match self.video.error() {
            Some(e) => Err(MediaError::Ffmpeg(format!("writing to ffmpeg: {e}"))),
            None => Ok(()),
        }
    }

    /// Close the inputs, wait for ffmpeg to finish the file, and report its errors if it failed.
    pub fn finish(mut self) -> Result<VideoSummary> {
        let (status, errors) = self.shut_down(false);
        let status = status.map_err(|e| MediaError::Ffmpeg(format!("waiting for ffmpeg: {e}")))?;
        if !status.success() {
            return Err(MediaError::Ffmpeg(format!(
                "exit status {status} writing {}: {}",
                self.path.display(),
                errors.join("; ")
            )));
        }
        if self.frames == 0 {
            return Err(MediaError::Video(format!(
                "{}: no frames were written",
                self.path.display()
            )));
        }
        Ok(VideoSummary {
            path: self.path.clone(),
            frames: self.frames,
        })
    }

    /// Kill ffmpeg without letting it finalise (what a crash of ffmpeg leaves behind).
    pub fn kill(mut self) -> Result<()> {
        let (status, _) = self.shut_down(true);
        status
            .map(|_| ())
            .map_err(|e| MediaError::Ffmpeg(format!("killing ffmpeg: {e}")))
    }

    /// End of input (or a kill), then ffmpeg's exit, then the feeder threads and the log.
    fn shut_down(
        &mut self,
        kill: bool,
    ) -> (std::io::Result<std::process::ExitStatus>, Vec<String>) {
        self.done = true;
        if kill {
            let _ = self.child.kill();
        }
        self.video.close();
        if let Some((feeder, _, _)) = self.audio.as_mut() {
            feeder.close();
        }
        let status = self.child.wait();
        self.video.join(None);
        if let Some((feeder, fifo, _)) = self.audio.as_mut() {
            feeder.join(Some(&fifo.path));
        }
        let errors = self
            .events
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (status, errors)
    }
}

impl Drop for Mp4Writer {
    /// Closing the inputs lets ffmpeg finalise what it has: an abandoned writer still leaves a
    /// playable file.
    fn drop(&mut self) {
        if !self.done {
            let _ = self.shut_down(false);
        }
    }
}

/// The reference's pixel conversion: clamp to [−1, 1], (x + 1) / 2, × 255, truncate to u8;
/// [3, H, W] planar in, H×W×3 interleaved out.
pub fn rgb24_from_chw(chw: &[f32], h: usize, w: usize, out: &mut Vec<u8>) -> Result<()> {
    let n = h * w;
    if chw.len() != 3 * n {
        return Err(MediaError::Video(format!(
            "frame of {} values, expected 3×{h}×{w}",
            chw.len()
        )));
    }
    out.clear();
    out.resize(3 * n, 0);
    for c in 0..3 {
        for (i, &v) in chw[c * n..(c + 1) * n].iter().enumerate() {
            out[i * 3 + c] = (((v.clamp(-1.0, 1.0) + 1.0) / 2.0) * 255.0) as u8;
        }
    }
    Ok(())
}

/// Write 16-bit PCM WAV (e.g. audio received live, so it can be muxed).
pub fn write_wav_i16(path: &Path, samples: &[f32], sample_rate: u32, channels: u16) -> Result<()> {
    let spec = hound::WavSpec {
        channels,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let err = |e: hound::Error| MediaError::Video(format!("{}: {e}", path.display()));
    let mut wr = hound::WavWriter::create(path, spec).map_err(err)?;
    for &s in samples {
        wr.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)
            .map_err(err)?;
    }
    wr.finalize().map_err(err)
}
