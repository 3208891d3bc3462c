//! `lava launch`: start this launcher's workers, bring the job to ready, and supervise it.
//!
//! One process per rank, one monitor task per process reporting its exit on a channel, and
//! one loop that owns every decision: any rank that dies ends the whole job (SPMD ranks cannot
//! continue without a peer), SIGTERM/SIGINT drain it (Shutdown to every rank, then SIGTERM,
//! then SIGKILL after the grace period). The shape is TGI's launcher with vLLM's safety nets
//! (docs/protocol.md).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use proto::worker::v1::{self as pb, RoleKind};
use proto::{Error, ErrorKind, exit};
use tokio::process::ChildStdin;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::coordinator::{self, LauncherService, Registry};
use crate::env::{self, Topology};
use crate::spawn::{self, Tail, WorkerSpec};

/// Consecutive failed heartbeats after which a launcher declares the master lost.
const MASTER_MISSES: u32 = 3;

/// Start the job's workers, bring every rank to ready, and supervise them until SIGTERM or
/// SIGINT (clean drain, exit 0) or until a rank dies (exit 5, peer lost).
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Workers this launcher starts: GPUs per node with one launcher per node, or 1 with one
    /// launcher per GPU (torchrun, `srun -n <GPUs>`).
    #[arg(long, env = "LAVA_NPROC")]
    pub nproc: Option<u32>,
    /// Number of launchers in the job [default: WORLD_SIZE, else SLURM_NTASKS, else 1].
    #[arg(long, env = "LAVA_NNODES")]
    pub nnodes: Option<u32>,
    /// Index of this launcher; launcher 0 coordinates [default: RANK, else SLURM_PROCID, else 0].
    #[arg(long, env = "LAVA_NODE_RANK")]
    pub node_rank: Option<u32>,
    /// Index of this launcher among those on its node, which offsets device ordinals
    /// [default: LOCAL_RANK, else SLURM_LOCALID, else 0].
    #[arg(long, env = "LAVA_LOCAL_NODE_RANK")]
    pub local_node_rank: Option<u32>,
    /// Host of launcher 0 [default: MASTER_ADDR, else the first host of SLURM_JOB_NODELIST,
    /// else 127.0.0.1].
    #[arg(long, env = "LAVA_MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// Port of launcher 0's registration service [default: MASTER_PORT, else 20000 +
    /// SLURM_JOB_ID % 10000, else 29500; a lone launcher picks a free port].
    #[arg(long, env = "LAVA_MASTER_PORT")]
    pub master_port: Option<u16>,
    /// Global rank started as the dedicated VAE rank; all others are DiT ranks [default: none].
    #[arg(long, env = "LAVA_VAE_RANK")]
    pub vae_rank: Option<u32>,
    /// Worker backend: `cpu`, or `cuda` (one GPU per worker, by local index).
    #[arg(long, env = "LAVA_BACKEND", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub backend: String,
    /// Path of the `lava-worker` executable [default: next to this `lava`].
    #[arg(long, env = "LAVA_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// Host name that other nodes use to reach this node's workers, in multi-launcher jobs
    /// [default: this host's name, or 127.0.0.1 when the master is on loopback].
    #[arg(long, env = "LAVA_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Seconds to wait for every rank to register.
    #[arg(long, env = "LAVA_READY_TIMEOUT", default_value_t = 120)]
    pub ready_timeout: u64,
    /// Seconds a worker gets between SIGTERM and SIGKILL.
    #[arg(long, env = "LAVA_GRACE", default_value_t = 10)]
    pub grace: u64,
    /// Seconds between liveness checks of ranks and launchers on other nodes.
    #[arg(long, env = "LAVA_HEALTH_INTERVAL", default_value_t = 2)]
    pub health_interval: u64,
}

