//! `vae-bench`: the full-size Wan2.1 VAE decoder (model-spec §1.5) on one GPU, bf16, seeded
//! random weights, streaming decode (§6.4) at 704×384 (latent 48×88): prime with 7 latents,
//! then decode 3-latent blocks one after another on the same stream, each timed with the
//! device synchronised before and after (warm-up, median). `vae_torch.py` times the PyTorch
//! reference the same way in the same session (docs/benchmarks.md).
//!
//! The VAE's tensor names and shapes come from its own loader (a probe source, as
//! `worker::role::tiny` does for the tiny model), so they cannot drift from the model code.
//!
//!   usage: vae-bench [--seed N] [--warmup N] [--iters N]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use runtime::memory::{Category, MemoryTracker};
use runtime::models::vae::{DecodeStream, VaeConfig, WanVae};
use runtime::models::vars::{TensorSource, VarsRoot};
use runtime::weights::{CheckpointErrorKind, RandomWeights};
use runtime::{DType, Device, Tensor};

/// 704×384 pixels → latent 48×88.
const PIXELS: (u64, u64) = (384, 704);
const LAT: (usize, usize) = (48, 88);
/// §6.4: the decoder is primed with the first 7 motion latents; a block is 3 latents.
const PRIME: usize = 7;
const BLOCK: usize = 3;

struct Args {
    seed: u64,
    warmup: usize,
    iters: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seed: 0,
        warmup: 2,
        iters: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--seed" => a.seed = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--iters" => a.iters = val()?.parse()?,
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    Ok(a)
}

/// Answers every name with a zero tensor of the shape the loader last asked for (empty until
/// then), so each shape-mismatch error names the next tensor and its shape.
struct Probe(Mutex<BTreeMap<String, Tensor>>);

impl TensorSource for Probe {
    fn load(&self, name: &str, device: &Device) -> runtime::Result<Tensor> {
        match self
            .0
            .lock()
            .map_err(|_| runtime::Error::LockPoisoned)?
            .get(name)
        {
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
        "<VAE shape probe>".into()
    }
}

fn vae_tensors(cfg: &VaeConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let probe = Probe(Mutex::new(BTreeMap::new()));
    let mut done = false;
    for _ in 0..100_000 {
        let root = VarsRoot::new(&probe, DType::F32, Device::Cpu);
        let err = match WanVae::load(&root, cfg.clone()) {
            Ok(_) => {
                done = true;
                break;
            }
            Err(e) => e,
        };
        let runtime::Error::Checkpoint {
            kind: CheckpointErrorKind::ShapeMismatch { name, expected, .. },
            ..
        } = err
        else {
            bail!("probing the VAE's tensors: {err}");
        };
        let mut m = probe.0.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        if m.contains_key(&name) {
            bail!("probing the VAE's tensors: {name} asked for twice with different shapes");
        }
        let t = Tensor::zeros(expected, DType::F32, &Device::Cpu)?;
        m.insert(name, t);
    }
    if !done {
        bail!("probing the VAE's tensors did not converge");
    }
    let m = probe.0.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    Ok(m.iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect())
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

/// Seeded N(0,1) latents `[1, z, n, h, w]`.
fn latents(seed: u64, name: &str, z: usize, n: usize, dev: &Device) -> Result<Tensor> {
    let shape = [1, z, n, LAT.0, LAT.1];
    let v = runtime::weights::random_values(seed, name, shape.iter().product(), 1.0, 0.0)?;
    Ok(Tensor::from_vec(v, shape.to_vec(), dev)?)
}

fn gb(b: usize) -> f64 {
    b as f64 / 1e9
}

fn main() -> Result<()> {
    let a = args()?;
    let dev = Device::cuda_if_available(0).context("CUDA device 0")?;
    println!("{}", runtime::device::cuda::check_kernels(0)?);
    let tracker = MemoryTracker::for_device(&dev);
    let spec = planner::ModelSpec::builtin("s2v-14b")?;
    let cfg = VaeConfig::from_spec(&spec.vae)?;

    let t0 = Instant::now();
    let tensors = vae_tensors(&cfg)?;
    let params: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let names = tensors.iter().map(|(n, _)| n.clone()).collect();
    let src = Random(RandomWeights::new(a.seed, tensors), names);
    let vae = WanVae::load(&VarsRoot::new(&src, DType::BF16, dev), cfg.clone())?;
    dev.synchronize()?;
    println!(
        "load: {:.1} s ({params} parameters, random bf16 weights, seed {})",
        t0.elapsed().as_secs_f64(),
        a.seed
    );

    let z = cfg.z_dim;
    let prime = latents(a.seed, "input.prime", z, PRIME, &dev)?;
    let block = latents(a.seed, "input.block", z, BLOCK, &dev)?;
    let mut stream = DecodeStream::new();
    let live_before = tracker.stats().get(Category::Activations).live;
    let t0 = Instant::now();
    vae.prime(&mut stream, &prime)?;
    dev.synchronize()?;
    let live_cache = tracker
        .stats()
        .get(Category::Activations)
        .live
        .saturating_sub(live_before);
    println!(
        "prime with {PRIME} latents: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    tracker.reset_peak();
    let mut times = Vec::new();
    let mut out = None;
    for i in 0..a.warmup + a.iters {
        dev.synchronize()?;
        let t = Instant::now();
        let y = vae.decode_stream(&mut stream, &block)?;
        dev.synchronize()?;
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out = Some(y);
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "RESULT vae_block ms_median {med:.2} ms_min {:.2} ms_max {:.2} iters {} warmup {}",
        times[0],
        times[times.len() - 1],
        times.len(),
        a.warmup
    );

    let (slots, cache_bytes) = stream.cache_usage();
    let (_, planned) = planner::memory::vae_decoder_cache(&spec, PIXELS.0, PIXELS.1);
    println!(
        "MEM decoder_cache slots {slots} bytes {cache_bytes} ({:.3} GB) tracker_live_after_prime \
         {live_cache} ({:.3} GB) planner {planned} ({:.3} GB)",
        gb(cache_bytes),
        gb(live_cache),
        gb(planned as usize)
    );
    let st = tracker.stats();
    println!(
        "MEM weights {:.3} GB, activations peak during blocks {:.3} GB, total peak {:.3} GB",
        gb(st.get(Category::Weights).peak),
        gb(st.get(Category::Activations).peak),
        gb(st.total_peak)
    );

    let y = out.context("no block ran")?;
    let v = y.to_vec_f32()?;
    if v.iter().any(|f| !f.is_finite()) {
        bail!("the decoded frames have non-finite values");
    }
    let rms = (v.iter().map(|f| f64::from(*f).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    println!("block output {:?} rms {rms:.4}", y.dims());
    Ok(())
}
