//! The pieces of `runtime::parallel` one by one: shard hints for checkpoint names, the rank
//! mesh against the planner's, communicator groups, FSDP flat layouts and loader pieces,
//! stage-boundary messages, the Ulysses KV adapter, bf16 TP linears and error paths.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use runtime::comm::{SocketComm, SocketOptions};
use runtime::models::wan::block::SelfAttnKv;
use runtime::parallel::tp::block_hint;
use runtime::parallel::ulysses::{pad_to, sdpa};
use runtime::parallel::{
    Attention, ColumnParallel, Coord, FlatLayout, Groups, Mesh, RowParallel, SeqShard, Shard,
    ShardedRmsNorm, ShardedUnit, SharedComm, StageBoundary, UlyssesKv, scatter_from, shard_of,
};
use runtime::testing::{Rng, compare, tolerance};
use runtime::{DType, Device, Result, Tensor};

fn on_threads<R: Send + 'static>(
    world: usize,
    f: impl Fn(SharedComm) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let o = SocketOptions {
        timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(30),
    };
    let comms = SocketComm::local_group(world, o).unwrap();
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

fn randn(rng: &mut Rng, shape: &[usize], dtype: DType) -> Tensor {
    rng.randn(shape.to_vec(), 1.0, dtype, &Device::Cpu)
        .unwrap()
        .0
}

#[test]
fn block_hints_follow_the_megatron_layout() {
    let h = |dim| {
        Some(Shard {
            dim,
            rank: 1,
            world: 4,
        })
    };
    let cases = [
        ("blocks.3.self_attn.q.weight", h(0)),
        ("blocks.3.self_attn.k.bias", h(0)),
        ("blocks.3.self_attn.v.weight", h(0)),
        ("blocks.3.self_attn.norm_q.weight", h(0)),
        ("blocks.3.cross_attn.norm_k.weight", h(0)),
        ("blocks.3.self_attn.o.weight", h(1)),
        ("blocks.3.self_attn.o.bias", None),
        ("blocks.3.ffn.0.weight", h(0)),
        ("blocks.3.ffn.0.bias", h(0)),
        ("blocks.3.ffn.2.weight", h(1)),
        ("blocks.3.ffn.2.bias", None),
        ("blocks.3.norm3.weight", None),
        ("blocks.3.modulation", None),
        ("audio_injector.injector.7.q.weight", h(0)),
        ("audio_injector.injector.7.o.weight", h(1)),
        ("audio_injector.injector_adain_layers.7.linear.weight", h(0)),
        ("audio_injector.injector_adain_layers.7.linear.bias", h(0)),
        ("time_projection.1.weight", h(0)),
        ("time_projection.1.bias", h(0)),
        ("casual_audio_encoder.encoder.final_linear.weight", None),
        ("time_embedding.0.weight", None),
        ("text_embedding.2.weight", None),
        ("head.head.weight", None),
        ("casual_audio_encoder.weights", None),
        ("ffn.2.weight", h(1)),
    ];
    for (name, want) in cases {
        assert_eq!(block_hint(name, 1, 4), want, "{name}");
    }
}

#[test]
fn mesh_order_matches_the_planner() {
    let layout = planner::Layout {
        kind: planner::LayoutKind::Lava,
        stages: 2,
        tp: 2,
        ulysses: 2,
        pp: 2,
        fsdp: false,
        vae: planner::VaePlacement::Dedicated,
        t5: planner::T5Placement::One,
        fp8: false,
        offload: false,
    };
    let mesh = Mesh::new(2, 2, 2, 2).unwrap();
    let roles = planner::layout::mesh(&layout, 40, 4);
    let dit: Vec<_> = roles
        .iter()
        .filter_map(|r| match *r {
            planner::Role::Dit {
                stage, pp, sp, tp, ..
            } => Some(Coord {
                stage: stage as usize,
                pp: pp as usize,
                sp: sp as usize,
                tp: tp as usize,
            }),
            planner::Role::Vae => None,
        })
        .collect();
    assert_eq!(dit.len(), mesh.world());
    for (rank, c) in dit.iter().enumerate() {
        assert_eq!(mesh.coord(rank).unwrap(), *c, "rank {rank}");
        assert_eq!(mesh.rank(*c), rank);
    }
    assert!(mesh.coord(16).is_err());
    assert!(Mesh::new(1, 0, 1, 1).is_err());
}

