//! SocketComm on host buffers: every collective against values computed here, in
//! threads and in 4 separate processes, plus sub-groups, timeouts, abort and a peer
//! that dies.
//!
//! The multi-process tests re-run this test binary with `LAVA_COMM_ROLE` set; the
//! ignored test `comm_child` is the child's entry point.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod comm_common;

use comm_common::{f32_data, input, kind, reference, run_tensor_collectives};
use half::{bf16, f16};
use runtime::comm::{Comm, CommErrorKind, ReduceOp, SocketComm, SocketOptions};
use runtime::{DType, Device};

const WORLD: usize = 4;

fn opts(timeout_ms: u64) -> SocketOptions {
    SocketOptions {
        timeout: Duration::from_millis(timeout_ms),
        connect_timeout: Duration::from_secs(20),
    }
}

/// Runs `f(comm)` on one thread per rank of a loopback group.
fn on_threads<R: Send + 'static>(
    world: usize,
    timeout_ms: u64,
    f: impl Fn(SocketComm) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let comms = SocketComm::local_group(world, opts(timeout_ms)).unwrap();
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

// ---- the scenario every rank runs -------------------------------------------

/// Every collective on every supported element type, checked against the values
/// computed locally from every rank's known inputs.
fn run_collectives(comm: &SocketComm) {
    let (r, w) = (comm.rank(), comm.world());

    // all_reduce: uneven chunking (1037 % 4 ≠ 0), fewer elements than ranks, empty.
    for n in [1037usize, 3, 0] {
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            let mut x = f32_data(r, n);
            comm.all_reduce_slice(&mut x, op).unwrap();
            let want = reference(n, w, op, |q, i| f32_data(q, n)[i], |v| v);
            let same_bits = x.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same_bits,
                "rank {r}: f32 {op:?} n={n} differs from the rank-order reference"
            );
        }
    }
    let bf = |q: usize, i: usize| bf16::from_f32(f32_data(q, 517)[i]);
    let mut x: Vec<bf16> = (0..517).map(|i| bf(r, i)).collect();
    comm.all_reduce_slice(&mut x, ReduceOp::Sum).unwrap();
    assert_eq!(
        x,
        reference(
            517,
            w,
            ReduceOp::Sum,
            |q, i| bf(q, i).to_f32(),
            bf16::from_f32
        )
    );
    let hf = |q: usize, i: usize| f16::from_f32(f32_data(q, 100)[i] / 100.0);
    let mut x: Vec<f16> = (0..100).map(|i| hf(r, i)).collect();
    comm.all_reduce_slice(&mut x, ReduceOp::Max).unwrap();
    assert_eq!(
        x,
        reference(
            100,
            w,
            ReduceOp::Max,
            |q, i| hf(q, i).to_f32(),
            f16::from_f32
        )
    );
    let mut x: Vec<u8> = (0..50).map(|i| (r * 70 + i) as u8).collect();
    comm.all_reduce_slice(&mut x, ReduceOp::Sum).unwrap();
    let want: Vec<u8> = (0..50)
        .map(|i| (0..w).fold(0u8, |a, q| a.wrapping_add((q * 70 + i) as u8)))
        .collect();
    assert_eq!(x, want);

    // reduce_scatter: rank r keeps chunk r of the element-wise sum.
    let m = 33;
    let x = f32_data(r, m * w);
    let got = comm.reduce_scatter_slice(&x, ReduceOp::Sum).unwrap();
    let full = reference(m * w, w, ReduceOp::Sum, |q, i| f32_data(q, m * w)[i], |v| v);
    assert_eq!(got, full[r * m..(r + 1) * m].to_vec());
    let bad = comm
        .reduce_scatter_slice(&x[..m * w - 1], ReduceOp::Sum)
        .unwrap_err();
    assert!(matches!(kind(&bad), CommErrorKind::InvalidArgument(_)));

    // all_gather: rank order.
    let mine: Vec<u8> = (0..5).map(|i| (r * 10 + i) as u8).collect();
    let got = comm.all_gather_bytes(&mine).unwrap();
    let want: Vec<u8> = (0..w)
        .flat_map(|q| (0..5).map(move |i| (q * 10 + i) as u8))
        .collect();
    assert_eq!(got, want);

    // all_to_all: chunk j of rank i lands as chunk i on rank j.
    let c = 3;
    let input: Vec<u8> = (0..w * c).map(|k| (r * 16 + k / c) as u8).collect();
    let got = comm.all_to_all_bytes(&input).unwrap();
    let want: Vec<u8> = (0..w * c).map(|k| ((k / c) * 16 + r) as u8).collect();
    assert_eq!(got, want);

    // broadcast from the last rank, large enough to span many socket writes.
    let root = w - 1;
    let n = 300_000;
    let mut buf: Vec<u8> = if r == root {
        (0..n).map(|i| (i % 251) as u8).collect()
    } else {
        vec![0; n]
    };
    comm.broadcast_bytes(&mut buf, root).unwrap();
    assert!(
        buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
        "rank {r}: broadcast"
    );

    // send/recv around the ring; even ranks send first so nobody waits on a full buffer.
    let next = (r + 1) % w;
    let prev = (r + w - 1) % w;
    let payload = vec![r as u8; 200_000];
    let mut got = vec![0u8; 200_000];
    if r % 2 == 0 {
        comm.send_bytes(&payload, next).unwrap();
        comm.recv_bytes(&mut got, prev).unwrap();
    } else {
        comm.recv_bytes(&mut got, prev).unwrap();
        comm.send_bytes(&payload, next).unwrap();
    }
    assert!(got.iter().all(|&b| b == prev as u8));
    let bad = comm.send_bytes(&payload, r).unwrap_err();
    assert!(matches!(kind(&bad), CommErrorKind::InvalidArgument(_)));

    comm.barrier().unwrap();
}

