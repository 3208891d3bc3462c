//! A model without a checkpoint: deterministic random weights of any model spec (the tiny one
//! on CPU ranks for the quick start and the tests, the full-size s2v-14b in bf16 on GPUs for
//! capacity and speed runs), generated where they live with the real tensor names
//! (`runtime::weights::RandomWeights`), and the two inputs a checkpoint's encoders would
//! provide, derived deterministically instead:
//! - text: umT5 is not run; the context is standard-normal values seeded by a hash of the prompt;
//! - audio: wav2vec2 is not run; per video frame (640 samples at 16 kHz) the feature is the log
//!   RMS of `audio_dim` consecutive sub-windows (each at least one sample, so they overlap when
//!   `audio_dim` > 640), scaled by (layer + 1)/layers per layer, zero past the end of the audio
//!   (as §10.3 zero-pads).

use anyhow::{Result, bail};
use planner::ModelSpec;
use runtime::models::VarBuilder;
use runtime::models::probe::{RandomSource, probe_tensors};
use runtime::models::vae::{VaeConfig, WanVae};
use runtime::models::vars::VarsRoot;
use runtime::models::wan::{CausalWanModelS2V, WanConfig};
use runtime::parallel::DitLayout;
use runtime::sampling::NoiseGenerator;
use runtime::weights::RandomWeights;
use runtime::{DType, Device, Tensor};

/// Samples of one video frame at 16 kHz and 25 fps.
const SAMPLES_PER_FRAME: usize = 16_000 / 25;

/// The DiT in f32 on the CPU from random weights seeded by `seed`.
#[cfg(test)]
pub fn dit(spec: &ModelSpec, seed: u64) -> Result<CausalWanModelS2V> {
    dit_on(spec, seed, DType::F32, Device::Cpu, &DitLayout::single())
}

/// This rank's part (`layout`: tp / Ulysses / pp / FSDP) of the DiT in `dtype` on `device`,
/// from random weights seeded by `seed` (every rank draws the same full tensors and keeps its
/// shard).
pub fn dit_on(
    spec: &ModelSpec,
    seed: u64,
    dtype: DType,
    device: Device,
    layout: &DitLayout,
) -> Result<CausalWanModelS2V> {
    let cfg = WanConfig::from(spec);
    let rw = RandomWeights::new(seed, cfg.expected_tensors());
    Ok(CausalWanModelS2V::load_rank(
        &cfg,
        &VarBuilder::random(&rw, dtype, device),
        layout,
    )?)
}

/// The VAE in f32 on the CPU from random weights seeded by `seed`.
#[cfg(test)]
pub fn vae(spec: &ModelSpec, seed: u64) -> Result<WanVae> {
    vae_on(spec, seed, DType::F32, Device::Cpu)
}

/// The VAE in `dtype` on `device` from random weights seeded by `seed`; its tensor names and
/// shapes come from the VAE's own loader (`runtime::models::probe`).
pub fn vae_on(spec: &ModelSpec, seed: u64, dtype: DType, device: Device) -> Result<WanVae> {
    let cfg = VaeConfig::from_spec(&spec.vae)?;
    let tensors = probe_tensors(|root| WanVae::load(root, cfg.clone()).map(|_| ()))?;
    let src = RandomSource::new(seed, tensors);
    Ok(WanVae::load(&VarsRoot::new(&src, dtype, device), cfg)?)
}

/// `[text_len, text_dim]` standard-normal values seeded by the prompt's FNV-1a hash.
pub fn text_context(prompt: &str, spec: &ModelSpec) -> Result<Tensor> {
    let hash = prompt.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let shape = (spec.dit.text_len as usize, spec.dit.text_dim as usize);
    Ok(NoiseGenerator::new(hash).randn(shape, DType::F32, &Device::Cpu)?)
}

/// `[1, layers, dim, frames]` per-video-frame features of 16 kHz mono `samples` (module docs).
pub fn audio_features(samples: &[f32], layers: usize, dim: usize, frames: usize) -> Result<Tensor> {
    if dim == 0 {
        bail!("audio_dim must be at least 1");
    }
    // Sub-window j of a frame: [j·640/dim, max(j·640/dim + 1, (j+1)·640/dim)).
    let window = |j: usize| {
        let (a, b) = (
            j * SAMPLES_PER_FRAME / dim,
            (j + 1) * SAMPLES_PER_FRAME / dim,
        );
        (a, b.max(a + 1))
    };
    // [dim, frames] for layer scale 1.
    let mut base = vec![0f32; dim * frames];
    for k in 0..frames {
        for j in 0..dim {
            let (a, b) = window(j);
            let (start, end) = (k * SAMPLES_PER_FRAME + a, k * SAMPLES_PER_FRAME + b);
            if end > samples.len() {
                continue;
            }
            let w = &samples[start..end];
            let rms = (w.iter().map(|x| x * x).sum::<f32>() / (end - start) as f32).sqrt();
            base[j * frames + k] = (1e-3 + rms).ln();
        }
    }
    let mut out = Vec::with_capacity(layers * base.len());
    for l in 0..layers {
        let scale = (l + 1) as f32 / layers as f32;
        out.extend(base.iter().map(|v| v * scale));
    }
    Ok(Tensor::from_vec(
        out,
        (1, layers, dim, frames),
        &Device::Cpu,
    )?)
}