#[test]
fn groups_hold_the_ranks_that_share_all_other_coordinates() {
    let mesh = Mesh::new(1, 2, 2, 2).unwrap();
    let out = on_threads(8, move |world| {
        let g = Groups::split(world.as_ref(), &mesh).unwrap();
        let me = Tensor::from_vec(vec![world.rank() as f32], 1, &Device::Cpu).unwrap();
        let members = |c: &SharedComm| -> Vec<usize> {
            let v = c.all_gather(&me, 0).unwrap().to_vec_f32().unwrap();
            v.into_iter().map(|x| x as usize).collect()
        };
        (g.coord, members(&g.tp), members(&g.sp), members(&g.pp))
    });
    for (rank, (c, tp, sp, pp)) in out.iter().enumerate() {
        assert_eq!(*c, mesh.coord(rank).unwrap());
        let with =
            |f: &dyn Fn(usize) -> Coord, n| (0..n).map(|i| mesh.rank(f(i))).collect::<Vec<_>>();
        assert_eq!(
            tp,
            &with(&|i| Coord { tp: i, ..*c }, 2),
            "rank {rank} tp group"
        );
        assert_eq!(
            sp,
            &with(&|i| Coord { sp: i, ..*c }, 2),
            "rank {rank} sp group"
        );
        assert_eq!(
            pp,
            &with(&|i| Coord { pp: i, ..*c }, 2),
            "rank {rank} pp group"
        );
    }
}

#[test]
fn flat_layout_pieces_cover_every_element_once() {
    let shapes = vec![
        ("a".to_string(), vec![3, 5]),
        ("b".to_string(), vec![7]),
        ("c".to_string(), vec![2, 2]),
    ];
    let l = FlatLayout::new(&shapes, 4).unwrap();
    assert_eq!((l.numel(), l.shard_len()), (26, 7));
    let mut seen = std::collections::BTreeMap::<String, Vec<u32>>::new();
    for (n, s) in &shapes {
        seen.insert(n.clone(), vec![0; s.iter().product()]);
    }
    for rank in 0..4 {
        let mut next_dst = 0;
        for p in l.pieces(rank) {
            assert_eq!(
                p.dst, next_dst,
                "rank {rank}: pieces are contiguous in the shard"
            );
            next_dst += p.src.len();
            for i in p.src.clone() {
                seen.get_mut(&p.name).unwrap()[i] += 1;
            }
        }
        // Only the last rank holds padding (26 = 3·7 + 5).
        assert_eq!(next_dst, if rank == 3 { 5 } else { 7 }, "rank {rank}");
    }
    assert!(seen.values().flatten().all(|&c| c == 1));
    assert!(FlatLayout::new(&[shapes[0].clone(), shapes[0].clone()], 2).is_err());
}

#[test]
fn sharded_unit_from_loader_pieces_equals_from_full_and_gathers_bitwise() {
    let out = on_threads(3, |comm| {
        let mut rng = Rng::new(5);
        let tensors = vec![
            ("w".to_string(), randn(&mut rng, &[4, 5], DType::BF16)),
            ("b".to_string(), randn(&mut rng, &[4], DType::BF16)),
            ("n".to_string(), randn(&mut rng, &[3], DType::BF16)),
        ];
        let full = ShardedUnit::from_full(&tensors, comm.clone()).unwrap();
        // What a loader does: read exactly the pieces into a zeroed shard.
        let layout = full.layout().clone();
        let shard = Tensor::zeros(layout.shard_len(), DType::BF16, &Device::Cpu).unwrap();
        for p in layout.pieces(comm.rank()) {
            let t = &tensors.iter().find(|(n, _)| *n == p.name).unwrap().1;
            let flat = t.reshape(t.elem_count()).unwrap();
            let part = flat.narrow(0, p.src.start, p.src.len()).unwrap();
            shard.slice_set(&part, 0, p.dst).unwrap();
        }
        let loaded = ShardedUnit::new(layout, shard, comm.clone()).unwrap();
        assert_eq!(
            loaded.shard().to_bytes().unwrap(),
            full.shard().to_bytes().unwrap()
        );
        assert_eq!(loaded.shard().elem_count(), 9); // ⌈27 / 3⌉
        let g = loaded.gather().unwrap();
        for (n, t) in &tensors {
            let got = g.get(n).unwrap();
            assert_eq!(got.dims(), t.dims(), "{n}");
            assert_eq!(got.dtype(), DType::BF16);
            assert_eq!(got.to_bytes().unwrap(), t.to_bytes().unwrap(), "{n}");
        }
        assert!(g.get("missing").is_err());
        let wrong = Tensor::zeros(8, DType::BF16, &Device::Cpu).unwrap();
        assert!(ShardedUnit::new(full.layout().clone(), wrong, comm.clone()).is_err());
        let mixed = vec![
            tensors[0].clone(),
            ("f".into(), randn(&mut rng, &[2], DType::F32)),
        ];
        assert!(ShardedUnit::from_full(&mixed, comm).is_err());
    });
    assert_eq!(out.len(), 3);
}