/// Sub-groups: even and odd ranks, ranked by descending parent rank; then a split
/// where every rank is alone (world 1: every collective is the identity).
fn run_subgroups(comm: &SocketComm) {
    let (r, w) = (comm.rank(), comm.world());
    let sub = comm.split((r % 2) as u32, (w - r) as u32).unwrap();
    let members: Vec<usize> = (0..w).filter(|q| q % 2 == r % 2).rev().collect();
    assert_eq!(sub.world(), members.len());
    assert_eq!(
        members[sub.rank()],
        r,
        "rank {r}: new rank follows the key order"
    );
    let got = sub.all_gather_bytes(&[r as u8]).unwrap();
    assert_eq!(got, members.iter().map(|&q| q as u8).collect::<Vec<_>>());
    let mut x = vec![r as f32 + 0.5; 10];
    sub.all_reduce_slice(&mut x, ReduceOp::Sum).unwrap();
    let want: f32 = members.iter().map(|&q| q as f32 + 0.5).sum();
    assert!(x.iter().all(|&v| v == want));
    // The parent still works, independently of the sub-group.
    let mut y = vec![1.0f32; 4];
    comm.all_reduce_slice(&mut y, ReduceOp::Sum).unwrap();
    assert_eq!(y, vec![w as f32; 4]);

    let alone = comm.split(r as u32, 0).unwrap();
    assert_eq!((alone.rank(), alone.world()), (0, 1));
    let mut z = vec![3.0f32, 4.0];
    alone.all_reduce_slice(&mut z, ReduceOp::Sum).unwrap();
    assert_eq!(z, vec![3.0, 4.0]);
    assert_eq!(alone.all_gather_bytes(&[7, 8]).unwrap(), vec![7, 8]);
    alone.barrier().unwrap();
}

// ---- threads ------------------------------------------------------------------

#[test]
fn collectives_on_threads() {
    on_threads(WORLD, 20_000, |c| {
        run_collectives(&c);
        run_subgroups(&c);
        run_tensor_collectives(&c, &Device::Cpu);
    });
}

#[test]
fn world_of_one_is_the_identity() {
    let c = SocketComm::local_group(1, opts(1000))
        .unwrap()
        .pop()
        .unwrap();
    let mut x = vec![1.5f32, -2.0];
    c.all_reduce_slice(&mut x, ReduceOp::Max).unwrap();
    assert_eq!(x, vec![1.5, -2.0]);
    assert_eq!(c.all_to_all_bytes(&[1, 2, 3]).unwrap(), vec![1, 2, 3]);
    assert_eq!(
        c.reduce_scatter_slice(&[2.0f32], ReduceOp::Sum).unwrap(),
        vec![2.0]
    );
    c.barrier().unwrap();
    // The trait's world-1 path returns the input itself for every collective.
    let c: &dyn Comm = &c;
    let x = input(0, &[2, 6], DType::BF16);
    assert!(c.all_reduce(&x, ReduceOp::Sum).unwrap().same_storage(&x));
    assert!(c.all_gather(&x, 1).unwrap().same_storage(&x));
    assert!(
        c.reduce_scatter(&x, 1, ReduceOp::Sum)
            .unwrap()
            .same_storage(&x)
    );
    assert!(c.all_to_all(&x, 1, 0).unwrap().same_storage(&x));
    assert!(c.broadcast(&x, 0).unwrap().same_storage(&x));
    c.barrier().unwrap();
    c.synchronize().unwrap();
    // Arguments are still checked at world 1, so shape bugs show up unsharded.
    assert!(c.all_gather(&x, 2).is_err());
    let e = c.send(&x, 0).unwrap_err();
    assert!(matches!(kind(&e), CommErrorKind::InvalidArgument(_)), "{e}");
    let sub = c.split(0, 0).unwrap();
    assert_eq!((sub.rank(), sub.world()), (0, 1));
}

