//! Golden test of the umT5 encoder (model-spec §1.3) against our PyTorch reference
//! (tests/reference/t5_ref.py): tiny config of configs/models/tiny.toml with a 1024-token
//! vocabulary (the real 256 384 would make a 16 MB fixture), a bf16 `.pth` checkpoint, one
//! prompt of 37 real tokens padded to 48 in the reference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use planner::spec::ModelSpec;
use runtime::models::t5::{T5Config, T5Encoder, relative_bucket};
use runtime::models::vars::VarsRoot;
use runtime::pth::PthFile;
use runtime::testing::{compare, tolerance};
use runtime::{DType, Device, Result};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/t5_tiny")
}

fn load(dev: &Device) -> Result<T5Encoder> {
    let spec = ModelSpec::builtin("tiny").expect("tiny spec");
    let cfg = T5Config {
        vocab: 1024,
        ..T5Config::from_spec(&spec.t5)
    };
    let ckpt = PthFile::open(fixtures().join("models_t5_umt5-xxl-enc-bf16.pth"))?;
    assert_eq!(
        ckpt.info("token_embedding.weight").map(|i| i.dtype),
        Some(DType::BF16)
    );
    T5Encoder::load(&VarsRoot::new(&ckpt, DType::F32, *dev), cfg)
}

fn t5_encoder_matches_reference(dev: &Device) -> Result<()> {
    let golden = PthFile::open(fixtures().join("golden.pth"))?;
    let ids: Vec<u32> = golden
        .tensor("ids", &Device::Cpu)?
        .to_vec_f32()?
        .iter()
        .map(|&v| v as u32)
        .collect();
    let real = golden
        .tensor("mask", &Device::Cpu)?
        .to_vec_f32()?
        .iter()
        .sum::<f32>() as usize;
    let out = load(dev)?.forward(&ids[..real])?;
    let want = golden.tensor("output", &Device::Cpu)?;
    assert_eq!(out.dims(), &want.dims()[1..]);
    let c = compare(&out.to_vec_f32()?, &want.to_vec_f32()?);
    let tol = tolerance(DType::F32);
    println!("{}", c.report("t5 output", tol));
    assert!(c.passes(tol), "{}", c.report("t5 output", tol));
    Ok(())
}
runtime::test_device!(
    t5_encoder_matches_reference,
    t5_encoder_matches_reference_cpu,
    t5_encoder_matches_reference_cuda
);

#[test]
fn t5_relative_buckets() {
    // Bidirectional, 32 buckets, max distance 128 (the standard T5 table).
    let b = |r| relative_bucket(r, 32, 128);
    assert_eq!([b(0), b(1), b(7), b(-1), b(-7)], [0, 17, 23, 1, 7]);
    // Values from tests/reference/t5_ref.py relative_buckets.
    let pos = [8, 12, 16, 127, 128, 1000].map(b);
    assert_eq!(pos, [24, 25, 26, 31, 31, 31]);
    let neg = [-8, -12, -16, -127, -128, -1000].map(b);
    assert_eq!(neg, [8, 9, 10, 15, 15, 15]);
}

#[test]
fn t5_rejects_bad_ids() -> Result<()> {
    let t5 = load(&Device::Cpu)?;
    assert!(t5.forward(&[]).is_err());
    assert!(t5.forward(&[3, 1024]).is_err());
    Ok(())
}

/// The checkpoint holds exactly the planner's parameter count for this config.
#[test]
fn t5_parameters_match_planner() -> Result<()> {
    let mut spec = ModelSpec::builtin("tiny").expect("tiny spec").t5;
    spec.vocab = 1024;
    let ckpt = PthFile::open(fixtures().join("models_t5_umt5-xxl-enc-bf16.pth"))?;
    let total: usize = ckpt
        .names()
        .map(|n| ckpt.info(n).unwrap().shape.iter().product::<usize>())
        .sum();
    assert_eq!(total as u64, planner::params::t5_params(&spec));
    Ok(())
}
