//! Golden test of the Wan2.1 VAE (model-spec §1.5, §6.4) against our PyTorch reference
//! (tests/reference/vae_ref.py, fixtures from make_golden_encoders.py): the tiny config of
//! configs/models/tiny.toml, random weights in a real `.pth` archive.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use planner::spec::ModelSpec;
use runtime::models::vae::{DecodeStream, VaeConfig, WanVae};
use runtime::models::vars::VarsRoot;
use runtime::pth::PthFile;
use runtime::testing::{compare, tolerance};
use runtime::{DType, Device, Result, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vae_tiny")
}

fn load(act: DType, dev: &Device) -> Result<WanVae> {
    let spec = ModelSpec::builtin("tiny").expect("tiny spec");
    let ckpt = PthFile::open(fixtures().join("Wan2.1_VAE.pth"))?;
    let root = VarsRoot::new(&ckpt, act, *dev);
    WanVae::load(&root, VaeConfig::from_spec(&spec.vae)?)
}

fn check(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let c = compare(
        &actual.to_vec_f32().unwrap(),
        &expected.to_vec_f32().unwrap(),
    );
    println!("{}", c.report(what, tol));
    assert!(c.passes(tol), "{}", c.report(what, tol));
    c.rel_l2
}

fn vae_encode_matches_reference(dev: &Device) -> Result<()> {
    let golden = PthFile::open(fixtures().join("golden.pth"))?;
    let vae = load(DType::F32, dev)?;
    let video = golden.tensor("video", dev)?;
    let latents = vae.encode(&video)?;
    check(
        "encode latents",
        &latents,
        &golden.tensor("latents", &Device::Cpu)?,
        tolerance(DType::F32),
    );
    Ok(())
}
runtime::test_device!(
    vae_encode_matches_reference,
    vae_encode_matches_reference_cpu,
    vae_encode_matches_reference_cuda
);

/// Seven latents through one stream in calls of 2 (priming), 3 and 2 latents; each call's
/// frames compared frame by frame.
fn vae_stream_decode_matches_reference(dev: &Device) -> Result<()> {
    let golden = PthFile::open(fixtures().join("golden.pth"))?;
    let vae = load(DType::F32, dev)?;
    let z = golden.tensor("z", dev)?;
    let mut stream = DecodeStream::new();
    for (i, (a, n)) in [(0, 2), (2, 3), (5, 2)].into_iter().enumerate() {
        let frames = vae.decode_stream(&mut stream, &z.narrow(2, a, n)?)?;
        let want = golden.tensor(&format!("decode.{i}"), &Device::Cpu)?;
        assert_eq!(frames.dims(), want.dims(), "call {i}");
        for f in 0..want.dim(2)? {
            check(
                &format!("call {i} frame {f}"),
                &frames.narrow(2, f, 1)?,
                &want.narrow(2, f, 1)?,
                tolerance(DType::F32),
            );
        }
    }
    assert_eq!(stream.latents(), 7);
    // 32 cached convs in the decoder (model-spec §1.5): all in use after the second latent.
    assert_eq!(stream.cache_usage().0, 32);
    Ok(())
}
runtime::test_device!(
    vae_stream_decode_matches_reference,
    vae_stream_decode_matches_reference_cpu,
    vae_stream_decode_matches_reference_cuda
);

