//! The compute thread: the one thread that owns this rank's device.
//!
//! Device contexts and communicators are bound to the thread that created them and are not
//! `Send`-friendly, so the control plane (tokio, its own threads) never touches them: it sends
//! a [`Command`] over a channel and awaits the reply on a oneshot.

use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::ErrorKind;
use runtime::comm::{Comm, CommErrorKind, SocketComm, SocketOptions};
use tokio::sync::oneshot;

/// How long forming the communicator may take: every rank must have received its Init.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of each collective once the communicator exists.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The device this rank computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU reference backend.
    Cpu,
    /// A CUDA device by ordinal on this node.
    Cuda(u32),
}

impl Device {
    /// Parses `cpu` or `cuda:N`.
    pub fn parse(text: &str) -> Result<Device, String> {
        if text == "cpu" {
            return Ok(Device::Cpu);
        }
        match text.strip_prefix("cuda:").map(str::parse::<u32>) {
            Some(Ok(ordinal)) => Ok(Device::Cuda(ordinal)),
            _ => Err(format!("device {text:?} is neither `cpu` nor `cuda:N`")),
        }
    }

    /// `cpu` or `cuda`.
    pub fn kind(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    /// Ordinal on the node (0 for the CPU).
    pub fn ordinal(self) -> u32 {
        match self {
            Device::Cpu => 0,
            Device::Cuda(ordinal) => ordinal,
        }
    }
}

/// Result of a device probe.
#[derive(Debug)]
pub struct Probe {
    /// What was checked and how it went.
    pub detail: String,
}

/// How this rank reaches the communicator's rendezvous.
#[derive(Debug)]
pub enum Rendezvous {
    /// Rank 0: host it on the listener whose address went out in the registration.
    Host(TcpListener),
    /// Other ranks: join rank 0 at this address (from Init).
    Join(SocketAddr),
    /// CUDA ranks: the NCCL unique id rank 0 created and registered, fanned out in Init.
    Nccl(Vec<u8>),
}

/// A failure of the compute thread, classified for the control plane.
pub type Failure = (ErrorKind, String);

/// Work for the compute thread.
#[derive(Debug)]
pub enum Command {
    /// Prove the thread is alive and its device answers.
    Probe(oneshot::Sender<Result<Probe, String>>),
    /// Form this rank's communicator (blocks until every rank has joined), check it with a
    /// barrier, and keep it for the model. Replies with a description of the communicator.
    Connect {
        /// Where the rendezvous is.
        rendezvous: Rendezvous,
        /// This rank.
        rank: usize,
        /// Number of ranks.
        world: usize,
        /// The outcome.
        reply: oneshot::Sender<Result<String, Failure>>,
    },
    /// Build this rank's model (random weights, or a checkpoint): replies with its weight bytes
    /// and the peak of the device's memory tracker while loading.
    Load {
        /// Model name from Init (built in, or a spec file).
        name: String,
        /// Weight and activation dtype from Init's ModelRef.
        dtype: runtime::DType,
        /// Checkpoint folder, LoRA and `--fp8` from Init; `None`: the built-in tiny model.
        ckpt: Option<crate::role::ckpt::CkptRequest>,
        /// Which parts this rank holds: (DiT, VAE); both on a DiT rank hosting the VAE.
        parts: (bool, bool),
        /// The job's ranks, from Init's layout (split stages form their groups at load).
        topology: crate::role::topology::Topology,
        reply: oneshot::Sender<Result<(u64, u64), Failure>>,
    },
    /// Run one generation on this rank over the communicator (see [`crate::role`]).
    Generate {
        job: crate::role::Job,
        /// Who talks to whom, from Init's layout.
        topology: crate::role::topology::Topology,
        /// Decoding rank only: where decoded blocks go.
        frames: Option<crate::role::FrameSink>,
        /// What this rank did, and the peak of its memory tracker during the generation.
        reply: oneshot::Sender<Result<(crate::role::Generated, u64), Failure>>,
    },
    /// Leave the loop.
    Stop,
}

/// The control plane's handle on the compute thread.
#[derive(Debug)]
pub struct Compute {
    tx: mpsc::Sender<Command>,
    join: Option<JoinHandle<()>>,
    info: DeviceInfo,
}

/// What the device reported when it was opened (empty on the CPU).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub total_memory_bytes: u64,
    /// Free after this rank's context was created.
    pub free_memory_bytes: u64,
}

