//! Golden test of the wav2vec2 network (model-spec §1.4) against our PyTorch reference
//! (tests/reference/wav2vec2_ref.py, itself checked against transformers' Wav2Vec2ForCTC when
//! the fixtures were made): tiny config of configs/models/tiny.toml in an HF folder
//! (config.json + model.safetensors with the CTC model's names), all 25 hidden states.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use runtime::models::wav2vec2::Wav2Vec2;
use runtime::pth::PthFile;
use runtime::testing::{compare, tolerance};
use runtime::{DType, Device, Result};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wav2vec2_tiny")
}

fn wav2vec2_hidden_states_match_reference(dev: &Device) -> Result<()> {
    let golden = PthFile::open(fixtures().join("golden.pth"))?;
    let model = Wav2Vec2::load_dir(fixtures(), DType::F32, *dev)?;
    let spec = planner::spec::ModelSpec::builtin("tiny").expect("tiny spec");
    assert_eq!(model.config().num_layers as u64, spec.wav2vec2.num_layers);
    assert_eq!(model.config().hidden as u64, spec.wav2vec2.hidden);
    let wav = golden.tensor("input_values", &Device::Cpu)?.to_vec_f32()?;
    let hs = model.hidden_states(&wav)?;
    let want = golden.tensor("hidden_states", &Device::Cpu)?;
    assert_eq!(hs.dims(), want.dims());
    assert_eq!(hs.dim(0)?, 25);
    assert_eq!(hs.dim(1)?, (wav.len() - 400) / 320 + 1);
    let tol = tolerance(DType::F32);
    for i in 0..25 {
        let c = compare(
            &hs.narrow(0, i, 1)?.to_vec_f32()?,
            &want.narrow(0, i, 1)?.to_vec_f32()?,
        );
        let what = format!("hidden state {i}");
        println!("{}", c.report(&what, tol));
        assert!(c.passes(tol), "{}", c.report(&what, tol));
    }
    Ok(())
}
runtime::test_device!(
    wav2vec2_hidden_states_match_reference,
    wav2vec2_hidden_states_match_reference_cpu,
    wav2vec2_hidden_states_match_reference_cuda
);

#[test]
fn wav2vec2_rejects_too_short_audio() -> Result<()> {
    let model = Wav2Vec2::load_dir(fixtures(), DType::F32, Device::Cpu)?;
    assert!(model.hidden_states(&[0.0; 399]).is_err());
    assert_eq!(model.config().num_frames(400), 1);
    assert_eq!(model.config().num_frames(16_000), 49);
    Ok(())
}

/// The checkpoint without its CTC head holds exactly the planner's parameter count.
#[test]
fn wav2vec2_parameters_match_planner() -> Result<()> {
    let spec = planner::spec::ModelSpec::builtin("tiny").expect("tiny spec");
    let st = runtime::weights::SafetensorsFile::open(fixtures().join("model.safetensors"))?;
    let total: usize = st
        .names()
        .filter(|n| !n.starts_with("lm_head."))
        .map(|n| st.info(n).unwrap().shape.iter().product::<usize>())
        .sum();
    assert_eq!(
        total as u64,
        planner::params::wav2vec2_params(&spec.wav2vec2)
    );
    Ok(())
}

/// The same weights from `pytorch_model.bin` (a torch.save zip) give the same hidden states.
#[test]
fn wav2vec2_loads_pytorch_model_bin() -> Result<()> {
    let dir = fixtures().with_file_name("wav2vec2_tiny_bin");
    let a = Wav2Vec2::load_dir(fixtures(), DType::F32, Device::Cpu)?;
    let b = Wav2Vec2::load_dir(&dir, DType::F32, Device::Cpu)?;
    let wav: Vec<f32> = (0..3000)
        .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
        .collect();
    assert_eq!(
        a.hidden_states(&wav)?.to_vec_f32()?,
        b.hidden_states(&wav)?.to_vec_f32()?
    );
    assert!(
        Wav2Vec2::load_dir(fixtures().with_file_name("nope"), DType::F32, Device::Cpu).is_err()
    );
    Ok(())
}
