//! The sharded == unsharded block of parallel.rs on CUDA tensors with NcclComm, one process
//! per GPU (feature `cuda`): `LAVA_NCCL_WORLD` ranks (default 2) run TP and Ulysses meshes of
//! that size; each rank compares its outputs with the unsharded block computed on its own GPU
//! (f32, rel L2 ≤ 1e-6) and checks its KV cache holds H/(tp·sp) heads. Children re-run this
//! binary with `LAVA_PAR_ROLE` set (the ignored test `parallel_child` is their entry point).
//!
//! Run on a machine with enough GPUs and libnccl on LD_LIBRARY_PATH:
//! `cargo test -p runtime --features cuda --test parallel_nccl -- --ignored`.

#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

mod parallel_common;

use parallel_common::*;
use runtime::comm::{NcclComm, NcclId};
use runtime::{Device, Tensor};

fn world() -> usize {
    std::env::var("LAVA_NCCL_WORLD")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2)
}

const ROLE: &str = "LAVA_PAR_ROLE";
const LENS: [usize; 2] = [13, 7];

#[test]
#[ignore = "child-process role; started by the parallel NCCL tests"]
fn parallel_child() {
    let role = std::env::var(ROLE).unwrap();
    let rank: usize = std::env::var("LAVA_NCCL_RANK").unwrap().parse().unwrap();
    let hex = std::env::var("LAVA_NCCL_ID").unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let id = NcclId::from_bytes(&bytes).unwrap();
    let (tp, sp) = match role.split_once('x') {
        Some((t, s)) => (t.parse::<usize>().unwrap(), s.parse::<usize>().unwrap()),
        None => panic!("role {role} is not TPxSP"),
    };
    assert_eq!(tp * sp, world());
    let comm = NcclComm::init_on_device(&id, rank, world(), rank, Duration::from_secs(60)).unwrap();
    let dev = Device::Cuda(rank);
    let w = Weights::random(7);
    let xs = inputs(11, LENS);
    let on_dev = |t: &Tensor| t.to_device(&dev).unwrap();
    let want = references(&w.to_device(&dev), &[on_dev(&xs[0]), on_dev(&xs[1])]);
    let cpu = references(&w, &xs);
    let got = mesh_rank(&comm, tp, sp, &w, &xs, &dev);
    for (i, y) in got.0.iter().enumerate() {
        let c = runtime::testing::compare(&y.to_vec_f32().unwrap(), &cpu[i]);
        println!(
            "rank {rank} tp{tp} sp{sp} call {i}: rel L2 vs CPU reference {}",
            c.rel_l2
        );
    }
    check_mesh_rank(rank, tp, sp, LENS, &got, &want);
    println!("rank {rank} tp{tp} sp{sp}: matches the unsharded block on its GPU");
}

fn run_processes(role: &str) -> Vec<Option<i32>> {
    let id = NcclId::new().unwrap();
    let hex: String = id.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let mut children: Vec<_> = (0..world())
        .map(|r| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--ignored", "--exact", "parallel_child", "--nocapture"])
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
fn parallel_tp_on_gpus() {
    let role = format!("{}x1", world());
    assert_eq!(run_processes(&role), vec![Some(0); world()]);
}

#[test]
#[ignore = "needs LAVA_NCCL_WORLD (default 2) GPUs and a loadable libnccl"]
fn parallel_ulysses_on_gpus() {
    let role = format!("1x{}", world());
    assert_eq!(run_processes(&role), vec![Some(0); world()]);
}

#[test]
#[ignore = "needs LAVA_NCCL_WORLD = 4 GPUs and a loadable libnccl"]
fn parallel_tp2_ulysses2_on_gpus() {
    assert_eq!(world(), 4, "set LAVA_NCCL_WORLD=4");
    assert_eq!(run_processes("2x2"), vec![Some(0); 4]);
}