#[test]
fn silent_peer_times_out_and_the_rest_fail_fast() {
    let results = on_threads(3, 400, |c| {
        let start = Instant::now();
        let mut x = vec![1.0f32; 64];
        if c.rank() == 2 {
            // Joins the collective only after the others have given up.
            std::thread::sleep(Duration::from_millis(1500));
            let e = c.all_reduce_slice(&mut x, ReduceOp::Sum).unwrap_err();
            return (c.rank(), kind(&e).clone(), start.elapsed());
        }
        let e = c.all_reduce_slice(&mut x, ReduceOp::Sum).unwrap_err();
        let elapsed = start.elapsed();
        // The communicator is unusable afterwards.
        let again = c.barrier().unwrap_err();
        assert_eq!(kind(&again), &CommErrorKind::Broken);
        (c.rank(), kind(&e).clone(), elapsed)
    });
    for (rank, k, elapsed) in &results[..2] {
        assert!(
            *elapsed < Duration::from_millis(1200),
            "rank {rank} took {elapsed:?}"
        );
        // Each either timed out on the silent rank 2, or lost the other rank when it gave up.
        match k {
            CommErrorKind::Timeout { peer: Some(2), .. } => {}
            CommErrorKind::PeerLost { peer, .. } if *peer < 2 => {}
            other => panic!("rank {rank}: unexpected {other:?}"),
        }
    }
    assert!(
        results[..2]
            .iter()
            .any(|(_, k, _)| matches!(k, CommErrorKind::Timeout { peer: Some(2), .. })),
        "someone must have timed out on the silent rank: {results:?}"
    );
    // The late rank finds its links closed.
    assert!(
        matches!(results[2].1, CommErrorKind::PeerLost { .. }),
        "{:?}",
        results[2]
    );
}

