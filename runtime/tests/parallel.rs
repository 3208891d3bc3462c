//! Sharded == unsharded at the layer level (issue 6 item 7): a small attention + FFN block
//! built from the `parallel` layer types, run with TP=2, Ulysses=2 and 4, TP×Ulysses, PP=2,
//! FSDP=2, FSDP×Ulysses and FSDP×Ulysses×TP on SocketComm ranks in threads, against a
//! reference written with plain tensor ops on full weights. f32 throughout; rel L2 ≤ 1e-6.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

mod parallel_common;

use parallel_common::*;
use runtime::comm::{SocketComm, SocketOptions};
use runtime::parallel::tp::block_hint;
use runtime::parallel::ulysses::sdpa;
use runtime::parallel::{
    Attention, Groups, Mesh, SeqShard, ShardedUnit, SharedComm, StageBoundary, shard_of,
};
use runtime::testing::Rng;
use runtime::{Device, Tensor};

fn opts() -> SocketOptions {
    SocketOptions {
        timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(30),
    }
}

/// Runs `f(comm)` on one thread per rank of a loopback group; results in rank order.
fn on_threads<R: Send + 'static>(
    world: usize,
    f: impl Fn(SharedComm) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let comms = SocketComm::local_group(world, opts()).unwrap();
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(Arc::new(c) as SharedComm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// TP × Ulysses mesh on `tp·sp` threads; every rank's outputs match the reference and its
/// cache holds `HEADS/(tp·sp)` heads of the whole sequence.
fn run_mesh(tp: usize, sp: usize, lens: [usize; 2]) {
    let w = Weights::random(7);
    let xs = inputs(11, lens);
    let want = references(&w, &xs);
    let results = on_threads(tp * sp, move |world| {
        mesh_rank(world.as_ref(), tp, sp, &w, &xs, &Device::Cpu)
    });
    for (rank, r) in results.iter().enumerate() {
        check_mesh_rank(rank, tp, sp, lens, r, &want);
    }
}

#[test]
fn single_rank_layers_match_reference() {
    run_mesh(1, 1, [13, 7]);
}

#[test]
fn tensor_parallel_2_matches_unsharded() {
    run_mesh(2, 1, [13, 7]);
}

#[test]
fn ulysses_2_matches_unsharded_with_padding() {
    // 13 and 7 tokens do not divide by 2: the last chunk carries a padding row.
    run_mesh(1, 2, [13, 7]);
}

#[test]
fn ulysses_4_matches_unsharded_with_padding() {
    // 7 tokens over 4 ranks: 2 per rank, the last rank holds one real token.
    run_mesh(1, 4, [13, 7]);
}

#[test]
fn ulysses_4_with_a_rank_holding_only_padding() {
    // 5 tokens over 4 ranks: 2 per rank, rank 3 holds padding only.
    run_mesh(1, 4, [5, 3]);
}

#[test]
fn tensor_parallel_2_by_ulysses_2_matches_unsharded() {
    run_mesh(2, 2, [13, 5]);
}

#[test]
fn pipeline_2_matches_unsharded() {
    let ws = [Weights::random(21), Weights::random(22)];
    let x = inputs(23, [9, 1])[0].clone();
    let (y0, _) = reference(&ws[0], &x, None);
    let (want, _) = reference(&ws[1], &y0, None);
    let want = want.to_vec_f32().unwrap();
    let ws2 = ws.clone();
    let results = on_threads(2, move |world| {
        let g = Groups::split(world.as_ref(), &Mesh::new(1, 2, 1, 1).unwrap()).unwrap();
        let boundary = StageBoundary::new(g.pp.clone());
        let block = Block::new(&ws2[g.coord.pp], g.tp.clone(), Attention::local());
        let seq = SeqShard::full(9);
        // Sub-stage 0 embeds (here: takes x and builds the tables), sub-stage 1 receives
        // the activations with the tables that travel with them.
        let (h, tables) = if boundary.is_first() {
            (x.clone(), rope(9))
        } else {
            let mut r = boundary.recv().unwrap();
            let sin = r.pop().unwrap();
            let cos = r.pop().unwrap();
            (r.pop().unwrap(), (cos, sin))
        };
        let y = block.forward(&h, &tables, &seq, sdpa).unwrap();
        if boundary.is_last() {
            Some(y)
        } else {
            boundary.send(&[&y, &tables.0, &tables.1]).unwrap();
            None
        }
    });
    assert!(results[0].is_none());
    assert_close("pp2 output", results[1].as_ref().unwrap(), &want);
}

/// FSDP over the Ulysses group of a `tp`×`sp` mesh (the planner's layout): two blocks and a
/// root unit (a final projection); each rank keeps 1/sp of its TP shard of every unit. With
/// `ulysses` false the sp ranks each run the whole sequence (plain FSDP).
fn run_fsdp(sp: usize, tp: usize, ulysses: bool) {
    let ws = [Weights::random(31), Weights::random(32)];
    let mut rng = Rng::new(33);
    let proj = randn(&mut rng, &[D, D], 0.1);
    let x = inputs(34, [11, 1])[0].clone();
    let (y0, _) = reference(&ws[0], &x, None);
    let (y1, _) = reference(&ws[1], &y0, None);
    let want = y1.linear(&proj, None).unwrap().to_vec_f32().unwrap();
    let (ws2, proj2) = (ws.clone(), proj.clone());
    let results = on_threads(sp * tp, move |world| {
        let g = Groups::split(world.as_ref(), &Mesh::new(1, 1, sp, tp).unwrap()).unwrap();
        let fsdp = g.sp.clone();
        // What this rank would hold under TP alone, then 1/sp of it under FSDP.
        let tp_shards: Vec<Weights> = ws2
            .iter()
            .map(|w| {
                let part = |(n, t): &(String, Tensor)| {
                    let t = match block_hint(n, g.tp.rank(), tp) {
                        Some(h) => shard_of(t, h).unwrap(),
                        None => t.clone(),
                    };
                    (n.clone(), t)
                };
                Weights(w.0.iter().map(part).collect())
            })
            .collect();
        let units: Vec<ShardedUnit> = tp_shards
            .iter()
            .map(|w| ShardedUnit::from_full(&w.0, fsdp.clone()).unwrap())
            .collect();
        let root =
            ShardedUnit::from_full(&[("head.weight".into(), proj2.clone())], fsdp.clone()).unwrap();
        let held: usize = tp_shards[0].0.iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(units[0].shard().elem_count(), held.div_ceil(sp));

        let seq = if ulysses {
            SeqShard::over(11, &g.sp).unwrap()
        } else {
            SeqShard::full(11)
        };
        let core = || {
            if ulysses {
                Attention::ulysses(g.sp.clone())
            } else {
                Attention::local()
            }
        };
        let (cos, sin) = rope(11);
        let tables = (seq.split(&cos, 0).unwrap(), seq.split(&sin, 0).unwrap());
        // The root unit stays gathered for the whole forward.
        let root_full = root.gather().unwrap();
        let mut h = seq.split(&x, 1).unwrap();
        for unit in &units {
            let gathered = unit.gather().unwrap();
            let w = Weights(
                gathered
                    .names()
                    .map(|nm| (nm.to_string(), gathered.get(nm).unwrap().clone()))
                    .collect(),
            );
            let block = Block::from_shards(&w, g.tp.clone(), core());
            h = block.forward(&h, &tables, &seq, sdpa).unwrap();
            // `gathered`, `w` and the block drop here: the unsharded block is freed.
        }
        let h = if ulysses {
            seq.gather(&h, 1, &g.sp).unwrap()
        } else {
            h
        };
        h.linear(root_full.get("head.weight").unwrap(), None)
            .unwrap()
    });
    for (rank, y) in results.iter().enumerate() {
        let what = format!("fsdp{sp} tp{tp} ulysses={ulysses} rank {rank}");
        assert_close(&what, y, &want);
    }
}

#[test]
fn fsdp_2_matches_unsharded() {
    run_fsdp(2, 1, false);
}

#[test]
fn fsdp_over_ulysses_2_matches_unsharded() {
    run_fsdp(2, 1, true);
}

#[test]
fn fsdp_over_ulysses_2_by_tensor_parallel_2_matches_unsharded() {
    run_fsdp(2, 2, true);
}
