//! Geometry, FLOPs and VAE cache sizes against model-spec §1.5, §3.1 and §3.6.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use planner::flops::{CallFlops, vae_decode_flops};
use planner::memory::vae_decoder_cache;
use planner::{Geometry, ModelSpec};

fn spec() -> ModelSpec {
    ModelSpec::builtin("s2v-14b").unwrap()
}

#[test]
fn geometry_table_3_1() {
    let g = Geometry::new(&spec(), 384, 704);
    assert_eq!(
        (g.lat_h, g.lat_w, g.fsl, g.lq, g.lc, g.ring, g.lkv),
        (48, 88, 1056, 3168, 2640, 12_672, 15_312)
    );
    let clip0: Vec<u64> = (0..4).map(|b| g.lkv_clip0(b)).collect();
    assert_eq!(clip0, vec![5808, 8976, 12_144, 15_312]);
    let g = Geometry::new(&spec(), 720, 400);
    assert_eq!(
        (g.fsl, g.lq, g.lc, g.ring, g.lkv),
        (1125, 3375, 2778, 13_500, 16_278)
    );
}

fn tflops(x: f64) -> String {
    format!("{:.1}", x / 1e12)
}

#[test]
fn flops_table_3_6() {
    let s = spec();
    let g = Geometry::new(&s, 384, 704);
    // The reference recomputes the text K/V every call.
    let f = CallFlops::streaming(&s, &g, g.lkv, true);
    assert_eq!(tflops(f.total()), "123.0");
    assert_eq!(tflops(f.self_attention), "39.7");
    let clip0: Vec<String> = (0..4)
        .map(|b| tflops(CallFlops::streaming(&s, &g, g.lkv_clip0(b), true).total()))
        .collect();
    assert_eq!(clip0, vec!["98.4", "106.6", "114.8", "123.0"]);
    let g = Geometry::new(&s, 720, 400);
    assert_eq!(
        tflops(CallFlops::streaming(&s, &g, g.lkv, true).total()),
        "133.6"
    );
    // lava caches the text K/V: 2.15 TFLOPs less per call.
    let g = Geometry::new(&s, 384, 704);
    let saved = CallFlops::streaming(&s, &g, g.lkv, true).total()
        - CallFlops::streaming(&s, &g, g.lkv, false).total();
    assert_eq!(format!("{:.2}", saved / 1e12), "2.20");
}

#[test]
fn prefill_flops() {
    let s = spec();
    let g = Geometry::new(&s, 384, 704);
    // The reference recomputes the text K/V here too.
    assert_eq!(tflops(CallFlops::prefill(&s, &g, true).total()), "72.1");
}

#[test]
fn vae_decoder_cache_1_5() {
    // 639.2 M elements; 2.52 GB because 29 of the 32 caches are float32.
    let (elems, bytes) = vae_decoder_cache(&spec(), 384, 704);
    assert_eq!(elems, 639_209_472);
    assert_eq!(format!("{:.2}", bytes as f64 / 1e9), "2.52");
    // ≈9.2 TFLOPs per latent frame at 384×704 (rough, per the spec).
    let f = vae_decode_flops(&spec(), 384, 704) / 1e12;
    assert!((8.0..=10.5).contains(&f), "{f:.2} TFLOPs");
}
