//! One rank of tpp-bench: load this rank's share of the DiT (and the VAE where it decodes),
//! run its TPP stage over every block of every clip, time it, and report.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use runtime::comm::{Comm, SocketComm, SocketOptions};
use runtime::memory::MemoryTracker;
use runtime::models::VarBuilder;
use runtime::models::vae::{DecodeStream, VaeConfig, WanVae};
use runtime::models::vars::VarsRoot;
use runtime::models::wan::stream::StageRunner;
use runtime::models::wan::{CausalWanModelS2V, RelativeDist, StreamGeometry, WanConfig};
use runtime::parallel::{DitLayout, Groups, Mesh};
use runtime::sampling::{FlowMatchSchedule, NoiseGenerator, clip_noise};
use runtime::weights::RandomWeights;
use runtime::{DType, Device, Shape, Tensor};

use super::tpp_plan::{self, median};
use super::{Args, Backend};

/// Latents the decoder is primed with (§6.4) and frames dropped from the first block.
const PRIME_LATENTS: usize = 7;
const DROPPED_FRAMES: usize = 3;
/// Video frames per block in steady state.
const FRAMES_PER_BLOCK: f64 = 12.0;
const COMM_TIMEOUT: Duration = Duration::from_secs(600);

pub fn report_path(a: &Args, rank: usize) -> PathBuf {
    a.out.join(format!("{}.rank{rank}.txt", a.layout))
}

pub fn latents_path(a: &Args) -> PathBuf {
    a.out.join(format!("{}.latents.f32", a.layout))
}

macro_rules! say {
    ($a:expr, $r:expr, $($t:tt)*) => {
        println!("[{} r{}] {}", $a.layout, $r, format!($($t)*))
    };
}

