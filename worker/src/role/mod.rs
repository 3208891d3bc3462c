//! The per-rank generation loop of the simplest TPP layout: one DiT rank running every
//! denoising step of every block (one step-cache per step, as TPP stages would hold them) and a
//! dedicated VAE rank, latents passed rank to rank over the socket communicator (§6.1, §6.3).
//!
//! ```text
//! VAE rank: image ─ encode ─▶ ref [16,1,h,w], motion [16,19,h,w] ──send──▶ DiT rank
//! DiT rank: StreamRunner per clip ─ each block's final latents [16,3,h,w] ──send──▶ VAE rank
//! VAE rank: prime with 7 motion latents, decode each block, frames ─▶ callback
//! ```
//!
//! Both ranks preprocess the image and audio themselves (cheap, deterministic), so only the
//! VAE latents and the denoised blocks travel.

pub mod dit;
pub mod tiny;
pub mod vae;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use planner::ModelSpec;
use planner::size::SizeArg;
use runtime::comm::SocketComm;
use runtime::models::wan::StreamGeometry;
use runtime::{DType, Device, Tensor};

/// Latent frames of the motion context the VAE rank decodes (and discards) to prime its caches.
pub const PRIME_LATENTS: usize = 7;
/// Frames of the motion context (§10.2): 73 frames ⇒ 19 latents.
pub const MOTION_FRAMES: usize = 73;
/// Video frames dropped at the start of the first block (§6.4).
pub const DROPPED_FRAMES: usize = 3;

/// One generation as every rank receives it.
#[derive(Debug, Clone)]
pub struct Job {
    pub image: PathBuf,
    pub audio: PathBuf,
    pub prompt: String,
    pub size: SizeArg,
    pub num_clip: usize,
    pub seed: u64,
    /// Echoed in frame chunks.
    pub request_id: String,
    /// (width, height) the coordinator planned; refused when the image resolves otherwise.
    pub expect_size: Option<(usize, usize)>,
}

/// Inputs derived identically on every rank.
#[derive(Debug)]
pub struct Prepared {
    pub spec: ModelSpec,
    /// Output height and width in pixels.
    pub height: usize,
    pub width: usize,
    /// `[1, 3, 1, H, W]` in [−1, 1].
    pub image: Tensor,
    /// `[1, audio_layers, audio_dim, 48·clips]`.
    pub audio: Tensor,
    /// `[text_len, text_dim]`.
    pub context: Tensor,
    pub clips: usize,
    pub geometry: StreamGeometry,
}

impl Prepared {
    /// Blocks per clip.
    pub fn blocks_per_clip(&self) -> usize {
        self.geometry.ring_frames / self.geometry.frames_per_block
    }
}

/// Load and preprocess the job's image and audio for the tiny model (§10.1, §10.3 timing).
pub fn prepare(job: &Job) -> Result<Prepared> {
    let spec = ModelSpec::builtin("tiny").context("the built-in tiny model")?;
    let img = media::image::load_reference_image(&job.image, job.size)
        .with_context(|| format!("reference image {}", job.image.display()))?;
    let (height, width) = (img.height(), img.width());
    let image = Tensor::from_vec(img.pixels, (1, 3, 1, height, width), &Device::Cpu)?;
    let samples = media::audio::load_16k_mono(&job.audio)
        .with_context(|| format!("driving audio {}", job.audio.display()))?;
    let timing = media::frames::timing(samples.len())?;
    let clips = job.num_clip.min(timing.clips);
    if clips == 0 {
        bail!("--num_clip must be at least 1");
    }
    let s = &spec.stream;
    let frames_per_clip = s.infer_frames as usize;
    let (layers, dim) = (spec.dit.audio_layers as usize, spec.dit.audio_dim as usize);
    let audio = tiny::audio_features(&samples, layers, dim, frames_per_clip * clips)?;
    let context = tiny::text_context(&job.prompt, &spec)?;
    let geometry = StreamGeometry::new(
        height / 8,
        width / 8,
        s.frames_per_block as usize,
        s.latents_per_clip as usize,
    )?;
    Ok(Prepared {
        spec,
        height,
        width,
        image,
        audio,
        context,
        clips,
        geometry,
    })
}

/// Receive timeout while generating (see [`Loaded::generate`]).
const GENERATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Seed of the tiny model's random weights (fixed: the built-in model is one model).
pub const TINY_WEIGHT_SEED: u64 = 0;

/// Where the VAE rank puts each decoded block: RGB24 frame chunks for the Frames stream.
pub type FrameSink = tokio::sync::mpsc::Sender<proto::frames::v1::FrameChunk>;

/// A loaded rank model.
#[derive(Debug)]
pub enum Loaded {
    Dit(Box<runtime::models::wan::CausalWanModelS2V>),
    Vae(Box<runtime::models::vae::WanVae>),
}

fn internal(e: impl std::fmt::Display) -> crate::compute::Failure {
    (proto::ErrorKind::Internal, format!("{e:#}"))
}