/// Runs `lava launch`; the exit code is one of `proto::exit`.
pub fn run(args: &LaunchArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lava-launch")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            spawn::say_err(&format!("lava: error: starting the async runtime: {e}"));
            return ExitCode::from(exit::INTERNAL);
        }
    };
    // The top-level future runs on this (main) thread, which spawns the workers: their
    // PR_SET_PDEATHSIG is tied to it.
    let code = match runtime.block_on(launch(args)) {
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

fn bad(message: impl Into<String>) -> Error {
    Error::Unattributed {
        kind: ErrorKind::BadInput,
        message: message.into(),
    }
}

fn internal(message: impl Into<String>) -> Error {
    Error::Unattributed {
        kind: ErrorKind::Internal,
        message: message.into(),
    }
}

/// A rank's process, as the supervisor tracks it.
#[derive(Debug)]
struct Running {
    role: RoleKind,
    pid: u32,
    tail: Tail,
    /// Held, never written: dropping it is the worker's cue that the launcher is gone.
    _lifeline: Option<ChildStdin>,
    forwarders: Vec<JoinHandle<()>>,
}

/// A rank's process ended.
#[derive(Debug)]
struct RankExit {
    rank: u32,
    status: io::Result<ExitStatus>,
}

/// This launcher's workers and the channel their exits arrive on.
#[derive(Debug)]
struct Ranks {
    alive: BTreeMap<u32, Running>,
    exits: mpsc::UnboundedReceiver<RankExit>,
    grace: Duration,
}

impl Ranks {
    /// Marks a rank dead, sweeps its process group (anything it started), and waits briefly
    /// for its last output.
    async fn reap(&mut self, rank: u32) -> Option<Running> {
        let running = self.alive.remove(&rank)?;
        spawn::signal_group(running.pid, libc::SIGKILL);
        for f in &running.forwarders {
            // Output still in the pipe drains within moments; a grandchild holding it open does not stop us.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while !f.is_finished() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
        Some(running)
    }

    /// Waits until every rank has exited or `deadline` passes.
    async fn wait_all(&mut self, deadline: Instant) {
        while !self.alive.is_empty() {
            tokio::select! {
                exit = self.exits.recv() => match exit {
                    Some(exit) => { self.reap(exit.rank).await; }
                    None => return,
                },
                _ = sleep_until(deadline) => return,
            }
        }
    }

    /// SIGTERM to every live rank, then SIGKILL after the grace period.
    async fn terminate(&mut self) {
        for r in self.alive.values() {
            spawn::signal_group(r.pid, libc::SIGTERM);
        }
        self.wait_all(Instant::now() + self.grace).await;
        if !self.alive.is_empty() {
            let ranks: Vec<_> = self.alive.keys().collect();
            spawn::say_err(&format!(
                "lava: ranks {ranks:?} ignored SIGTERM for {} s; sending SIGKILL",
                self.grace.as_secs()
            ));
            for r in self.alive.values() {
                spawn::signal_group(r.pid, libc::SIGKILL);
            }
            self.wait_all(Instant::now() + Duration::from_secs(5)).await;
        }
    }

    /// A rank died on its own: report it with its stderr tail, end every other rank, and
    /// return the job's error.
    async fn fail(&mut self, exit: RankExit) -> Error {
        let rank = exit.rank;
        let Some(running) = self.reap(rank).await else {
            return internal(format!("exit of unknown rank {rank}"));
        };
        let (kind, how) = match &exit.status {
            Ok(status) => (kind_of_exit(*status), spawn::describe_exit(*status)),
            Err(e) => (ErrorKind::Internal, format!("could not be waited for: {e}")),
        };
        let label = spawn::label(rank, running.role);
        spawn::say_err(&format!(
            "lava: rank {rank} ({}, pid {}) died: {how}; ending the job",
            running.role.name(),
            running.pid
        ));
        let tail = running
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if !tail.is_empty() {
            spawn::say_err(&format!("lava: last stderr lines of rank {rank}:"));
            for line in tail {
                spawn::say_err(&format!("lava:   {label} {line}"));
            }
        }
        self.terminate().await;
        Error::rank(
            rank,
            kind,
            format!(
                "{} worker (pid {}) died: {how}",
                running.role.name(),
                running.pid
            ),
        )
    }
}

/// The job's failure kind when a worker ends with `status`: its own bad-input, load and
/// plan failures are passed on; anything else is a lost peer.
fn kind_of_exit(status: ExitStatus) -> ErrorKind {
    match status.code().and_then(|c| u8::try_from(c).ok()) {
        Some(exit::BAD_INPUT) => ErrorKind::BadInput,
        Some(exit::LOAD_FAILURE) => ErrorKind::LoadFailure,
        Some(exit::INFEASIBLE_PLAN) => ErrorKind::Infeasible,
        _ => ErrorKind::PeerLost,
    }
}

fn job_id() -> String {
    match std::env::var("SLURM_JOB_ID") {
        Ok(id) if !id.is_empty() => format!("slurm-{id}"),
        _ => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("lava-{}-{secs}", std::process::id())
        }
    }
}

fn this_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "127.0.0.1".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

async fn launch(args: &LaunchArgs) -> Result<(), Error> {
    let overrides = env::Overrides {
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        local_node_rank: args.local_node_rank,
        nproc: args.nproc,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    };
    let topo =
        env::resolve(&overrides, |k| std::env::var(k).ok()).map_err(|e| bad(e.to_string()))?;
    let world = topo.world_size();
    if let Some(v) = args.vae_rank
        && v >= world
    {
        return Err(bad(format!("--vae-rank {v} is outside world size {world}")));
    }
    let bin = spawn::locate_worker(args.worker_bin.as_deref()).map_err(bad)?;
    let multi = topo.nnodes > 1;
    let advertise = match &args.advertise_host {
        Some(host) => host.clone(),
        None if is_loopback(&topo.master_addr) => "127.0.0.1".into(),
        None => this_host(),
    };
    spawn::say_err(&format!(
        "lava: launcher {} of {} ({:?}): ranks {}..{} of {world}, master {}:{}",
        topo.node_rank,
        topo.nnodes,
        topo.source,
        topo.global_rank(0),
        topo.global_rank(topo.nproc),
        topo.master_addr,
        topo.master_port
    ));

    // Registration service: the master listens where the other launchers look for it.
    let bind = if topo.is_master() && multi {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), topo.master_port)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    };
    let master_endpoint = format!("http://{}:{}", topo.master_addr, topo.master_port);
    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let registry = Registry::new(
        job_id(),
        world,
        (!topo.is_master()).then(|| master_endpoint.clone()),
        ready_timeout,
    );
    let incoming = TcpIncoming::bind(bind)
        .map_err(|e| bad(format!("binding the registration service on {bind}: {e}")))?;
    let port = incoming
        .local_addr()
        .map_err(|e| internal(format!("reading the bound address: {e}")))?
        .port();
    let local_registration = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let (server_stop, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(pb::launcher_server::LauncherServer::new(LauncherService(
                registry.clone(),
            )))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = server_stopped.await;
            }),
    );

    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| internal(format!("SIGTERM handler: {e}")))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| internal(format!("SIGINT handler: {e}")))?;

    let (exit_tx, exits) = mpsc::unbounded_channel();
    let mut ranks = Ranks {
        alive: BTreeMap::new(),
        exits,
        grace: Duration::from_secs(args.grace),
    };
    for i in 0..topo.nproc {
        let rank = topo.global_rank(i);
        let role = if args.vae_rank == Some(rank) {
            RoleKind::Vae
        } else {
            RoleKind::Dit
        };
        let spec = WorkerSpec {
            rank,
            world_size: world,
            local_rank: topo.device_ordinal(i),
            role,
            device: if args.backend == "cuda" {
                format!("cuda:{}", topo.device_ordinal(i))
            } else {
                "cpu".into()
            },
            launcher: local_registration,
            listen: if multi {
                "0.0.0.0:0".into()
            } else {
                "127.0.0.1:0".into()
            },
            advertise_host: multi.then(|| advertise.clone()),
        };
        let process = match spawn::spawn(&bin, &spec) {
            Ok(p) => p,
            Err(e) => {
                ranks.terminate().await;
                return Err(internal(format!(
                    "starting {} for rank {rank}: {e}",
                    bin.display()
                )));
            }
        };
        let mut child = process.child;
        let tx = exit_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // The receiver is gone only when the launcher is exiting anyway.
            let _ = tx.send(RankExit { rank, status });
        });
        ranks.alive.insert(
            rank,
            Running {
                role,
                pid: process.pid,
                tail: process.tail,
                _lifeline: process.lifeline,
                forwarders: process.forwarders,
            },
        );
    }
    drop(exit_tx);

    let result = supervise(
        args,
        &topo,
        &registry,
        &mut ranks,
        &mut sigterm,
        &mut sigint,
        &master_endpoint,
    )
    .await;
    let _ = server_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    result
}

