//! `dit-bench`: the full 14B DiT (model-spec §3.3) on one GPU, bf16, seeded random weights
//! (`runtime::weights::RandomWeights`, reproduced by `tests/reference/hash_init.py`), at
//! 704×384 (latent 48×88): prefill of one step-cache per sampling step, four calls of clip 0
//! to fill the ring, then steady-state calls at clip 1 (3168 query tokens over 15,312 keys,
//! §3.1) timed one by one (device synchronised before and after each, warm-up, median).
//!
//! Prints `RESULT …` and `MEM …` lines for `benches/dit_compare.py`, and writes the last
//! call's output as little-endian f32 to `--dump` so that it can be compared with the PyTorch
//! reference run on the same seed (`bench_ref.py --hash-seed --fill-ring --dump`).
//!
//! With `LAVA_PROFILE=1` (all timed calls) or `--profile N` (N extra calls after the timed
//! ones) it also prints the device time per op (CUDA events; `PROFILE` lines).
//!
//!   usage: dit-bench [--seed N] [--warmup N] [--iters N] [--dump PATH] [--profile N]

use std::time::Instant;

use anyhow::{Context, Result, bail};
use runtime::memory::{Category, MemoryTracker};
use runtime::models::VarBuilder;
use runtime::models::wan::{CausalWanModelS2V, StepCache, StreamCall, StreamGeometry, WanConfig};
use runtime::weights::RandomWeights;
use runtime::{DType, Device, Tensor};

/// §3.6: one steady-state call at 48×88, with the text K/V recomputed (the reference) and
/// with it cached once per generation (lava).
const TFLOP_PER_CALL: f64 = 123.0;
const TFLOP_PER_CALL_CACHED_TEXT: f64 = 120.8;
const LAT: (usize, usize) = (48, 88);
/// The reference's steady-state timestep and §4.5 draw (bench_ref.py).
const T: f32 = 857.6923;
const RELATIVE_DIST: u32 = 30;
/// The 4-step LoRA schedule (§4.6): one step-cache each.
const SAMPLE_STEPS: usize = 4;

struct Args {
    seed: u64,
    warmup: usize,
    iters: usize,
    dump: Option<String>,
    /// Extra calls after the timed ones with per-op device times recorded.
    profile: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seed: 0,
        warmup: 3,
        iters: 10,
        dump: None,
        profile: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--seed" => a.seed = val()?.parse()?,
            "--warmup" => a.warmup = val()?.parse()?,
            "--iters" => a.iters = val()?.parse()?,
            "--dump" => a.dump = Some(val()?),
            "--profile" => a.profile = val()?.parse()?,
            _ => bail!("unknown argument {k}"),
        }
    }
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    Ok(a)
}