#[test]
fn stage_boundary_carries_activations_and_side_tensors_through_three_stages() {
    let out = on_threads(3, |comm| {
        let b = StageBoundary::new(comm.clone());
        let dev = Device::Cpu;
        let mut rng = Rng::new(9);
        let x = randn(&mut rng, &[1, 6, 4], DType::BF16);
        let e0 = randn(&mut rng, &[3, 6, 4], DType::F32);
        let tiny = randn(&mut rng, &[2], DType::F16);
        let scalar = Tensor::scalar(42.0, DType::F32, &dev).unwrap();
        let (first, last) = (b.is_first(), b.is_last());
        if first {
            assert!(b.recv().is_err(), "the first sub-stage has no predecessor");
            b.send(&[&x, &e0, &tiny, &scalar]).unwrap();
            return None;
        }
        let got = b.recv().unwrap();
        assert_eq!(got.len(), 4);
        // Each sub-stage adds 1 to the activations, as a layer range would transform them.
        let y = got[0].affine(1.0, 1.0).unwrap();
        if !last {
            b.send(&[&y, &got[1], &got[2], &got[3]]).unwrap();
            return None;
        }
        assert!(
            b.send(&[&y]).is_err(),
            "the last sub-stage has no successor"
        );
        assert!(b.send(&[]).is_err());
        let want_x = x.affine(1.0, 1.0).unwrap().affine(1.0, 1.0).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(y.to_bytes().unwrap(), want_x.to_bytes().unwrap());
        for (g, w) in got[1..].iter().zip([&e0, &tiny, &scalar]) {
            assert_eq!((g.dims(), g.dtype()), (w.dims(), w.dtype()));
            assert_eq!(g.to_bytes().unwrap(), w.to_bytes().unwrap());
        }
        Some(b.stage())
    });
    assert_eq!(out, vec![None, None, Some((2, 3))]);
}

/// Mirrors the DiT's streaming `SelfAttnKv`: RoPE over the positions it sees, keys and
/// values appended to a cache of its heads, attention over the cache.
struct AppendKv {
    cache: Option<(Tensor, Tensor)>,
    heads: usize,
}

impl SelfAttnKv for AppendKv {
    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (_, l, h, d) = q.dims4()?;
        assert_eq!(h, self.heads, "the inner KV sees this rank's heads");
        let start = self.cache.as_ref().map_or(0, |c| c.0.dim(1).unwrap());
        let (mut c, mut s) = (Vec::new(), Vec::new());
        for p in start..start + l {
            for i in 0..d / 2 {
                let a = p as f64 * 10000f64.powf(-2.0 * i as f64 / d as f64);
                c.push(a.cos() as f32);
                s.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(c, (l, d / 2), &Device::Cpu)?;
        let sin = Tensor::from_vec(s, (l, d / 2), &Device::Cpu)?;
        let q = q.rope_interleaved(&cos, &sin, q.dtype())?;
        let k = k.rope_interleaved(&cos, &sin, k.dtype())?;
        let (kk, vv) = match self.cache.take() {
            Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 1)?, Tensor::cat(&[&cv, v], 1)?),
            None => (k, v.clone()),
        };
        let o = sdpa(&q, &kk, &vv);
        self.cache = Some((kk, vv));
        o
    }
}