async fn supervise(
    args: &LaunchArgs,
    topo: &Topology,
    registry: &Arc<Registry>,
    ranks: &mut Ranks,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
    master: &str,
) -> Result<(), Error> {
    // Readiness: the master waits for every rank of the job, other launchers for their own.
    let expected = if topo.is_master() {
        topo.world_size()
    } else {
        topo.nproc
    };
    let expected_n = usize::try_from(expected).unwrap_or(usize::MAX);
    let mut count = registry.subscribe();
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    loop {
        if *count.borrow_and_update() >= expected_n {
            break;
        }
        tokio::select! {
            changed = count.changed() => if changed.is_err() { return Err(internal("registry closed")) },
            exit = ranks.exits.recv() => match exit {
                Some(exit) => return Err(ranks.fail(exit).await),
                None => return Err(internal("every worker monitor ended before readiness")),
            },
            _ = sigterm.recv() => return drain(registry, ranks, "SIGTERM during start-up").await,
            _ = sigint.recv() => return drain(registry, ranks, "SIGINT during start-up").await,
            _ = sleep_until(deadline) => {
                let seen = registry.entries();
                let missing: Vec<u32> = (0..topo.world_size()).filter(|r| !seen.contains_key(r)).collect();
                ranks.terminate().await;
                let first = missing.first().copied().unwrap_or(0);
                return Err(Error::rank(first, ErrorKind::PeerLost, format!(
                    "ranks {missing:?} did not register within {} s", args.ready_timeout)));
            }
        }
    }

    if topo.is_master() {
        let all = registry.entries();
        // A rank turns REGISTERED once it has read the reply to its registration, which can
        // land after the launcher recorded it: poll the cheap level until every rank has.
        loop {
            let replies = match coordinator::health_all(&all, pb::HealthLevel::Liveness).await {
                Ok(replies) => replies,
                Err(e) => {
                    ranks.terminate().await;
                    return Err(e);
                }
            };
            if replies
                .iter()
                .all(|h| h.state() != pb::WorkerState::Starting)
            {
                break;
            }
            if Instant::now() >= deadline {
                ranks.terminate().await;
                return Err(internal("ranks registered but never left STARTING"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match coordinator::health_all(&all, pb::HealthLevel::Device).await {
            Ok(replies) => {
                for h in replies {
                    spawn::say(&format!(
                        "lava: rank {} healthy: {}, {} (compute round trip {} us)",
                        h.rank,
                        h.state().name(),
                        h.device_detail,
                        h.compute_roundtrip_us
                    ));
                }
            }
            Err(e) => {
                ranks.terminate().await;
                return Err(e);
            }
        }
        spawn::say(&format!(
            "lava: ready: {} ranks (job {})",
            topo.world_size(),
            registry.job_id
        ));
    } else {
        spawn::say(&format!(
            "lava: ready: {} local ranks registered with the master at {master}",
            topo.nproc
        ));
    }

    // Supervision until a signal or a death.
    let remote: BTreeMap<u32, pb::RegisterRequest> = registry
        .entries()
        .into_iter()
        .filter(|(r, _)| !ranks.alive.contains_key(r))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs(args.health_interval.max(1)));
    tick.reset();
    let mut master_misses = 0u32;
    loop {
        tokio::select! {
            exit = ranks.exits.recv() => {
                let Some(exit) = exit else { return Ok(()) };
                let clean = exit.status.as_ref().is_ok_and(ExitStatus::success);
                if clean && !topo.is_master() {
                    // The master drained the job and this rank obeyed its Shutdown.
                    ranks.reap(exit.rank).await;
                    if ranks.alive.is_empty() {
                        spawn::say("lava: every local rank shut down on the master's request");
                        return Ok(());
                    }
                } else {
                    return Err(ranks.fail(exit).await);
                }
            }
            _ = sigterm.recv() => return drain(registry, ranks, "SIGTERM").await,
            _ = sigint.recv() => return drain(registry, ranks, "SIGINT").await,
            _ = tick.tick() => {
                if topo.is_master() {
                    if !remote.is_empty()
                        && let Err(e) = coordinator::health_all(&remote, pb::HealthLevel::Liveness).await
                    {
                        spawn::say_err(&format!("lava: {e}; ending the job"));
                        ranks.terminate().await;
                        return Err(Error::rank(e.rank_id().unwrap_or(0), ErrorKind::PeerLost, e.message().to_string()));
                    }
                } else {
                    match coordinator::heartbeat(master, topo.node_rank).await {
                        Ok(_) => master_misses = 0,
                        Err(e) => {
                            master_misses += 1;
                            if master_misses >= MASTER_MISSES {
                                ranks.terminate().await;
                                return Err(Error::Unattributed {
                                    kind: ErrorKind::PeerLost,
                                    message: format!("master launcher at {master} unreachable {master_misses} times: {e}"),
                                });
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Clean stop: Shutdown to every rank this launcher knows, then SIGTERM/SIGKILL stragglers.
async fn drain(registry: &Registry, ranks: &mut Ranks, why: &str) -> Result<(), Error> {
    let entries = registry.entries();
    spawn::say_err(&format!("lava: {why}: draining {} ranks", entries.len()));
    for failure in coordinator::shutdown_all(&entries, why).await {
        spawn::say_err(&format!("lava: shutdown not acknowledged: {failure}"));
    }
    // Ranks that never registered cannot be asked; they get SIGTERM right away.
    for (rank, r) in &ranks.alive {
        if !entries.contains_key(rank) {
            spawn::signal_group(r.pid, libc::SIGTERM);
        }
    }
    ranks.wait_all(Instant::now() + ranks.grace).await;
    if !ranks.alive.is_empty() {
        ranks.terminate().await;
    }
    spawn::say("lava: drained");
    Ok(())
}