fn load_failure(e: impl std::fmt::Display) -> crate::compute::Failure {
    (proto::ErrorKind::LoadFailure, format!("{e:#}"))
}

/// A communicator failure (lost or silent peer) is a lost peer; anything else internal.
fn classify(e: anyhow::Error) -> crate::compute::Failure {
    let lost = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<runtime::Error>(),
            Some(runtime::Error::Comm {
                kind: runtime::comm::CommErrorKind::PeerLost { .. }
                    | runtime::comm::CommErrorKind::Timeout { .. },
                ..
            })
        )
    });
    let kind = if lost {
        proto::ErrorKind::PeerLost
    } else {
        proto::ErrorKind::Internal
    };
    (kind, format!("{e:#}"))
}

impl Loaded {
    /// The built-in tiny model's part for this rank; checkpoints are refused (not wired yet).
    pub fn load(name: &str, ckpt_dir: &str, vae: bool) -> Result<Self, crate::compute::Failure> {
        if !ckpt_dir.is_empty() || name != "tiny" {
            return Err((
                proto::ErrorKind::Unsupported,
                format!(
                    "model {name:?} with checkpoint {ckpt_dir:?}: only the built-in tiny model \
                     (no --ckpt_dir) runs in this build"
                ),
            ));
        }
        let spec = ModelSpec::builtin("tiny").map_err(internal)?;
        Ok(if vae {
            Loaded::Vae(Box::new(
                tiny::vae(&spec, TINY_WEIGHT_SEED).map_err(load_failure)?,
            ))
        } else {
            Loaded::Dit(Box::new(
                tiny::dit(&spec, TINY_WEIGHT_SEED).map_err(load_failure)?,
            ))
        })
    }

