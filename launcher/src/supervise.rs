//! `lava launch`: start this launcher's workers, bring the job to ready, and supervise it.
//!
//! One process per rank, one monitor task per process reporting its exit on a channel, and
//! one loop ([`Job::watch`]) that owns every decision: any rank that dies ends the whole job
//! (SPMD ranks cannot continue without a peer), SIGTERM/SIGINT drain it (Shutdown to every
//! rank, then SIGTERM, then SIGKILL after the grace period). The shape is TGI's launcher with
//! vLLM's safety nets (docs/protocol.md).
//!
//! `lava generate` reuses the same [`Job`]: `start`, `ready`, then `watch` around its own
//! work (Init, Load, Generate fan-out), then `drain`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use proto::worker::v1::{self as pb, RoleKind};
use proto::{Error, ErrorKind, exit};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::coordinator::{self, LauncherService, Registry};
use crate::env::{self, Topology};
use crate::spawn::{self, Ranks, WorkerSpec};

/// Consecutive failed heartbeats after which a launcher declares the master lost.
const MASTER_MISSES: u32 = 3;
/// How long a failed call waits for the death of the rank it may be the echo of.
const DEATH_GRACE: Duration = Duration::from_secs(2);

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

/// `lava launch`: start, get ready, then supervise until a signal or a death.
async fn launch(args: &LaunchArgs) -> Result<(), Error> {
    let mut job = Job::start(args).await?;
    let outcome = match job.ready().await {
        Ok(true) => job
            .watch(std::future::pending::<Result<(), Error>>())
            .await
            .map(|_| ()),
        Ok(false) => Ok(()),
        Err(e) => Err(e),
    };
    if outcome.is_ok() {
        job.drain().await;
    }
    job.close().await;
    outcome
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

/// A running job as one launcher sees it: its workers, its registration service, its signals.
#[derive(Debug)]
pub struct Job {
    /// Where this launcher sits.
    pub topo: Topology,
    /// Registrations (every rank on the master, this launcher's own elsewhere).
    pub registry: Arc<Registry>,
    ranks: Ranks,
    local: BTreeSet<u32>,
    ready_timeout: Duration,
    health_interval: Duration,
    master: String,
    /// Set once every rank has registered and answered health; gates remote checks.
    is_ready: bool,
    master_misses: u32,
    sigterm: Signal,
    sigint: Signal,
    server_stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Job {
    /// Resolves the topology, starts the registration service and spawns this launcher's
    /// workers. Fails with bad input before spawning anything when flags or variables are wrong.
    pub async fn start(args: &LaunchArgs) -> Result<Job, Error> {
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
        let master = format!("http://{}:{}", topo.master_addr, topo.master_port);
        let ready_timeout = Duration::from_secs(args.ready_timeout);
        let forward = (!topo.is_master()).then(|| master.clone());
        let registry = Registry::new(job_id(), world, forward, ready_timeout);
        let incoming = TcpIncoming::bind(bind)
            .map_err(|e| bad(format!("binding the registration service on {bind}: {e}")))?;
        let port = incoming
            .local_addr()
            .map_err(|e| internal(format!("reading the bound address: {e}")))?
            .port();
        let (server_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .add_service(pb::launcher_server::LauncherServer::new(LauncherService(
                    registry.clone(),
                )))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        let sigterm = signal(SignalKind::terminate())
            .map_err(|e| internal(format!("SIGTERM handler: {e}")))?;
        let sigint = signal(SignalKind::interrupt())
            .map_err(|e| internal(format!("SIGINT handler: {e}")))?;

        let mut job = Job {
            ranks: Ranks::new(Duration::from_secs(args.grace)),
            local: (0..topo.nproc).map(|i| topo.global_rank(i)).collect(),
            topo,
            registry,
            ready_timeout,
            health_interval: Duration::from_secs(args.health_interval.max(1)),
            master,
            is_ready: false,
            master_misses: 0,
            sigterm,
            sigint,
            server_stop: Some(server_stop),
            server,
        };
        let registration = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        for i in 0..job.topo.nproc {
            let rank = job.topo.global_rank(i);
            let ordinal = job.topo.device_ordinal(i);
            let spec = WorkerSpec {
                rank,
                world_size: world,
                local_rank: ordinal,
                role: if args.vae_rank == Some(rank) {
                    RoleKind::Vae
                } else {
                    RoleKind::Dit
                },
                device: if args.backend == "cuda" {
                    format!("cuda:{ordinal}")
                } else {
                    "cpu".into()
                },
                launcher: registration,
                listen: if multi {
                    "0.0.0.0:0".into()
                } else {
                    "127.0.0.1:0".into()
                },
                advertise_host: multi.then(|| advertise.clone()),
            };
            if let Err(e) = job.ranks.start(&bin, &spec) {
                job.ranks.terminate().await;
                job.close().await;
                return Err(internal(format!(
                    "starting {} for rank {rank}: {e}",
                    bin.display()
                )));
            }
        }
        Ok(job)
    }

    /// Waits until every rank has registered and answered both health levels. `Ok(false)`:
    /// a signal asked to stop first (call [`Job::drain`]). On error the ranks are already ended.
    pub async fn ready(&mut self) -> Result<bool, Error> {
        let registry = self.registry.clone();
        let (master, world, nproc) = (
            self.topo.is_master(),
            self.topo.world_size(),
            self.topo.nproc,
        );
        let deadline = Instant::now() + self.ready_timeout;
        let timeout_s = self.ready_timeout.as_secs();
        let master_at = self.master.clone();
        let work = async move {
            let expected =
                usize::try_from(if master { world } else { nproc }).unwrap_or(usize::MAX);
            let mut count = registry.subscribe();
            tokio::select! {
                seen = count.wait_for(|n| *n >= expected) => { seen.map_err(|_| internal("registry closed"))?; }
                _ = sleep_until(deadline) => {
                    let seen = registry.entries();
                    let missing: Vec<u32> = (0..world).filter(|r| !seen.contains_key(r)).collect();
                    let first = missing.first().copied().unwrap_or(0);
                    return Err(Error::rank(first, ErrorKind::PeerLost,
                        format!("ranks {missing:?} did not register within {timeout_s} s")));
                }
            }
            if master {
                check_health(&registry.entries(), deadline).await?;
                spawn::say(&format!(
                    "lava: ready: {world} ranks (job {})",
                    registry.job_id
                ));
            } else {
                spawn::say(&format!(
                    "lava: ready: {nproc} local ranks registered with the master at {master_at}"
                ));
            }
            Ok(())
        };
        let ready = self.watch(work).await?.is_some();
        self.is_ready = ready;
        Ok(ready)
    }

    /// Runs `work` while supervising the job. `Ok(Some(value))`: the work finished.
    /// `Ok(None)`: SIGTERM/SIGINT arrived, or (not the master) every local rank obeyed the
    /// master's Shutdown; call [`Job::drain`]. `Err`: the work failed or a rank died; every
    /// local rank has been ended already.
    pub async fn watch<T>(
        &mut self,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<Option<T>, Error> {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(self.health_interval);
        tick.reset();
        loop {
            tokio::select! {
                done = &mut work => {
                    return match done {
                        Ok(value) => Ok(Some(value)),
                        Err(e) => {
                            if let Some(dead) = self.death_behind(&e).await {
                                return Err(dead);
                            }
                            self.ranks.terminate().await;
                            Err(e)
                        }
                    };
                }
                exit = self.ranks.exits.recv() => {
                    let Some(exit) = exit else { return Err(internal("worker monitors ended")) };
                    let clean = exit.status.as_ref().is_ok_and(ExitStatus::success);
                    if !clean || self.topo.is_master() {
                        return Err(self.ranks.fail(exit).await);
                    }
                    // The master drained the job and this rank obeyed its Shutdown.
                    self.ranks.reap(exit.rank).await;
                    if self.ranks.alive.is_empty() {
                        spawn::say("lava: every local rank shut down on the master's request");
                        return Ok(None);
                    }
                }
                _ = self.sigterm.recv() => { spawn::say_err("lava: SIGTERM"); return Ok(None) }
                _ = self.sigint.recv() => { spawn::say_err("lava: SIGINT"); return Ok(None) }
                _ = tick.tick(), if self.is_ready => {
                    if let Err(e) = self.check_peers().await {
                        spawn::say_err(&format!("lava: {e}; ending the job"));
                        self.ranks.terminate().await;
                        return Err(e);
                    }
                }
            }
        }
    }

    /// A failed call (a lost peer, a broken transport) is often the echo of a rank that died:
    /// its peers saw the closed link before this launcher reaped the process. Waits up to
    /// [`DEATH_GRACE`] for a local rank's unclean exit and, if one comes, ends the job naming
    /// that rank instead.
    async fn death_behind(&mut self, e: &Error) -> Option<Error> {
        if !matches!(e.kind(), ErrorKind::PeerLost | ErrorKind::Internal) {
            return None;
        }
        let deadline = tokio::time::sleep(DEATH_GRACE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                exit = self.ranks.exits.recv() => {
                    let exit = exit?;
                    if !exit.status.as_ref().is_ok_and(ExitStatus::success) {
                        return Some(self.ranks.fail(exit).await);
                    }
                    self.ranks.reap(exit.rank).await;
                }
                _ = &mut deadline => return None,
            }
        }
    }

    /// Liveness of what this launcher cannot watch as processes: ranks on other launchers
    /// (master), or the master launcher itself (the others).
    async fn check_peers(&mut self) -> Result<(), Error> {
        if self.topo.is_master() {
            let remote: BTreeMap<_, _> = self
                .registry
                .entries()
                .into_iter()
                .filter(|(r, _)| !self.local.contains(r))
                .collect();
            if remote.is_empty() {
                return Ok(());
            }
            return coordinator::health_all(&remote, pb::HealthLevel::Liveness)
                .await
                .map(|_| ())
                .map_err(|e| {
                    Error::rank(
                        e.rank_id().unwrap_or(0),
                        ErrorKind::PeerLost,
                        e.message().to_string(),
                    )
                });
        }
        match coordinator::heartbeat(&self.master, self.topo.node_rank).await {
            Ok(_) => self.master_misses = 0,
            Err(e) => {
                self.master_misses += 1;
                if self.master_misses >= MASTER_MISSES {
                    return Err(Error::Unattributed {
                        kind: ErrorKind::PeerLost,
                        message: format!(
                            "master launcher at {} unreachable {} times: {e}",
                            self.master, self.master_misses
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Clean stop: Shutdown to every rank this launcher knows, then SIGTERM/SIGKILL stragglers.
    pub async fn drain(&mut self) {
        if self.ranks.alive.is_empty() {
            return;
        }
        let entries = self.registry.entries();
        spawn::say_err(&format!("lava: draining {} ranks", entries.len()));
        for failure in coordinator::shutdown_all(&entries, "the launcher is draining the job").await
        {
            spawn::say_err(&format!("lava: shutdown not acknowledged: {failure}"));
        }
        // Ranks that never registered cannot be asked; they get SIGTERM right away.
        for (rank, r) in &self.ranks.alive {
            if !entries.contains_key(rank) {
                spawn::signal_group(r.pid, libc::SIGTERM);
            }
        }
        self.ranks.wait_all(Instant::now() + self.ranks.grace).await;
        if !self.ranks.alive.is_empty() {
            self.ranks.terminate().await;
        }
        spawn::say("lava: drained");
    }

    /// Stops the registration service. Ranks still alive are ended first.
    pub async fn close(mut self) {
        if !self.ranks.alive.is_empty() {
            self.ranks.terminate().await;
        }
        if let Some(stop) = self.server_stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.server).await;
    }
}

/// Health of every rank: the cheap level until every rank has left STARTING (a rank turns
/// REGISTERED once it has read the reply to its registration, which can land after the
/// launcher recorded it), then the expensive level once.
async fn check_health(
    all: &BTreeMap<u32, pb::RegisterRequest>,
    deadline: Instant,
) -> Result<(), Error> {
    loop {
        let replies = coordinator::health_all(all, pb::HealthLevel::Liveness).await?;
        if replies
            .iter()
            .all(|h| h.state() != pb::WorkerState::Starting)
        {
            break;
        }
        if Instant::now() >= deadline {
            return Err(internal("ranks registered but never left STARTING"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for h in coordinator::health_all(all, pb::HealthLevel::Device).await? {
        spawn::say(&format!(
            "lava: rank {} healthy: {}, {} (compute round trip {} us)",
            h.rank,
            h.state().name(),
            h.device_detail,
            h.compute_roundtrip_us
        ));
    }
    Ok(())
}
