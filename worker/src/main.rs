//! `lava-worker`: one rank of a lava job, spawned by `lava launch` / `lava generate`.
//!
//! Start-up: parse flags → start the compute thread (owns the device) → bind the control
//! plane → register with the launcher → serve until Shutdown, a signal, or the launcher's
//! death (stdin lifeline). Exit codes are `proto::exit`; see docs/protocol.md.

/// Writes a line to stderr. Never panics: once the launcher is gone the pipe is closed, and
/// `eprintln!` would panic on EPIPE exactly when the worker must shut down cleanly.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod compute;
mod control;
mod doctor;
mod lifeline;
mod role;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use proto::worker::v1 as pb;
use proto::{Error, ErrorKind};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::compute::{Compute, Device};
use crate::control::{FramesService, Shared, Stop, WorkerService};

/// How long a worker keeps trying to reach its launcher at start-up.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// One rank of a lava job. Started by `lava launch`; rarely run by hand.
#[derive(Debug, Parser)]
#[command(name = "lava-worker", version, about, long_about = None)]
struct Args {
    /// Global rank of this worker, 0-based.
    #[arg(long, env = "LAVA_WORKER_RANK")]
    rank: u32,
    /// Number of ranks in the job.
    #[arg(long, env = "LAVA_WORKER_WORLD_SIZE")]
    world_size: u32,
    /// Rank on this node.
    #[arg(long, env = "LAVA_WORKER_LOCAL_RANK", default_value_t = 0)]
    local_rank: u32,
    /// Role this process plays: `dit` or `vae`.
    #[arg(long, env = "LAVA_WORKER_ROLE", default_value = "dit")]
    role: String,
    /// host:port of the launcher's registration service.
    #[arg(long, env = "LAVA_WORKER_LAUNCHER")]
    launcher: SocketAddr,
    /// Address the control plane binds (port 0 picks a free port).
    #[arg(long, env = "LAVA_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Host name or IP the coordinator should use to reach this worker [default: the bound IP].
    #[arg(long, env = "LAVA_WORKER_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, env = "LAVA_WORKER_DEVICE", default_value = "cpu")]
    device: String,
    /// Exit when stdin reaches EOF (the launcher holds the other end of the pipe).
    #[arg(long, env = "LAVA_WORKER_STDIN_LIFELINE")]
    stdin_lifeline: bool,
}

fn main() -> ExitCode {
    // `lava-worker doctor` (run by `lava doctor`) needs none of the rank flags.
    if std::env::args().nth(1).as_deref() == Some("doctor") {
        return doctor::run();
    }
    let args = Args::parse();
    let rank = args.rank;
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            log!("lava-worker rank {rank}: error: {err:#}");
            let code = err
                .downcast_ref::<Error>()
                .map_or(proto::exit::INTERNAL, Error::exit_code);
            ExitCode::from(code)
        }
    }
}

fn bad_input(rank: u32, message: String) -> anyhow::Error {
    Error::rank(rank, ErrorKind::BadInput, message).into()
}

