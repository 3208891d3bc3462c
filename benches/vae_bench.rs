//! `vae-bench`: the full-size Wan2.1 VAE decoder (model-spec §1.5) on one GPU, bf16, seeded
//! random weights, streaming decode (§6.4) at 704×384 (latent 48×88): prime with 7 latents,
//! then decode 3-latent blocks one after another on the same stream, each timed with the
//! device synchronised before and after (warm-up, median). `vae_torch.py` times the PyTorch
//! reference the same way in the same session (docs/benchmarks.md).
//!
//! The VAE's tensor names and shapes come from its own loader (a probe source, as
//! `worker::role::tiny` does for the tiny model), so they cannot drift from the model code.
//!
//! `--convs` times the decoder's convolution shapes alone instead (`vae_convs.rs`).
//! `LAVA_CONV=tune` (autotuned cuDNN engines) or `LAVA_CONV=im2col` pick the conv path;
//! `LAVA_PROFILE=1` adds one block with per-op device times.
//!
//!   usage: vae-bench [--seed N] [--warmup N] [--iters N] [--convs]

#[cfg(feature = "cudnn")]
#[path = "vae_convs.rs"]
mod vae_convs;

use std::time::Instant;

use anyhow::{Context, Result, bail};
use runtime::memory::{Category, MemoryTracker};
use runtime::models::vae::{DecodeStream, VaeConfig, WanVae};
use runtime::models::vars::VarsRoot;
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
    convs: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seed: 0,
        warmup: 2,
        iters: 5,
        convs: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--seed" => a.seed = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--iters" => a.iters = val()?.parse()?,
            "--convs" => a.convs = true,
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    Ok(a)
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
    if a.convs {
        #[cfg(feature = "cudnn")]
        return vae_convs::run(a.iters);
        #[cfg(not(feature = "cudnn"))]
        bail!("--convs needs a build with the `cudnn` feature");
    }
    let dev = Device::cuda_if_available(0).context("CUDA device 0")?;
    println!("{}", runtime::device::cuda::check_kernels(0)?);
    let tracker = MemoryTracker::for_device(&dev);
    let spec = planner::ModelSpec::builtin("s2v-14b")?;
    let cfg = VaeConfig::from_spec(&spec.vae)?;

    let t0 = Instant::now();
    let tensors = benches::probe_tensors(|root| WanVae::load(root, cfg.clone()).map(|_| ()))?;
    let params: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let src = benches::Random::new(a.seed, tensors);
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

    if runtime::device::cuda::profile::enabled() {
        // One more block with per-op device times (LAVA_PROFILE=1).
        use runtime::device::cuda::profile;
        profile::take(0)?;
        let t = Instant::now();
        vae.decode_stream(&mut stream, &block)?;
        dev.synchronize()?;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        print!("{}", profile::table(&profile::take(0)?, 1, wall));
    }
    for p in runtime::device::cuda::conv_plans(0)? {
        println!("PLAN {p}");
    }
    let y = out.context("no block ran")?;
    let v = y.to_vec_f32()?;
    if v.iter().any(|f| !f.is_finite()) {
        bail!("the decoded frames have non-finite values");
    }
    let rms = (v.iter().map(|f| f64::from(*f).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    println!("block output {:?} rms {rms:.4}", y.dims());
    Ok(())
}
