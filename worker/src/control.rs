//! The control-plane server of one rank (`Worker` in worker.proto) and its frame stream
//! (`Frames` in frames.proto).
//!
//! Handlers run on the tokio threads and only read or update [`Shared`]; anything that needs
//! the device goes to the compute thread through [`crate::compute`].

use std::net::{TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use proto::frames::v1 as fpb;
use proto::worker::v1::{self as pb, rank_role::Role};
use proto::{Error, ErrorKind};
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status};

use crate::compute::{Command, Device, Rendezvous};

/// How long an expensive health probe waits for the compute thread.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the worker is leaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The coordinator sent Shutdown: a clean exit.
    Shutdown,
    /// The launcher is gone (lifeline EOF): the job cannot continue.
    LauncherGone,
    /// SIGTERM or SIGINT arrived.
    Signal(i32),
}

impl Stop {
    /// The process exit code for this way of stopping.
    pub fn exit_code(self) -> u8 {
        match self {
            Stop::Shutdown => proto::exit::OK,
            Stop::LauncherGone => proto::exit::PEER_LOST,
            // The shell convention for "terminated by signal N".
            Stop::Signal(signal) => 128u8.saturating_add(u8::try_from(signal).unwrap_or(0)),
        }
    }
}

/// State shared by the handlers of one rank.
#[derive(Debug)]
pub struct Shared {
    /// Global rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// The role this process was started with.
    pub role: pb::RoleKind,
    device: Device,
    started: Instant,
    state: Mutex<pb::WorkerState>,
    /// Set by the first Init, so a second one is refused even while the first is connecting.
    init_claimed: AtomicBool,
    plan: Mutex<Option<pb::InitRequest>>,
    /// Rank 0 of a multi-rank job: the listener of the communicator rendezvous, bound at
    /// start-up so its address goes out in the registration; taken by Init.
    rendezvous: Mutex<Option<TcpListener>>,
    compute: mpsc::Sender<Command>,
    stop: watch::Sender<Option<Stop>>,
    /// VAE rank: frame streams of running generations, by request id, until StreamFrames
    /// takes them.
    frames: Mutex<std::collections::HashMap<String, tokio::sync::mpsc::Receiver<fpb::FrameChunk>>>,
}

impl Shared {
    /// New shared state in `STARTING`.
    pub fn new(
        (rank, world_size, role, device): (u32, u32, pb::RoleKind, Device),
        rendezvous: Option<TcpListener>,
        compute: mpsc::Sender<Command>,
        stop: watch::Sender<Option<Stop>>,
    ) -> Self {
        Shared {
            rank,
            world_size,
            role,
            device,
            started: Instant::now(),
            state: Mutex::new(pb::WorkerState::Starting),
            init_claimed: AtomicBool::new(false),
            plan: Mutex::new(None),
            rendezvous: Mutex::new(rendezvous),
            compute,
            stop,
            frames: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn plan(&self) -> Option<pb::InitRequest> {
        self.plan
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends `cmd` to the compute thread and awaits its reply.
    async fn compute<T>(
        &self,
        cmd: Command,
        rx: oneshot::Receiver<Result<T, crate::compute::Failure>>,
    ) -> Result<T, Status> {
        self.compute
            .send(cmd)
            .map_err(|_| self.err(ErrorKind::Internal, "compute thread has exited"))?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((kind, message))) => Err(self.err(kind, message)),
            Err(_) => Err(self.err(ErrorKind::Internal, "compute thread dropped the request")),
        }
    }

    /// Current lifecycle state.
    pub fn state(&self) -> pb::WorkerState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves to `next`.
    pub fn set_state(&self, next: pb::WorkerState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = next;
    }

    /// Asks the worker to stop; the first reason wins.
    pub fn request_stop(&self, why: Stop) {
        self.stop.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(why);
                true
            } else {
                false
            }
        });
    }

    fn err(&self, kind: ErrorKind, message: impl Into<String>) -> Status {
        Error::rank(self.rank, kind, message).into()
    }

    /// Checks an Init against this process: same rank, world and role kind, a complete layout.
    fn check_init(&self, init: &pb::InitRequest) -> Result<(), Status> {
        let bad = |msg: String| self.err(ErrorKind::BadInput, msg);
        if init.rank != self.rank {
            return Err(bad(format!(
                "Init for rank {} sent to rank {}",
                init.rank, self.rank
            )));
        }
        if init.world_size != self.world_size {
            return Err(bad(format!(
                "Init says world size {}, this worker was started with {}",
                init.world_size, self.world_size
            )));
        }
        let kind = match init.role.as_ref().and_then(|r| r.role.as_ref()) {
            Some(Role::Dit(dit)) => {
                check_dit(dit).map_err(bad)?;
                pb::RoleKind::Dit
            }
            Some(Role::Vae(_)) => pb::RoleKind::Vae,
            None => return Err(bad("Init carries no role".into())),
        };
        if kind != self.role {
            return Err(bad(format!(
                "Init gives role {}, this worker was started as {}",
                kind.name(),
                self.role.name()
            )));
        }
        let world = usize::try_from(self.world_size).unwrap_or(usize::MAX);
        if init.layout.len() != world {
            return Err(bad(format!(
                "layout lists {} ranks, world size is {world}",
                init.layout.len()
            )));
        }
        if let Some((i, entry)) = init
            .layout
            .iter()
            .enumerate()
            .find(|(i, e)| usize::try_from(e.rank).ok() != Some(*i))
        {
            return Err(bad(format!(
                "layout entry {i} is rank {}, expected {i}",
                entry.rank
            )));
        }
        if init.model.as_ref().is_none_or(|m| m.name.is_empty()) {
            return Err(bad("Init names no model".into()));
        }
        Ok(())
    }
}

