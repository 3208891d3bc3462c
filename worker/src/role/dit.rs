//! The DiT rank: all denoising steps of every block with one step-cache per step
//! ([`StreamRunner`]), each block's final latents sent to the VAE rank.

use anyhow::Result;
use runtime::comm::SocketComm;
use runtime::models::wan::{CausalWanModelS2V, ClipInputs, RelativeDist, StreamRunner};
use runtime::sampling::{FlowMatchSchedule, clip_noise};
use runtime::{DType, Device, Tensor};

use super::{MOTION_FRAMES, Prepared, recv_tensor, send_tensor};

/// Latents of the motion context: 73 frames ⇒ 19.
pub fn motion_latents() -> usize {
    1 + (MOTION_FRAMES - 1) / 4
}

/// Runs every clip, handing each block's final latents `[C, fpb, h, w]` to `on_block`
/// (clip, block within the clip, latents) as soon as its clip is done.
pub fn generate(
    model: &CausalWanModelS2V,
    p: &Prepared,
    seed: u64,
    ref_latent: Tensor,
    motion: Tensor,
    mut on_block: impl FnMut(usize, usize, &Tensor) -> Result<()>,
) -> Result<()> {
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
    let cond = Tensor::zeros((c, lat, g.lat_h, g.lat_w), DType::F32, &Device::Cpu)?;
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

/// The DiT rank of a two-rank job: receive the VAE encodings, generate, send every block.
pub fn run(
    comm: &SocketComm,
    vae_rank: usize,
    model: &CausalWanModelS2V,
    p: &Prepared,
    seed: u64,
) -> Result<usize> {
    let (c, h, w) = (model.cfg.in_dim, p.geometry.lat_h, p.geometry.lat_w);
    let ref_latent = recv_tensor(comm, &[c, 1, h, w], vae_rank)?;
    let motion = recv_tensor(comm, &[c, motion_latents(), h, w], vae_rank)?;
    let mut blocks = 0;
    generate(model, p, seed, ref_latent, motion, |_, _, x| {
        blocks += 1;
        send_tensor(comm, x, vae_rank)
    })?;
    Ok(blocks)
}
