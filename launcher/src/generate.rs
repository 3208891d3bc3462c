//! `lava generate`: plan, spawn the ranks, Init/Load/Generate them, and write the MP4 from
//! the VAE rank's frame stream as it arrives.
//!
//! The ranks run the planner's layout: TPP stages (the steps split evenly over them, each stage
//! with the step-caches of its own steps), each stage on one rank or split over tp × Ulysses ×
//! pp ranks (FSDP over the Ulysses group), and the VAE on a dedicated rank
//! (`--enable_vae_parallel`) or co-located on the last stage. `--backend cuda` puts one rank on
//! each GPU of the node (bf16, NCCL); `--backend cpu` runs every rank on the CPU reference
//! backend (f32, sockets), planned as the GPUs of `--gpus`. Without `--ckpt_dir` every rank
//! generates the model's weights from a fixed seed (the tiny model for the quick start and the
//! tests, the full-size model for capacity and speed runs).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use planner::layout::mesh;
use proto::frames::v1::{self as fpb, frames_client::FramesClient};
use proto::worker::v1::{self as pb, worker_client::WorkerClient};
use proto::{Error, ErrorKind, exit};
use tokio::task::JoinSet;

use crate::plan::{PlanArgs, plan_for_generate};
use crate::progress::Progress;
use crate::spawn;
use crate::supervise::{Job, LaunchArgs};

/// LiveAvatar's flags where they mean the same, plus the layout flags of `lava plan`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Driving speech (WAV, MP3, FLAC).
    #[arg(long)]
    pub audio: PathBuf,
    /// Text prompt.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Seed of the noise and reference positions.
    #[arg(long = "base_seed", alias = "base-seed", default_value_t = 420)]
    pub base_seed: u64,
    /// Checkpoint folder (Wan2.2-S2V layout); without it the built-in tiny model runs.
    #[arg(long = "ckpt_dir", alias = "ckpt-dir")]
    pub ckpt_dir: Option<PathBuf>,
    /// The LiveAvatar LoRA (`liveavatar.safetensors`), merged at load; needs --ckpt_dir.
    #[arg(long = "lora_path_dmd", alias = "lora-path-dmd")]
    pub lora_path_dmd: Option<PathBuf>,
    /// Only rank 0 reads --ckpt_dir (and the LoRA); every other rank receives the tensors it
    /// loads from rank 0 over the communicator (for a slow shared filesystem, or nodes without
    /// the folder). Without it, each rank reads the folder if its node has it and the others
    /// receive from the lowest rank that has it.
    #[arg(long = "weights_from_rank0", alias = "weights-from-rank0")]
    pub weights_from_rank0: bool,
    /// Output MP4.
    #[arg(long = "save_file", alias = "save-file", default_value = "lava.mp4")]
    pub save_file: PathBuf,
    /// Also write every block's final latents here (raw little-endian f32, `[C, 3, h, w]` per
    /// block, in order), to compare layouts.
    #[arg(long = "save_latents", alias = "save-latents")]
    pub save_latents: Option<PathBuf>,
    /// Where the ranks compute: `cpu` (the reference backend, f32) or `cuda` (one GPU per rank
    /// by its index on the node, bf16, NCCL) [default: cpu for --model tiny, cuda otherwise].
    #[arg(long, value_parser = ["cpu", "cuda"])]
    pub backend: Option<String>,
    /// Path of the `lava-worker` executable [default: next to this `lava`].
    #[arg(long, env = "LAVA_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
}

fn bad(message: impl Into<String>) -> Error {
    Error::Unattributed {
        kind: ErrorKind::BadInput,
        message: message.into(),
    }
}

/// `--backend`, or its default for the model.
fn backend<'a>(a: &'a GenerateArgs, model_name: &str) -> &'a str {
    match &a.backend {
        Some(b) => b,
        None if model_name == "tiny" => "cpu",
        None => "cuda",
    }
}

