//! NcclComm on device buffers and CUDA tensors (feature `cuda`): every collective,
//! one process per GPU (`LAVA_NCCL_WORLD` ranks, default 2), a peer that dies and an
//! abort from another thread. Children re-run this binary with `LAVA_NCCL_ROLE` set
//! (the ignored test `nccl_child` is their entry point).
//!
//! Run on a machine with enough GPUs and libnccl on LD_LIBRARY_PATH:
//! `cargo test -p runtime --features cuda --test comm_nccl -- --ignored`.

#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

mod comm_common;

use comm_common::run_tensor_collectives;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use runtime::comm::{Comm, CommErrorKind, NcclComm, NcclId, ReduceOp};
use runtime::{DType, Device, Error};

/// Ranks, one GPU each: `LAVA_NCCL_world()`, default 2.
fn world() -> usize {
    std::env::var("LAVA_NCCL_world()")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2)
}
const ROLE: &str = "LAVA_NCCL_ROLE";

#[test]
fn nccl_id_is_bytes_or_a_clear_error() {
    // Without libnccl this must be an error naming the fix, not a panic.
    match NcclId::new() {
        Ok(id) => {
            let back = NcclId::from_bytes(&id.to_bytes()).unwrap();
            assert_eq!(back, id);
            assert!(NcclId::from_bytes(&[0u8; 12]).is_err());
        }
        Err(e) => assert!(e.to_string().contains("libnccl"), "{e}"),
    }
}

fn upload(stream: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<u8> {
    stream
        .clone_htod(bytemuck::cast_slice::<f32, u8>(v))
        .unwrap()
}

fn download(stream: &Arc<CudaStream>, s: &CudaSlice<u8>) -> Vec<f32> {
    let bytes: Vec<u8> = stream.clone_dtoh(s).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn zeros(stream: &Arc<CudaStream>, elems: usize) -> CudaSlice<u8> {
    stream.alloc_zeros::<u8>(elems * 4).unwrap()
}

fn run_collectives(c: &NcclComm, stream: &Arc<CudaStream>) {
    let (r, w) = (c.rank(), c.world());
    let f = DType::F32;

    let x = upload(stream, &vec![r as f32 + 1.0; 1000]);
    let mut y = zeros(stream, 1000);
    c.all_reduce_bytes(&x, &mut y, 1000, f, ReduceOp::Sum)
        .unwrap();
    c.synchronize().unwrap();
    assert!(
        download(stream, &y)
            .iter()
            .all(|&v| v == (w * (w + 1) / 2) as f32),
        "all_reduce sum"
    );
    c.all_reduce_bytes(&x, &mut y, 1000, f, ReduceOp::Max)
        .unwrap();
    c.synchronize().unwrap();
    assert!(
        download(stream, &y).iter().all(|&v| v == w as f32),
        "all_reduce max"
    );

    let x = upload(
        stream,
        &(0..4).map(|i| (r * 10 + i) as f32).collect::<Vec<_>>(),
    );
    let mut y = zeros(stream, 4 * w);
    c.all_gather_bytes(&x, &mut y, 4, f).unwrap();
    c.synchronize().unwrap();
    let want: Vec<f32> = (0..w)
        .flat_map(|q| (0..4).map(move |i| (q * 10 + i) as f32))
        .collect();
    assert_eq!(download(stream, &y), want, "all_gather");

    let m = 3;
    let x = upload(
        stream,
        &(0..m * w).map(|i| (r + i) as f32).collect::<Vec<_>>(),
    );
    let mut y = zeros(stream, m);
    c.reduce_scatter_bytes(&x, &mut y, m, f, ReduceOp::Sum)
        .unwrap();
    c.synchronize().unwrap();
    let want: Vec<f32> = (r * m..(r + 1) * m)
        .map(|i| (0..w).map(|q| (q + i) as f32).sum())
        .collect();
    assert_eq!(download(stream, &y), want, "reduce_scatter");

    let k = 5;
    let send: Vec<f32> = (0..w * k)
        .map(|i| (r * 100 + (i / k) * 10 + i % k) as f32)
        .collect();
    let x = upload(stream, &send);
    let mut y = zeros(stream, w * k);
    c.all_to_all_bytes(&x, &mut y, k, f).unwrap();
    c.synchronize().unwrap();
    let want: Vec<f32> = (0..w * k)
        .map(|i| ((i / k) * 100 + r * 10 + i % k) as f32)
        .collect();
    assert_eq!(download(stream, &y), want, "all_to_all");

    let x = upload(stream, &[r as f32 + 7.0; 16]);
    let mut y = zeros(stream, 16);
    c.broadcast_bytes(&x, &mut y, 16, f, 1).unwrap();
    c.synchronize().unwrap();
    assert!(download(stream, &y).iter().all(|&v| v == 8.0), "broadcast");

    if r == 0 {
        c.send_bytes(&upload(stream, &[1.5, 2.5, 3.5]), 3, f, 1)
            .unwrap();
    } else if r == 1 {
        let mut y = zeros(stream, 3);
        c.recv_bytes(&mut y, 3, f, 0).unwrap();
        c.synchronize().unwrap();
        assert_eq!(download(stream, &y), vec![1.5, 2.5, 3.5], "send/recv");
    }
    c.synchronize().unwrap();
    assert!(matches!(
        c.send_bytes(&x, 16, f, r).unwrap_err(),
        Error::Comm {
            kind: CommErrorKind::InvalidArgument(_),
            ..
        }
    ));
    c.barrier().unwrap();

    // Sub-groups: everyone alone, then everyone together in reverse order.
    let alone = c.split(r as u32, 0).unwrap();
    assert_eq!((alone.rank(), alone.world()), (0, 1));
    let both = c.split(0, (w - r) as u32).unwrap();
    assert_eq!((both.rank(), both.world()), (w - 1 - r, w));
    let x = upload(stream, &[both.rank() as f32]);
    let mut y = zeros(stream, w);
    both.all_gather_bytes(&x, &mut y, 1, f).unwrap();
    both.synchronize().unwrap();
    assert_eq!(
        download(stream, &y),
        (0..w).map(|i| i as f32).collect::<Vec<_>>(),
        "split all_gather"
    );
    c.barrier().unwrap();
    c.check().unwrap();
}

#[test]
#[ignore = "child-process role; started by the NCCL multi-process tests"]
fn nccl_child() {
    let role = std::env::var(ROLE).unwrap();
    let rank: usize = std::env::var("LAVA_NCCL_RANK").unwrap().parse().unwrap();
    let hex = std::env::var("LAVA_NCCL_ID").unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let id = NcclId::from_bytes(&bytes).unwrap();
    if role == "tensor" {
        // Collectives on CUDA tensors, on the backend's stream.
        let timeout = Duration::from_secs(60);
        let comm = NcclComm::init_on_device(&id, rank, world(), rank, timeout).unwrap();
        run_tensor_collectives(&comm, &Device::Cuda(rank));
        Comm::synchronize(&comm).unwrap();
        return;
    }
    let ctx = CudaContext::new(rank).unwrap();
    let stream = ctx.new_stream().unwrap();
    let comm = NcclComm::init(&id, rank, world(), stream.clone(), Duration::from_secs(60)).unwrap();
    match role.as_str() {
        "collectives" => run_collectives(&comm, &stream),
        "dead_peer" => {
            comm.barrier().unwrap();
            if rank == 1 {
                std::process::exit(17);
            }
            comm.set_timeout(Duration::from_secs(5));
            let start = Instant::now();
            let x = upload(&stream, &[1.0; 1 << 20]);
            let mut y = zeros(&stream, 1 << 20);
            let res = comm
                .all_reduce_bytes(&x, &mut y, 1 << 20, DType::F32, ReduceOp::Sum)
                .and_then(|()| comm.synchronize());
            let elapsed = start.elapsed();
            println!("rank {rank}: {res:?} after {elapsed:?}");
            assert!(res.is_err(), "a collective with a dead peer must fail");
            assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
            assert!(
                comm.barrier().is_err(),
                "the communicator is aborted afterwards"
            );
        }
        "abort" => {
            comm.barrier().unwrap();
            if rank == 1 {
                std::process::exit(17);
            }
            // A generous timeout: only the abort from another thread can end the wait.
            comm.set_timeout(Duration::from_secs(60));
            let comm = Arc::new(comm);
            let aborter = {
                let comm = Arc::clone(&comm);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    comm.abort();
                })
            };
            let start = Instant::now();
            let x = upload(&stream, &[1.0; 1 << 20]);
            let mut y = zeros(&stream, 1 << 20);
            let res = comm
                .all_reduce_bytes(&x, &mut y, 1 << 20, DType::F32, ReduceOp::Sum)
                .and_then(|()| comm.synchronize());
            let elapsed = start.elapsed();
            aborter.join().unwrap();
            println!("rank {rank}: {res:?} after {elapsed:?}");
            assert!(
                matches!(
                    res,
                    Err(Error::Comm {
                        kind: CommErrorKind::Aborted,
                        ..
                    })
                ),
                "{res:?}"
            );
            assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        }
        other => panic!("unknown role {other}"),
    }
}

