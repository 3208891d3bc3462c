//! The per-rank generation loop of a TPP layout (§6.1, §6.3): one rank per TPP stage, each
//! with the step-caches of its own steps, and the VAE on a dedicated rank or co-located on the
//! last stage; latents pass rank to rank over the communicator ([`topology`] has the wiring).
//!
//! ```text
//! decoder: image ─ encode ─▶ ref [16,1,h,w], motion [16,19,h,w] ──send──▶ every DiT rank
//! stage s: per block: noise (s = 0) or latents from stage s−1 ─ its steps ─▶ stage s+1
//! last stage: each block's final latents [16,3,h,w] ──▶ decoder (as soon as the block is done)
//! decoder: prime with 7 motion latents, decode each block, frames ─▶ coordinator
//! ```
//!
//! Every rank preprocesses the image and audio itself (cheap, deterministic), so only the VAE
//! latents, the denoised blocks and the clip-1 sink travel.

pub mod ckpt;
pub mod dit;
pub mod random;
pub mod scatter;
pub mod topology;
pub mod vae;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use planner::ModelSpec;
use planner::size::SizeArg;
use runtime::comm::Comm;
use runtime::models::wan::StreamGeometry;
use runtime::parallel::{DitLayout, Groups};
use runtime::{DType, Device, Shape, Tensor};

use topology::Topology;

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
    /// Video frames per clip (`--infer_frames`).
    pub infer_frames: u64,
    /// Denoising steps per block (`--sample_steps`).
    pub sample_steps: u64,
    pub seed: u64,
    /// Echoed in frame chunks.
    pub request_id: String,
    /// (width, height) the coordinator planned; refused when the image resolves otherwise.
    pub expect_size: Option<(usize, usize)>,
    /// The decoding rank writes every block's final latents here (raw little-endian f32,
    /// `[C, fpb, h, w]` per block, in order).
    pub save_latents: Option<PathBuf>,
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

