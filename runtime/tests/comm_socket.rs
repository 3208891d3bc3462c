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

use half::{bf16, f16};
use runtime::comm::{Comm, CommErrorKind, ReduceOp, SocketComm, SocketOptions};
use runtime::{DType, Device, Error, Shape, Tensor};

const WORLD: usize = 4;

fn opts(timeout_ms: u64) -> SocketOptions {
    SocketOptions {
        timeout: Duration::from_millis(timeout_ms),
        connect_timeout: Duration::from_secs(20),
    }
}

fn kind(e: &Error) -> &CommErrorKind {
    match e {
        Error::Comm { kind, .. } => kind,
        other => panic!("expected a comm error, got {other}"),
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

// ---- data and references ----------------------------------------------------

/// Values with many mantissa bits, so a different summation order shows up.
fn f32_data(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (rank as u64 * 2_654_435_761 + i as u64 * 40_503) % 100_003;
            (h as f32 / 7.3 - 6000.0) * if i % 3 == 0 { 1e-3 } else { 1.0 }
        })
        .collect()
}

fn reference<T: Copy>(
    n: usize,
    world: usize,
    op: ReduceOp,
    load: impl Fn(usize, usize) -> f32,
    store: impl Fn(f32) -> T,
) -> Vec<T> {
    (0..n)
        .map(|i| {
            let mut acc = load(0, i);
            for r in 1..world {
                let v = load(r, i);
                acc = match op {
                    ReduceOp::Sum => acc + v,
                    ReduceOp::Max => acc.max(v),
                    ReduceOp::Min => acc.min(v),
                };
            }
            store(acc)
        })
        .collect()
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

// ---- tensor-level interface -----------------------------------------------------

/// Rank `rank`'s input of `shape`, rounded to `dtype`.
fn input(rank: usize, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&f32_data(rank + 11, n), shape, dtype, &Device::Cpu).unwrap()
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(
        got.to_bytes().unwrap(),
        want.to_bytes().unwrap(),
        "{what}: values"
    );
}

/// The rank-order, f32-accumulated, once-rounded reduction of every rank's input.
fn reduced(world: usize, shape: &[usize], dtype: DType, op: ReduceOp) -> Tensor {
    let all: Vec<Vec<f32>> = (0..world)
        .map(|q| input(q, shape, dtype).to_vec_f32().unwrap())
        .collect();
    let n = all[0].len();
    let v = reference(n, world, op, |q, i| all[q][i], |v| v);
    Tensor::from_f32(&v, shape, dtype, &Device::Cpu).unwrap()
}