fn run_processes(role: &str) -> Vec<Option<i32>> {
    let id = NcclId::new().unwrap();
    let hex: String = id.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let mut children: Vec<_> = (0..world())
        .map(|r| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--ignored",
                    "--exact",
                    "nccl_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ROLE, role)
                .env("LAVA_NCCL_RANK", r.to_string())
                .env("LAVA_NCCL_ID", &hex)
                .env("LAVA_NCCL_WORLD", world().to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut codes = vec![None; world()];
    let mut done = vec![false; world()];
    while done.iter().any(|d| !d) {
        for (i, c) in children.iter_mut().enumerate() {
            if !done[i]
                && let Some(s) = c.try_wait().unwrap()
            {
                codes[i] = s.code();
                done[i] = true;
            }
        }
        if Instant::now() > deadline {
            children.iter_mut().for_each(|c| drop(c.kill()));
            panic!("{role}: ranks still running after 120 s (a hang): {codes:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    codes
}

#[test]
#[ignore = "needs LAVA_NCCL_WORLD (default 2) GPUs and a loadable libnccl"]
fn nccl_collectives_on_gpus() {
    assert_eq!(run_processes("collectives"), vec![Some(0); world()]);
}

#[test]
#[ignore = "needs LAVA_NCCL_WORLD (default 2) GPUs and a loadable libnccl"]
fn nccl_tensor_collectives_on_gpus() {
    assert_eq!(run_processes("tensor"), vec![Some(0); world()]);
}

#[test]
#[ignore = "needs LAVA_NCCL_WORLD (default 2) GPUs and a loadable libnccl"]
fn nccl_abort_from_another_thread_on_gpus() {
    assert_eq!(
        run_processes("abort"),
        (0..world())
            .map(|r| Some(if r == 1 { 17 } else { 0 }))
            .collect::<Vec<_>>()
    );
}

#[test]
#[ignore = "needs LAVA_NCCL_WORLD (default 2) GPUs and a loadable libnccl"]
fn nccl_dead_peer_on_gpus() {
    assert_eq!(
        run_processes("dead_peer"),
        (0..world())
            .map(|r| Some(if r == 1 { 17 } else { 0 }))
            .collect::<Vec<_>>()
    );
}