/// Load and preprocess the job's image and audio for `spec` (§10.1, §10.3 timing); the text
/// context and audio features are the random model's ([`random`]), replaced by the encoders'
/// on a checkpoint run.
pub fn prepare(job: &Job, spec: &ModelSpec) -> Result<Prepared> {
    let mut spec = spec.clone();
    spec.set_workload(job.infer_frames, job.sample_steps)?;
    let img = media::image::load_reference_image(&job.image, job.size)
        .with_context(|| format!("reference image {}", job.image.display()))?;
    let (height, width) = (img.height(), img.width());
    let image = Tensor::from_vec(img.pixels, (1, 3, 1, height, width), &Device::Cpu)?;
    let samples = media::audio::load_16k_mono(&job.audio)
        .with_context(|| format!("driving audio {}", job.audio.display()))?;
    let timing = media::frames::timing(samples.len())?;
    let frames_per_clip = spec.stream.infer_frames as usize;
    let clips = job
        .num_clip
        .min(media::frames::num_clips_for(timing.t30, frames_per_clip));
    if clips == 0 {
        bail!("--num_clip must be at least 1");
    }
    let s = &spec.stream;
    let (layers, dim) = (spec.dit.audio_layers as usize, spec.dit.audio_dim as usize);
    let audio = random::audio_features(&samples, layers, dim, frames_per_clip * clips)?;
    let context = random::text_context(&job.prompt, &spec)?;
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

/// Seed of the random models' weights (fixed: one spec, one model).
pub const WEIGHT_SEED: u64 = 0;

/// Where the VAE rank puts each decoded block: RGB24 frame chunks for the Frames stream.
pub type FrameSink = tokio::sync::mpsc::Sender<proto::frames::v1::FrameChunk>;

/// This rank's models: the DiT on DiT ranks, the VAE on the decoding rank (both when the
/// VAE is co-located on the last stage).
#[derive(Debug)]
pub struct Loaded {
    pub spec: ModelSpec,
    /// Dtype of the weights and activations (f32 on CPU ranks, bf16 on GPUs).
    pub dtype: DType,
    pub dit: Option<Box<runtime::models::wan::CausalWanModelS2V>>,
    pub vae: Option<Box<runtime::models::vae::WanVae>>,
    /// umT5 and wav2vec2 on the decoding rank of a checkpoint run (`--ckpt_dir`).
    pub encoders: Option<Box<ckpt::Encoders>>,
    /// Loaded from `--ckpt_dir`: the decoding rank encodes the prompt and audio and sends them.
    pub from_ckpt: bool,
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

/// What one rank did in a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generated {
    pub blocks: usize,
    /// Frames decoded (0 on ranks that do not decode).
    pub frames: usize,
}

impl Loaded {
    /// This rank's parts on `device` in `dtype`: random weights of the model `name` (built in
    /// or a spec file), or with `ckpt` the checkpoint folder, validated whole (names, shapes,
    /// the LoRA's fit) before anything large is allocated. When a stage is split over ranks,
    /// every rank (the VAE rank too) first forms its tp / Ulysses / pp groups over `comm`
    /// (collective), and a DiT rank loads its part of the layout.
    pub fn load(
        (name, dtype): (&str, DType),
        ckpt: Option<&ckpt::CkptRequest>,
        (dit, vae): (bool, bool),
        device: Device,
        comm: Option<&dyn Comm>,
        topo: &Topology,
    ) -> Result<Self, crate::compute::Failure> {
        let spec = proto::plan::model_spec(name)
            .map_err(|e| (proto::ErrorKind::BadInput, format!("{e:#}")))?;
        let validated = match ckpt {
            Some(req) => Some(scatter::Plan::agree(req, &spec, comm, device)?),
            None => None,
        };
        let layout = if topo.split_stages() {
            let comm = comm.ok_or_else(|| internal("a split stage needs a communicator"))?;
            let groups = Groups::split_dit(comm, &topo.mesh).map_err(|e| classify(e.into()))?;
            match groups {
                Some(g) => DitLayout::new(&g, &topo.mesh, spec.dit.num_layers as usize, topo.fsdp)
                    .map_err(load_failure)?,
                None => DitLayout::single(),
            }
        } else {
            DitLayout::single()
        };
        let _w = runtime::memory::scope(runtime::memory::Category::Weights);
        if let (Some(v), Some(req)) = (&validated, ckpt) {
            let parts = v.load(req, &spec, dtype, (dit, vae), (device, comm), &layout)?;
            return Ok(Loaded {
                spec,
                dtype,
                dit: parts.dit.map(Box::new),
                vae: parts.vae.map(Box::new),
                encoders: parts.encoders.map(Box::new),
                from_ckpt: true,
            });
        }
        let dit = if dit {
            let m = random::dit_on(&spec, WEIGHT_SEED, dtype, device, &layout);
            Some(Box::new(m.map_err(load_failure)?))
        } else {
            None
        };
        let vae = if vae {
            let v = random::vae_on(&spec, WEIGHT_SEED, dtype, device);
            Some(Box::new(v.map_err(load_failure)?))
        } else {
            None
        };
        Ok(Loaded {
            spec,
            dtype,
            dit,
            vae,
            encoders: None,
            from_ckpt: false,
        })
    }

    /// Bytes of weights held by the whole model parts this rank loaded (the spec's parameter
    /// counts in this rank's dtype; used when the memory tracker saw nothing).
    pub fn weight_bytes(&self) -> u64 {
        let dit = self.dit.as_ref().map_or(0, |_| {
            planner::params::DitParams::new(&self.spec.dit).total()
        });
        let vae = self
            .vae
            .as_ref()
            .map_or(0, |_| planner::params::vae_params(&self.spec.vae).total());
        self.dtype.size_in_bytes() as u64 * (dit + vae)
    }

    /// One generation on this rank.
    pub fn generate(
        &self,
        comm: &dyn Comm,
        topo: &Topology,
        job: &Job,
        frames: Option<FrameSink>,
    ) -> Result<Generated, crate::compute::Failure> {
        let mut p =
            prepare(job, &self.spec).map_err(|e| (proto::ErrorKind::BadInput, format!("{e:#}")))?;
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
        // A rank waits for its peers' compute (a whole stage of a block, the motion-context
        // encode), which on slow CPUs exceeds the collective timeout; a dead peer still fails
        // at once (its sockets close), so only a hung one waits this long.
        let usual = comm.timeout();
        comm.set_timeout(usual.max(GENERATE_TIMEOUT));
        let out = self.generate_inner(comm, topo, job, &mut p, frames);
        comm.set_timeout(usual);
        out.map_err(classify)
    }

    fn generate_inner(
        &self,
        comm: &dyn Comm,
        topo: &Topology,
        job: &Job,
        p: &mut Prepared,
        frames: Option<FrameSink>,
    ) -> Result<Generated> {
        if self.from_ckpt {
            self.exchange_encoded(comm, topo, job, p)?;
        }
        let p = &*p;
        let mut out = Output::new(job, p, frames, topo.decodes())?;
        let missing = |what: &str| anyhow::anyhow!("rank {} holds no {what}", topo.rank);
        let blocks = match &topo.stage {
            None => {
                let vae = self.vae.as_deref().ok_or_else(|| missing("VAE"))?;
                vae::run(comm, topo, vae, p, |b| out.emit(b))?
            }
            Some(_) => {
                let dit = self.dit.as_deref().ok_or_else(|| missing("DiT"))?;
                if topo.decodes() {
                    let vae = self.vae.as_deref().ok_or_else(|| missing("VAE"))?;
                    let conds = vae::encode_and_send(comm, topo, vae, p)?;
                    let mut dec = vae::Decoder::new(vae, &conds.1)?;
                    dit::run_stage(comm, topo, dit, p, job.seed, conds, |fb| {
                        let b = dec.decode(fb, std::time::Instant::now())?;
                        out.emit(b)
                    })?
                } else {
                    let (c, g) = (dit.cfg.in_dim, p.geometry);
                    let (from, dev) = (topo.decoder_rank, dit.device());
                    let r = recv_tensor(comm, &[c, 1, g.lat_h, g.lat_w], from, &dev)?;
                    let m = recv_tensor(
                        comm,
                        &[c, dit::motion_latents(), g.lat_h, g.lat_w],
                        from,
                        &dev,
                    )?;
                    dit::run_stage(comm, topo, dit, p, job.seed, (r, m), |fb| {
                        send_tensor(comm, &fb.latents, from)?;
                        let ms = Tensor::from_vec(fb.stage_ms, topo.stages, &Device::Cpu)?;
                        send_tensor(comm, &ms.to_device(&dev)?, from)
                    })?
                }
            }
        };
        Ok(Generated {
            blocks,
            frames: out.frames,
        })
    }
}

impl Loaded {
    /// A checkpoint run: the decoding rank encodes the prompt (umT5) and the audio (wav2vec2,
    /// §10.3) once and sends both to the other DiT ranks, which take them in place of the
    /// tiny model's derived inputs; a dedicated VAE rank needs neither.
    fn exchange_encoded(
        &self,
        comm: &dyn Comm,
        topo: &Topology,
        job: &Job,
        p: &mut Prepared,
    ) -> Result<()> {
        let (ctx_shape, audio_shape) = (p.context.dims().to_vec(), p.audio.dims().to_vec());
        if topo.decodes() {
            let enc = self
                .encoders
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("rank {} holds no encoders", topo.rank))?;
            p.context = enc.text_context(&job.prompt, ctx_shape[0])?;
            let samples = media::audio::load_16k_mono(&job.audio)
                .with_context(|| format!("driving audio {}", job.audio.display()))?;
            p.audio = enc.audio_features(&samples, audio_shape[3])?;
            let peers: Vec<usize> = topo
                .dit_ranks
                .iter()
                .copied()
                .filter(|&d| d != topo.rank)
                .collect();
            // The encoders hand back host tensors; NCCL moves device memory only.
            let dev = self.vae.as_deref().map_or(Device::Cpu, |v| v.device());
            let (context, audio) = (p.context.to_device(&dev)?, p.audio.to_device(&dev)?);
            for &peer in &peers {
                send_tensor(comm, &context, peer)?;
                send_tensor(comm, &audio, peer)?;
            }
            log!(
                "encoded the prompt (umT5) and the audio (wav2vec2, {} frames) once, sent to ranks {peers:?}",
                audio_shape[3]
            );
        } else if topo.stage.is_some() {
            let cpu = Device::Cpu;
            p.context = recv_tensor(comm, &ctx_shape, topo.decoder_rank, &cpu)?;
            p.audio = recv_tensor(comm, &audio_shape, topo.decoder_rank, &cpu)?;
            log!(
                "received the text context and audio features from rank {}",
                topo.decoder_rank
            );
        }
        Ok(())
    }
}