/// Every tensor-level method of [`Comm`], against results built with tensor ops
/// from every rank's known input.
fn run_tensor_collectives(comm: &dyn Comm) {
    let (r, w) = (comm.rank(), comm.world());
    let inputs = |shape: &[usize], dt| (0..w).map(|q| input(q, shape, dt)).collect::<Vec<_>>();

    for dt in [DType::BF16, DType::F16, DType::F32] {
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let got = comm.all_reduce(&input(r, &[3, 5], dt), op).unwrap();
            assert_same(
                &got,
                &reduced(w, &[3, 5], dt, op),
                &format!("all_reduce {dt:?} {op:?}"),
            );
        }
    }

    // all_gather along an inner dim.
    let xs = inputs(&[2, 3, 4], DType::BF16);
    let got = comm.all_gather(&xs[r], 1).unwrap();
    assert_same(
        &got,
        &Tensor::cat(&xs.iter().collect::<Vec<_>>(), 1).unwrap(),
        "all_gather dim 1",
    );
    let got = comm.all_gather(&xs[r], 0).unwrap();
    assert_same(
        &got,
        &Tensor::cat(&xs.iter().collect::<Vec<_>>(), 0).unwrap(),
        "all_gather dim 0",
    );

    // reduce_scatter along dim 1: this rank's slice of the full reduction.
    let shape = [2, 2 * w, 3];
    let got = comm
        .reduce_scatter(&input(r, &shape, DType::F32), 1, ReduceOp::Sum)
        .unwrap();
    let want = reduced(w, &shape, DType::F32, ReduceOp::Sum)
        .narrow(1, 2 * r, 2)
        .unwrap();
    assert_same(&got, &want, "reduce_scatter dim 1");

    // Ulysses: [seq/W, heads, d] → [seq, heads/W, d] and back.
    let (s_loc, heads, d) = (3, 2 * w, 2);
    let xs = inputs(&[s_loc, heads, d], DType::BF16);
    let y = comm.all_to_all(&xs[r], 1, 0).unwrap();
    let mine: Vec<Tensor> = xs.iter().map(|x| x.narrow(1, 2 * r, 2).unwrap()).collect();
    assert_same(
        &y,
        &Tensor::cat(&mine.iter().collect::<Vec<_>>(), 0).unwrap(),
        "all_to_all heads→seq",
    );
    assert_same(
        &comm.all_to_all(&y, 0, 1).unwrap(),
        &xs[r],
        "all_to_all seq→heads round trip",
    );
    // With a batch dim in front, and with split == concat.
    let xs = inputs(&[2, s_loc, heads, d], DType::F32);
    let y = comm.all_to_all(&xs[r], 2, 1).unwrap();
    let mine: Vec<Tensor> = xs.iter().map(|x| x.narrow(2, 2 * r, 2).unwrap()).collect();
    assert_same(
        &y,
        &Tensor::cat(&mine.iter().collect::<Vec<_>>(), 1).unwrap(),
        "all_to_all 4-d",
    );
    let y = comm.all_to_all(&xs[r], 2, 2).unwrap();
    assert_same(
        &y,
        &Tensor::cat(&mine.iter().collect::<Vec<_>>(), 2).unwrap(),
        "all_to_all split == concat",
    );

    // broadcast, send/recv, barrier.
    let got = comm.broadcast(&input(r, &[4, 4], DType::F16), 1).unwrap();
    assert_same(&got, &input(1, &[4, 4], DType::F16), "broadcast");
    let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
    let shape = Shape::from([7, 3]);
    let got = if r % 2 == 0 {
        comm.send(&input(r, &[7, 3], DType::BF16), next).unwrap();
        comm.recv(&shape, DType::BF16, prev).unwrap()
    } else {
        let got = comm.recv(&shape, DType::BF16, prev).unwrap();
        comm.send(&input(r, &[7, 3], DType::BF16), next).unwrap();
        got
    };
    assert_same(&got, &input(prev, &[7, 3], DType::BF16), "send/recv");
    comm.barrier().unwrap();

    // Caller errors are reported before anything moves, so the group stays usable.
    let x = input(r, &[3, 5], DType::F32);
    let e = comm.all_to_all(&x, 1, 0).unwrap_err();
    assert!(matches!(kind(&e), CommErrorKind::InvalidArgument(_)), "{e}");
    assert!(matches!(
        comm.all_gather(&x, 2).unwrap_err(),
        Error::DimOutOfRange { .. }
    ));
    let fp8 = x.to_dtype(DType::F8E4M3).unwrap();
    assert!(matches!(
        kind(&comm.all_reduce(&fp8, ReduceOp::Sum).unwrap_err()),
        CommErrorKind::Unsupported(_)
    ));
    assert!(matches!(
        kind(&comm.send(&x, r).unwrap_err()),
        CommErrorKind::InvalidArgument(_)
    ));

    // A sub-group through the trait: ranks {0, 1} and {2, 3} by rank / 2.
    let sub = comm.split((r / 2) as u32, r as u32).unwrap();
    assert_eq!((sub.rank(), sub.world()), (r % 2, 2));
    let got = sub.all_gather(&input(r, &[2, 2], DType::F32), 0).unwrap();
    let base = r - r % 2;
    let pair = [
        input(base, &[2, 2], DType::F32),
        input(base + 1, &[2, 2], DType::F32),
    ];
    assert_same(
        &got,
        &Tensor::cat(&[&pair[0], &pair[1]], 0).unwrap(),
        "sub-group all_gather",
    );
    comm.barrier().unwrap();
}

// ---- threads ------------------------------------------------------------------

#[test]
fn collectives_on_threads() {
    on_threads(WORLD, 20_000, |c| {
        run_collectives(&c);
        run_subgroups(&c);
        run_tensor_collectives(&c);
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
            run_tensor_collectives(&comm);
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