#[test]
fn ulysses_kv_adapter_matches_single_rank_kv() {
    const H: usize = 4;
    let mut rng = Rng::new(3);
    let calls: Vec<[Tensor; 3]> = [9usize, 5]
        .iter()
        .map(|&l| std::array::from_fn(|_| randn(&mut rng, &[1, l, H, 8], DType::F32)))
        .collect();
    let mut single = AppendKv {
        cache: None,
        heads: H,
    };
    let want: Vec<Vec<f32>> = calls
        .iter()
        .map(|[q, k, v]| single.attend(0, q, k, v).unwrap().to_vec_f32().unwrap())
        .collect();
    let calls2 = calls.clone();
    let out = on_threads(2, move |comm| {
        let attn = Attention::ulysses(comm.clone());
        let mut inner = AppendKv {
            cache: None,
            heads: H / 2,
        };
        let mut outs = Vec::new();
        for [q, k, v] in &calls2 {
            let seq = SeqShard::over(q.dim(1).unwrap(), &comm).unwrap();
            let split = |t: &Tensor| seq.split(t, 1).unwrap();
            let mut kv = UlyssesKv {
                attn: &attn,
                seq,
                inner: &mut inner,
            };
            let o = kv.attend(0, &split(q), &split(k), &split(v)).unwrap();
            outs.push(seq.gather(&o, 1, &comm).unwrap().to_vec_f32().unwrap());
        }
        outs
    });
    for (rank, outs) in out.iter().enumerate() {
        for (i, (g, w)) in outs.iter().zip(&want).enumerate() {
            let c = compare(g, w);
            assert!(c.rel_l2 <= 1e-6, "rank {rank} call {i}: {c:?}");
        }
    }
}

#[test]
fn seq_shard_pads_splits_and_gathers() {
    let s = SeqShard::new(5, 3, 4).unwrap();
    assert_eq!(
        (s.padded, s.local_len(), s.offset(), s.valid_local()),
        (8, 2, 6, 0)
    );
    let s1 = SeqShard::new(5, 2, 4).unwrap();
    assert_eq!((s1.offset(), s1.valid_local()), (4, 1));
    let x = Tensor::from_vec((0..10).map(|v| v as f32).collect(), (5, 2), &Device::Cpu).unwrap();
    assert_eq!(
        s1.split(&x, 0).unwrap().to_vec_f32().unwrap(),
        vec![8., 9., 0., 0.]
    );
    assert_eq!(s.split(&x, 0).unwrap().to_vec_f32().unwrap(), vec![0.; 4]);
    assert!(s.split(&x.narrow(0, 0, 4).unwrap(), 0).is_err());
    assert!(SeqShard::new(5, 4, 4).is_err());
    assert!(pad_to(&x, 0, 3).is_err());
    let out = on_threads(4, move |comm| {
        let s = SeqShard::over(5, &comm).unwrap();
        let g = s.gather(&s.split(&x, 0).unwrap(), 0, &comm).unwrap();
        // A shard of another rank, or of another group size, is refused.
        let other = SeqShard::new(5, (comm.rank() + 1) % 4, 4).unwrap();
        assert!(other.gather(&s.split(&x, 0).unwrap(), 0, &comm).is_err());
        g.to_vec_f32().unwrap()
    });
    let want: Vec<f32> = (0..10).map(|v| v as f32).collect();
    assert!(out.iter().all(|g| *g == want));
}

#[test]
fn local_attention_refuses_a_split_sequence() {
    let q = Tensor::zeros((1, 2, 2, 4), DType::F32, &Device::Cpu).unwrap();
    let seq = SeqShard::new(4, 0, 2).unwrap();
    assert!(Attention::local().forward(&q, &q, &q, &seq).is_err());
    assert_eq!(Attention::local().degree(), 1);
}