fn run(args: Args) -> anyhow::Result<u8> {
    let rank = args.rank;
    if args.world_size == 0 || rank >= args.world_size {
        return Err(bad_input(
            rank,
            format!("rank {rank} is outside world size {}", args.world_size),
        ));
    }
    let role = pb::RoleKind::from_name(&args.role).ok_or_else(|| {
        bad_input(
            rank,
            format!("role {:?} is neither `dit` nor `vae`", args.role),
        )
    })?;
    let device = Device::parse(&args.device).map_err(|e| bad_input(rank, e))?;
    lifeline::set_process_name(rank, role.name());

    let compute = Compute::start(rank, device).map_err(|e| bad_input(rank, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("ctl-r{rank}"))
        .enable_all()
        .build()
        .context("starting the control-plane runtime")?;
    // Rank 0 of a multi-rank CPU job hosts the socket communicator's rendezvous; its address
    // travels in the registration and reaches the other ranks in Init.
    let rendezvous = if rank == 0 && args.world_size > 1 && device == Device::Cpu {
        let bind = SocketAddr::new(args.listen.ip(), 0);
        let listener = std::net::TcpListener::bind(bind)
            .map_err(|e| bad_input(rank, format!("binding the rendezvous on {bind}: {e}")))?;
        Some(listener)
    } else {
        None
    };
    // Rank 0 of a multi-rank CUDA job creates the NCCL unique id; it travels in the
    // registration and reaches the other ranks in Init.
    let nccl_id = if rank == 0 && args.world_size > 1 && device != Device::Cpu {
        nccl_unique_id().map_err(|e| bad_input(rank, format!("creating the NCCL id: {e}")))?
    } else {
        Vec::new()
    };
    let rendezvous_port = match &rendezvous {
        Some(l) => Some(
            l.local_addr()
                .context("reading the rendezvous address")?
                .port(),
        ),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None);
    let setup = (rank, args.world_size, role, device);
    let shared = Arc::new(Shared::new(setup, rendezvous, compute.sender(), stop_tx));
    let boot = Bootstrap {
        rendezvous_port,
        nccl_id,
        device: compute.device_info().clone(),
    };
    let result = runtime.block_on(serve(&args, device, boot, shared, stop_rx));
    // Give the compute thread a moment to leave its loop; it holds no state worth waiting for.
    compute.stop(Duration::from_secs(5));
    runtime.shutdown_timeout(Duration::from_secs(2));
    let stop = result?;
    log!("exiting ({stop:?})");
    Ok(stop.exit_code())
}

/// What rank 0 announces for the communicator.
struct Bootstrap {
    /// Port of the socket rendezvous (CPU ranks).
    rendezvous_port: Option<u16>,
    /// The NCCL unique id (CUDA ranks).
    nccl_id: Vec<u8>,
    /// The opened device's name and memory (empty on the CPU).
    device: compute::DeviceInfo,
}

#[cfg(feature = "cuda")]
fn nccl_unique_id() -> Result<Vec<u8>, String> {
    runtime::comm::NcclId::new()
        .map(|id| id.to_bytes().to_vec())
        .map_err(|e| e.to_string())
}

/// Unreachable in practice: a CUDA device is refused at start-up without the feature.
#[cfg(not(feature = "cuda"))]
fn nccl_unique_id() -> Result<Vec<u8>, String> {
    Err("this lava-worker was built without the `cuda` feature".into())
}

async fn serve(
    args: &Args,
    device: Device,
    boot: Bootstrap,
    shared: Arc<Shared>,
    mut stop_rx: tokio::sync::watch::Receiver<Option<Stop>>,
) -> anyhow::Result<Stop> {
    let rank = args.rank;
    lifeline::watch_signals(shared.clone()).context("installing signal handlers")?;
    if args.stdin_lifeline {
        lifeline::watch_stdin(shared.clone()).context("starting the lifeline thread")?;
    }

    let incoming = TcpIncoming::bind(args.listen).map_err(|e| {
        bad_input(
            rank,
            format!("binding the control plane on {}: {e}", args.listen),
        )
    })?;
    let bound = incoming.local_addr().context("reading the bound address")?;
    let host = args
        .advertise_host
        .clone()
        .unwrap_or_else(|| bound.ip().to_string());
    let address = format!("{host}:{}", bound.port());
    let rendezvous = boot
        .rendezvous_port
        .map(|port| format!("{host}:{port}"))
        .unwrap_or_default();

    let mut server_stop = stop_rx.clone();
    let server = Server::builder()
        .add_service(pb::worker_server::WorkerServer::new(WorkerService::new(
            shared.clone(),
        )))
        .add_service(proto::frames::v1::frames_server::FramesServer::new(
            FramesService::new(shared.clone()),
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            // An Err means the sender is gone, which also means stop.
            let _ = server_stop.wait_for(Option::is_some).await;
        });
    let server = tokio::spawn(server);

    let registration = register(
        args,
        (device, &boot.device),
        &address,
        rendezvous,
        boot.nccl_id,
    );
    let reply = tokio::select! {
        reply = registration => reply?,
        stop = wait_stop(&mut stop_rx) => return Ok(stop),
    };
    if !reply.accepted {
        return Err(bad_input(
            rank,
            format!("the launcher refused the registration: {}", reply.reason),
        ));
    }
    shared.set_state(pb::WorkerState::Registered);
    log!(
        "registered with job {} as rank {rank} ({}) at {address}",
        reply.job_id,
        shared.role.name()
    );

    let stop = wait_stop(&mut stop_rx).await;
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => log!("control plane ended with an error: {e}"),
        Ok(Err(e)) => log!("control plane task failed: {e}"),
        Err(_) => log!("control plane did not drain within 5 s"),
    }
    Ok(stop)
}

/// Waits for the first stop request. A closed channel cannot happen while `Shared` lives;
/// reading it as "launcher gone" is the safe choice if it ever does.
async fn wait_stop(rx: &mut tokio::sync::watch::Receiver<Option<Stop>>) -> Stop {
    match rx.wait_for(Option::is_some).await {
        Ok(stop) => stop.unwrap_or(Stop::LauncherGone),
        Err(_) => Stop::LauncherGone,
    }
}

/// Registers with the launcher, retrying while it is not reachable yet.
async fn register(
    args: &Args,
    (device, info): (Device, &compute::DeviceInfo),
    address: &str,
    comm_rendezvous_address: String,
    nccl_unique_id: Vec<u8>,
) -> anyhow::Result<pb::RegisterReply> {
    let request = pb::RegisterRequest {
        rank: args.rank,
        world_size: args.world_size,
        local_rank: args.local_rank,
        role: pb::RoleKind::from_name(&args.role)
            .unwrap_or_default()
            .into(),
        pid: std::process::id(),
        address: address.to_string(),
        hostname: hostname(),
        device: Some(pb::DeviceInfo {
            kind: device.kind().into(),
            ordinal: device.ordinal(),
            name: info.name.clone(),
            total_memory_bytes: info.total_memory_bytes,
            free_memory_bytes: info.free_memory_bytes,
        }),
        // Rank 0 only: the NCCL id (CUDA) or the socket rendezvous (CPU).
        nccl_unique_id,
        comm_rendezvous_address,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let endpoint = format!("http://{}", args.launcher);
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    loop {
        let attempt = async {
            let mut client = pb::launcher_client::LauncherClient::connect(endpoint.clone()).await?;
            anyhow::Ok(client.register(request.clone()).await)
        };
        match attempt.await {
            Ok(Ok(reply)) => return Ok(reply.into_inner()),
            Ok(Err(status)) => {
                let err = Error::from(status);
                return Err(Error::rank(
                    args.rank,
                    err.kind(),
                    format!("registering: {}", err.message()),
                )
                .into());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::rank(
                    args.rank,
                    ErrorKind::PeerLost,
                    format!(
                        "launcher at {} unreachable for {} s: {e}",
                        args.launcher,
                        REGISTER_TIMEOUT.as_secs()
                    ),
                )
                .into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