/// Where the decoding rank's blocks go: frame chunks to the coordinator, and the final
/// latents to `--save_latents` when asked.
struct Output<'a> {
    job: &'a Job,
    p: &'a Prepared,
    sink: Option<FrameSink>,
    latents: Option<std::io::BufWriter<std::fs::File>>,
    frames: usize,
}

impl<'a> Output<'a> {
    fn new(job: &'a Job, p: &'a Prepared, sink: Option<FrameSink>, decodes: bool) -> Result<Self> {
        let latents = match (&job.save_latents, decodes) {
            (Some(path), true) => Some(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            )),
            _ => None,
        };
        Ok(Self {
            job,
            p,
            sink,
            latents,
            frames: 0,
        })
    }

    fn emit(&mut self, b: vae::BlockFrames) -> Result<()> {
        use std::io::Write as _;
        self.frames += b.frames;
        if let Some(w) = &mut self.latents {
            let v = b.latents.to_vec_f32()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.write_all(&bytes)?;
            if b.block + 1 == self.p.clips * self.p.blocks_per_clip() {
                w.flush()?;
            }
        }
        if let Some(sink) = &self.sink {
            let chunk = frame_chunk(&self.job.request_id, self.p, &b)?;
            // A coordinator that went away is not this rank's failure.
            let _ = sink.blocking_send(chunk);
        }
        Ok(())
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
        stage_ms: b.stage_ms.clone(),
    })
}