    /// Bytes of weights held (the DiT's from the tiny spec's parameter count, f32).
    pub fn weight_bytes(&self) -> u64 {
        let spec = match ModelSpec::builtin("tiny") {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let params = match self {
            Loaded::Dit(_) => planner::params::DitParams::new(&spec.dit).total(),
            Loaded::Vae(_) => planner::params::vae_params(&spec.vae).total(),
        };
        4 * params
    }

    /// One generation on this rank: (blocks, frames).
    pub fn generate(
        &self,
        comm: &SocketComm,
        peer: usize,
        job: &Job,
        frames: Option<FrameSink>,
    ) -> Result<(usize, usize), crate::compute::Failure> {
        let p = prepare(job).map_err(|e| (proto::ErrorKind::BadInput, format!("{e:#}")))?;
        if let Some((w, h)) = job.expect_size
            && (w, h) != (p.width, p.height)
        {
            return Err((
                proto::ErrorKind::BadInput,
                format!(
                    "the image resolves to {}×{} here, the coordinator planned {w}×{h}",
                    p.width, p.height
                ),
            ));
        }
        // A rank waits for its peer's compute (a whole clip, the motion-context encode), which
        // on slow CPUs exceeds the collective timeout; a dead peer still fails at once (its
        // sockets close), so only a hung one waits this long.
        let usual = comm.timeout();
        comm.set_timeout(usual.max(GENERATE_TIMEOUT));
        let out = self.generate_inner(comm, peer, job, &p, frames);
        comm.set_timeout(usual);
        out
    }

    fn generate_inner(
        &self,
        comm: &SocketComm,
        peer: usize,
        job: &Job,
        p: &Prepared,
        frames: Option<FrameSink>,
    ) -> Result<(usize, usize), crate::compute::Failure> {
        match self {
            Loaded::Dit(m) => dit::run(comm, peer, m, p, job.seed)
                .map(|b| (b, 0))
                .map_err(classify),
            Loaded::Vae(v) => {
                let mut total = 0;
                let blocks = vae::run(comm, peer, v, p, |b| {
                    total += b.frames;
                    if let Some(sink) = &frames {
                        let chunk = frame_chunk(&job.request_id, p, &b)?;
                        // A coordinator that went away is not this rank's failure.
                        let _ = sink.blocking_send(chunk);
                    }
                    Ok(())
                })
                .map_err(classify)?;
                Ok((blocks, total))
            }
        }
    }
}

fn unix_ns(t: std::time::Instant) -> u64 {
    let now_sys = std::time::SystemTime::now();
    let ago = t.elapsed();
    now_sys
        .checked_sub(ago)
        .and_then(|s| s.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A decoded block as an RGB24 frame chunk (§6.5 pixel conversion).
fn frame_chunk(
    request_id: &str,
    p: &Prepared,
    b: &vae::BlockFrames,
) -> Result<proto::frames::v1::FrameChunk> {
    use proto::frames::v1 as fpb;
    let (h, w, t) = (p.height, p.width, b.frames);
    let mut data = Vec::with_capacity(3 * t * h * w);
    let mut chw = vec![0f32; 3 * h * w];
    let mut rgb = Vec::new();
    for f in 0..t {
        for c in 0..3 {
            let src = (c * t + f) * h * w;
            chw[c * h * w..(c + 1) * h * w].copy_from_slice(&b.pixels[src..src + h * w]);
        }
        media::video::rgb24_from_chw(&chw, h, w, &mut rgb)?;
        data.extend_from_slice(&rgb);
    }
    let total_blocks = p.clips * p.blocks_per_clip();
    let u = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(fpb::FrameChunk {
        request_id: request_id.to_string(),
        block_index: u(b.block),
        clip_index: u(b.clip),
        frame_start: u(b.frame_start),
        frame_count: u(t),
        width: u(w),
        height: u(h),
        pixel_format: fpb::PixelFormat::Rgb24.into(),
        data,
        latents_received_unix_ns: unix_ns(b.received),
        decode_start_unix_ns: unix_ns(b.decode_start),
        decode_end_unix_ns: unix_ns(b.decode_end),
        sent_unix_ns: unix_ns(std::time::Instant::now()),
        last: b.block + 1 == total_blocks,
    })
}

/// Sends an f32 tensor's values (the receiver knows the shape).
pub fn send_tensor(comm: &SocketComm, t: &Tensor, peer: usize) -> Result<()> {
    let v = t.to_vec_f32()?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    comm.send_bytes(&bytes, peer)
        .with_context(|| format!("sending {:?} to rank {peer}", t.dims()))
}

/// Receives an f32 tensor of `shape` sent by [`send_tensor`].
pub fn recv_tensor(comm: &SocketComm, shape: &[usize], peer: usize) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut bytes = vec![0u8; 4 * n];
    comm.recv_bytes(&mut bytes, peer)
        .with_context(|| format!("receiving {shape:?} from rank {peer}"))?;
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::from_vec(v, shape.to_vec(), &Device::Cpu)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;
    use std::path::Path;
    use std::time::Duration;

    use runtime::comm::SocketOptions;

    use super::*;

    pub(crate) fn test_job(num_clip: usize) -> Job {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../media/tests/data");
        Job {
            image: data.join("boy.jpg"),
            audio: data.join("speech_44k.mp3"),
            prompt: "a boy talking".into(),
            size: SizeArg::parse("128*64").unwrap(),
            num_clip,
            seed: 420,
            request_id: "t".into(),
            expect_size: None,
        }
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (d / n).sqrt()
    }

    /// DiT rank and VAE rank on two threads over the socket communicator: the latents the VAE
    /// rank receives equal a single-process StreamRunner run on the same seed, and the frame
    /// count is 48·N − 3.
    #[test]
    fn two_rank_latents_equal_the_single_process_run() {
        let job = test_job(2);
        let p = prepare(&job).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = SocketOptions {
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        };
        let dit_job = job.clone();
        let dit = std::thread::spawn(move || {
            let comm = SocketComm::host(listener, 2, opts).unwrap();
            let p = prepare(&dit_job).unwrap();
            let model = tiny::dit(&p.spec, 1).unwrap();
            dit::run(&comm, 1, &model, &p, dit_job.seed).unwrap()
        });
        let comm = SocketComm::join(addr, 1, 2, opts).unwrap();
        let vae = tiny::vae(&p.spec, 2).unwrap();
        let mut got = Vec::new();
        let mut frames = 0;
        let blocks = vae::run(&comm, 0, &vae, &p, |b| {
            assert_eq!(b.frame_start, frames);
            assert_eq!(b.pixels.len(), 3 * b.frames * p.height * p.width);
            assert!(b.pixels.iter().all(|v| v.is_finite() && v.abs() <= 1.0));
            frames += b.frames;
            got.extend(b.latents.to_vec_f32()?);
            Ok(())
        })
        .unwrap();
        assert_eq!(dit.join().unwrap(), blocks);
        assert_eq!(blocks, p.clips * p.blocks_per_clip());
        assert_eq!(frames, 48 * p.clips - 3);

        // The same generation in one process.
        let model = tiny::dit(&p.spec, 1).unwrap();
        let (r, m) = vae::encode_conditions(&vae, &p).unwrap();
        let mut want = Vec::new();
        dit::generate(&model, &p, job.seed, r, m, |_, _, x| {
            want.extend(x.to_vec_f32()?);
            Ok(())
        })
        .unwrap();
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-6, "rel L2 {err}");
        assert!(want.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn tiny_weights_and_inputs_are_deterministic() {
        let spec = ModelSpec::builtin("tiny").unwrap();
        let a = tiny::text_context("hello", &spec)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        assert_eq!(
            a,
            tiny::text_context("hello", &spec)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        );
        assert_ne!(
            a,
            tiny::text_context("hellp", &spec)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        );
        let samples: Vec<f32> = (0..16_000).map(|i| (i as f32 * 0.01).sin()).collect();
        let f = tiny::audio_features(&samples, 2, 16, 48).unwrap();
        assert_eq!(f.dims(), &[1, 2, 16, 48]);
        let v = f.to_vec_f32().unwrap();
        // Frame 24 starts at 15 360 samples: real audio; frame 25 would start past the end.
        assert!(v[24] != 0.0 && v[25] == 0.0);
        // Layer 1 is layer 0 scaled by 2.
        assert_eq!(v[16 * 48 + 24], 2.0 * v[24]);
    }
}
