//! Ranks as threads over the socket communicator with the tiny checkpoint folder (built from
//! tests/fixtures as tests/generate_ckpt.rs builds it) on some ranks only.

#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use planner::layout::VaePlacement;
use planner::size::SizeArg;
use proto::worker::v1 as pb;
use runtime::comm::{SocketComm, SocketOptions};

use super::*;
use crate::role::topology::{Topology, tests::layout_of};
use crate::role::{Job, Loaded};

#[path = "../../../../tests/src/ckpt_folder.rs"]
mod ckpt_folder;

const SHARD1: &str = ckpt_folder::SHARDS[0];

/// A fresh tiny checkpoint folder under the temp dir, and the LoRA beside it.
fn tiny_folder(tag: &str) -> (PathBuf, PathBuf) {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let root = std::env::temp_dir().join(format!("lava-scatter-{}-{tag}", std::process::id()));
    ckpt_folder::tiny_checkpoint_folder(&f, &root).unwrap()
}

fn request(dir: &Path, lora: &Path, from_rank0: bool) -> CkptRequest {
    CkptRequest {
        dir: dir.to_path_buf(),
        lora: Some(lora.to_path_buf()),
        fp8: false,
        from_rank0,
    }
}

/// One thread per rank over the socket communicator; `body` gets the rank's communicator and
/// topology. Returns every rank's result in rank order.
fn on_ranks<T: Send + 'static>(
    layout: &[pb::RankEntry],
    body: impl Fn(usize, &SocketComm, &Topology) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let world = layout.len();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = SocketOptions {
        timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(10),
    };
    let body = std::sync::Arc::new(body);
    let mut listener = Some(listener);
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let (l, layout, body) = (listener.take(), layout.to_vec(), body.clone());
            std::thread::spawn(move || {
                let comm = match l {
                    Some(l) => SocketComm::host(l, world, opts).unwrap(),
                    None => SocketComm::join(addr, rank, world, opts).unwrap(),
                };
                let topo = Topology::new(&layout, rank).unwrap();
                body(rank, &comm, &topo)
            })
        })
        .collect();
    ranks.into_iter().map(|h| h.join().unwrap()).collect()
}

/// This rank's parts of the tiny model from the checkpoint `req` names, on the CPU.
fn load(
    req: &CkptRequest,
    comm: &SocketComm,
    topo: &Topology,
) -> Result<Loaded, crate::compute::Failure> {
    let parts = (topo.stage.is_some(), topo.decodes());
    Loaded::load(
        ("tiny", DType::F32),
        Some(req),
        parts,
        Device::Cpu,
        Some(comm),
        topo,
    )
}

