//! The decoding side: encodes the reference image and motion context for the DiT ranks,
//! then streaming-decodes each block's final latents (§6.4) and hands the frames on. It runs
//! on the dedicated VAE rank, or on the last stage's rank when the VAE is co-located.

use std::time::Instant;

use anyhow::Result;
use runtime::Tensor;
use runtime::comm::Comm;
use runtime::models::vae::{DecodeStream, WanVae};

use super::dit::{FinalBlock, motion_latents};
use super::topology::Topology;
use super::{DROPPED_FRAMES, MOTION_FRAMES, PRIME_LATENTS, Prepared, recv_tensor, send_tensor};

/// One decoded block.
#[derive(Debug)]
pub struct BlockFrames {
    pub clip: usize,
    /// Global block index.
    pub block: usize,
    /// Index of the first frame in the whole video.
    pub frame_start: usize,
    pub frames: usize,
    /// `[3, frames, H, W]` f32 in [−1, 1].
    pub pixels: Vec<f32>,
    /// The block's final latents, `[C, fpb, h, w]`.
    pub latents: Tensor,
    /// Compute time of this block on each TPP stage, ms.
    pub stage_ms: Vec<f32>,
    pub received: Instant,
    pub decode_start: Instant,
    pub decode_end: Instant,
}

/// `(ref [C, 1, h, w], motion [C, 19, h, w])`: the encodings of the reference image alone and
/// repeated 73 times (§4.6, TPP).
pub fn encode_conditions(vae: &WanVae, p: &Prepared) -> Result<(Tensor, Tensor)> {
    let dev = vae.device();
    // The encode's own peak above what this rank held before it (the plan's "VAE encode
    // workspace"), seen only when it exceeds the generation's peak so far (on a checkpoint
    // run the encoders ran just before on this rank).
    let tracker = runtime::memory::MemoryTracker::for_device(&dev);
    let before = tracker.stats();
    let t0 = Instant::now();
    let image = p.image.to_device(&dev)?;
    let r = vae.encode_repeated(&image, 1)?.squeeze(0)?;
    let m = vae.encode_repeated(&image, MOTION_FRAMES)?.squeeze(0)?;
    dev.synchronize()?;
    let (held, peak) = (before.total_live, tracker.stats().total_peak);
    let mib = |b: usize| b.saturating_sub(held) as f64 / 1048576.0;
    let bound = if peak > before.total_peak {
        ""
    } else {
        "at most "
    };
    log!(
        "VAE encode of the reference and the {MOTION_FRAMES}-frame motion context: {:.0} ms, peak {bound}{:.1} MiB above the {:.1} MiB held",
        t0.elapsed().as_secs_f64() * 1e3,
        mib(peak),
        held as f64 / 1048576.0
    );
    Ok((r, m))
}

/// Encodes the conditions once and sends them to every DiT rank but this one; returns them.
pub fn encode_and_send(
    comm: &dyn Comm,
    topo: &Topology,
    vae: &WanVae,
    p: &Prepared,
) -> Result<(Tensor, Tensor)> {
    let (r, m) = encode_conditions(vae, p)?;
    debug_assert_eq!(m.dims()[1], motion_latents());
    for &peer in topo.dit_ranks.iter().filter(|&&d| d != topo.rank) {
        send_tensor(comm, &r, peer)?;
        send_tensor(comm, &m, peer)?;
    }
    Ok((r, m))
}

/// The streaming decoder of one generation: primed with the motion context, then one block
/// after another (the decode cache is never reset between clips, §6.4).
#[derive(Debug)]
pub struct Decoder<'v> {
    vae: &'v WanVae,
    stream: DecodeStream,
    block: usize,
    frame_start: usize,
}

impl<'v> Decoder<'v> {
    /// Primes the decoder with the first 7 motion latents (their frames are discarded).
    pub fn new(vae: &'v WanVae, motion: &Tensor) -> Result<Self> {
        let mut stream = DecodeStream::new();
        vae.prime(
            &mut stream,
            &motion.narrow(1, 0, PRIME_LATENTS)?.unsqueeze(0)?,
        )?;
        Ok(Self {
            vae,
            stream,
            block: 0,
            frame_start: 0,
        })
    }

    /// Decodes the next block (the first 3 frames of the very first are dropped).
    pub fn decode(&mut self, fb: FinalBlock, received: Instant) -> Result<BlockFrames> {
        let decode_start = Instant::now();
        let mut x = self
            .vae
            .decode_stream(&mut self.stream, &fb.latents.unsqueeze(0)?)?;
        if self.block == 0 {
            let n = x.dims()[2];
            x = x.narrow(2, DROPPED_FRAMES, n - DROPPED_FRAMES)?;
        }
        let frames = x.dims()[2];
        let out = BlockFrames {
            clip: fb.clip,
            block: self.block,
            frame_start: self.frame_start,
            frames,
            pixels: x.squeeze(0)?.to_vec_f32()?,
            latents: fb.latents,
            stage_ms: fb.stage_ms,
            received,
            decode_start,
            decode_end: Instant::now(),
        };
        self.block += 1;
        self.frame_start += frames;
        Ok(out)
    }
}

/// The dedicated VAE rank: encode and send the conditions, then receive and decode every
/// block from the final DiT rank. Returns the number of blocks.
pub fn run(
    comm: &dyn Comm,
    topo: &Topology,
    vae: &WanVae,
    p: &Prepared,
    mut on_block: impl FnMut(BlockFrames) -> Result<()>,
) -> Result<usize> {
    let (r, m) = encode_and_send(comm, topo, vae, p)?;
    let mut dec = Decoder::new(vae, &m)?;
    let g = p.geometry;
    let shape = [r.dims()[0], g.frames_per_block, g.lat_h, g.lat_w];
    let dev = r.device();
    for clip in 0..p.clips {
        for _ in 0..p.blocks_per_clip() {
            let latents = recv_tensor(comm, &shape, topo.final_rank, &dev)?;
            let stage_ms = recv_tensor(comm, &[topo.stages], topo.final_rank, &dev)?;
            let received = Instant::now();
            let fb = FinalBlock {
                clip,
                latents,
                stage_ms: stage_ms.to_vec_f32()?,
            };
            on_block(dec.decode(fb, received)?)?;
        }
    }
    Ok(dec.block)
}
