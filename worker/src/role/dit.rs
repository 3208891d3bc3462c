//! A DiT rank: one TPP stage ([`StageRunner`], one step-cache per owned step). Per block the
//! first stage starts from the clip's noise, every stage runs its steps and passes the
//! latents on; the last stage hands each block's final latents to the decoder (a dedicated
//! VAE rank, or its own co-located VAE) as soon as the block is done (§6.1, §6.3).

use std::time::Instant;

use anyhow::{Context, Result};
use runtime::comm::Comm;
use runtime::models::wan::stream::StageRunner;
use runtime::models::wan::{CausalWanModelS2V, RelativeDist};
use runtime::sampling::{FlowMatchSchedule, clip_noise};
use runtime::{DType, Device, Tensor};

use super::topology::{StagePart, Topology};
use super::{MOTION_FRAMES, Prepared, recv_tensor, send_tensor};

/// Latents of the motion context: 73 frames ⇒ 19.
pub fn motion_latents() -> usize {
    1 + (MOTION_FRAMES - 1) / 4
}

/// One block's final latents as the last stage hands them on.
#[derive(Debug)]
pub struct FinalBlock {
    pub clip: usize,
    /// `[C, fpb, h, w]`.
    pub latents: Tensor,
    /// Compute time of this block on each stage, ms, by stage.
    pub stage_ms: Vec<f32>,
}

/// The whole generation in one process with every step in one [`StreamRunner`] (the
/// single-rank reference the distributed runs are compared with): each block's final
/// latents go to `on_block` (clip, block within the clip, latents).
#[cfg(test)]
pub fn generate(
    model: &CausalWanModelS2V,
    p: &Prepared,
    seed: u64,
    ref_latent: Tensor,
    motion: Tensor,
    mut on_block: impl FnMut(usize, usize, &Tensor) -> Result<()>,
) -> Result<()> {
    use runtime::models::wan::{ClipInputs, StreamRunner};
    let g = p.geometry;
    let c = model.cfg.in_dim;
    let steps = p.spec.stream.sample_steps as usize;
    let mut runner = StreamRunner::new(
        model,
        g,
        FlowMatchSchedule::liveavatar(steps)?,
        &p.context,
        ref_latent,
        motion,
        RelativeDist::seeded(seed),
    )?;
    let lat = g.ring_frames;
    let frames = 4 * lat;
    let cond = Tensor::zeros(
        (model.cfg.cond_dim, lat, g.lat_h, g.lat_w),
        DType::F32,
        &Device::Cpu,
    )?;
    for r in 0..p.clips {
        let clip = ClipInputs {
            noise: clip_noise(
                seed,
                r,
                (c, lat, g.lat_h, g.lat_w),
                DType::F32,
                &Device::Cpu,
            )?,
            audio: p.audio.narrow(3, frames * r, frames)?,
            cond_states: cond.clone(),
            blocks: p.blocks_per_clip(),
        };
        let out = runner.run_clip(&clip)?;
        for b in 0..clip.blocks {
            let fpb = g.frames_per_block;
            on_block(r, b, &out.latents.narrow(1, fpb * b, fpb)?)?;
        }
    }
    Ok(())
}

/// Runs this rank's stage over every block of every clip. `ref_latent` / `motion` are the
/// VAE encodings (§4.6); the last stage calls `on_final` with each block's final latents.
pub fn run_stage(
    comm: &dyn Comm,
    topo: &Topology,
    model: &CausalWanModelS2V,
    p: &Prepared,
    seed: u64,
    (ref_latent, motion): (Tensor, Tensor),
    mut on_final: impl FnMut(FinalBlock) -> Result<()>,
) -> Result<usize> {
    let part: &StagePart = topo
        .stage
        .as_ref()
        .context("a DiT stage on a rank without one")?;
    let g = p.geometry;
    let (c, fpb, lat) = (model.cfg.in_dim, g.frames_per_block, g.ring_frames);
    let dev = model.device();
    let steps = p.spec.stream.sample_steps as usize;
    if steps != topo.sample_steps {
        anyhow::bail!(
            "the layout covers {} denoising steps, the model samples {steps}",
            topo.sample_steps
        );
    }
    let mut runner = StageRunner::new(
        model,
        g,
        FlowMatchSchedule::liveavatar(steps)?,
        part.steps.clone(),
        &p.context.to_device(&dev)?,
        motion.to_device(&dev)?,
        RelativeDist::seeded(seed),
    )?;
    let block_shape = [c, fpb, g.lat_h, g.lat_w];
    // Pose latents: zeros without a pose video (§4.7).
    let cond = Tensor::zeros(
        (model.cfg.cond_dim, fpb, g.lat_h, g.lat_w),
        DType::F32,
        &dev,
    )?;
    let mut first: Option<Tensor> = None;
    let mut done = 0;
    for r in 0..p.clips {
        match r {
            0 => runner.prefill(&ref_latent.to_device(&dev)?)?,
            // The clip-1 re-prefill with clip 0's first denoised latent (§4.6, §6.3): every rank
            // of the last stage has it; the final rank sends it to the other stages' ranks.
            1 => {
                let sink = if runner.is_last() {
                    let sink = first.take().context("clip 0 produced no latent")?;
                    if topo.rank == topo.final_rank {
                        for &peer in &topo.sink_receivers {
                            send_tensor(comm, &sink, peer)
                                .context("sending clip 0's first latent (the new sink)")?;
                        }
                    }
                    sink
                } else {
                    recv_tensor(comm, &[c, 1, g.lat_h, g.lat_w], topo.final_rank, &dev)
                        .context("receiving clip 0's first latent (the new sink)")?
                };
                runner.prefill(&sink)?;
            }
            _ => {}
        }
        let noise = if runner.is_first() {
            Some(clip_noise(
                seed,
                r,
                (c, lat, g.lat_h, g.lat_w),
                DType::F32,
                &dev,
            )?)
        } else {
            None
        };
        for b in 0..p.blocks_per_clip() {
            let (x, mut stage_ms) = match (&noise, part.prev) {
                (Some(n), _) => (n.narrow(1, fpb * b, fpb)?, vec![0f32; topo.stages]),
                (None, Some(prev)) => {
                    let x = recv_tensor(comm, &block_shape, prev, &dev)?;
                    let ms = recv_tensor(comm, &[topo.stages], prev, &dev)?;
                    (x, ms.to_vec_f32()?)
                }
                (None, None) => anyhow::bail!("stage {} has no input", part.stage),
            };
            let f0 = 4 * (lat * r + fpb * b);
            let audio = p.audio.narrow(3, f0, 4 * fpb)?.to_device(&dev)?;
            let t0 = Instant::now();
            let x = runner.run_block(r, b, &x, &audio, &cond)?;
            runtime_sync(&dev)?;
            stage_ms[part.stage] = t0.elapsed().as_secs_f32() * 1e3;
            match part.next {
                Some(next) => {
                    send_tensor(comm, &x, next)?;
                    let ms = Tensor::from_vec(stage_ms, topo.stages, &Device::Cpu)?;
                    send_tensor(comm, &ms.to_device(&dev)?, next)?;
                }
                None => {
                    if (r, b) == (0, 0) && p.clips > 1 {
                        first = Some(x.narrow(1, 0, 1)?);
                    }
                    if topo.rank == topo.final_rank {
                        on_final(FinalBlock {
                            clip: r,
                            latents: x,
                            stage_ms,
                        })?;
                    }
                }
            }
            done += 1;
        }
    }
    Ok(done)
}

/// Waits for the device so that a block's time is its compute, not its queueing.
fn runtime_sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}