/// Loads with `reqs[rank]` and generates one clip; the decoding rank's final latents.
fn generate(layout: &[pb::RankEntry], reqs: Vec<CkptRequest>, tag: &str) -> Vec<f32> {
    let path = std::env::temp_dir().join(format!("lava-scatter-{tag}-{}.f32", std::process::id()));
    let job = Job {
        size: SizeArg::parse("64*64").unwrap(),
        save_latents: Some(path.clone()),
        ..crate::role::tests::test_job(1)
    };
    on_ranks(layout, move |rank, comm, topo| {
        let m = load(&reqs[rank], comm, topo).unwrap();
        assert!(m.from_ckpt);
        m.generate(comm, topo, &job, None).unwrap();
    });
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// TP 2 with a dedicated VAE rank: with `--weights_from_rank0` rank 1 receives its tp shard
/// (cut and LoRA-merged by rank 0) and rank 2 the VAE, umT5, the tokenizer and wav2vec2; the
/// final latents equal those of the run where every rank reads the folder.
#[test]
fn received_weights_generate_the_latents_of_local_reads() {
    let (dir, lora) = tiny_folder("gen");
    let layout = layout_of(1, (2, 1, 1, false), VaePlacement::Dedicated);
    let local = generate(&layout, vec![request(&dir, &lora, false); 3], "local");
    let received = generate(&layout, vec![request(&dir, &lora, true); 3], "rank0");
    assert!(local.iter().any(|v| *v != 0.0));
    assert_eq!(received, local);
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// Without the flag, a rank whose folder is missing receives from the lowest rank that has
/// it; the others read their own. With it, everyone but rank 0 receives.
#[test]
fn ranks_without_the_folder_receive_from_the_lowest_holder() {
    let (dir, lora) = tiny_folder("agree");
    let missing = dir.with_file_name("nowhere");
    let layout = layout_of(1, (2, 1, 1, false), VaePlacement::Dedicated);
    let spec = ModelSpec::builtin("tiny").unwrap();
    for (from_rank0, dirs, want) in [
        (
            false,
            [&missing, &dir, &dir],
            ["receive 1", "serve [0]", "local"],
        ),
        (
            false,
            [&dir, &missing, &missing],
            ["serve [1, 2]", "receive 0", "receive 0"],
        ),
        (
            true,
            [&dir, &dir, &dir],
            ["serve [1, 2]", "receive 0", "receive 0"],
        ),
    ] {
        let reqs: Vec<_> = dirs.iter().map(|d| request(d, &lora, from_rank0)).collect();
        let spec = spec.clone();
        let got = on_ranks(&layout, move |rank, comm, _| {
            match Plan::agree(&reqs[rank], &spec, Some(comm), Device::Cpu).unwrap() {
                Plan::Local(_) => "local".to_string(),
                Plan::Serve(_, to) => format!("serve {to:?}"),
                Plan::Receive { from } => format!("receive {from}"),
            }
        });
        assert_eq!(got, want, "from_rank0 {from_rank0}, dirs {dirs:?}");
    }
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// A holder's validation failure (here a missing shard) fails every rank at once with its
/// message; the receivers say which rank read the folder for them.
#[test]
fn a_holders_validation_failure_fails_every_rank_with_its_message() {
    let (dir, lora) = tiny_folder("bad");
    std::fs::remove_file(dir.join(SHARD1)).unwrap();
    let layout = layout_of(1, (2, 1, 1, false), VaePlacement::Dedicated);
    let t0 = Instant::now();
    let reqs = vec![request(&dir, &lora, true); 3];
    let got = on_ranks(&layout, move |rank, comm, topo| {
        load(&reqs[rank], comm, topo).unwrap_err()
    });
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    for (rank, (kind, msg)) in got.iter().enumerate() {
        assert_eq!(*kind, proto::ErrorKind::LoadFailure, "rank {rank}: {msg}");
        assert!(msg.contains(SHARD1), "rank {rank}: {msg}");
        assert_eq!(
            msg.contains("rank 0 reads the checkpoint"),
            rank > 0,
            "{msg}"
        );
    }
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// A holder that dies before serving fails its receivers with a lost peer naming it.
#[test]
fn a_holder_that_dies_is_a_lost_peer() {
    let (dir, lora) = tiny_folder("dies");
    let layout = layout_of(1, (2, 1, 1, false), VaePlacement::Dedicated);
    let spec = ModelSpec::builtin("tiny").unwrap();
    let reqs = vec![request(&dir, &lora, true); 3];
    let got = on_ranks(&layout, move |rank, comm, topo| {
        let plan = Plan::agree(&reqs[rank], &spec, Some(comm), Device::Cpu).unwrap();
        if rank == 0 {
            comm.abort();
            return None;
        }
        let parts = (topo.stage.is_some(), topo.decodes());
        let layout = DitLayout::single();
        let err = plan
            .load(
                &reqs[rank],
                &spec,
                DType::F32,
                parts,
                (Device::Cpu, Some(comm)),
                &layout,
            )
            .unwrap_err();
        Some(err)
    });
    for (kind, msg) in got.into_iter().flatten() {
        assert_eq!(kind, proto::ErrorKind::PeerLost, "{msg}");
        assert!(msg.contains("rank 0"), "{msg}");
    }
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// Message lengths past f32's 2^24 exact integers and every byte value survive the encoding.
#[test]
fn message_lengths_and_bytes_round_trip() {
    for n in [0, 1, 255, 65_536, (1 << 24) + 1, (1 << 40) + 12_345] {
        assert_eq!(len_of(&len_tensor(n, Device::Cpu).unwrap()).unwrap(), n);
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(
        bytes_of(&bytes_tensor(&all, Device::Cpu).unwrap()).unwrap(),
        all
    );
}
