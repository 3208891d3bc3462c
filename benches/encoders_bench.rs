//! `encoders-bench`: full-size forward times of the two encoders on one GPU, bf16, seeded
//! random weights (names and shapes probed from each model's own loader):
//! - umT5-XXL (model-spec §1.3) on 512 random tokens (the prompt length the DiT sees);
//! - wav2vec2-large-xlsr-53 (§1.4), all 25 hidden states of 10 s of 16 kHz audio.
//!
//! Each forward is timed with the device synchronised before and after (warm-up, median).
//! `encoders_torch.py` times the PyTorch references the same way in the same session.
//!
//!   usage: encoders-bench [--seed N] [--warmup N] [--iters N] [--tokens N] [--seconds S]
//!                         [--only t5|w2v]

use std::time::Instant;

use anyhow::{Context, Result, bail};
use runtime::models::t5::{T5Config, T5Encoder};
use runtime::models::vars::VarsRoot;
use runtime::models::wav2vec2::{Wav2Vec2, Wav2Vec2Config};
use runtime::{DType, Device, Tensor};

struct Args {
    seed: u64,
    warmup: usize,
    iters: usize,
    tokens: usize,
    seconds: f64,
    /// Run only this model ("t5" or "w2v").
    only: Option<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seed: 0,
        warmup: 2,
        iters: 5,
        tokens: 512,
        seconds: 10.0,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--seed" => a.seed = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--iters" => a.iters = val()?.parse()?,
            "--tokens" => a.tokens = val()?.parse()?,
            "--seconds" => a.seconds = val()?.parse()?,
            "--only" => a.only = Some(val()?),
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.iters == 0 || a.tokens == 0 || a.seconds <= 0.0 {
        bail!("--iters, --tokens and --seconds must be positive");
    }
    Ok(a)
}

/// Median, min, max of `warmup + iters` synchronised calls of `f` (the last `iters`).
fn time(
    dev: &Device,
    a: &Args,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<(f64, f64, f64, Tensor)> {
    let mut times = Vec::new();
    let mut last = None;
    for i in 0..a.warmup + a.iters {
        dev.synchronize()?;
        let t = Instant::now();
        let y = f()?;
        dev.synchronize()?;
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        last = Some(y);
    }
    times.sort_by(f64::total_cmp);
    let y = last.context("no call ran")?;
    Ok((times[times.len() / 2], times[0], times[times.len() - 1], y))
}

fn rms(y: &Tensor) -> Result<f64> {
    let v = y.to_vec_f32()?;
    if v.iter().any(|f| !f.is_finite()) {
        bail!("non-finite output");
    }
    Ok((v.iter().map(|f| f64::from(*f).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt())
}

/// The public wav2vec2-large-xlsr-53 architecture (model-spec §1.4).
fn xlsr53() -> Wav2Vec2Config {
    Wav2Vec2Config {
        conv_dim: vec![512; 7],
        conv_kernel: vec![10, 3, 3, 3, 3, 2, 2],
        conv_stride: vec![5, 2, 2, 2, 2, 2, 2],
        hidden: 1024,
        num_layers: 24,
        num_heads: 16,
        ffn_dim: 4096,
        pos_conv_kernel: 128,
        pos_conv_groups: 16,
        eps: 1e-5,
    }
}

fn main() -> Result<()> {
    let a = args()?;
    let dev = Device::cuda_if_available(0).context("CUDA device 0")?;
    println!("{}", runtime::device::cuda::check_kernels(0)?);
    let spec = planner::ModelSpec::builtin("s2v-14b")?;

    let run = |m: &str| a.only.as_deref().is_none_or(|o| o == m);
    if run("t5") {
        t5(&a, dev, &spec)?;
    }
    if run("w2v") {
        w2v(&a, dev)?;
    }
    Ok(())
}

fn t5(a: &Args, dev: Device, spec: &planner::ModelSpec) -> Result<()> {
    let cfg = T5Config::from_spec(&spec.t5);
    let t0 = Instant::now();
    let tensors = benches::probe_tensors(|r| T5Encoder::load(r, cfg.clone()).map(|_| ()))?;
    let params: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let src = benches::Random::new(a.seed, tensors);
    let t5 = T5Encoder::load(&VarsRoot::new(&src, DType::BF16, dev), cfg.clone())?;
    dev.synchronize()?;
    println!(
        "t5 load: {:.1} s ({params} parameters, random bf16 weights)",
        t0.elapsed().as_secs_f64()
    );
    let vocab = cfg.vocab as u64;
    let ids: Vec<u32> = (0..a.tokens as u64)
        .map(|i| ((i * 2_654_435_761 + a.seed * 97 + 1) % vocab) as u32)
        .collect();
    let (med, lo, hi, y) = time(&dev, a, || Ok(t5.forward(&ids)?))?;
    println!(
        "RESULT t5_forward tokens {} ms_median {med:.2} ms_min {lo:.2} ms_max {hi:.2} iters {} warmup {} out {:?} rms {:.4}",
        a.tokens,
        a.iters,
        a.warmup,
        y.dims(),
        rms(&y)?
    );
    Ok(())
}

fn w2v(a: &Args, dev: Device) -> Result<()> {
    let wcfg = xlsr53();
    let t0 = Instant::now();
    let tensors = benches::probe_tensors(|r| Wav2Vec2::load(r, wcfg.clone()).map(|_| ()))?;
    let params: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let src = benches::Random::new(a.seed, tensors);
    let w2v = Wav2Vec2::load(&VarsRoot::new(&src, DType::BF16, dev), wcfg)?;
    dev.synchronize()?;
    println!(
        "wav2vec2 load: {:.1} s ({params} parameters, random bf16 weights)",
        t0.elapsed().as_secs_f64()
    );
    let n = (a.seconds * 16_000.0) as usize;
    // A 220 Hz tone with a little noise, normalised like the processor's output.
    let mut s = a.seed.wrapping_mul(6_364_136_223_846_793_005) | 1;
    let wav: Vec<f32> = (0..n)
        .map(|i| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let noise = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            (i as f32 * 220.0 * std::f32::consts::TAU / 16_000.0).sin() + 0.2 * noise
        })
        .collect();
    let (med, lo, hi, y) = time(&dev, a, || Ok(w2v.hidden_states(&wav)?))?;
    println!(
        "RESULT w2v_forward seconds {} ms_median {med:.2} ms_min {lo:.2} ms_max {hi:.2} iters {} warmup {} out {:?} rms {:.4}",
        a.seconds,
        a.iters,
        a.warmup,
        y.dims(),
        rms(&y)?
    );
    Ok(())
}
