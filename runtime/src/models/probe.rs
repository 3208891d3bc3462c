//! Seeded random weights for a model whose tensor names and shapes come from its own loader
//! (a probe source), so they cannot drift from the model code: the built-in tiny model's VAE
//! and the benchmarks' full-size models.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::vars::{TensorSource, VarsRoot};
use crate::weights::{CheckpointErrorKind, RandomWeights};
use crate::{DType, Device, Error, Result, Tensor};

/// Answers every name with a tensor of the shape the loader last asked for (empty until
/// then), so each shape-mismatch error names the next tensor and its shape.
struct Probe(Mutex<BTreeMap<String, Tensor>>);

impl TensorSource for Probe {
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self.0.lock().map_err(|_| Error::LockPoisoned)?.get(name) {
            Some(t) => Ok(t.clone()),
            None => Tensor::zeros(vec![0], DType::F32, device),
        }
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
        "<shape probe>".into()
    }
}

/// Every tensor `load` asks for, with its shape: `load` is called on the CPU until it
/// succeeds, each failure naming one more tensor, which is then answered with f32 zeros of
/// the asked shape (calloc'ed, so untouched pages of the large ones cost no memory).
pub fn probe_tensors(load: impl Fn(&VarsRoot) -> Result<()>) -> Result<Vec<(String, Vec<usize>)>> {
    let probe = Probe(Mutex::new(BTreeMap::new()));
    for _ in 0..100_000 {
        let root = VarsRoot::new(&probe, DType::F32, Device::Cpu);
        let err = match load(&root) {
            Ok(()) => {
                let m = probe.0.lock().map_err(|_| Error::LockPoisoned)?;
                return Ok(m
                    .iter()
                    .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                    .collect());
            }
            Err(e) => e,
        };
        let Error::Checkpoint {
            kind: CheckpointErrorKind::ShapeMismatch { name, expected, .. },
            ..
        } = err
        else {
            return Err(Error::invalid(
                "probe_tensors",
                format!("probing the model's tensors: {err}"),
            ));
        };
        let mut m = probe.0.lock().map_err(|_| Error::LockPoisoned)?;
        if m.contains_key(&name) {
            return Err(Error::invalid(
                "probe_tensors",
                format!("{name} asked for twice with different shapes"),
            ));
        }
        let t = Tensor::zeros(expected, DType::F32, &Device::Cpu)?;
        m.insert(name, t);
    }
    Err(Error::invalid(
        "probe_tensors",
        "probing the model's tensors did not converge",
    ))
}

/// Seeded random weights for exactly the given (probed) tensors.
pub struct RandomSource(RandomWeights, Vec<String>);

impl RandomSource {
    pub fn new(seed: u64, tensors: Vec<(String, Vec<usize>)>) -> Self {
        let names = tensors.iter().map(|(n, _)| n.clone()).collect();
        Self(RandomWeights::new(seed, tensors), names)
    }
}

impl std::fmt::Debug for RandomSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RandomSource({} tensors)", self.1.len())
    }
}

impl TensorSource for RandomSource {
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
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