fn world_comm(a: &Args, rank: usize, boot: &str) -> Result<Option<Arc<dyn Comm>>> {
    if a.world() == 1 {
        return Ok(None);
    }
    let c: Arc<dyn Comm> = match a.backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let bytes = (0..boot.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(boot.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .context("the NCCL id is not hex")?;
            let id = runtime::comm::NcclId::from_bytes(&bytes)?;
            Arc::new(runtime::comm::NcclComm::init_on_device(
                &id,
                rank,
                a.world(),
                rank,
                COMM_TIMEOUT,
            )?)
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => bail!("built without the `cuda` feature"),
        Backend::Cpu => {
            let opts = SocketOptions {
                timeout: COMM_TIMEOUT,
                connect_timeout: Duration::from_secs(60),
            };
            Arc::new(SocketComm::connect(boot.parse()?, rank, a.world(), opts)?)
        }
    };
    Ok(Some(c))
}

/// This rank's DiT layout: alone, tp over the whole world, or tp groups split from it.
fn dit_layout(a: &Args, world: Option<&Arc<dyn Comm>>, layers: usize) -> Result<DitLayout> {
    match world {
        None => Ok(DitLayout::single()),
        Some(_) if a.tp == 1 => Ok(DitLayout::single()),
        Some(w) if a.stages == 1 => Ok(DitLayout {
            tp: w.clone(),
            sp: runtime::parallel::solo(),
            pp: None,
            fsdp: false,
        }),
        Some(w) => {
            let mesh = Mesh::new(a.stages, 1, 1, a.tp)?;
            let g = Groups::split(w.as_ref(), &mesh)?;
            Ok(DitLayout::new(&g, &mesh, layers, false)?)
        }
    }
}

fn vae_on(spec: &planner::ModelSpec, seed: u64, dtype: DType, dev: Device) -> Result<WanVae> {
    let cfg = VaeConfig::from_spec(&spec.vae)?;
    let tensors = benches::probe_tensors(|root| WanVae::load(root, cfg.clone()).map(|_| ()))?;
    let src = benches::Random::new(seed, tensors);
    Ok(WanVae::load(&VarsRoot::new(&src, dtype, dev), cfg)?)
}

/// Sends `t` as `dtype` (the receiver asks for that dtype; a no-op copy-wise when it already is).
fn send(comm: &dyn Comm, t: &Tensor, dtype: DType, peer: usize) -> Result<()> {
    comm.send(&t.to_dtype(dtype)?, peer)
        .with_context(|| format!("sending {:?} to rank {peer}", t.dims()))
}

fn recv(comm: &dyn Comm, shape: &[usize], dtype: DType, peer: usize) -> Result<Tensor> {
    comm.recv(&Shape::from(shape.to_vec()), dtype, peer)
        .with_context(|| format!("receiving {shape:?} from rank {peer}"))
}

pub fn run(a: &Args, rank: usize, boot: &str) -> Result<()> {
    let t_proc = Instant::now();
    let (dev, dtype) = match a.backend {
        Backend::Cuda => (Device::cuda_if_available(rank)?, DType::BF16),
        Backend::Cpu => (Device::Cpu, DType::F32),
    };
    #[cfg(feature = "cuda")]
    if a.backend == Backend::Cuda {
        say!(a, rank, "{}", runtime::device::cuda::check_kernels(rank)?);
    }
    let tracker = MemoryTracker::for_device(&dev);
    let world = world_comm(a, rank, boot)?;
    let spec = planner::ModelSpec::builtin(&a.model)?;
    let cfg = WanConfig::from(&spec);
    let layout = dit_layout(a, world.as_ref(), cfg.num_layers)?;

    // Rank = stage · tp + t; each stage runs steps/stages consecutive steps.
    let steps = spec.stream.sample_steps as usize;
    if !steps.is_multiple_of(a.stages) {
        bail!("{steps} steps do not split over {} stages", a.stages);
    }
    let (stage, per) = (rank / a.tp, steps / a.stages);
    let last_stage = stage + 1 == a.stages;
    // The decoding rank: the last stage's first rank (planner `colocated_vae_rank`).
    let final_rank = (a.stages - 1) * a.tp;
    let decodes = rank == final_rank;
    let role = format!(
        "stage {stage} steps {}..{}{}{}",
        stage * per,
        stage * per + per,
        if a.tp > 1 {
            format!(" tp {}/{}", rank % a.tp, a.tp)
        } else {
            String::new()
        },
        if decodes && a.vae { " +VAE" } else { "" }
    );

    let t0 = Instant::now();
    let rw = RandomWeights::new(a.seed, cfg.expected_tensors());
    let model = CausalWanModelS2V::load_rank(&cfg, &VarBuilder::random(&rw, dtype, dev), &layout)?;
    dev.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    say!(a, rank, "{role}: DiT loaded in {load_s:.1} s");
    let t0 = Instant::now();
    let vae = if decodes && a.vae {
        Some(vae_on(&spec, a.seed, dtype, dev)?)
    } else {
        None
    };
    let vae_load_s = t0.elapsed().as_secs_f64();

    // Inputs, identical on every rank (seeded).
    let res = tpp_plan::resolution(&a.size)?;
    let (lh, lw) = (res.height as usize / 8, res.width as usize / 8);
    let s = &spec.stream;
    let g = StreamGeometry::new(
        lh,
        lw,
        s.frames_per_block as usize,
        s.latents_per_clip as usize,
    )?;
    let (c, fpb, lat) = (cfg.in_dim, g.frames_per_block, g.ring_frames);
    let bpc = lat / fpb;
    let mut rng = NoiseGenerator::new(a.seed ^ 0x7470_7062);
    let context = rng.randn((cfg.text_len, cfg.text_dim), DType::F32, &dev)?;
    let ref_latent = rng.randn((c, 1, lh, lw), DType::F32, &dev)?;
    let motion = rng.randn((c, cfg.motion_latents(), lh, lw), DType::F32, &dev)?;
    let frames = 4 * lat;
    let audio = rng.randn(
        (1, cfg.audio_layers, cfg.audio_dim, frames * a.clips),
        DType::F32,
        &dev,
    )?;
    let cond = Tensor::zeros((cfg.cond_dim, fpb, lh, lw), DType::F32, &dev)?;

    let mut runner = StageRunner::new(
        &model,
        g,
        FlowMatchSchedule::liveavatar(steps)?,
        stage * per..stage * per + per,
        &context,
        motion.clone(),
        RelativeDist::seeded(a.seed),
    )?;
    let mut stream = DecodeStream::new();
    let mut prime_ms = 0.0;
    if let Some(v) = &vae {
        let t = Instant::now();
        v.prime(
            &mut stream,
            &motion.narrow(1, 0, PRIME_LATENTS)?.unsqueeze(0)?,
        )?;
        dev.synchronize()?;
        prime_ms = t.elapsed().as_secs_f64() * 1e3;
    }
    let mut dump = if decodes {
        Some(std::io::BufWriter::new(
            std::fs::File::create(latents_path(a))
                .with_context(|| format!("creating {}", latents_path(a).display()))?,
        ))
    } else {
        None
    };

    if let Some(w) = &world {
        w.barrier()?;
    }
    let start = Instant::now();
    let block_shape = [c, fpb, lh, lw];
    let (mut block_ms, mut decode_ms, mut done_s) = (vec![], vec![], vec![]);
    let mut first: Option<Tensor> = None;
    let mut frames_out = 0usize;
    for r in 0..a.clips {
        match r {
            0 => runner.prefill(&ref_latent)?,
            1 => {
                // The clip-1 sink (§4.6, §6.3): the last stage has it, the final rank sends it.
                let sink = if last_stage {
                    let sink = first.take().context("clip 0 produced no latent")?;
                    if let (true, Some(w)) = (decodes, &world) {
                        for peer in 0..final_rank {
                            send(w.as_ref(), &sink, dtype, peer)?;
                        }
                    }
                    sink
                } else {
                    let w = world.as_ref().context("a non-last stage without a world")?;
                    recv(w.as_ref(), &[c, 1, lh, lw], dtype, final_rank)?
                };
                runner.prefill(&sink)?;
            }
            _ => {}
        }
        let noise = if stage == 0 {
            Some(clip_noise(a.seed, r, (c, lat, lh, lw), DType::F32, &dev)?)
        } else {
            None
        };
        for b in 0..bpc {
            let x = match (&noise, &world) {
                (Some(n), _) => n.narrow(1, fpb * b, fpb)?,
                (None, Some(w)) => recv(w.as_ref(), &block_shape, dtype, rank - a.tp)?,
                (None, None) => bail!("stage {stage} has no input"),
            };
            let f0 = 4 * (lat * r + fpb * b);
            let au = audio.narrow(3, f0, 4 * fpb)?;
            // Start every tp rank together, so a block's time is its compute, not the wait
            // for a peer that was decoding or receiving.
            if a.tp > 1 {
                layout.tp.barrier()?;
            }
            dev.synchronize()?;
            let t = Instant::now();
            let x = runner.run_block(r, b, &x, &au, &cond)?;
            dev.synchronize()?;
            block_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if !last_stage {
                let w = world.as_ref().context("a non-last stage without a world")?;
                send(w.as_ref(), &x, dtype, rank + a.tp)?;
                continue;
            }
            if (r, b) == (0, 0) && a.clips > 1 {
                first = Some(x.narrow(1, 0, 1)?);
            }
            if !decodes {
                continue;
            }
            if let Some(f) = dump.as_mut() {
                let v = x.to_vec_f32()?;
                if v.iter().any(|e| !e.is_finite()) {
                    bail!("clip {r} block {b}: non-finite latents");
                }
                let bytes: Vec<u8> = v.iter().flat_map(|e| e.to_le_bytes()).collect();
                f.write_all(&bytes)?;
            }
            if let Some(v) = &vae {
                let t = Instant::now();
                let mut y = v.decode_stream(&mut stream, &x.unsqueeze(0)?)?;
                if (r, b) == (0, 0) {
                    let n = y.dims()[2];
                    y = y.narrow(2, DROPPED_FRAMES, n - DROPPED_FRAMES)?;
                }
                dev.synchronize()?;
                frames_out += y.dims()[2];
                decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
            } else {
                frames_out += 4 * fpb - if (r, b) == (0, 0) { DROPPED_FRAMES } else { 0 };
            }
            done_s.push(start.elapsed().as_secs_f64());
        }
    }
    if let Some(f) = dump.as_mut() {
        f.flush()?;
    }
    if let Some(w) = &world {
        w.barrier()?;
    }
    let total_s = start.elapsed().as_secs_f64();

    // Steady state: the blocks after the first clip (after the first block with one clip).
    let skip = if a.clips > 1 { bpc } else { 1 };
    let steady = |v: &[f64]| median(v.get(skip..).unwrap_or(&[])).or_else(|| median(v));
    let fmt = |v: Option<f64>| v.map_or("—".into(), |x| format!("{x:.1}"));
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let pred = tpp_plan::predict(&spec, &a.gpu, &a.size, a.stages, a.tp, a.clips, a.vae, rank)?;
    let st = tracker.stats();
    say!(
        a,
        rank,
        "{role}: block ms {} (steady median {})",
        list(&block_ms),
        fmt(steady(&block_ms))
    );
    let mut items = vec![
        ("role", role.replace(' ', "_")),
        ("load_s", format!("{load_s:.1}")),
        ("block_ms", list(&block_ms)),
        ("block_ms_steady", fmt(steady(&block_ms))),
        ("decode_ms_steady", fmt(steady(&decode_ms))),
        ("peak_bytes", st.total_peak.to_string()),
        ("planned_bytes", pred.peak.to_string()),
        (
            "process_s",
            format!("{:.1}", t_proc.elapsed().as_secs_f64()),
        ),
    ];
    if decodes {
        let gaps: Vec<f64> = done_s.windows(2).map(|w| (w[1] - w[0]) * 1e3).collect();
        // Intervals between steady-state blocks (the one into the first of them also holds
        // the clip-1 re-prefill).
        let steady_gaps = gaps.get(skip..).unwrap_or(&[]);
        let interval = median(steady_gaps).or_else(|| median(&gaps));
        let first_frame = done_s.first().copied().unwrap_or(f64::NAN);
        let fps_all = frames_out as f64 / total_s;
        if vae.is_some() {
            say!(
                a,
                rank,
                "VAE: loaded in {vae_load_s:.1} s, primed in {prime_ms:.0} ms, decode ms {} \
                 (steady median {})",
                list(&decode_ms),
                fmt(steady(&decode_ms))
            );
        }
        say!(
            a,
            rank,
            "pipeline: first-frame latency {first_frame:.2} s, block done at s {}, steady interval \
             {} ms ⇒ {} FPS, {frames_out} frames in {total_s:.2} s ({fps_all:.2} FPS)",
            list(&done_s),
            fmt(interval),
            interval.map_or("—".into(), |i| format!(
                "{:.2}",
                FRAMES_PER_BLOCK / i * 1e3
            ))
        );
        items.extend([
            ("first_frame_s", format!("{first_frame:.2}")),
            ("interval_ms_steady", fmt(interval)),
            (
                "fps_steady",
                interval.map_or("—".into(), |i| {
                    format!("{:.2}", FRAMES_PER_BLOCK / i * 1e3)
                }),
            ),
            ("fps_all", format!("{fps_all:.2}")),
            ("blocks", done_s.len().to_string()),
            ("latents", latents_path(a).display().to_string()),
            ("vae_load_s", format!("{vae_load_s:.1}")),
            ("prime_ms", format!("{prime_ms:.0}")),
        ]);
    }
    for l in tpp_plan::memory_lines(&st, &pred) {
        say!(a, rank, "{l}");
    }
    tpp_plan::write_report(&report_path(a, rank), &items)?;
    Ok(())
}
