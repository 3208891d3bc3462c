//! Memory accounting through real tensor ops: every allocation is charged to the category
//! in scope, released on drop, and a strict reservation refuses unplanned bytes before
//! allocating. One test per binary: the process-wide CPU tracker is shared.

#![allow(
    clippy::unwrap_used,
    clippy::type_complexity,
    clippy::too_many_arguments
)]

use runtime::memory::{Category, MemoryTracker, scope};
use runtime::{DType, Device, Error, Tensor};

#[test]
fn tensors_are_charged_released_and_bounded_by_reservations() {
    let dev = Device::Cpu;
    let tracker = MemoryTracker::for_device(&dev);
    let base = tracker.stats();

    // Weights: 1000 bf16 = 2000 B, charged on creation and kept by clones.
    let w = {
        let _g = scope(Category::Weights);
        Tensor::zeros((10, 100), DType::BF16, &dev).unwrap()
    };
    let w2 = w.clone();
    let s = tracker.stats();
    assert_eq!(
        s.get(Category::Weights).live - base.get(Category::Weights).live,
        2000
    );

    // Ops inherit the thread's category: a KV-cache write path and an activation.
    let kv = {
        let _g = scope(Category::KvCache);
        let kv = Tensor::zeros((4, 100), DType::F32, &dev).unwrap(); // 1600 B
        kv.slice_set(
            &w.narrow(0, 0, 2).unwrap().to_dtype(DType::F32).unwrap(),
            0,
            1,
        )
        .unwrap();
        kv
    };
    let s = tracker.stats();
    // narrow (400 B bf16) and its f32 cast (800 B) were KvCache temporaries, now dropped.
    assert_eq!(
        s.get(Category::KvCache).live - base.get(Category::KvCache).live,
        1600
    );
    assert!(s.get(Category::KvCache).peak - base.get(Category::KvCache).live >= 1600 + 800);

    let act = w.linear(&w, None).unwrap(); // [10, 10] bf16 = 200 B, Activations by default
    assert_eq!(
        tracker.stats().get(Category::Activations).live - base.get(Category::Activations).live,
        200
    );
    drop(act);
    drop(w);
    assert_eq!(
        tracker.stats().get(Category::Weights).live - base.get(Category::Weights).live,
        2000
    );
    drop(w2);
    drop(kv);
    let s = tracker.stats();
    assert_eq!(
        s.get(Category::Weights).live,
        base.get(Category::Weights).live
    );
    assert_eq!(
        s.get(Category::KvCache).live,
        base.get(Category::KvCache).live
    );

    // A plan reserves bytes; strict mode turns an unplanned allocation into an error
    // before anything is allocated.
    for c in Category::ALL {
        tracker.reserve(c, s.get(c).live + 4096);
    }
    tracker.set_strict(true);
    let ok = Tensor::zeros((1024,), DType::F32, &dev).unwrap(); // exactly 4096 B
    let err = Tensor::zeros((1,), DType::F32, &dev).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfReservation {
                category: Category::Activations,
                bytes: 4,
                ..
            }
        ),
        "{err}"
    );
    drop(ok);
    Tensor::zeros((1,), DType::F32, &dev).unwrap();
    tracker.set_strict(false);
    println!("{}", tracker.stats());
}
