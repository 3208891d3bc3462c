//! `lava generate`: plan, spawn the ranks, Init/Load/Generate them, and write the MP4 from
//! the VAE rank's frame stream as it arrives.
//!
//! This build runs the built-in tiny model (deterministic random weights generated on each
//! rank, no checkpoint) on CPU ranks in one layout: one DiT rank running every denoising step
//! (one step-cache per step) and a dedicated VAE rank. The CPU ranks are planned as the
//! generic GPUs of `--gpus` (default `2x24GB`); other layouts are refused before spawning.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use planner::layout::{VaePlacement, mesh};
use proto::frames::v1::{self as fpb, frames_client::FramesClient};
use proto::worker::v1::{self as pb, worker_client::WorkerClient};
use proto::{Error, ErrorKind, exit};
use tokio::task::JoinSet;

use crate::plan::{PlanArgs, plan_for_generate};
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
    /// Checkpoint folder; without it the built-in tiny model runs.
    #[arg(long = "ckpt_dir", alias = "ckpt-dir")]
    pub ckpt_dir: Option<PathBuf>,
    /// Output MP4.
    #[arg(long = "save_file", alias = "save-file", default_value = "lava.mp4")]
    pub save_file: PathBuf,
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

/// Runs `lava generate`; the exit code is one of `proto::exit`.
pub fn run(a: &GenerateArgs) -> ExitCode {
    if a.ckpt_dir.is_some() {
        eprintln!(
            "lava generate: --ckpt_dir: checkpoints are not wired into lava generate yet; \
             leave it out to run the built-in tiny model"
        );
        return ExitCode::from(exit::BAD_INPUT);
    }
    let Some(image) = a.plan.image.clone() else {
        eprintln!("lava generate: --image is required");
        return ExitCode::from(exit::BAD_INPUT);
    };
    let (layout, resolution, model) = match plan_for_generate(&a.plan) {
        Ok(v) => v,
        Err(code) => return ExitCode::from(code),
    };
    if model.name != "tiny"
        || layout.stages != 1
        || layout.tp * layout.ulysses * layout.pp != 1
        || layout.vae != VaePlacement::Dedicated
        || a.plan.sample_steps != 4
        || a.plan.infer_frames != 48
    {
        eprintln!(
            "lava generate: this build runs the built-in tiny model with one DiT rank and a \
             dedicated VAE rank (--model tiny --num_gpus_dit 1 --enable_vae_parallel, \
             --sample_steps 4, --infer_frames 48); the planned layout is different"
        );
        return ExitCode::from(exit::BAD_INPUT);
    }
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
    roles: Vec<pb::RankRole>,
    image: PathBuf,
    width: u32,
    height: u32,
    frames_per_clip: u32,
}

async fn generate(a: &GenerateArgs, s: Setup) -> Result<(), Error> {
    let world = u32::try_from(s.roles.len()).unwrap_or(u32::MAX);
    let vae_rank = s
        .roles
        .iter()
        .position(|r| matches!(r.role, Some(pb::rank_role::Role::Vae(_))))
        .map(|r| r as u32);
    let launch = LaunchArgs {
        nproc: Some(world),
        nnodes: Some(1),
        node_rank: Some(0),
        local_node_rank: Some(0),
        master_addr: Some("127.0.0.1".into()),
        master_port: None,
        vae_rank,
        backend: "cpu".into(),
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
            job.watch(coordinate(a, &s, registry, vae_rank.unwrap_or(0)))
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
    vae_rank: u32,
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
    let rendezvous = regs
        .get(&0)
        .map(|r| r.comm_rendezvous_address.clone())
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
            model: Some(pb::ModelRef {
                name: "tiny".into(),
                dtype: "f32".into(),
                ..Default::default()
            }),
            nccl_unique_id: Vec::new(),
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
        calls.spawn(async move { c.load(req).await.map(|_| ()) });
    }
    join_all(calls).await?;
    spawn::say(&format!(
        "lava: {world} ranks loaded the built-in tiny model (random weights) in {:.1} s",
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
        reply_rank: vae_rank,
    };
    let t0 = Instant::now();
    let mut calls = JoinSet::new();
    for c in &clients {
        let (mut c, req) = (c.clone(), req.clone());
        calls.spawn(async move { c.generate(req).await.map(|_| ()) });
    }
    let vae_addr = &regs
        .get(&vae_rank)
        .ok_or_else(|| bad("no VAE rank registered"))?
        .address;
    let writing = write_frames(a, s, vae_addr, vae_rank, request_id, t0);
    let (written, generated) = tokio::join!(writing, join_all(calls));
    generated?;
    let (frames, first) = written?;
    let total = t0.elapsed().as_secs_f64();
    spawn::say(&format!(
        "lava: wrote {} ({frames} frames, {}×{}, 25 fps, with audio): first frame after {first:.2} s, \
         {total:.1} s in all, {:.2} frames/s",
        a.save_file.display(),
        s.width,
        s.height,
        f64::from(frames) / total.max(1e-9)
    ));
    Ok(())
}

fn abs(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

async fn join_all(mut calls: JoinSet<Result<(), tonic::Status>>) -> Result<(), Error> {
    while let Some(r) = calls.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(status)) => return Err(Error::from(status)),
            Err(e) => {
                return Err(Error::Unattributed {
                    kind: ErrorKind::Internal,
                    message: format!("a control call panicked: {e}"),
                });
            }
        }
    }
    Ok(())
}

/// Streams the VAE rank's frames into the MP4: (frames written, first-frame latency in s).
async fn write_frames(
    a: &GenerateArgs,
    s: &Setup,
    addr: &str,
    rank: u32,
    request_id: String,
    t0: Instant,
) -> Result<(u32, f64), Error> {
    let lost = |e: String| Error::rank(rank, ErrorKind::PeerLost, e);
    let mut fc = FramesClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| lost(format!("frames: {e}")))?;
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
    let (mut frames, mut first) = (0u32, None);
    let frame_bytes = 3 * s.width as usize * s.height as usize;
    while let Some(chunk) = stream.message().await.map_err(Error::from)? {
        if chunk.frame_start != frames
            || chunk.data.len() != frame_bytes * chunk.frame_count as usize
        {
            return Err(Error::rank(
                rank,
                ErrorKind::Internal,
                format!(
                    "frame chunk of block {} starts at frame {} with {} bytes; expected frame {frames}",
                    chunk.block_index,
                    chunk.frame_start,
                    chunk.data.len()
                ),
            ));
        }
        for f in chunk.data.chunks_exact(frame_bytes) {
            mp4.write_rgb24(f).map_err(internal)?;
        }
        frames += chunk.frame_count;
        let el = t0.elapsed().as_secs_f64();
        first.get_or_insert(el);
        let decode_ms = chunk
            .decode_end_unix_ns
            .saturating_sub(chunk.decode_start_unix_ns)
            / 1_000_000;
        spawn::say(&format!(
            "lava: block {} (clip {}): frames {frames}/{expected}, decode {decode_ms} ms, {:.2} frames/s, {:.1} s",
            chunk.block_index,
            chunk.clip_index,
            f64::from(frames) / el.max(1e-9),
            el
        ));
        if chunk.last {
            break;
        }
    }
    mp4.finish().map_err(internal)?;
    Ok((frames, first.unwrap_or(0.0)))
}
