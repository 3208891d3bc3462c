//! Flow-matching Euler sampling (model-spec §5): the schedule of diffusers'
//! `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)` for any step count, the
//! Euler update with the reference's precision, and the initial noise (seeded, or injected
//! from a file to compare with the reference).

use std::path::Path;

use crate::device::BinaryOp;
use crate::weights::SafetensorsFile;
use crate::{DType, Device, Error, Result, Tensor};

/// Timesteps fed to the DiT and the sigmas (one more, ending in 0), both f32.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

impl FlowMatchSchedule {
    /// The shipped configuration: 1000 training steps, shift 3.
    pub fn liveavatar(steps: usize) -> Result<Self> {
        Self::new(steps, 3.0, 1000)
    }

    /// diffusers' arithmetic: the constructor shifts the f32 training sigmas (so
    /// σ_min = s(1/num_train)), `set_timesteps` takes an f64 linspace from num_train·σ_max to
    /// num_train·σ_min, divides by num_train, shifts again (f64), casts to f32; timesteps =
    /// σ·num_train in f32; a terminal 0 is appended. s(σ) = shift·σ / (1 + (shift−1)·σ).
    pub fn new(steps: usize, shift: f64, num_train: usize) -> Result<Self> {
        if steps == 0 || num_train == 0 {
            return Err(Error::invalid("FlowMatchSchedule", "steps must be >= 1"));
        }
        let shift32 = shift as f32;
        let shifted32 = |t: f32| {
            let s = t / num_train as f32;
            shift32 * s / (1.0 + (shift32 - 1.0) * s)
        };
        let s_max = shifted32(num_train as f32) as f64;
        let s_min = shifted32(1.0) as f64;
        let (start, stop) = (s_max * num_train as f64, s_min * num_train as f64);
        // numpy.linspace: k·step + start, the last value set to stop.
        let t: Vec<f64> = if steps == 1 {
            vec![start]
        } else {
            let step = (stop - start) / (steps - 1) as f64;
            (0..steps)
                .map(|k| {
                    if k == steps - 1 {
                        stop
                    } else {
                        k as f64 * step + start
                    }
                })
                .collect()
        };
        let mut sigmas: Vec<f32> = t
            .iter()
            .map(|&t| {
                let s = t / num_train as f64;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|s| s * num_train as f32).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }
}

/// x_{i+1} = x_i + (σ_{i+1} − σ_i)·v with the reference's type promotion (§5): dt is an f32
/// difference rounded to v's dtype, dt·v a product in v's dtype, added to x in f32, the sum
/// stored in v's dtype. In f32 this is plain f32 arithmetic.
pub fn euler_step(x: &Tensor, v: &Tensor, sigma: f32, sigma_next: f32) -> Result<Tensor> {
    let dt = v.dtype().round_f32(sigma_next - sigma);
    let prod = v.affine(dt, 0.0)?;
    x.binary_to(&prod, BinaryOp::Add, DType::F32)?
        .to_dtype(v.dtype())
}

/// A seeded standard-normal generator (SplitMix64 + Box–Muller in f64). The reference draws
/// its noise with torch's Philox stream, which is not reproducible outside PyTorch; use
/// [`load_noise`] to inject it for comparisons.
#[derive(Debug, Clone)]
pub struct NoiseGenerator(u64);

impl NoiseGenerator {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in `range` (inclusive).
    pub fn int_in(&mut self, range: std::ops::RangeInclusive<u32>) -> u32 {
        let n = (range.end() - range.start() + 1) as u64;
        range.start() + (self.next_u64() % n) as u32
    }
    /// A `dtype` tensor of standard-normal values.
    pub fn randn(
        &mut self,
        shape: impl Into<crate::Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let u1 = self.uniform().max(f64::MIN_POSITIVE);
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            let a = std::f64::consts::TAU * u2;
            v.push((r * a.cos()) as f32);
            v.push((r * a.sin()) as f32);
        }
        v.truncate(n);
        Tensor::from_f32(&v, shape, dtype, device)
    }
}

/// Clip noise seeded like the reference (base_seed + clip), from our generator.
pub fn clip_noise(
    base_seed: u64,
    clip: usize,
    shape: impl Into<crate::Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    NoiseGenerator::new(base_seed.wrapping_add(clip as u64)).randn(shape, dtype, device)
}

/// Noise injected from a safetensors file (e.g. torch's noise dumped by the reference),
/// converted to `dtype`.
pub fn load_noise(
    path: impl AsRef<Path>,
    name: &str,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    SafetensorsFile::open(path)?
        .tensor(name, device)?
        .to_dtype(dtype)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn four_steps_give_the_spec_table() {
        let s = FlowMatchSchedule::liveavatar(4).unwrap();
        // model-spec §5 table (float32 values; equal to diffusers, see the golden test).
        assert_eq!(s.timesteps, vec![1000.0, 857.6923, 602.1506, 8.928_572]);
        assert_eq!(
            s.sigmas,
            vec![1.0, 0.857_692_3, 0.602_150_56, 0.008_928_572, 0.0]
        );
        assert!(FlowMatchSchedule::liveavatar(0).is_err());
    }

    #[test]
    fn bf16_euler_rounds_dt_and_the_product() {
        let dev = Device::Cpu;
        let x = Tensor::from_f32(&[1.0, -2.0], 2, DType::BF16, &dev).unwrap();
        let v = Tensor::from_f32(&[1.0, 3.0], 2, DType::BF16, &dev).unwrap();
        let out = euler_step(&x, &v, 1.0, 0.857_692_3).unwrap();
        // dt = bf16(−0.1423077) = −0.142578125 (§5), products exact in bf16 here.
        let dt = -73.0f32 / 512.0;
        let want: Vec<f32> = [1.0 + dt, -2.0 + DType::BF16.round_f32(3.0 * dt)]
            .iter()
            .map(|v| DType::BF16.round_f32(*v))
            .collect();
        assert_eq!(out.to_vec_f32().unwrap(), want);
        let n1 = clip_noise(420, 1, (4, 8), DType::BF16, &dev).unwrap();
        let n2 = clip_noise(420, 1, (4, 8), DType::BF16, &dev).unwrap();
        assert_eq!(n1.to_bytes().unwrap(), n2.to_bytes().unwrap());
        let n0 = clip_noise(420, 0, (4, 8), DType::BF16, &dev).unwrap();
        assert_ne!(n0.to_bytes().unwrap(), n1.to_bytes().unwrap());
    }
}