impl Compute {
    /// Starts the compute thread for `device`. A CUDA device in a build without the `cuda`
    /// feature is refused here, before the rank registers.
    pub fn start(rank: u32, device: Device) -> Result<Compute, String> {
        if let Device::Cuda(_) = device
            && !cfg!(feature = "cuda")
        {
            return Err(
                "this lava-worker was built without the `cuda` feature; use --device cpu".into(),
            );
        }
        let (tx, rx) = mpsc::channel();
        let (opened_tx, opened) = mpsc::sync_channel(1);
        let join = std::thread::Builder::new()
            .name(format!("compute-r{rank}"))
            .spawn(move || {
                // The device is opened on the thread that will use it; a failure ends here.
                let result = open(device);
                let ok = result.is_ok();
                let _ = opened_tx.send(result);
                if ok {
                    run(device, rx);
                }
            })
            .map_err(|e| format!("starting the compute thread: {e}"))?;
        let info = match opened.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the compute thread died while opening the device".into()),
        };
        Ok(Compute {
            tx,
            join: Some(join),
            info,
        })
    }

    /// The device as it was opened: name and memory.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.info
    }

    /// A sender for the control plane's handlers.
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }

    /// Asks the thread to stop and waits up to `timeout` for it.
    pub fn stop(mut self, timeout: Duration) -> bool {
        // Send fails only when the thread is already gone, which is what we want.
        let _ = self.tx.send(Command::Stop);
        let Some(join) = self.join.take() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        while !join.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        join.join().is_ok()
    }
}

/// The runtime's name for `device`.
fn runtime_device(device: Device) -> runtime::Device {
    match device {
        Device::Cpu => runtime::Device::Cpu,
        Device::Cuda(o) => runtime::Device::Cuda(usize::try_from(o).unwrap_or(usize::MAX)),
    }
}

/// Creates the device's context (CUDA: context, stream, kernels) so that a missing library or
/// GPU stops the worker before it registers; reads its name and memory for the launcher's
/// check against the plan.
fn open(device: Device) -> Result<DeviceInfo, String> {
    match runtime_device(device) {
        runtime::Device::Cpu => Ok(DeviceInfo::default()),
        runtime::Device::Cuda(o) => {
            runtime::Device::cuda_if_available(o).map_err(|e| format!("opening cuda:{o}: {e}"))?;
            let (name, total, free) = runtime::device::cuda::memory_info(o)
                .map_err(|e| format!("reading cuda:{o}'s memory: {e}"))?;
            Ok(DeviceInfo {
                name,
                total_memory_bytes: total,
                free_memory_bytes: free,
            })
        }
    }
}