/// Sends `t` as f32 (lossless for the bf16 and f32 latents that travel; the receiver knows
/// the shape).
pub fn send_tensor(comm: &dyn Comm, t: &Tensor, peer: usize) -> Result<()> {
    comm.send(&t.to_dtype(DType::F32)?, peer)
        .with_context(|| format!("sending {:?} to rank {peer}", t.dims()))
}

/// Receives an f32 tensor of `shape` sent by [`send_tensor`], on `device`.
pub fn recv_tensor(
    comm: &dyn Comm,
    shape: &[usize],
    peer: usize,
    device: &Device,
) -> Result<Tensor> {
    let t = comm
        .recv(&Shape::from(shape.to_vec()), DType::F32, peer)
        .with_context(|| format!("receiving {shape:?} from rank {peer}"))?;
    Ok(t.to_device(device)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::TcpListener;
    use std::path::Path;
    use std::time::Duration;

    use proto::worker::v1 as pb;
    use runtime::comm::{SocketComm, SocketOptions};

    use super::*;

    pub(crate) fn test_job(num_clip: usize) -> Job {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../media/tests/data");
        Job {
            image: data.join("boy.jpg"),
            audio: data.join("speech_44k.mp3"),
            prompt: "a boy talking".into(),
            size: SizeArg::parse("128*64").unwrap(),
            num_clip,
            infer_frames: 48,
            sample_steps: 4,
            seed: 420,
            request_id: "t".into(),
            expect_size: None,
            save_latents: None,
        }
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (d / n).sqrt()
    }

    /// Runs `layout` on one thread per rank over the socket communicator; returns the final
    /// latents the decoding rank saved and the frames it decoded.
    fn run_layout(layout: &[pb::RankEntry], job: &Job, tag: &str) -> (Vec<f32>, usize) {
        let world = layout.len();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = SocketOptions {
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
        };
        let path = std::env::temp_dir().join(format!("lava-{tag}-{}.f32", std::process::id()));
        let mut listener = Some(listener);
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let l = listener.take();
                let (layout, mut job) = (layout.to_vec(), job.clone());
                job.save_latents = Some(path.clone());
                std::thread::spawn(move || {
                    let comm = match l {
                        Some(l) => SocketComm::host(l, world, opts).unwrap(),
                        None => SocketComm::join(addr, rank, world, opts).unwrap(),
                    };
                    let topo = Topology::new(&layout, rank).unwrap();
                    let parts = (topo.stage.is_some(), topo.decodes());
                    let m = Loaded::load(
                        ("tiny", DType::F32),
                        None,
                        parts,
                        Device::Cpu,
                        Some(&comm),
                        &topo,
                    )
                    .unwrap();
                    let (tx, mut rx) = tokio::sync::mpsc::channel(1000);
                    let g = m.generate(&comm, &topo, &job, Some(tx)).unwrap();
                    let mut chunks = 0;
                    while let Ok(c) = rx.try_recv() {
                        assert_eq!(c.stage_ms.len(), topo.stages);
                        assert!(c.stage_ms.iter().all(|ms| *ms > 0.0), "{:?}", c.stage_ms);
                        chunks += 1;
                    }
                    assert_eq!(chunks, if topo.decodes() { g.blocks } else { 0 });
                    g
                })
            })
            .collect();
        let done: Vec<Generated> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
        let p = prepare(job, &ModelSpec::builtin("tiny").unwrap()).unwrap();
        let blocks = p.clips * p.blocks_per_clip();
        assert!(done.iter().all(|g| g.blocks == blocks), "{done:?}");
        let frames = done.iter().map(|g| g.frames).sum();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let got = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (got, frames)
    }

    /// TPP over threads and the socket communicator: 4 stages × 1 step + a VAE rank, 2 stages ×
    /// 2 steps with the VAE co-located on the last, and 1 stage + VAE rank: the final latents
    /// equal a single-process StreamRunner run on the same seed over 2 clips (so the ring wraps
    /// and clip 1 re-prefills with the sink the last stage sends), and 48·N − 3 frames decode.
    #[test]
    fn tpp_layouts_equal_the_single_process_run() {
        use planner::layout::VaePlacement;
        let job = Job {
            size: SizeArg::parse("64*64").unwrap(),
            ..test_job(2)
        };
        let p = prepare(&job, &ModelSpec::builtin("tiny").unwrap()).unwrap();
        let model = random::dit(&p.spec, WEIGHT_SEED).unwrap();
        let vae = random::vae(&p.spec, WEIGHT_SEED).unwrap();
        let (r, m) = vae::encode_conditions(&vae, &p).unwrap();
        let mut want = Vec::new();
        dit::generate(&model, &p, job.seed, r, m, |_, _, x| {
            want.extend(x.to_vec_f32()?);
            Ok(())
        })
        .unwrap();
        assert!(want.iter().any(|v| *v != 0.0));
        for (stages, vae) in [
            (4, VaePlacement::Dedicated),
            (2, VaePlacement::Colocated),
            (1, VaePlacement::Dedicated),
        ] {
            let layout = topology::tests::layout(stages, vae);
            let (got, frames) = run_layout(&layout, &job, &format!("tpp{stages}"));
            let err = rel_l2(&got, &want);
            assert!(err <= 1e-6, "{stages} stages, {vae:?}: rel L2 {err}");
            assert_eq!(frames, 48 * p.clips - 3);
        }
    }

    #[test]
    fn tiny_weights_and_inputs_are_deterministic() {
        let spec = ModelSpec::builtin("tiny").unwrap();
        let a = random::text_context("hello", &spec)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        assert_eq!(
            a,
            random::text_context("hello", &spec)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        );
        assert_ne!(
            a,
            random::text_context("hellp", &spec)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        );
        let samples: Vec<f32> = (0..16_000).map(|i| (i as f32 * 0.01).sin()).collect();
        let f = random::audio_features(&samples, 2, 16, 48).unwrap();
        assert_eq!(f.dims(), &[1, 2, 16, 48]);
        let v = f.to_vec_f32().unwrap();
        // Frame 24 starts at 15 360 samples: real audio; frame 25 would start past the end.
        assert!(v[24] != 0.0 && v[25] == 0.0);
        // Layer 1 is layer 0 scaled by 2.
        assert_eq!(v[16 * 48 + 24], 2.0 * v[24]);
    }
}