impl Shared {
    /// Forms the communicator on the compute thread: rank 0 hosts the rendezvous it announced
    /// at registration, the others join the address Init carries. One rank needs none.
    async fn connect(&self, init: &pb::InitRequest) -> Result<String, Status> {
        if self.world_size == 1 {
            return Ok("one rank, no communicator".into());
        }
        let rendezvous = if self.device != Device::Cpu {
            if init.nccl_unique_id.is_empty() {
                return Err(self.err(
                    ErrorKind::BadInput,
                    "a multi-rank CUDA job needs rank 0's NCCL unique id in Init",
                ));
            }
            Rendezvous::Nccl(init.nccl_unique_id.clone())
        } else if self.rank == 0 {
            let listener = self
                .rendezvous
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let listener = listener.ok_or_else(|| {
                self.err(
                    ErrorKind::Internal,
                    "no rendezvous listener (CPU ranks only)",
                )
            })?;
            Rendezvous::Host(listener)
        } else {
            let text = &init.comm_rendezvous_address;
            let addr = text.to_socket_addrs().ok().and_then(|mut a| a.next());
            Rendezvous::Join(addr.ok_or_else(|| {
                self.err(
                    ErrorKind::BadInput,
                    format!("comm_rendezvous_address {text:?} does not resolve"),
                )
            })?)
        };
        let rank = usize::try_from(self.rank).unwrap_or(usize::MAX);
        let world = usize::try_from(self.world_size).unwrap_or(usize::MAX);
        let (reply, rx) = oneshot::channel();
        self.compute
            .send(Command::Connect {
                rendezvous,
                rank,
                world,
                reply,
            })
            .map_err(|_| self.err(ErrorKind::Internal, "compute thread has exited"))?;
        match rx.await {
            Ok(Ok(detail)) => Ok(detail),
            Ok(Err((kind, message))) => {
                Err(self.err(kind, format!("forming the communicator: {message}")))
            }
            Err(_) => Err(self.err(ErrorKind::Internal, "compute thread dropped the request")),
        }
    }
}

/// The parallel degrees of a DiT role must be positive and each rank index inside its degree.
fn check_dit(dit: &pb::DitRole) -> Result<(), String> {
    let axes = [
        ("tp", dit.tp_rank, dit.tp_size),
        ("sp", dit.sp_rank, dit.sp_size),
        ("pp", dit.pp_stage, dit.pp_size),
        ("tpp", dit.tpp_stage, dit.tpp_size),
    ];
    for (axis, index, size) in axes {
        if size == 0 || index >= size {
            return Err(format!("{axis} index {index} is outside degree {size}"));
        }
    }
    if dit.block_start >= dit.block_end {
        return Err(format!(
            "empty block range {}..{}",
            dit.block_start, dit.block_end
        ));
    }
    if dit.steps.is_empty() {
        return Err("the role owns no denoising step".into());
    }
    Ok(())
}

/// The `Worker` service of this rank.
#[derive(Debug)]
pub struct WorkerService {
    shared: std::sync::Arc<Shared>,
}