fn run(device: Device, rx: mpsc::Receiver<Command>) {
    // The communicator lives and dies on this thread, like the device context.
    let mut comm: Option<(Box<dyn Comm>, String)> = None;
    let mut model: Option<crate::role::Loaded> = None;
    let tracker = runtime::memory::MemoryTracker::for_device(&runtime_device(device));
    while let Ok(cmd) = rx.recv() {
        // Receivers may have given up (timeouts); nothing to do then, hence the ignored sends.
        match cmd {
            Command::Probe(reply) => {
                let _ = reply.send(probe(device, comm.as_ref().map(|c| c.1.as_str())));
            }
            Command::Connect {
                rendezvous,
                rank,
                world,
                reply,
            } => {
                let outcome = if comm.is_some() {
                    Err((
                        ErrorKind::WrongState,
                        "the communicator already exists".to_string(),
                    ))
                } else {
                    connect(device, rendezvous, rank, world).map(|c| {
                        // "socket communicator rank 1 of 3" → "socket communicator, rank 1 of 3"
                        let detail = c.1.replacen(" rank", ", rank", 1);
                        comm = Some(c);
                        detail
                    })
                };
                let _ = reply.send(outcome);
            }
            Command::Load {
                name,
                dtype,
                ckpt,
                parts,
                topology,
                reply,
            } => {
                tracker.reset_peak();
                let c = comm.as_ref().map(|c| c.0.as_ref());
                let dev = runtime_device(device);
                let outcome = crate::role::Loaded::load(
                    (&name, dtype),
                    ckpt.as_ref(),
                    parts,
                    dev,
                    c,
                    &topology,
                )
                .map(|m| {
                    // What this rank's tracker holds as weights (its shards); the spec's
                    // count if nothing was tracked.
                    let live = tracker.stats().get(runtime::memory::Category::Weights).live;
                    let bytes = match u64::try_from(live) {
                        Ok(b) if b > 0 => b,
                        _ => m.weight_bytes(),
                    };
                    model = Some(m);
                    (bytes, peak(&tracker))
                });
                let _ = reply.send(outcome);
            }
            Command::Generate {
                job,
                topology,
                frames,
                reply,
            } => {
                tracker.reset_peak();
                let outcome = match &model {
                    Some(m) => {
                        // One rank alone has no communicator; the solo group answers every
                        // collective.
                        let solo;
                        let c: &dyn Comm = match &comm {
                            Some((c, _)) => c.as_ref(),
                            None => {
                                solo = runtime::parallel::solo();
                                solo.as_ref()
                            }
                        };
                        m.generate(c, &topology, &job, frames)
                            .map(|g| (g, peak(&tracker)))
                    }
                    None => Err((
                        ErrorKind::WrongState,
                        "Generate needs Init and Load first".to_string(),
                    )),
                };
                let _ = reply.send(outcome);
            }
            Command::Stop => break,
        }
    }
    if let Some((comm, _)) = comm {
        // Peers blocked on us fail fast instead of waiting for their timeout.
        comm.abort();
    }
}

fn peak(tracker: &runtime::memory::MemoryTracker) -> u64 {
    u64::try_from(tracker.stats().total_peak).unwrap_or(u64::MAX)
}

/// The device check of an expensive health probe: the compute thread answering, and on CUDA
/// a synchronisation of the device's stream (a wedged or lost GPU fails it).
fn probe(device: Device, comm: Option<&str>) -> Result<Probe, String> {
    runtime_device(device)
        .synchronize()
        .map_err(|e| format!("{}:{}: {e}", device.kind(), device.ordinal()))?;
    let mut detail = format!(
        "{}:{} compute thread answered",
        device.kind(),
        device.ordinal()
    );
    if let Some(c) = comm {
        detail.push_str(&format!("; {c}"));
    }
    Ok(Probe { detail })
}

/// The communicator: sockets between CPU ranks, NCCL between CUDA ranks (`cuda` feature),
/// checked with a barrier. Returns it with its description for health probes.
fn connect(
    device: Device,
    rendezvous: Rendezvous,
    rank: usize,
    world: usize,
) -> Result<(Box<dyn Comm>, String), Failure> {
    let opts = SocketOptions {
        timeout: COLLECTIVE_TIMEOUT,
        connect_timeout: RENDEZVOUS_TIMEOUT,
    };
    let comm: Box<dyn Comm> = match rendezvous {
        Rendezvous::Host(listener) => {
            Box::new(SocketComm::host(listener, world, opts).map_err(classify)?)
        }
        Rendezvous::Join(addr) => {
            Box::new(SocketComm::join(addr, rank, world, opts).map_err(classify)?)
        }
        Rendezvous::Nccl(id) => nccl(device, &id, rank, world)?,
    };
    comm.barrier().map_err(classify)?;
    let kind = match device {
        Device::Cpu => "socket",
        Device::Cuda(_) => "NCCL",
    };
    let detail = format!(
        "{kind} communicator rank {} of {}",
        comm.rank(),
        comm.world()
    );
    Ok((comm, detail))
}

