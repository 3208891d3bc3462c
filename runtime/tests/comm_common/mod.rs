//! Checks shared by the communicator tests: known inputs per rank, rank-order
//! references, and the tensor-level scenario every backend must pass.

#![allow(dead_code)]

use runtime::comm::{Comm, CommErrorKind, ReduceOp};
use runtime::{DType, Device, Error, Shape, Tensor};

pub fn kind(e: &Error) -> &CommErrorKind {
    match e {
        Error::Comm { kind, .. } => kind,
        other => panic!("expected a comm error, got {other}"),
    }
}

// ---- data and references ----------------------------------------------------

/// Values with many mantissa bits, so a different summation order shows up.
pub fn f32_data(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (rank as u64 * 2_654_435_761 + i as u64 * 40_503) % 100_003;
            (h as f32 / 7.3 - 6000.0) * if i % 3 == 0 { 1e-3 } else { 1.0 }
        })
        .collect()
}

pub fn reference<T: Copy>(
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

// ---- tensor-level interface -----------------------------------------------------

/// Rank `rank`'s input of `shape`, rounded to `dtype`.
pub fn input(rank: usize, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&f32_data(rank + 11, n), shape, dtype, &Device::Cpu).unwrap()
}

pub fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(
        got.to_bytes().unwrap(),
        want.to_bytes().unwrap(),
        "{what}: values"
    );
}

/// The rank-order, f32-accumulated, once-rounded reduction of every rank's input.
pub fn reduced(world: usize, shape: &[usize], dtype: DType, op: ReduceOp) -> Tensor {
    let all: Vec<Vec<f32>> = (0..world)
        .map(|q| input(q, shape, dtype).to_vec_f32().unwrap())
        .collect();
    let n = all[0].len();
    let v = reference(n, world, op, |q, i| all[q][i], |v| v);
    Tensor::from_f32(&v, shape, dtype, &Device::Cpu).unwrap()
}

/// Every tensor-level method of [`Comm`], against results built with tensor ops
/// from every rank's known input on the CPU; the communicated tensors live on `dev`.
pub fn run_tensor_collectives(comm: &dyn Comm, dev: &Device) {
    let (r, w) = (comm.rank(), comm.world());
    let put = |t: &Tensor| t.to_device(dev).unwrap();
    let inputs = |shape: &[usize], dt| (0..w).map(|q| input(q, shape, dt)).collect::<Vec<_>>();

    for dt in [DType::BF16, DType::F16, DType::F32] {
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let got = comm.all_reduce(&put(&input(r, &[3, 5], dt)), op).unwrap();
            assert_same(
                &got,
                &reduced(w, &[3, 5], dt, op),
                &format!("all_reduce {dt:?} {op:?}"),
            );
        }
    }

    // all_gather along an inner dim.
    let xs = inputs(&[2, 3, 4], DType::BF16);
    let got = comm.all_gather(&put(&xs[r]), 1).unwrap();
    assert_same(
        &got,
        &Tensor::cat(&xs.iter().collect::<Vec<_>>(), 1).unwrap(),
        "all_gather dim 1",
    );
    let got = comm.all_gather(&put(&xs[r]), 0).unwrap();
    assert_same(
        &got,
        &Tensor::cat(&xs.iter().collect::<Vec<_>>(), 0).unwrap(),
        "all_gather dim 0",
    );

    // reduce_scatter along dim 1: this rank's slice of the full reduction.
    let shape = [2, 2 * w, 3];
    let got = comm
        .reduce_scatter(&put(&input(r, &shape, DType::F32)), 1, ReduceOp::Sum)
        .unwrap();
    let want = reduced(w, &shape, DType::F32, ReduceOp::Sum)
        .narrow(1, 2 * r, 2)
        .unwrap();
    assert_same(&got, &want, "reduce_scatter dim 1");

    // Ulysses: [seq/W, heads, d] → [seq, heads/W, d] and back.
    let (s_loc, heads, d) = (3, 2 * w, 2);
    let xs = inputs(&[s_loc, heads, d], DType::BF16);
    let y = comm.all_to_all(&put(&xs[r]), 1, 0).unwrap();
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
    let y = comm.all_to_all(&put(&xs[r]), 2, 1).unwrap();
    let mine: Vec<Tensor> = xs.iter().map(|x| x.narrow(2, 2 * r, 2).unwrap()).collect();
    assert_same(
        &y,
        &Tensor::cat(&mine.iter().collect::<Vec<_>>(), 1).unwrap(),
        "all_to_all 4-d",
    );
    let y = comm.all_to_all(&put(&xs[r]), 2, 2).unwrap();
    assert_same(
        &y,
        &Tensor::cat(&mine.iter().collect::<Vec<_>>(), 2).unwrap(),
        "all_to_all split == concat",
    );

    // broadcast, send/recv, barrier.
    let got = comm
        .broadcast(&put(&input(r, &[4, 4], DType::F16)), 1)
        .unwrap();
    assert_same(&got, &input(1, &[4, 4], DType::F16), "broadcast");
    let (next, prev) = ((r + 1) % w, (r + w - 1) % w);
    let shape = Shape::from([7, 3]);
    let got = if r % 2 == 0 {
        comm.send(&put(&input(r, &[7, 3], DType::BF16)), next)
            .unwrap();
        comm.recv(&shape, DType::BF16, prev).unwrap()
    } else {
        let got = comm.recv(&shape, DType::BF16, prev).unwrap();
        comm.send(&put(&input(r, &[7, 3], DType::BF16)), next)
            .unwrap();
        got
    };
    assert_same(&got, &input(prev, &[7, 3], DType::BF16), "send/recv");
    comm.barrier().unwrap();

    // Caller errors are reported before anything moves, so the group stays usable.
    let x = put(&input(r, &[3, 5], DType::F32));
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
    let got = sub
        .all_gather(&put(&input(r, &[2, 2], DType::F32)), 0)
        .unwrap();
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