#[test]
fn tp_layers_in_bf16_match_the_unsharded_linear() {
    let mut rng = Rng::new(17);
    let x = randn(&mut rng, &[5, 32], DType::BF16);
    let w0 = randn(&mut rng, &[48, 32], DType::BF16)
        .affine(0.2, 0.0)
        .unwrap();
    let b0 = randn(&mut rng, &[48], DType::BF16);
    let w1 = randn(&mut rng, &[32, 48], DType::BF16)
        .affine(0.2, 0.0)
        .unwrap();
    let b1 = randn(&mut rng, &[32], DType::BF16);
    let nw = randn(&mut rng, &[48], DType::BF16);
    let h = x.linear(&w0, Some(&b0)).unwrap();
    let want = h
        .rms_norm(Some(&nw), 1e-6)
        .unwrap()
        .linear(&w1, Some(&b1))
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let out = on_threads(2, move |comm| {
        let (r, n) = (comm.rank(), comm.world());
        let col = ColumnParallel::from_full(&w0, Some(&b0), r, n).unwrap();
        let norm = ShardedRmsNorm::from_full(&nw, 1e-6, comm.clone()).unwrap();
        let row = RowParallel::from_full(&w1, Some(&b1), comm.clone()).unwrap();
        assert_eq!(col.weight.dims(), &[24, 32]);
        assert_eq!(row.weight.dims(), &[32, 24]);
        // Error paths: a bias of the wrong width, a norm weight that is not a 1/n slice.
        assert!(ColumnParallel::new(col.weight.clone(), Some(b0.clone())).is_err());
        assert!(ShardedRmsNorm::new(nw.clone(), 48, 1e-6, comm.clone()).is_err());
        let y = row
            .forward(&norm.forward(&col.forward(&x).unwrap()).unwrap())
            .unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        y.to_vec_f32().unwrap()
    });
    for (rank, y) in out.iter().enumerate() {
        let c = compare(y, &want);
        assert!(c.rel_l2 <= tolerance(DType::BF16), "rank {rank}: {c:?}");
    }
    assert_eq!(
        out[0], out[1],
        "every TP rank holds the same reduced output"
    );
}

#[test]
fn dit_groups_leave_out_the_vae_rank() {
    let mesh = Mesh::new(1, 1, 1, 2).unwrap();
    let out = on_threads(3, move |world| {
        let g = Groups::split_dit(world.as_ref(), &mesh).unwrap();
        g.map(|g| {
            let me = Tensor::from_vec(vec![world.rank() as f32], 1, &Device::Cpu).unwrap();
            g.tp.all_gather(&me, 0).unwrap().to_vec_f32().unwrap()
        })
    });
    assert_eq!(out, vec![Some(vec![0., 1.]), Some(vec![0., 1.]), None]);
    // Groups::split itself wants exactly the DiT ranks.
    let out = on_threads(3, move |world| {
        Groups::split(world.as_ref(), &mesh).is_err()
    });
    assert!(out.iter().all(|&e| e));
}

#[test]
fn ulysses_refuses_heads_that_do_not_split() {
    let out = on_threads(2, |comm| {
        let q = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let seq = SeqShard::over(4, &comm).unwrap();
        let e = Attention::ulysses(comm)
            .forward(&q, &q, &q, &seq)
            .unwrap_err();
        e.to_string()
    });
    assert!(out.iter().all(|m| m.contains("3 heads")), "{out:?}");
}

#[test]
fn weights_read_once_are_scattered_by_their_hints() {
    let mut rng = Rng::new(77);
    let full = randn(&mut rng, &[6, 4], DType::BF16);
    let f2 = full.clone();
    let out = on_threads(3, move |comm| {
        let root = 1;
        let mine = (comm.rank() == root).then_some(&f2);
        let shape = f2.shape().clone();
        let rows = scatter_from(
            comm.as_ref(),
            root,
            mine,
            &shape,
            DType::BF16,
            Some(0),
            &Device::Cpu,
        )
        .unwrap();
        let whole = scatter_from(
            comm.as_ref(),
            root,
            mine,
            &shape,
            DType::BF16,
            None,
            &Device::Cpu,
        )
        .unwrap();
        // Columns: 4 does not split 3 ways, and every rank finds out before any data moves.
        let cols = scatter_from(
            comm.as_ref(),
            root,
            mine,
            &shape,
            DType::BF16,
            Some(1),
            &Device::Cpu,
        );
        (
            rows.to_bytes().unwrap(),
            whole.to_bytes().unwrap(),
            cols.is_err(),
        )
    });
    for (rank, (rows, whole, cols_err)) in out.into_iter().enumerate() {
        let want = shard_of(
            &full,
            Shard {
                dim: 0,
                rank,
                world: 3,
            },
        )
        .unwrap();
        assert_eq!(rows, want.to_bytes().unwrap(), "rank {rank}");
        assert_eq!(whole, full.to_bytes().unwrap(), "rank {rank}");
        assert!(cols_err, "rank {rank}");
    }
}
