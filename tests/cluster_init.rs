//! Init over the real control plane: three `lava-worker` processes register with a
//! coordinator played by this test, receive their roles built from the planner's mesh, and
//! form the CPU socket communicator from the rendezvous address rank 0 registered.
//!
//! `lava launch` does not send Init (that needs a plan: `lava generate`), so the test is the
//! coordinator here. Binaries are found or built as in tests/cluster.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use planner::layout::{Layout, LayoutKind, T5Placement, VaePlacement, mesh};
use proto::worker::v1::{self as pb, launcher_server, worker_client::WorkerClient};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use lava_tests::bin_dir;

/// The coordinator's registration service: accepts everyone, remembers them.
#[derive(Debug, Default, Clone)]
struct Seen(Arc<Mutex<Vec<pb::RegisterRequest>>>);

#[tonic::async_trait]
impl launcher_server::Launcher for Seen {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(Response::new(pb::RegisterReply {
            job_id: "init-test".into(),
            accepted: true,
            reason: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        Ok(Response::new(pb::HeartbeatReply::default()))
    }
}

/// Workers killed on drop, so a failed assertion leaves nothing behind.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn init_hands_out_planner_roles_and_forms_the_communicator() {
    // Two TPP stages of one GPU each plus a dedicated VAE rank: world 3.
    let layout = Layout {
        kind: LayoutKind::Lava,
        stages: 2,
        tp: 1,
        ulysses: 1,
        pp: 1,
        fsdp: false,
        vae: VaePlacement::Dedicated,
        t5: T5Placement::One,
        fp8: false,
        offload: false,
    };
    let roles = proto::plan::rank_roles(&layout, &mesh(&layout, 40, 4)).unwrap();
    assert_eq!(roles.len(), 3);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen = Seen::default();
    let incoming =
        rt.block_on(async { TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap() });
    let launcher = incoming.local_addr().unwrap();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(launcher_server::LauncherServer::new(seen.clone()))
            .serve_with_incoming(incoming),
    );

    let mut workers = Workers(Vec::new());
    for rank in 0..3u32 {
        let role = if rank == 2 { "vae" } else { "dit" };
        let child = Command::new(bin_dir().join("lava-worker"))
            .args([
                "--rank",
                &rank.to_string(),
                "--world-size",
                "3",
                "--role",
                role,
            ])
            .args(["--launcher", &launcher.to_string(), "--stdin-lifeline"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        workers.0.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.0.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "workers did not register");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut regs = seen.0.lock().unwrap().clone();
    regs.sort_by_key(|r| r.rank);
    assert!(
        !regs[0].comm_rendezvous_address.is_empty(),
        "rank 0 announced no rendezvous"
    );
    assert!(
        regs[1..]
            .iter()
            .all(|r| r.comm_rendezvous_address.is_empty())
    );

    let layout_entries: Vec<pb::RankEntry> = regs
        .iter()
        .zip(&roles)
        .map(|(r, role)| pb::RankEntry {
            rank: r.rank,
            role: Some(role.clone()),
            address: r.address.clone(),
            hostname: r.hostname.clone(),
        })
        .collect();
    let init = |rank: u32| pb::InitRequest {
        job_id: "init-test".into(),
        rank,
        world_size: 3,
        role: Some(roles[rank as usize].clone()),
        layout: layout_entries.clone(),
        model: Some(pb::ModelRef {
            name: "tiny".into(),
            dtype: "f32".into(),
            ..Default::default()
        }),
        nccl_unique_id: Vec::new(),
        comm_rendezvous_address: regs[0].comm_rendezvous_address.clone(),
    };

    rt.block_on(async {
        let mut clients = Vec::new();
        for r in &regs {
            // Wait for the worker to read its registration reply (STARTING -> REGISTERED).
            let mut c = WorkerClient::connect(format!("http://{}", r.address))
                .await
                .unwrap();
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let h = c
                    .health(pb::HealthRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                if h.state() == pb::WorkerState::Registered {
                    break;
                }
                assert!(
                    Instant::now() < until,
                    "rank {} stuck in {:?}",
                    r.rank,
                    h.state()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            clients.push(c);
        }

        // Rank 1's part sent to rank 2: refused as bad input, with the refusing rank attached.
        let err = proto::Error::from(clients[2].init(init(1)).await.unwrap_err());
        assert_eq!(
            (err.rank_id(), err.kind()),
            (Some(2), proto::ErrorKind::BadInput),
            "{err}"
        );

        // Every rank at once: rank 0 hosts the rendezvous, so all must be in flight together.
        let mut calls = tokio::task::JoinSet::new();
        for (rank, c) in clients.iter().enumerate() {
            let mut c = c.clone();
            let req = init(rank as u32);
            calls.spawn(async move { c.init(req).await });
        }
        while let Some(reply) = calls.join_next().await {
            let reply = reply.unwrap().unwrap().into_inner();
            assert_eq!(
                reply.state(),
                pb::WorkerState::Initialized,
                "rank {}",
                reply.rank
            );
        }

        let level = pb::HealthLevel::Device.into();
        let h = clients[1]
            .health(pb::HealthRequest { level })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.state(), pb::WorkerState::Initialized);
        assert!(
            h.device_detail.ends_with("socket communicator rank 1 of 3"),
            "{}",
            h.device_detail
        );

        let again = clients[2].init(init(2)).await.unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition);
        let gen_err = clients[0]
            .generate(pb::GenerateRequest::default())
            .await
            .unwrap_err();
        // Generate needs Load first.
        assert_eq!(gen_err.code(), tonic::Code::FailedPrecondition);

        for c in &mut clients {
            c.shutdown(pb::ShutdownRequest {
                reason: "test done".into(),
            })
            .await
            .unwrap();
        }
    });

    let deadline = Instant::now() + Duration::from_secs(10);
    for (rank, child) in workers.0.iter_mut().enumerate() {
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "rank {rank} did not exit after Shutdown"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "rank {rank}");
    }
}