#[test]
fn abort_unblocks_a_waiting_operation() {
    let mut comms = SocketComm::local_group(2, opts(30_000)).unwrap();
    let c1 = comms.pop().unwrap();
    let c0 = Arc::new(comms.pop().unwrap());
    let waiter = {
        let c0 = c0.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut buf = [0u8; 8];
            (c0.recv_bytes(&mut buf, 1).unwrap_err(), start.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    c0.abort();
    let (e, elapsed) = waiter.join().unwrap();
    assert_eq!(kind(&e), &CommErrorKind::Aborted);
    assert!(elapsed < Duration::from_secs(5));
    assert_eq!(kind(&c0.barrier().unwrap_err()), &CommErrorKind::Aborted);
    // The peer sees the links close instead of waiting 30 s.
    let e = c1.barrier().unwrap_err();
    assert!(
        matches!(kind(&e), CommErrorKind::PeerLost { peer: 0, .. }),
        "{e}"
    );
}

#[test]
fn missing_rank_fails_the_rendezvous_in_time() {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let o = SocketOptions {
        timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
    };
    // World 3, but only rank 1 ever joins.
    let joiner = std::thread::spawn(move || SocketComm::join(addr, 1, 3, o));
    let start = Instant::now();
    let e = SocketComm::host(l, 3, o).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(e.to_string().contains("1 of 2 ranks joined"), "{e}");
    // The joiner gets no rank table and fails too, instead of waiting forever.
    let e = joiner.join().unwrap().unwrap_err();
    assert!(matches!(kind(&e), CommErrorKind::Rendezvous(_)), "{e}");
    // A rank outside the world is refused before any connection.
    let e = SocketComm::join(addr, 3, 3, o).unwrap_err();
    assert!(matches!(kind(&e), CommErrorKind::InvalidArgument(_)), "{e}");
}

#[test]
fn mismatched_sizes_are_a_protocol_error() {
    let results = on_threads(2, 5_000, |c| {
        let n = if c.rank() == 0 { 4 } else { 8 };
        c.all_gather_bytes(&vec![1u8; n]).unwrap_err().to_string()
    });
    assert!(
        results.iter().any(|m| m.contains("protocol error")),
        "{results:?}"
    );
}

// ---- processes ------------------------------------------------------------------

const ROLE: &str = "LAVA_COMM_ROLE";

/// Entry point of a child process (see the module docs).
#[test]
#[ignore = "child-process role; started by the multi-process tests"]
fn comm_child() {
    let role = std::env::var(ROLE).expect("LAVA_COMM_ROLE");
    let rank: usize = std::env::var("LAVA_COMM_RANK").unwrap().parse().unwrap();
    let world: usize = std::env::var("LAVA_COMM_WORLD").unwrap().parse().unwrap();
    let timeout_ms = if role == "dead_peer" { 3_000 } else { 20_000 };
    let comm = if rank == 0 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        println!("LAVA_COMM_ADDR={}", l.local_addr().unwrap());
        SocketComm::host(l, world, opts(timeout_ms)).unwrap()
    } else {
        let addr: SocketAddr = std::env::var("LAVA_COMM_ADDR").unwrap().parse().unwrap();
        SocketComm::join(addr, rank, world, opts(timeout_ms)).unwrap()
    };
    match role.as_str() {
        "collectives" => {
            run_collectives(&comm);
            run_subgroups(&comm);
            run_tensor_collectives(&comm, &Device::Cpu);
        }
        "dead_peer" => {
            let mut x = vec![1.0f32; 1000];
            comm.all_reduce_slice(&mut x, ReduceOp::Sum).unwrap();
            assert_eq!(x[0], world as f32);
            if rank == world - 1 {
                // Dies without a goodbye, in the middle of the job.
                std::process::exit(17);
            }
            let start = Instant::now();
            let e = comm.all_reduce_slice(&mut x, ReduceOp::Sum).unwrap_err();
            let elapsed = start.elapsed();
            println!("rank {rank}: {e} after {elapsed:?}");
            assert!(
                elapsed < Duration::from_millis(3_500),
                "rank {rank} took {elapsed:?}"
            );
            let k = kind(&e);
            assert!(
                k.peer().is_some(),
                "rank {rank}: the error must name a peer: {e}"
            );
            if rank == 0 {
                // Rank 0 is directly linked to the dead rank and reads from it first.
                assert!(matches!(k, CommErrorKind::PeerLost { .. }), "{e}");
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn_child(role: &str, rank: usize, addr: Option<&str>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "comm_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE, role)
    .env("LAVA_COMM_RANK", rank.to_string())
    .env("LAVA_COMM_WORLD", WORLD.to_string())
    .stdout(if rank == 0 {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    if let Some(a) = addr {
        cmd.env("LAVA_COMM_ADDR", a);
    }
    cmd.spawn().unwrap()
}

/// Starts `WORLD` child processes in `role` and returns their exit codes.
fn run_processes(role: &str) -> Vec<Option<i32>> {
    let mut root = spawn_child(role, 0, None);
    let mut lines = BufReader::new(root.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("rank 0 exited before printing its address")
            .unwrap();
        // libtest prints "test comm_child ... " on the same line first.
        if let Some((_, a)) = line.split_once("LAVA_COMM_ADDR=") {
            break a.trim().to_string();
        }
    };
    // Keep draining rank 0's stdout so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let mut children = vec![root];
    children.extend((1..WORLD).map(|r| spawn_child(role, r, Some(&addr))));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut codes = vec![None; WORLD];
    let mut done = [false; WORLD];
    while done.iter().any(|d| !d) {
        for (i, c) in children.iter_mut().enumerate() {
            if !done[i]
                && let Some(status) = c.try_wait().unwrap()
            {
                codes[i] = status.code();
                done[i] = true;
            }
        }
        if Instant::now() > deadline {
            for (i, c) in children.iter_mut().enumerate() {
                if !done[i] {
                    let _ = c.kill();
                }
            }
            panic!("{role}: children still running after 60 s (a hang): {codes:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    codes
}

#[test]
fn collectives_in_four_processes() {
    let codes = run_processes("collectives");
    assert_eq!(codes, vec![Some(0); WORLD], "exit codes per rank");
}

#[test]
fn dead_peer_in_four_processes() {
    let codes = run_processes("dead_peer");
    assert_eq!(
        codes,
        vec![Some(0), Some(0), Some(0), Some(17)],
        "exit codes per rank"
    );
}
