//! Memory accounting of the streaming DiT (one test per binary: the CPU tracker is
//! process-wide): a step-cache holds exactly the ring (12·fsl rows) and, after the prefill,
//! exactly Lc sink rows per layer, charged to the KV-cache category; a streaming call
//! leaves no activation behind and does not grow the cache.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use runtime::memory::{Category, MemoryTracker};
use runtime::models::wan::{CausalWanModelS2V, StepCache, StreamCall, StreamGeometry, WanConfig};
use runtime::weights::{Checkpoint, SafetensorsFile};
use runtime::{DType, Device};

#[test]
fn step_cache_is_sized_from_the_geometry_and_calls_do_not_leak() {
    let dev = Device::Cpu;
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dit_tiny");
    let spec = planner::ModelSpec::builtin("tiny").unwrap();
    let cfg = WanConfig::from(&spec);
    let ckpt = Checkpoint::open(fx.join("checkpoint")).unwrap();
    let tracker = MemoryTracker::for_device(&dev);
    let w0 = tracker.stats().get(Category::Weights).live;
    let model = CausalWanModelS2V::from_checkpoint(&cfg, &ckpt, None, DType::BF16, dev).unwrap();
    let params: usize = cfg
        .expected_tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let weights = tracker.stats().get(Category::Weights).live - w0;
    // bf16 parameters plus the f32 copies of the fp32 regions (time MLPs, head, audio encoder).
    assert!(
        weights >= 2 * params && weights < 3 * params,
        "{weights} B for {params} params"
    );

    let inputs = SafetensorsFile::open(fx.join("inputs.safetensors")).unwrap();
    let g = StreamGeometry::new(8, 16, 3, 12).unwrap();
    let (l, h, d) = (cfg.num_layers, cfg.num_heads, cfg.head_dim());
    let kv0 = tracker.stats().get(Category::KvCache).live;
    let mut cache = StepCache::new(&cfg, g, DType::BF16, &dev).unwrap();
    let ring_bytes = 2 * l * g.ring_len() * h * d * 2;
    assert_eq!(
        tracker.stats().get(Category::KvCache).live - kv0,
        ring_bytes
    );

    let load = |n: &str| {
        inputs
            .tensor(n, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let text = model
        .text_kv(&model.embed_text(&load("context")).unwrap())
        .unwrap();
    let act0 = tracker.stats().get(Category::Activations).live;
    model
        .prefill(
            &mut cache,
            &load("ref_latent"),
            &load("motion_latents"),
            &text,
            None,
        )
        .unwrap();
    let sink_bytes = 2 * l * g.lc() * h * d * 2;
    // The text K/V, computed once per generation, is charged with the caches.
    let text_bytes = 2 * l * cfg.text_len * cfg.dim * 2;
    assert_eq!(
        tracker.stats().get(Category::KvCache).live - kv0,
        ring_bytes + sink_bytes + text_bytes
    );
    assert_eq!(tracker.stats().get(Category::Activations).live, act0);

    let x = load("noise.r0").narrow(1, 0, 3).unwrap();
    let cond = load("cond_states").narrow(1, 0, 3).unwrap();
    let audio = load("audio").narrow(3, 0, 12).unwrap();
    let act1 = tracker.stats().get(Category::Activations).live;
    for b in 0..5 {
        let call = StreamCall {
            x: &x,
            t: 1000.0,
            cond_states: &cond,
            audio: &audio,
            current_start: b * g.lq(),
            relative_dist: 30,
        };
        let v = model
            .forward_stream(&mut cache, &call, &text, None)
            .unwrap();
        assert_eq!(v.dims(), x.dims());
        assert!(v.to_vec_f32().unwrap().iter().all(|v| v.is_finite()));
        drop(v);
        assert_eq!(
            tracker.stats().get(Category::Activations).live,
            act1,
            "call {b}"
        );
        assert_eq!(
            tracker.stats().get(Category::KvCache).live - kv0,
            ring_bytes + sink_bytes + text_bytes,
            "call {b}"
        );
    }
}
