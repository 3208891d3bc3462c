//! The built-in tiny model: deterministic random weights generated locally with the real
//! tensor names (`runtime::weights::RandomWeights`), and the two inputs a checkpoint would
//! normally provide through its encoders, derived deterministically instead:
//! - text: umT5 is not run; the context is standard-normal values seeded by a hash of the prompt;
//! - audio: wav2vec2 is not run; per video frame (640 samples at 16 kHz) the feature is the log
//!   RMS of `audio_dim` equal sub-windows, scaled by (layer + 1)/layers per layer, zero past the
//!   end of the audio (as §10.3 zero-pads).

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{Result, bail};
use planner::ModelSpec;
use runtime::models::VarBuilder;
use runtime::models::vae::{VaeConfig, WanVae};
use runtime::models::vars::{TensorSource, VarsRoot};
use runtime::models::wan::{CausalWanModelS2V, WanConfig};
use runtime::parallel::DitLayout;
use runtime::sampling::NoiseGenerator;
use runtime::weights::{CheckpointErrorKind, RandomWeights};
use runtime::{DType, Device, Tensor};

/// Samples of one video frame at 16 kHz and 25 fps.
const SAMPLES_PER_FRAME: usize = 16_000 / 25;

/// The tiny DiT in f32 on the CPU from random weights seeded by `seed`.
#[cfg(test)]
pub fn dit(spec: &ModelSpec, seed: u64) -> Result<CausalWanModelS2V> {
    dit_on(spec, seed, Device::Cpu, &DitLayout::single())
}

/// This rank's part (`layout`: tp / Ulysses / pp / FSDP) of the tiny DiT in f32 on `device`,
/// from random weights seeded by `seed` (every rank draws the same full tensors and keeps its
/// shard).
pub fn dit_on(
    spec: &ModelSpec,
    seed: u64,
    device: Device,
    layout: &DitLayout,
) -> Result<CausalWanModelS2V> {
    let cfg = WanConfig::from(spec);
    let rw = RandomWeights::new(seed, cfg.expected_tensors());
    Ok(CausalWanModelS2V::load_rank(
        &cfg,
        &VarBuilder::random(&rw, DType::F32, device),
        layout,
    )?)
}

/// The tiny VAE in f32 on the CPU from random weights seeded by `seed`.
#[cfg(test)]
pub fn vae(spec: &ModelSpec, seed: u64) -> Result<WanVae> {
    vae_on(spec, seed, Device::Cpu)
}

/// The tiny VAE in f32 on `device` from random weights seeded by `seed`.
pub fn vae_on(spec: &ModelSpec, seed: u64, device: Device) -> Result<WanVae> {
    let cfg = VaeConfig::from_spec(&spec.vae)?;
    let tensors = vae_tensors(&cfg)?;
    let names = tensors.iter().map(|(n, _)| n.clone()).collect();
    let src = Random(RandomWeights::new(seed, tensors), names);
    Ok(WanVae::load(&VarsRoot::new(&src, DType::F32, device), cfg)?)
}

/// The VAE's tensor names and shapes, as its loader asks for them: a probe source answers
/// every name with an empty tensor, and each shape-mismatch error names the next tensor and
/// its expected shape.
fn vae_tensors(cfg: &VaeConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let probe = Probe(Mutex::new(BTreeMap::new()));
    for _ in 0..100_000 {
        let err = match WanVae::load(&VarsRoot::new(&probe, DType::F32, Device::Cpu), cfg.clone()) {
            Ok(_) => break,
            Err(e) => e,
        };
        let runtime::Error::Checkpoint {
            kind: CheckpointErrorKind::ShapeMismatch { name, expected, .. },
            ..
        } = err
        else {
            bail!("probing the VAE's tensors: {err}");
        };
        let mut shapes = probe.0.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        if shapes.insert(name.clone(), expected).is_some() {
            bail!("probing the VAE's tensors: {name} asked for twice with different shapes");
        }
    }
    let shapes = probe.0.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    Ok(shapes.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

struct Probe(Mutex<BTreeMap<String, Vec<usize>>>);

impl TensorSource for Probe {
    fn load(&self, name: &str, device: &Device) -> runtime::Result<Tensor> {
        let shape = self
            .0
            .lock()
            .map_err(|_| runtime::Error::LockPoisoned)?
            .get(name)
            .cloned()
            .unwrap_or_else(|| vec![0]);
        Tensor::zeros(shape, DType::F32, device)
    }
    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
    fn contains(&self, _: &str) -> bool {
        true
    }
    fn origin(&self) -> String {
        "<tiny VAE shape probe>".into()
    }
}

struct Random(RandomWeights, Vec<String>);

impl TensorSource for Random {
    fn load(&self, name: &str, device: &Device) -> runtime::Result<Tensor> {
        self.0.tensor(name, device)
    }
    fn names(&self) -> Vec<String> {
        self.1.clone()
    }
    fn contains(&self, name: &str) -> bool {
        self.0.shape(name).is_some()
    }
    fn origin(&self) -> String {
        "<random weights>".into()
    }
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
    if dim == 0 || !SAMPLES_PER_FRAME.is_multiple_of(dim) {
        bail!("audio_dim {dim} must divide {SAMPLES_PER_FRAME}");
    }
    let sub = SAMPLES_PER_FRAME / dim;
    // [dim, frames] for layer scale 1.
    let mut base = vec![0f32; dim * frames];
    for k in 0..frames {
        for j in 0..dim {
            let start = k * SAMPLES_PER_FRAME + j * sub;
            if start + sub > samples.len() {
                continue;
            }
            let w = &samples[start..start + sub];
            let rms = (w.iter().map(|x| x * x).sum::<f32>() / sub as f32).sqrt();
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