/// Seeded N(0,1)-scaled input `name` (same generator and names as bench_ref.py).
fn input(seed: u64, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    let v = runtime::weights::random_values(seed, &format!("input.{name}"), n, 1.0, 0.0)?;
    Ok(Tensor::from_vec(v, shape.to_vec(), dev)?)
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn main() -> Result<()> {
    let a = args()?;
    let dev = Device::cuda_if_available(0).context("CUDA device 0")?;
    println!("{}", runtime::device::cuda::check_kernels(0)?);
    let tracker = MemoryTracker::for_device(&dev);
    let spec = planner::ModelSpec::builtin("s2v-14b")?;
    let cfg = WanConfig::from(&spec);

    let t0 = Instant::now();
    let rw = RandomWeights::new(a.seed, cfg.expected_tensors());
    let model = CausalWanModelS2V::load(&cfg, &VarBuilder::random(&rw, DType::BF16, dev))?;
    dev.synchronize()?;
    println!(
        "load: {:.1} s (random bf16 weights, seed {})",
        t0.elapsed().as_secs_f64(),
        a.seed
    );

    let (h, w) = LAT;
    let g = StreamGeometry::new(h, w, 3, 12)?;
    let fsl = g.fsl();
    let (c, s) = (cfg.in_dim, a.seed);
    let context = input(s, "context", &[77, cfg.text_dim], &dev)?;
    let ref_latent = input(s, "ref_latent", &[c, 1, h, w], &dev)?;
    let motion = input(s, "motion", &[c, cfg.motion_latents(), h, w], &dev)?;
    let x = input(s, "x", &[c, 3, h, w], &dev)?;
    let audio = input(s, "audio", &[1, cfg.audio_layers, cfg.audio_dim, 12], &dev)?;
    let cond = Tensor::zeros((c, 3, h, w), DType::BF16, &dev)?;

    let t0 = Instant::now();
    let text = model.text_kv(&model.embed_text(&context)?)?;
    // One step-cache per sampling step, as StreamRunner (and the planner) hold them.
    let steps = SAMPLE_STEPS;
    let mut caches = (0..steps)
        .map(|_| StepCache::new(&cfg, g, DType::BF16, &dev))
        .collect::<runtime::Result<Vec<_>>>()?;
    for cache in &mut caches {
        model.prefill(cache, &ref_latent, &motion, &text, None)?;
    }
    dev.synchronize()?;
    println!(
        "text + {steps} prefills: {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    let call = |start: usize| StreamCall {
        x: &x,
        t: T,
        cond_states: &cond,
        audio: &audio,
        current_start: start,
        relative_dist: RELATIVE_DIST,
    };
    // Clip 0 fills the ring of cache 0 (blocks 0..4), as bench_ref.py --fill-ring.
    for b in 0..4 {
        model.forward_stream(&mut caches[0], &call(3 * b * fsl), &text, None)?;
    }
    let steady = 12 * fsl;
    let keys = caches[0].key_len(steady)?;
    println!("steady state: {} query tokens, {keys} keys", 3 * fsl);

    let mut times = Vec::new();
    let mut out = None;
    let profile = runtime::device::cuda::profile::enabled();
    for i in 0..a.warmup + a.iters {
        dev.synchronize()?;
        if profile && i == a.warmup {
            // Drop the spans of the load, prefills and warm-up calls.
            runtime::device::cuda::profile::take(0)?;
        }
        let t = Instant::now();
        let y = model.forward_stream(&mut caches[0], &call(steady), &text, None)?;
        dev.synchronize()?;
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out = Some(y);
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "RESULT dit_call ms_median {med:.2} ms_min {:.2} ms_max {:.2} iters {} \
         tflops_123 {:.1} tflops_120_8 {:.1} keys {keys}",
        times[0],
        times[times.len() - 1],
        times.len(),
        TFLOP_PER_CALL / med * 1e3,
        TFLOP_PER_CALL_CACHED_TEXT / med * 1e3,
    );

    if profile {
        let rows = runtime::device::cuda::profile::take(0)?;
        let wall: f64 = times.iter().sum::<f64>() / times.len() as f64;
        print!(
            "{}",
            runtime::device::cuda::profile::table(&rows, times.len(), wall)
        );
    }

    if a.profile > 0 {
        use runtime::device::cuda::profile as prof;
        prof::set_enabled(true);
        prof::take(0)?;
        let mut wall = 0.0;
        for _ in 0..a.profile {
            dev.synchronize()?;
            let t = Instant::now();
            model.forward_stream(&mut caches[0], &call(steady), &text, None)?;
            dev.synchronize()?;
            wall += t.elapsed().as_secs_f64() * 1e3;
        }
        prof::set_enabled(false);
        let rows = prof::take(0)?;
        print!("{}", prof::table(&rows, a.profile, wall / a.profile as f64));
    }

    let st = tracker.stats();
    for c in Category::ALL {
        let v = st.get(c);
        println!(
            "MEM {c:?} peak_bytes {} live_bytes {} ({:.2} GiB peak)",
            v.peak,
            v.live,
            gib(v.peak)
        );
    }
    println!(
        "MEM total peak_bytes {} ({:.2} GiB)",
        st.total_peak,
        gib(st.total_peak)
    );
    println!("MEM step_caches {steps}");

    let y = out.context("no call ran")?;
    let v = y.to_vec_f32()?;
    if v.iter().any(|f| !f.is_finite()) {
        bail!("the output has non-finite values");
    }
    let rms = (v.iter().map(|f| f64::from(*f).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    println!("output {:?} rms {rms:.4}", y.dims());
    if let Some(p) = a.dump {
        let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        std::fs::write(&p, bytes).with_context(|| format!("writing {p}"))?;
        println!("dumped {} f32 to {p}", v.len());
    }
    Ok(())
}
