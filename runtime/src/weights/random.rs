//! Deterministic random weights for benchmarks without a checkpoint: every tensor of a model's
//! name/shape list is a pure function of (seed, name, index), so `tests/reference/hash_init.py`
//! reproduces the same bf16 values bit for bit in PyTorch.
//!
//! Element `i` of tensor `name` (row-major): `key = fnv1a32("{seed}:{name}")`,
//! `h = i·0x9E3779B1 + key`, then twice `h = ((h >> 16) ^ h)·0x045D9F3B`, `h ^= h >> 16`
//! (all mod 2³²); `u = (h >> 8)·2⁻²³ − 1` (exact in f32, uniform in [−1, 1));
//! `value = bf16(u·s + o)` in f32 arithmetic with `s = f32(std·√3)`, `o = f32(offset)`.
//! `std`/`offset` per name ([`init_of`]): biases 0.1; norm weights exactly 1; the audio layer
//! weights 0.5 + 0.5 (SiLU'd and summed: no small denominator); ≥2-D weights 1/√fan_in;
//! modulation, cond mask and padding tokens 0.5. Activations stay O(1) through 40 blocks.

use std::collections::HashMap;

use half::bf16;

use crate::{DType, Device, Error, Result, Tensor};

/// `(std, offset)` of tensor `name` with shape `shape` (mirrored in hash_init.py).
pub fn init_of(name: &str, shape: &[usize]) -> (f64, f64) {
    if name.ends_with(".bias") {
        (0.1, 0.0)
    } else if name.contains("norm") {
        (0.0, 1.0)
    } else if name == "casual_audio_encoder.weights" {
        (0.5, 0.5)
    } else if shape.len() >= 2
        && !["modulation", "trainable_cond_mask", "padding_tokens"]
            .iter()
            .any(|s| name.contains(s))
    {
        let fan_in: usize = shape[1..].iter().product();
        (1.0 / (fan_in as f64).sqrt(), 0.0)
    } else {
        (0.5, 0.0)
    }
}

fn fnv1a32(s: &str) -> u32 {
    s.bytes().fold(0x811C_9DC5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The uniform [−1, 1) draw of element `i` under `key` (exact f32).
pub fn uniform(key: u32, i: u32) -> f32 {
    let mut h = i.wrapping_mul(0x9E37_79B1).wrapping_add(key);
    h = ((h >> 16) ^ h).wrapping_mul(0x045D_9F3B);
    h = ((h >> 16) ^ h).wrapping_mul(0x045D_9F3B);
    h ^= h >> 16;
    (h >> 8) as f32 * 2f32.powi(-23) - 1.0
}

/// `n` bf16 values of tensor `name` (std/offset given), generated on all host threads.
pub fn values(seed: u64, name: &str, n: usize, std: f64, offset: f64) -> Result<Vec<bf16>> {
    if n > u32::MAX as usize {
        return Err(Error::invalid(
            "RandomWeights",
            format!("{name}: {n} elements exceed the generator's 2^32 indices"),
        ));
    }
    let key = fnv1a32(&format!("{seed}:{name}"));
    let (s, o) = ((std * 3f64.sqrt()) as f32, offset as f32);
    let mut out = vec![bf16::ZERO; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads).max(1 << 16);
    std::thread::scope(|sc| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            sc.spawn(move || {
                let base = c * chunk;
                for (j, v) in part.iter_mut().enumerate() {
                    let u = uniform(key, (base + j) as u32);
                    *v = bf16::from_f32(u * s + o);
                }
            });
        }
    });
    Ok(out)
}

/// A model's tensors as seeded random bf16 values (no checkpoint needed).
#[derive(Debug, Clone)]
pub struct RandomWeights {
    seed: u64,
    shapes: HashMap<String, Vec<usize>>,
}

impl RandomWeights {
    /// `tensors`: every name and shape the model loads (e.g. `WanConfig::expected_tensors`).
    pub fn new(seed: u64, tensors: Vec<(String, Vec<usize>)>) -> Self {
        Self {
            seed,
            shapes: tensors.into_iter().collect(),
        }
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    /// Tensor `name` in bf16 on `device`; an unknown name is an error.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let shape = self
            .shape(name)
            .ok_or_else(|| Error::invalid("RandomWeights", format!("no tensor named {name}")))?;
        let (std, offset) = init_of(name, shape);
        let n = shape.iter().product();
        let v = values(self.seed, name, n, std, offset)?;
        let t = Tensor::from_vec(v, shape.to_vec(), device)?;
        debug_assert_eq!(t.dtype(), DType::BF16);
        Ok(t)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn values_are_reproducible_uniform_and_pinned() {
        let a = values(7, "blocks.0.ffn.0.weight", 100_003, 0.02, 0.0).unwrap();
        assert_eq!(
            a,
            values(7, "blocks.0.ffn.0.weight", 100_003, 0.02, 0.0).unwrap()
        );
        assert_ne!(
            a,
            values(8, "blocks.0.ffn.0.weight", 100_003, 0.02, 0.0).unwrap()
        );
        let f: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
        let mean = f.iter().sum::<f32>() / f.len() as f32;
        let std = (f.iter().map(|v| v * v).sum::<f32>() / f.len() as f32).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
            "{mean} {std}"
        );
        assert!(f.iter().all(|v| v.abs() <= 0.02 * 1.7321 * 1.004));
        // Pinned against tests/reference/hash_init.py (same seed, name, index).
        assert_eq!(fnv1a32("0:x"), 0xa1b2_cad5);
        assert_eq!(uniform(0xa1b2_cad5, 12345), 0.019_617_438);
    }

    #[test]
    fn init_follows_the_name_rules() {
        assert_eq!(init_of("blocks.0.self_attn.q.bias", &[8]), (0.1, 0.0));
        assert_eq!(
            init_of("blocks.0.self_attn.norm_q.weight", &[8]),
            (0.0, 1.0)
        );
        assert_eq!(init_of("blocks.0.ffn.0.weight", &[16, 4]), (0.5, 0.0));
        assert_eq!(init_of("blocks.0.modulation", &[1, 6, 8]), (0.5, 0.0));
        let rw = RandomWeights::new(1, vec![("w".into(), vec![2, 3])]);
        let t = rw.tensor("w", &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        assert!(rw.tensor("nope", &Device::Cpu).is_err());
    }
}
