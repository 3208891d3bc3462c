//! Parameter counts computed from configs/models/s2v-14b.toml, pinned to model-spec §1–2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use planner::{ModelParams, ModelSpec};

fn s2v() -> ModelParams {
    ModelParams::new(&ModelSpec::builtin("s2v-14b").unwrap())
}

#[test]
fn dit_modules_match_spec_2_1() {
    let d = s2v().dit;
    assert_eq!(d.patch_embedding, 332_800);
    assert_eq!(d.cond_encoder, 332_800);
    assert_eq!(d.text_embedding, 47_196_160);
    assert_eq!(d.time_embedding, 27_535_360);
    assert_eq!(d.time_projection, 157_317_120);
    assert_eq!(d.trainable_cond_mask, 15_360);
    assert_eq!(d.block, 351_394_304);
    assert_eq!(d.blocks, 14_055_772_160);
    assert_eq!(d.head, 337_984);
    assert_eq!(d.audio_injector_layer, 157_327_360);
    assert_eq!(d.audio_injector, 1_887_928_320);
    assert_eq!(d.casual_audio_encoder, 95_051_545);
    assert_eq!(d.frame_packer, 23_936_000);
    assert_eq!(d.total(), 16_295_755_609);
    assert_eq!(d.base(), 14_288_491_584);
    assert_eq!(d.total() - d.base(), 2_007_264_025);
    assert_eq!(d.root(), 2_239_983_449);
}

#[test]
fn fp8_linears_match_spec_8_1() {
    let p = s2v();
    assert_eq!(p.fp8.linears, 460);
    // 16.65 GB: fp8 linear weights at 1 byte, everything else bf16 (model-spec §2.2).
    let fp8_weights = 40 * p.fp8.block + 12 * p.fp8.injector_layer;
    let bytes = fp8_weights + (p.dit.total() - fp8_weights) * 2;
    assert_eq!(bytes, 16_653_156_018);
}

#[test]
fn encoders_match_spec() {
    let p = s2v();
    assert_eq!(p.t5, 5_680_910_336);
    assert_eq!(p.vae.total(), 126_892_531);
    assert_eq!(p.vae.encoder, 53_595_872);
    assert_eq!(p.vae.decoder, 73_295_331);
    // ≈315 M (model-spec §1.4): the encoder without the CTC head.
    assert_eq!(p.wav2vec2, 315_438_720);
}

#[test]
fn weight_bytes_match_spec_2_2() {
    use planner::layout::{Layout, LayoutKind, T5Placement, VaePlacement};
    let model = ModelSpec::builtin("s2v-14b").unwrap();
    let gpus = planner::Catalog::builtin()
        .unwrap()
        .parse_gpus("H200")
        .unwrap();
    for (fp8, want) in [(false, 32_591_511_218u64), (true, 16_653_156_018 + 460 * 4)] {
        let layout = Layout {
            kind: LayoutKind::Lava,
            stages: 1,
            tp: 1,
            ulysses: 1,
            pp: 1,
            fsdp: false,
            vae: VaePlacement::Colocated,
            t5: T5Placement::Cpu,
            fp8,
            offload: false,
        };
        let res = planner::size::resolve(
            planner::size::SizeArg::parse("704*384").unwrap(),
            planner::size::AspectSource::SizeString,
        )
        .unwrap();
        let req = planner::Request::new(
            model.clone(),
            gpus.clone(),
            layout,
            res,
            planner::Workload {
                sample_steps: 4,
                clips: 1,
            },
        )
        .unwrap();
        let plan = match planner::plan(&req) {
            Ok(p) => p,
            Err(e) => e.plan,
        };
        let got = plan.ranks[0]
            .items
            .iter()
            .find(|i| i.component == planner::Component::DitWeights)
            .unwrap()
            .bytes;
        assert_eq!(got, want, "fp8 = {fp8}");
    }
}