/// The bf16 dtype flow (norm/SiLU in f32, conv inputs rounded to bf16) against the
/// reference's bf16 mode. bf16 decoding is chaotic at the 1e-2 level (a 1e-6 relative change
/// of the latents moves the reference's bf16 output by 1.4e-2), so the check on the CPU is the
/// bf16 tolerance plus being nearer the bf16 reference than the f32 one (the roundings
/// happen), on the first call only: later calls drift apart through the caches as far as a
/// random 1e-6 perturbation would move them. CUDA: see the comment in the body.
fn vae_stream_decode_bf16_flow_matches_reference(dev: &Device) -> Result<()> {
    let golden = PthFile::open(fixtures().join("golden.pth"))?;
    let vae = load(DType::BF16, dev)?;
    let z = golden.tensor("z", dev)?;
    let mut stream = DecodeStream::new();
    {
        let i = 0;
        let frames = vae.decode_stream(&mut stream, &z.narrow(2, 0, 2)?)?;
        let want = golden.tensor(&format!("decode_bf16.{i}"), &Device::Cpu)?;
        let f32_ref = golden.tensor(&format!("decode.{i}"), &Device::Cpu)?;
        let to_f32 = compare(&frames.to_vec_f32()?, &f32_ref.to_vec_f32()?).rel_l2;
        if !dev.is_cuda() {
            // The CPU backend rounds where the reference rounds and sums like it: within the
            // bf16 tolerance, and nearer the bf16 reference than the f32 one.
            let err = check(
                &format!("bf16 call {i}"),
                &frames,
                &want,
                tolerance(DType::BF16),
            );
            println!(
                "bf16 call {i}: rel L2 {err:.3e} to the bf16 reference, {to_f32:.3e} to the f32 one"
            );
            assert!(
                err < to_f32,
                "call {i}: nearer the f32 reference ({to_f32:.3e}) than the bf16 one ({err:.3e})"
            );
        } else {
            // On CUDA the convolutions (cuDNN engines) sum in another order. This decode
            // amplifies such differences to the level a 1e-6 change of the latents causes in
            // the reference itself (1.4e-2), which is as far as the bf16 and f32 references
            // are apart, so which of the two is nearer is noise (H200, 2026-11-21: 1.41e-2 to
            // the bf16 one, 1.22e-2 to the f32 one). What holds: within 2.5e-2 of both
            // references and of this crate's CPU bf16 decode, whose rounding points are
            // checked above; the CUDA kernels' rounding is pinned op by op against the CPU
            // in cuda_vae.rs.
            let tol = 2.5e-2;
            let err = check(
                &format!("bf16 call {i} vs bf16 reference"),
                &frames,
                &want,
                tol,
            );
            check(
                &format!("bf16 call {i} vs f32 reference"),
                &frames,
                &f32_ref,
                tol,
            );
            let cpu = load(DType::BF16, &Device::Cpu)?.decode_stream(
                &mut DecodeStream::new(),
                &golden.tensor("z", &Device::Cpu)?.narrow(2, 0, 2)?,
            )?;
            let to_cpu = check(&format!("bf16 call {i} vs CPU bf16"), &frames, &cpu, tol);
            println!(
                "bf16 call {i} (cuda): rel L2 {err:.3e} to the bf16 reference, {to_f32:.3e} to \
                 the f32 one, {to_cpu:.3e} to the CPU bf16 decode"
            );
        }
    }
    Ok(())
}
runtime::test_device!(
    vae_stream_decode_bf16_flow_matches_reference,
    vae_stream_decode_bf16_flow_matches_reference_cpu,
    vae_stream_decode_bf16_flow_matches_reference_cuda
);

#[test]
fn vae_rejects_bad_inputs() -> Result<()> {
    let vae = load(DType::F32, &Device::Cpu)?;
    let dev = Device::Cpu;
    // 6 frames is not 1 + 4k.
    let v = Tensor::zeros((1, 3, 6, 32, 48), DType::F32, &dev)?;
    assert!(vae.encode(&v).is_err());
    let z = Tensor::zeros((1, 8, 1, 4, 6), DType::F32, &dev)?;
    assert!(vae.decode_stream(&mut DecodeStream::new(), &z).is_err());
    Ok(())
}

/// The checkpoint's tensors are exactly the planner's parameter count (model-spec §1.5
/// formula; 126 892 531 at full size), and `load` rejects unknown tensors, so the module
/// structure and the planner's architecture walk agree.
#[test]
fn vae_parameters_match_planner() -> Result<()> {
    let spec = ModelSpec::builtin("tiny").expect("tiny spec");
    let ckpt = PthFile::open(fixtures().join("Wan2.1_VAE.pth"))?;
    let total: usize = ckpt
        .names()
        .map(|n| ckpt.info(n).unwrap().shape.iter().product::<usize>())
        .sum();
    assert_eq!(total as u64, planner::params::vae_params(&spec.vae).total());
    Ok(())
}

/// After two latents every cached conv holds 2 frames; in the bf16 flow their bytes equal the
/// planner's cache model (f32 after norm/SiLU, bf16 for conv1 and the temporal upsamples).
#[test]
fn vae_cache_bytes_match_planner() -> Result<()> {
    let spec = ModelSpec::builtin("tiny").expect("tiny spec");
    let vae = load(DType::BF16, &Device::Cpu)?;
    let z = Tensor::zeros((1, 16, 3, 4, 6), DType::F32, &Device::Cpu)?;
    let mut stream = DecodeStream::new();
    vae.decode_stream(&mut stream, &z)?;
    let (elems, bytes) = planner::memory::vae_decoder_cache(&spec, 32, 48);
    assert!(elems > 0);
    assert_eq!(stream.cache_usage(), (32, bytes as usize));
    Ok(())
}

/// The 73-frame motion context of one image gives 19 latents, and causality holds: the first
/// latent is the encoding of the image alone (the reference latent of §4.6).
#[test]
fn vae_motion_context_is_causal() -> Result<()> {
    let golden = PthFile::open(fixtures().join("golden.pth"))?;
    let vae = load(DType::F32, &Device::Cpu)?;
    let frame = golden.tensor("video", &Device::Cpu)?.narrow(2, 0, 1)?;
    let motion = vae.encode_repeated(&frame, 73)?;
    assert_eq!(motion.dims(), &[1, 16, 19, 4, 6]);
    let alone = vae.encode_repeated(&frame, 1)?;
    assert_eq!(motion.narrow(2, 0, 1)?.to_vec_f32()?, alone.to_vec_f32()?);
    assert!(vae.encode_repeated(&frame, 0).is_err());
    Ok(())
}
