//! The VAE rank: encodes the reference image and motion context for the DiT rank, then
//! streaming-decodes each block it receives (§6.4) and hands the frames on.

use std::time::Instant;

use anyhow::Result;
use runtime::Tensor;
use runtime::comm::SocketComm;
use runtime::models::vae::{DecodeStream, WanVae};

use super::dit::motion_latents;
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
    /// The block's final latents as received, `[C, fpb, h, w]` (the tests compare them).
    #[cfg_attr(not(test), allow(dead_code))]
    pub latents: Tensor,
    pub received: Instant,
    pub decode_start: Instant,
    pub decode_end: Instant,
}

/// `(ref [C, 1, h, w], motion [C, 19, h, w])`: the encodings of the reference image alone and
/// repeated 73 times (§4.6, TPP).
pub fn encode_conditions(vae: &WanVae, p: &Prepared) -> Result<(Tensor, Tensor)> {
    let r = vae.encode_repeated(&p.image, 1)?.squeeze(0)?;
    let m = vae.encode_repeated(&p.image, MOTION_FRAMES)?.squeeze(0)?;
    Ok((r, m))
}

/// The VAE rank of a two-rank job.
pub fn run(
    comm: &SocketComm,
    dit_rank: usize,
    vae: &WanVae,
    p: &Prepared,
    mut on_block: impl FnMut(BlockFrames) -> Result<()>,
) -> Result<usize> {
    let (r, m) = encode_conditions(vae, p)?;
    debug_assert_eq!(m.dims()[1], motion_latents());
    send_tensor(comm, &r, dit_rank)?;
    send_tensor(comm, &m, dit_rank)?;
    let mut stream = DecodeStream::new();
    vae.prime(&mut stream, &m.narrow(1, 0, PRIME_LATENTS)?.unsqueeze(0)?)?;
    let g = p.geometry;
    let shape = [r.dims()[0], g.frames_per_block, g.lat_h, g.lat_w];
    let (mut block, mut frame_start) = (0, 0);
    for clip in 0..p.clips {
        for _ in 0..p.blocks_per_clip() {
            let latents = recv_tensor(comm, &shape, dit_rank)?;
            let received = Instant::now();
            let mut x = vae.decode_stream(&mut stream, &latents.unsqueeze(0)?)?;
            if block == 0 {
                let n = x.dims()[2];
                x = x.narrow(2, DROPPED_FRAMES, n - DROPPED_FRAMES)?;
            }
            let decode_end = Instant::now();
            let frames = x.dims()[2];
            on_block(BlockFrames {
                clip,
                block,
                frame_start,
                frames,
                pixels: x.squeeze(0)?.to_vec_f32()?,
                latents,
                received,
                decode_start: received,
                decode_end,
            })?;
            block += 1;
            frame_start += frames;
        }
    }
    Ok(block)
}
