//! The launcher's side of the control plane: the registration service workers call, the
//! forwarding of registrations to the master launcher, and fan-out calls to every rank.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::worker::v1::{self as pb, launcher_client::LauncherClient, worker_client::WorkerClient};
use proto::{Error, ErrorKind};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::{Request, Response, Status};

/// How long one call to a rank may take before the rank counts as unresponsive.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Registrations seen by this launcher.
#[derive(Debug)]
pub struct Registry {
    /// Identifier of the job (the master's).
    pub job_id: String,
    /// Number of ranks in the job.
    pub world_size: u32,
    /// The master's registration endpoint when this launcher is not the master.
    forward_to: Option<String>,
    /// How long forwarding keeps retrying while the master is not up yet.
    forward_timeout: Duration,
    entries: Mutex<BTreeMap<u32, pb::RegisterRequest>>,
    count: watch::Sender<usize>,
}

impl Registry {
    /// A registry for a job of `world_size` ranks; `forward_to` is `http://host:port` of the
    /// master when this launcher is not the master.
    pub fn new(
        job_id: String,
        world_size: u32,
        forward_to: Option<String>,
        forward_timeout: Duration,
    ) -> Arc<Self> {
        let (count, _) = watch::channel(0);
        Arc::new(Registry {
            job_id,
            world_size,
            forward_to,
            forward_timeout,
            entries: Mutex::default(),
            count,
        })
    }

    /// Watches the number of registered ranks.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// A copy of the registrations, by rank.
    pub fn entries(&self) -> BTreeMap<u32, pb::RegisterRequest> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why this registration cannot be accepted, if it cannot.
    fn refusal(&self, req: &pb::RegisterRequest) -> Option<String> {
        let version = env!("CARGO_PKG_VERSION");
        if req.world_size != self.world_size {
            return Some(format!(
                "rank {} says world size {}, the job has {}",
                req.rank, req.world_size, self.world_size
            ));
        }
        if req.rank >= self.world_size {
            return Some(format!(
                "rank {} is outside world size {}",
                req.rank, self.world_size
            ));
        }
        if req.version != version {
            return Some(format!(
                "lava-worker {} does not match lava {version}",
                req.version
            ));
        }
        if req.address.is_empty() {
            return Some(format!("rank {} registered no address", req.rank));
        }
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(&req.rank)
            .map(|prev| format!("rank {} already registered by pid {}", req.rank, prev.pid))
    }

    fn record(&self, req: pb::RegisterRequest) {
        let n = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.insert(req.rank, req);
            entries.len()
        };
        self.count.send_replace(n);
    }

    /// Forwards a registration to the master, retrying while it is unreachable.
    async fn forward(
        &self,
        endpoint: &str,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterReply, Status> {
        let deadline = Instant::now() + self.forward_timeout;
        loop {
            match LauncherClient::connect(endpoint.to_string()).await {
                Ok(mut client) => return client.register(req).await.map(Response::into_inner),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Status::unavailable(format!(
                        "master launcher at {endpoint} unreachable: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

/// The `Launcher` service over a [`Registry`].
#[derive(Debug)]
pub struct LauncherService(pub Arc<Registry>);

#[tonic::async_trait]
impl pb::launcher_server::Launcher for LauncherService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let reg = &self.0;
        let req = request.into_inner();
        if let Some(reason) = reg.refusal(&req) {
            return Ok(Response::new(pb::RegisterReply {
                job_id: reg.job_id.clone(),
                accepted: false,
                reason,
            }));
        }
        let reply = match &reg.forward_to {
            Some(master) => reg.forward(master, req.clone()).await?,
            None => pb::RegisterReply {
                job_id: reg.job_id.clone(),
                accepted: true,
                reason: String::new(),
            },
        };
        if reply.accepted {
            crate::spawn::say(&format!(
                "lava: rank {} registered: {}, pid {}, {} on {}",
                req.rank,
                req.role().name(),
                req.pid,
                req.address,
                req.hostname
            ));
            reg.record(req);
        }
        Ok(Response::new(reply))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let registered = u32::try_from(self.0.entries().len()).unwrap_or(u32::MAX);
        Ok(Response::new(pb::HeartbeatReply {
            job_id: self.0.job_id.clone(),
            registered,
        }))
    }
}

async fn connect(
    rank: u32,
    address: &str,
) -> Result<WorkerClient<tonic::transport::Channel>, Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| {
            Error::rank(
                rank,
                ErrorKind::BadInput,
                format!("address {address:?}: {e}"),
            )
        })?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| {
        Error::rank(
            rank,
            ErrorKind::PeerLost,
            format!("unreachable at {address}: {e}"),
        )
    })?;
    Ok(WorkerClient::new(channel))
}

/// Health of every rank at `level`, in rank order; the first failure, with its rank, otherwise.
pub async fn health_all(
    ranks: &BTreeMap<u32, pb::RegisterRequest>,
    level: pb::HealthLevel,
) -> Result<Vec<pb::HealthReply>, Error> {
    let mut calls = JoinSet::new();
    for (&rank, entry) in ranks {
        let address = entry.address.clone();
        calls.spawn(async move {
            let mut client = connect(rank, &address).await?;
            let request = pb::HealthRequest {
                level: level.into(),
            };
            client
                .health(request)
                .await
                .map(Response::into_inner)
                .map_err(|s| Error::from(s).or_rank(rank))
        });
    }
    let mut replies = Vec::with_capacity(ranks.len());
    while let Some(joined) = calls.join_next().await {
        let reply = joined.map_err(|e| Error::Unattributed {
            kind: ErrorKind::Internal,
            message: e.to_string(),
        })??;
        replies.push(reply);
    }
    replies.sort_by_key(|r| r.rank);
    Ok(replies)
}

/// Sends Shutdown to every rank at once; returns the ranks that did not acknowledge, with why.
pub async fn shutdown_all(ranks: &BTreeMap<u32, pb::RegisterRequest>, reason: &str) -> Vec<Error> {
    let mut calls = JoinSet::new();
    for (&rank, entry) in ranks {
        let address = entry.address.clone();
        let reason = reason.to_string();
        calls.spawn(async move {
            let mut client = connect(rank, &address).await?;
            client
                .shutdown(pb::ShutdownRequest { reason })
                .await
                .map_err(|s| Error::from(s).or_rank(rank))?;
            Ok::<(), Error>(())
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = calls.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(Error::Unattributed {
                kind: ErrorKind::Internal,
                message: e.to_string(),
            }),
        }
    }
    failures
}

/// One liveness probe of the master launcher, from a launcher that is not the master.
pub async fn heartbeat(master: &str, node_rank: u32) -> Result<pb::HeartbeatReply, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(master.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    LauncherClient::new(channel)
        .heartbeat(pb::HeartbeatRequest { node_rank })
        .await
        .map(Response::into_inner)
        .map_err(|s| s.message().to_string())
}