impl WorkerService {
    /// Serves `shared`.
    pub fn new(shared: std::sync::Arc<Shared>) -> Self {
        WorkerService { shared }
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitReply>, Status> {
        let s = &self.shared;
        let init = request.into_inner();
        let state = s.state();
        if state != pb::WorkerState::Registered {
            return Err(s.err(
                ErrorKind::WrongState,
                format!("Init in state {}", state.name()),
            ));
        }
        s.check_init(&init)?;
        if s.init_claimed.swap(true, Ordering::SeqCst) {
            return Err(s.err(ErrorKind::WrongState, "Init already received"));
        }
        let detail = match s.connect(&init).await {
            Ok(detail) => detail,
            Err(status) => {
                s.set_state(pb::WorkerState::Failed);
                return Err(status);
            }
        };
        *s.plan.lock().unwrap_or_else(PoisonError::into_inner) = Some(init);
        s.set_state(pb::WorkerState::Initialized);
        log!("initialized: {detail}");
        Ok(Response::new(pb::InitReply {
            rank: s.rank,
            state: pb::WorkerState::Initialized.into(),
        }))
    }

    async fn load(&self, _: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReply>, Status> {
        let s = &self.shared;
        let state = s.state();
        if state != pb::WorkerState::Initialized {
            return Err(s.err(
                ErrorKind::WrongState,
                format!("Load in state {}", state.name()),
            ));
        }
        let plan = s
            .plan()
            .ok_or_else(|| s.err(ErrorKind::WrongState, "no Init"))?;
        let model = plan.model.unwrap_or_default();
        let t0 = Instant::now();
        let (reply, rx) = oneshot::channel();
        let parts = match plan.role.as_ref().and_then(|r| r.role.as_ref()) {
            Some(Role::Dit(d)) => (true, d.hosts_vae),
            _ => (false, true),
        };
        let topology = crate::role::topology::Topology::new(
            &plan.layout,
            usize::try_from(s.rank).unwrap_or(usize::MAX),
        )
        .map_err(|e| s.err(ErrorKind::BadInput, e))?;
        // fp8: the §8.1 linears are quantised after the merge; activations stay bf16 on a GPU
        // and f32 on the CPU reference backend.
        let dtype = match (model.dtype.as_str(), s.device) {
            ("f32" | "", _) | ("fp8", Device::Cpu) => runtime::DType::F32,
            ("bf16", _) | ("fp8", Device::Cuda(_)) => runtime::DType::BF16,
            other => {
                return Err(s.err(
                    ErrorKind::BadInput,
                    format!("dtype {other:?} is none of f32, bf16, fp8"),
                ));
            }
        };
        let cmd = Command::Load {
            name: model.name,
            dtype,
            ckpt: (!model.ckpt_dir.is_empty()).then(|| crate::role::ckpt::CkptRequest {
                dir: model.ckpt_dir.into(),
                lora: (!model.lora_path.is_empty()).then(|| model.lora_path.into()),
                fp8: model.dtype == "fp8",
                from_rank0: model.weights_from_rank0,
            }),
            parts,
            topology,
            reply,
        };
        let (weight_bytes, peak_memory_bytes) = s.compute(cmd, rx).await?;
        s.set_state(pb::WorkerState::Loaded);
        log!("loaded: {weight_bytes} bytes of weights");
        Ok(Response::new(pb::LoadReply {
            rank: s.rank,
            weight_bytes,
            peak_memory_bytes,
            elapsed_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateReply>, Status> {
        let s = &self.shared;
        let req = request.into_inner();
        let state = s.state();
        if state != pb::WorkerState::Loaded {
            return Err(s.err(
                ErrorKind::WrongState,
                format!("Generate in state {}", state.name()),
            ));
        }
        let plan = s
            .plan()
            .ok_or_else(|| s.err(ErrorKind::WrongState, "no Init"))?;
        let topology = crate::role::topology::Topology::new(
            &plan.layout,
            usize::try_from(s.rank).unwrap_or(usize::MAX),
        )
        .map_err(|e| s.err(ErrorKind::BadInput, e))?;
        let size = planner::size::SizeArg::parse(&format!("{}*{}", req.width, req.height))
            .map_err(|e| s.err(ErrorKind::BadInput, e.to_string()))?;
        let job = crate::role::Job {
            image: req.image_path.clone().into(),
            audio: req.audio_path.clone().into(),
            prompt: req.prompt.clone(),
            size,
            num_clip: req.num_clip as usize,
            infer_frames: u64::from(req.infer_frames),
            sample_steps: u64::from(req.sample_steps),
            seed: req.seed,
            request_id: req.request_id.clone(),
            expect_size: Some((req.width as usize, req.height as usize)),
            save_latents: (!req.save_latents_path.is_empty())
                .then(|| req.save_latents_path.clone().into()),
        };
        let frames = if topology.decodes() {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            s.frames
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(req.request_id.clone(), rx);
            Some(tx)
        } else {
            None
        };
        let t0 = Instant::now();
        s.set_state(pb::WorkerState::Generating);
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Generate {
            job,
            topology,
            frames,
            reply,
        };
        let outcome = s.compute(cmd, rx).await;
        s.set_state(if outcome.is_ok() {
            pb::WorkerState::Loaded
        } else {
            pb::WorkerState::Failed
        });
        let (done, peak_memory_bytes) = outcome?;
        log!("generated {} blocks, {} frames", done.blocks, done.frames);
        let u = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(Response::new(pb::GenerateReply {
            request_id: req.request_id,
            rank: s.rank,
            blocks: u(done.blocks),
            frames: u(done.frames),
            elapsed_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            peak_memory_bytes,
        }))
    }

    async fn cancel(
        &self,
        _: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelReply>, Status> {
        // No generation can run in this build, so none was running.
        Ok(Response::new(pb::CancelReply {
            rank: self.shared.rank,
            was_running: false,
        }))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        let s = &self.shared;
        log!("shutdown requested: {}", request.get_ref().reason);
        s.set_state(pb::WorkerState::Draining);
        // The server shuts down gracefully, so this reply still reaches the caller.
        s.request_stop(Stop::Shutdown);
        Ok(Response::new(pb::ShutdownReply { rank: s.rank }))
    }

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        let s = &self.shared;
        let level = match request.get_ref().level() {
            pb::HealthLevel::Device => pb::HealthLevel::Device,
            pb::HealthLevel::Liveness | pb::HealthLevel::Unspecified => pb::HealthLevel::Liveness,
        };
        let mut reply = pb::HealthReply {
            rank: s.rank,
            state: s.state().into(),
            pid: std::process::id(),
            uptime_s: s.started.elapsed().as_secs(),
            level: level.into(),
            compute_roundtrip_us: 0,
            device_detail: String::new(),
        };
        if level == pb::HealthLevel::Device {
            let t0 = Instant::now();
            let (tx, rx) = oneshot::channel();
            s.compute
                .send(Command::Probe(tx))
                .map_err(|_| s.err(ErrorKind::Internal, "compute thread has exited"))?;
            let probe = match tokio::time::timeout(PROBE_TIMEOUT, rx).await {
                Ok(Ok(Ok(probe))) => probe,
                Ok(Ok(Err(e))) => {
                    return Err(s.err(ErrorKind::Internal, format!("device check failed: {e}")));
                }
                Ok(Err(_)) => {
                    return Err(s.err(ErrorKind::Internal, "compute thread dropped the probe"));
                }
                Err(_) => {
                    return Err(s.err(
                        ErrorKind::Internal,
                        format!(
                            "compute thread did not answer within {} s",
                            PROBE_TIMEOUT.as_secs()
                        ),
                    ));
                }
            };
            reply.compute_roundtrip_us =
                u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            reply.device_detail = probe.detail;
        }
        Ok(Response::new(reply))
    }
}

/// The `Frames` service of this rank.
#[derive(Debug)]
pub struct FramesService {
    shared: std::sync::Arc<Shared>,
}

impl FramesService {
    /// Serves `shared`.
    pub fn new(shared: std::sync::Arc<Shared>) -> Self {
        FramesService { shared }
    }
}

#[tonic::async_trait]
impl fpb::frames_server::Frames for FramesService {
    type StreamFramesStream = tonic::codegen::BoxStream<fpb::FrameChunk>;

    async fn stream_frames(
        &self,
        request: Request<fpb::StreamFramesRequest>,
    ) -> Result<Response<Self::StreamFramesStream>, Status> {
        let s = &self.shared;
        let id = request.into_inner().request_id;
        // Generate may still be on its way to this rank: wait for it a little.
        let until = Instant::now() + FRAMES_WAIT;
        loop {
            let rx = s
                .frames
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            if let Some(rx) = rx {
                return Ok(Response::new(Box::pin(Chunks(rx))));
            }
            if Instant::now() >= until {
                return Err(s.err(
                    ErrorKind::BadInput,
                    format!("no generation {id:?} is streaming frames on this rank"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How long StreamFrames waits for its Generate to arrive.
const FRAMES_WAIT: Duration = Duration::from_secs(30);

/// The frame channel as a gRPC stream.
struct Chunks(tokio::sync::mpsc::Receiver<fpb::FrameChunk>);

impl tonic::codegen::tokio_stream::Stream for Chunks {
    type Item = Result<fpb::FrameChunk, Status>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|c| c.map(Ok))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dit() -> pb::DitRole {
        pb::DitRole {
            tp_rank: 1,
            tp_size: 2,
            sp_rank: 0,
            sp_size: 1,
            pp_stage: 0,
            pp_size: 1,
            block_start: 0,
            block_end: 40,
            fsdp_size: 1,
            tpp_stage: 0,
            tpp_size: 1,
            steps: vec![0, 1, 2, 3],
            hosts_vae: false,
        }
    }

    #[test]
    fn dit_roles_outside_their_degrees_are_refused() {
        assert!(check_dit(&dit()).is_ok());
        assert!(
            check_dit(&pb::DitRole {
                tp_rank: 2,
                ..dit()
            })
            .unwrap_err()
            .contains("tp index 2")
        );
        assert!(
            check_dit(&pb::DitRole {
                sp_size: 0,
                ..dit()
            })
            .is_err()
        );
        assert!(
            check_dit(&pb::DitRole {
                block_end: 0,
                ..dit()
            })
            .is_err()
        );
        assert!(
            check_dit(&pb::DitRole {
                steps: vec![],
                ..dit()
            })
            .is_err()
        );
    }

    fn shared(rank: u32, world_size: u32) -> std::sync::Arc<Shared> {
        let (compute, _) = mpsc::channel();
        let (stop, _) = watch::channel(None);
        let setup = (rank, world_size, pb::RoleKind::Dit, Device::Cpu);
        std::sync::Arc::new(Shared::new(setup, None, compute, stop))
    }

    fn init(rank: u32, world_size: u32, role: Role) -> pb::InitRequest {
        pb::InitRequest {
            job_id: "j".into(),
            rank,
            world_size,
            role: Some(pb::RankRole { role: Some(role) }),
            layout: (0..world_size)
                .map(|rank| pb::RankEntry {
                    rank,
                    ..Default::default()
                })
                .collect(),
            model: Some(pb::ModelRef {
                name: "wan-tiny".into(),
                ..Default::default()
            }),
            nccl_unique_id: vec![],
            comm_rendezvous_address: String::new(),
        }
    }

    fn refusal(s: &Shared, req: &pb::InitRequest) -> Error {
        Error::from(s.check_init(req).unwrap_err())
    }

    #[test]
    fn init_must_match_the_rank_it_reaches() {
        let s = shared(1, 2);
        assert!(s.check_init(&init(1, 2, Role::Dit(dit()))).is_ok());
        let wrong_rank = refusal(&s, &init(0, 2, Role::Dit(dit())));
        assert_eq!(
            (wrong_rank.rank_id(), wrong_rank.kind()),
            (Some(1), ErrorKind::BadInput)
        );
        assert!(
            refusal(&s, &init(1, 3, Role::Dit(dit())))
                .message()
                .contains("world size 3")
        );
        assert!(
            refusal(&s, &init(1, 2, Role::Vae(pb::VaeRole::default())))
                .message()
                .contains("role vae")
        );
        let mut shuffled = init(1, 2, Role::Dit(dit()));
        shuffled.layout.reverse();
        assert!(refusal(&s, &shuffled).message().contains("layout entry 0"));
        let mut nameless = init(1, 2, Role::Dit(dit()));
        nameless.model = None;
        assert!(refusal(&s, &nameless).message().contains("no model"));
    }

    #[test]
    fn init_is_accepted_once_and_only_after_registration() {
        use pb::worker_server::Worker as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let s = shared(0, 1);
        let service = WorkerService::new(s.clone());
        let call = || rt.block_on(service.init(Request::new(init(0, 1, Role::Dit(dit())))));
        assert_eq!(call().unwrap_err().code(), tonic::Code::FailedPrecondition);
        s.set_state(pb::WorkerState::Registered);
        assert_eq!(
            call().unwrap().into_inner().state(),
            pb::WorkerState::Initialized
        );
        assert_eq!(s.state(), pb::WorkerState::Initialized);
        assert_eq!(call().unwrap_err().code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn model_calls_before_init_are_refused_with_the_rank() {
        use pb::worker_server::Worker as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let service = WorkerService::new(shared(0, 1));
        let err = rt
            .block_on(service.generate(Request::new(pb::GenerateRequest::default())))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("Generate in state"),
            "{}",
            err.message()
        );
        let err = rt
            .block_on(service.load(Request::new(pb::LoadRequest::default())))
            .unwrap_err();
        assert_eq!(Error::from(err).rank_id(), Some(0));
    }

    #[test]
    fn stop_reasons_map_to_exit_codes() {
        assert_eq!(Stop::Shutdown.exit_code(), 0);
        assert_eq!(Stop::LauncherGone.exit_code(), proto::exit::PEER_LOST);
        assert_eq!(Stop::Signal(libc::SIGTERM).exit_code(), 143);
    }
}