/// An NCCL communicator on this rank's CUDA device from rank 0's unique id.
#[cfg(feature = "cuda")]
fn nccl(device: Device, id: &[u8], rank: usize, world: usize) -> Result<Box<dyn Comm>, Failure> {
    use runtime::comm::{NcclComm, NcclId};
    let Device::Cuda(ordinal) = device else {
        return Err((
            ErrorKind::BadInput,
            "an NCCL id reached a CPU rank".to_string(),
        ));
    };
    let id = NcclId::from_bytes(id).map_err(|e| (ErrorKind::BadInput, e.to_string()))?;
    let ordinal = usize::try_from(ordinal).unwrap_or(usize::MAX);
    let comm = NcclComm::init_on_device(&id, rank, world, ordinal, RENDEZVOUS_TIMEOUT)
        .map_err(classify)?;
    comm.set_timeout(COLLECTIVE_TIMEOUT);
    Ok(Box::new(comm))
}

/// Without the `cuda` feature no CUDA rank starts ([`Compute::start`]), so no NCCL id comes.
#[cfg(not(feature = "cuda"))]
fn nccl(_: Device, _: &[u8], _: usize, _: usize) -> Result<Box<dyn Comm>, Failure> {
    Err((
        ErrorKind::Unsupported,
        "this lava-worker was built without the `cuda` feature (no NCCL)".to_string(),
    ))
}

/// A peer that vanished or never came is a lost peer; anything else is internal.
fn classify(err: runtime::Error) -> Failure {
    let kind = match &err {
        runtime::Error::Comm {
            kind: CommErrorKind::PeerLost { .. } | CommErrorKind::Timeout { .. },
            ..
        } => ErrorKind::PeerLost,
        _ => ErrorKind::Internal,
    };
    (kind, err.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse("cuda:3"), Ok(Device::Cuda(3)));
        assert!(Device::parse("cuda").is_err());
        assert!(Device::parse("gpu:1").is_err());
    }

    #[test]
    fn probe_round_trips_and_stop_joins() {
        let compute = Compute::start(0, Device::Cpu).unwrap();
        let (tx, rx) = oneshot::channel();
        compute.sender().send(Command::Probe(tx)).unwrap();
        let probe = rx.blocking_recv().unwrap().unwrap();
        assert!(probe.detail.starts_with("cpu:0"), "{}", probe.detail);
        assert!(compute.stop(Duration::from_secs(5)));
    }

    #[test]
    fn three_compute_threads_form_a_communicator() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let computes: Vec<_> = (0..3)
            .map(|r| Compute::start(r, Device::Cpu).unwrap())
            .collect();
        let mut replies = Vec::new();
        let mut listener = Some(listener);
        for (rank, compute) in computes.iter().enumerate() {
            let rendezvous = match listener.take() {
                Some(l) => Rendezvous::Host(l),
                None => Rendezvous::Join(addr),
            };
            let (reply, rx) = oneshot::channel();
            compute
                .sender()
                .send(Command::Connect {
                    rendezvous,
                    rank,
                    world: 3,
                    reply,
                })
                .unwrap();
            replies.push(rx);
        }
        for (rank, rx) in replies.into_iter().enumerate() {
            assert_eq!(
                rx.blocking_recv().unwrap().unwrap(),
                format!("socket communicator, rank {rank} of 3")
            );
        }
        let (tx, rx) = oneshot::channel();
        computes[1].sender().send(Command::Probe(tx)).unwrap();
        assert!(
            rx.blocking_recv()
                .unwrap()
                .unwrap()
                .detail
                .ends_with("rank 1 of 3")
        );
        for c in computes {
            assert!(c.stop(Duration::from_secs(5)));
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_device_is_refused_without_the_feature() {
        let err = Compute::start(0, Device::Cuda(0)).unwrap_err();
        assert!(err.contains("cuda"), "{err}");
    }
}