/// Runs `lava generate`; the exit code is one of `proto::exit`.
pub fn run(a: &GenerateArgs) -> ExitCode {
    let model_ref = match model_ref(a) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("lava generate: {e}");
            return ExitCode::from(exit::BAD_INPUT);
        }
    };
    let Some(image) = a.plan.image.clone() else {
        eprintln!("lava generate: --image is required");
        return ExitCode::from(exit::BAD_INPUT);
    };
    let (layout, resolution, model, plan) = match plan_for_generate(&a.plan, a.ckpt_dir.is_some()) {
        Ok(v) => v,
        Err(code) => return ExitCode::from(code),
    };
    let mut model_ref = model_ref;
    model_ref.dtype = match (backend(a, &model.name), a.plan.fp8) {
        (_, true) => "fp8",
        ("cuda", false) => "bf16",
        _ => "f32",
    }
    .into();
    let roles = match proto::plan::rank_roles(
        &layout,
        &mesh(&layout, model.dit.num_layers, a.plan.sample_steps),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lava generate: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lava-generate")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lava: error: starting the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let setup = Setup {
        backend: backend(a, &model.name).to_string(),
        model_ref,
        needs: crate::fit::Need::of(&plan),
        labels: plan.ranks.iter().map(|r| r.role_label.clone()).collect(),
        roles,
        image,
        width: resolution.width as u32,
        height: resolution.height as u32,
        frames_per_clip: model.stream.infer_frames as u32,
    };
    let code = match runtime.block_on(generate(a, setup)) {
        Ok(()) => exit::OK,
        Err(err) => {
            spawn::say_err(&format!("lava: error: {err}"));
            let code = err.exit_code();
            spawn::say_err(&format!("lava: exit code {code} ({})", exit::name(code)));
            code
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

struct Setup {
    /// `cpu` or `cuda`.
    backend: String,
    /// What every rank loads (the tiny model, or the checkpoint folder).
    model_ref: pb::ModelRef,
    roles: Vec<pb::RankRole>,
    /// What the plan assumed of every rank's GPU and predicts as its peak (checked against
    /// the registrations, and beside the measured peaks at the end).
    needs: Vec<crate::fit::Need>,
    /// The plan's role label of every rank.
    labels: Vec<String>,
    image: PathBuf,
    width: u32,
    height: u32,
    frames_per_clip: u32,
}

async fn generate(a: &GenerateArgs, s: Setup) -> Result<(), Error> {
    let world = u32::try_from(s.roles.len()).unwrap_or(u32::MAX);
    // The dedicated VAE rank is started with the vae role; a co-located VAE rides on a DiT rank.
    let vae_rank = s
        .roles
        .iter()
        .position(|r| matches!(r.role, Some(pb::rank_role::Role::Vae(_))))
        .map(|r| r as u32);
    let decoder = decoder_rank(&s.roles).ok_or_else(|| bad("the plan has no decoding rank"))?;
    let launch = LaunchArgs {
        nproc: Some(world),
        nnodes: Some(1),
        node_rank: Some(0),
        local_node_rank: Some(0),
        master_addr: Some("127.0.0.1".into()),
        master_port: None,
        vae_rank,
        backend: s.backend.clone(),
        worker_bin: a.worker_bin.clone(),
        advertise_host: None,
        ready_timeout: 120,
        // A rank busy in a model call answers SIGTERM only between calls; once a peer is lost
        // the generation is over anyway, so stragglers get SIGKILL soon.
        grace: 3,
        health_interval: 2,
    };
    let mut job = Job::start(&launch).await?;
    let outcome = match job.ready().await {
        Ok(true) => {
            let registry = job.registry.clone();
            job.watch(coordinate(a, &s, registry, decoder))
                .await
                .map(|_| ())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    if outcome.is_ok() {
        job.drain().await;
    }
    job.close().await;
    outcome
}

/// The rank that decodes and streams frames: the VAE rank, or the DiT rank hosting the VAE.
fn decoder_rank(roles: &[pb::RankRole]) -> Option<u32> {
    roles
        .iter()
        .position(|r| match &r.role {
            Some(pb::rank_role::Role::Vae(_)) => true,
            Some(pb::rank_role::Role::Dit(d)) => d.hosts_vae,
            None => false,
        })
        .map(|r| r as u32)
}

async fn client(addr: &str, rank: u32) -> Result<WorkerClient<tonic::transport::Channel>, Error> {
    WorkerClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| Error::rank(rank, ErrorKind::PeerLost, format!("connecting: {e}")))
}

/// Init, Load and Generate on every rank; the frames go into the MP4 as they come.
async fn coordinate(
    a: &GenerateArgs,
    s: &Setup,
    registry: std::sync::Arc<crate::coordinator::Registry>,
    decoder: u32,
) -> Result<(), Error> {
    let regs = registry.entries();
    let world = s.roles.len();
    let layout: Vec<pb::RankEntry> = regs
        .values()
        .zip(&s.roles)
        .map(|(r, role)| pb::RankEntry {
            rank: r.rank,
            role: Some(role.clone()),
            address: r.address.clone(),
            hostname: r.hostname.clone(),
        })
        .collect();
    if layout.len() != world {
        return Err(bad(format!(
            "{} ranks registered, {world} planned",
            layout.len()
        )));
    }
    crate::fit::check(&regs.values().cloned().collect::<Vec<_>>(), &s.needs)?;
    // Rank 0's communicator bootstrap: the socket rendezvous (CPU) or the NCCL id (CUDA).
    let (rendezvous, nccl_id) = regs
        .get(&0)
        .map(|r| (r.comm_rendezvous_address.clone(), r.nccl_unique_id.clone()))
        .unwrap_or_default();
    let mut clients = Vec::new();
    for r in regs.values() {
        clients.push(client(&r.address, r.rank).await?);
    }
    // Init at once on every rank: rank 0 hosts the communicator's rendezvous.
    let mut calls = JoinSet::new();
    for (rank, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        let req = pb::InitRequest {
            job_id: registry.job_id.clone(),
            rank: rank as u32,
            world_size: world as u32,
            role: Some(s.roles[rank].clone()),
            layout: layout.clone(),
            model: Some(s.model_ref.clone()),
            nccl_unique_id: nccl_id.clone(),
            comm_rendezvous_address: rendezvous.clone(),
        };
        calls.spawn(async move { c.init(req).await.map(|_| ()) });
    }
    join_all(calls).await?;
    let t_load = Instant::now();
    let mut calls = JoinSet::new();
    for c in &clients {
        let mut c = c.clone();
        let req = pb::LoadRequest {
            job_id: registry.job_id.clone(),
        };
        calls.spawn(async move {
            c.load(req)
                .await
                .map(|r| (r.get_ref().rank, r.get_ref().peak_memory_bytes))
        });
    }
    let load_peaks = join_all(calls).await?;
    let what = if s.model_ref.ckpt_dir.is_empty() {
        format!(
            "model {} ({}, random weights)",
            s.model_ref.name, s.model_ref.dtype
        )
    } else {
        format!("checkpoint {}", s.model_ref.ckpt_dir)
    };
    spawn::say(&format!(
        "lava: {world} ranks loaded {what} in {:.1} s",
        t_load.elapsed().as_secs_f64()
    ));

    let request_id = format!("{}-0", registry.job_id);
    let req = pb::GenerateRequest {
        request_id: request_id.clone(),
        image_path: abs(&s.image),
        audio_path: abs(&a.audio),
        prompt: a.prompt.clone(),
        width: s.width,
        height: s.height,
        num_clip: a.plan.num_clip as u32,
        infer_frames: s.frames_per_clip,
        sample_steps: a.plan.sample_steps as u32,
        seed: a.base_seed,
        reply_rank: decoder,
        save_latents_path: a.save_latents.as_deref().map(abs).unwrap_or_default(),
    };
    let t0 = Instant::now();
    let mut calls = JoinSet::new();
    for c in &clients {
        let (mut c, req) = (c.clone(), req.clone());
        calls.spawn(async move { c.generate(req).await.map(|r| r.into_inner()) });
    }
    let dec_addr = &regs
        .get(&decoder)
        .ok_or_else(|| bad("the decoding rank did not register"))?
        .address;
    let blocks = a.plan.num_clip * u64::from(s.frames_per_clip / 12);
    let expected = u64::from(s.frames_per_clip) * a.plan.num_clip - 3;
    let mut progress = Progress::new(blocks, expected);
    let writing = write_frames(a, s, dec_addr, decoder, request_id, &mut progress);
    let (written, generated) = tokio::join!(writing, join_all(calls));
    let replies = generated?;
    written?;
    let total = t0.elapsed().as_secs_f64();
    spawn::say(&format!(
        "lava: wrote {} ({} frames, {}×{}, 25 fps, with audio) in {total:.1} s",
        a.save_file.display(),
        progress.frames(),
        s.width,
        s.height,
    ));
    let mut replies = replies;
    replies.sort_by_key(|r| r.rank);
    let mut ranks: Vec<(String, u64, u64)> = Vec::new();
    for r in &replies {
        let i = r.rank as usize;
        let load = load_peaks
            .iter()
            .find(|(rank, _)| *rank == r.rank)
            .map_or(0, |l| l.1);
        let label = s.labels.get(i).cloned().unwrap_or_default();
        ranks.push((
            format!("rank {i} ({label})"),
            r.peak_memory_bytes.max(load),
            s.needs.get(i).map_or(0, |n| n.peak_bytes),
        ));
    }
    for line in progress.summary(total, &ranks) {
        spawn::say_err(&line);
    }
    Ok(())
}

fn abs(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Every call's result in rank order of completion; the first failure otherwise.
async fn join_all<T: 'static>(
    mut calls: JoinSet<Result<T, tonic::Status>>,
) -> Result<Vec<T>, Error> {
    let mut out = Vec::new();
    while let Some(r) = calls.join_next().await {
        match r {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(status)) => return Err(Error::from(status)),
            Err(e) => {
                return Err(Error::Unattributed {
                    kind: ErrorKind::Internal,
                    message: format!("a control call panicked: {e}"),
                });
            }
        }
    }
    Ok(out)
}

/// Largest frame chunk accepted: one block of 12 RGB24 frames at up to 2048×2048.
const MAX_CHUNK_BYTES: usize = 12 * 3 * 2048 * 2048 + (1 << 20);

/// Streams the decoding rank's frames into the MP4, reporting each block to `progress`.
async fn write_frames(
    a: &GenerateArgs,
    s: &Setup,
    addr: &str,
    rank: u32,
    request_id: String,
    progress: &mut Progress,
) -> Result<(), Error> {
    let lost = |e: String| Error::rank(rank, ErrorKind::PeerLost, e);
    // A block of 12 frames at 704×384 is 9.7 MB, over tonic's 4 MB default.
    let mut fc = FramesClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| lost(format!("frames: {e}")))?
        .max_decoding_message_size(MAX_CHUNK_BYTES);
    let mut stream = fc
        .stream_frames(fpb::StreamFramesRequest { request_id })
        .await
        .map_err(Error::from)?
        .into_inner();
    let expected = u64::from(s.frames_per_clip) * a.plan.num_clip - 3;
    let mut opts = media::video::Mp4Options::new(s.width, s.height);
    opts.audio = media::video::AudioIn::File(a.audio.clone());
    opts.block_frames = 12;
    opts.expected_frames = Some(expected);
    let internal = |e: media::MediaError| Error::Unattributed {
        kind: ErrorKind::Internal,
        message: format!("writing {}: {e}", a.save_file.display()),
    };
    let mut mp4 = media::video::Mp4Writer::create(&a.save_file, &opts).map_err(internal)?;
    let frame_bytes = 3 * s.width as usize * s.height as usize;
    while let Some(chunk) = stream.message().await.map_err(Error::from)? {
        if u64::from(chunk.frame_start) != progress.frames()
            || chunk.data.len() != frame_bytes * chunk.frame_count as usize
        {
            return Err(Error::rank(
                rank,
                ErrorKind::Internal,
                format!(
                    "frame chunk of block {} starts at frame {} with {} bytes; expected frame {}",
                    chunk.block_index,
                    chunk.frame_start,
                    chunk.data.len(),
                    progress.frames()
                ),
            ));
        }
        for f in chunk.data.chunks_exact(frame_bytes) {
            mp4.write_rgb24(f).map_err(internal)?;
        }
        progress.block(&chunk);
        if chunk.last {
            break;
        }
    }
    mp4.finish().map_err(internal)?;
    Ok(())
}

/// The ModelRef sent to every rank, after the cheap checks of the checkpoint folder that need
/// no model code (it exists, config.json and the index parse, the LoRA file exists); the
/// workers validate names, shapes and the LoRA's fit.
fn model_ref(a: &GenerateArgs) -> Result<pb::ModelRef, String> {
    // A spec file travels as an absolute path (every rank reads it; same node or shared path).
    let name = if planner::ModelSpec::builtin_names().contains(&a.plan.model.as_str()) {
        a.plan.model.clone()
    } else {
        std::path::absolute(&a.plan.model)
            .map_err(|e| format!("--model {}: {e}", a.plan.model))?
            .display()
            .to_string()
    };
    let Some(dir) = &a.ckpt_dir else {
        if a.lora_path_dmd.is_some() {
            return Err("--lora_path_dmd needs --ckpt_dir".into());
        }
        if a.weights_from_rank0 {
            return Err("--weights_from_rank0 needs --ckpt_dir".into());
        }
        if a.plan.fp8 {
            return Err("--fp8 needs --ckpt_dir (random weights are not quantised)".into());
        }
        return Ok(pb::ModelRef {
            name,
            ..Default::default()
        });
    };
    let dir = std::path::absolute(dir).map_err(|e| format!("--ckpt_dir {}: {e}", dir.display()))?;
    if !dir.is_dir() {
        return Err(format!("--ckpt_dir {} is not a folder", dir.display()));
    }
    for name in [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
    ] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("checkpoint file {}: {e}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("checkpoint file {}: {e}", path.display()))?;
        if name.ends_with("index.json") && !json["weight_map"].is_object() {
            return Err(format!(
                "checkpoint file {}: no weight_map object",
                path.display()
            ));
        }
    }
    let lora_path = match &a.lora_path_dmd {
        Some(p) if !p.is_file() => {
            return Err(format!("--lora_path_dmd {} is not a file", p.display()));
        }
        Some(p) => std::path::absolute(p)
            .map_err(|e| format!("--lora_path_dmd {}: {e}", p.display()))?
            .display()
            .to_string(),
        None => String::new(),
    };
    Ok(pb::ModelRef {
        name,
        ckpt_dir: dir.display().to_string(),
        lora_path,
        weights_from_rank0: a.weights_from_rank0,
        ..Default::default()
    })
}
