//! The streaming generation loop as TPP runs it (model-spec §4.6, §4.7, §5): one
//! [`StepCache`] per denoising step, prefill at clip 0, re-prefill at clip 1 with the first
//! denoised latent of clip 0, text embedded once, Euler per block.

use super::cache::StepCache;
use super::config::{RELATIVE_DIST_RANGE, StreamGeometry};
use super::dit::{CausalWanModelS2V, StreamCall, TextKv};
use super::rope::ref_time_for_call;
use crate::sampling::{FlowMatchSchedule, NoiseGenerator, euler_step};
use crate::{Error, Result, Tensor};

/// Where the §4.5 reference-position draws come from.
#[derive(Debug, Clone)]
pub enum RelativeDist {
    /// Uniform in 4..=30 from a seeded generator, one draw per call in call order, so the
    /// same seed gives the same video.
    Seeded(NoiseGenerator),
    /// Fixed draws indexed `[clip][block][step]` (e.g. the reference's, to compare).
    Table(Vec<Vec<Vec<u32>>>),
}

impl RelativeDist {
    pub fn seeded(seed: u64) -> Self {
        Self::Seeded(NoiseGenerator::new(seed))
    }
    fn draw(&mut self, clip: usize, block: usize, step: usize) -> Result<u32> {
        match self {
            Self::Seeded(g) => Ok(g.int_in(RELATIVE_DIST_RANGE)),
            Self::Table(t) => t
                .get(clip)
                .and_then(|c| c.get(block))
                .and_then(|b| b.get(step))
                .copied()
                .ok_or_else(|| {
                    Error::invalid(
                        "RelativeDist",
                        format!("no draw for clip {clip} block {block} step {step}"),
                    )
                }),
        }
    }
}

/// Inputs of one clip (`latents_per_clip` latent frames).
#[derive(Debug, Clone)]
pub struct ClipInputs {
    /// `[C, latents_per_clip, h, w]`.
    pub noise: Tensor,
    /// `[1, layers, audio_dim, 4·latents_per_clip]`: this clip's video frames.
    pub audio: Tensor,
    /// `[C, latents_per_clip, h, w]` pose latents (zeros without a pose video).
    pub cond_states: Tensor,
    /// Blocks to run (normally latents_per_clip / frames_per_block).
    pub blocks: usize,
}

/// What one clip produced.
#[derive(Debug, Clone)]
pub struct StreamOutput {
    /// Denoised blocks concatenated, `[C, 3·blocks, h, w]`.
    pub latents: Tensor,
    /// Per block: x₀ … x_steps.
    pub x: Vec<Vec<Tensor>>,
    /// Per block: the DiT output of each step.
    pub v: Vec<Vec<Tensor>>,
    /// Per block and step: keys attended per layer and the reference temporal index.
    pub key_len: Vec<Vec<usize>>,
    pub ref_time: Vec<Vec<i64>>,
}

/// A generation in progress.
#[derive(Debug)]
pub struct StreamRunner<'m> {
    model: &'m CausalWanModelS2V,
    geom: StreamGeometry,
    schedule: FlowMatchSchedule,
    caches: Vec<StepCache>,
    text: TextKv,
    ref_latent: Tensor,
    motion: Tensor,
    rel: RelativeDist,
    clip: usize,
    first_latent: Option<Tensor>,
}

impl<'m> StreamRunner<'m> {
    /// Embed the text once and allocate one step-cache per sampling step.
    pub fn new(
        model: &'m CausalWanModelS2V,
        geom: StreamGeometry,
        schedule: FlowMatchSchedule,
        context: &Tensor,
        ref_latent: Tensor,
        motion: Tensor,
        rel: RelativeDist,
    ) -> Result<Self> {
        let text = model.text_kv(&model.embed_text(context)?)?;
        let caches = (0..schedule.steps())
            .map(|_| StepCache::new(&model.cfg, geom, model.dtype(), &model.device()))
            .collect::<Result<_>>()?;
        Ok(Self {
            model,
            geom,
            schedule,
            caches,
            text,
            ref_latent,
            motion,
            rel,
            clip: 0,
            first_latent: None,
        })
    }

    /// The clip about to run.
    pub fn clip(&self) -> usize {
        self.clip
    }

    /// Run the next clip: (re-)prefill when due, then every block through every step.
    pub fn run_clip(&mut self, inp: &ClipInputs) -> Result<StreamOutput> {
        let (r, g, model) = (self.clip, self.geom, self.model);
        let lat_per_clip = g.ring_frames;
        let fpb = g.frames_per_block;
        if inp.blocks * fpb > lat_per_clip {
            return Err(Error::invalid(
                "StreamRunner",
                format!(
                    "{} blocks exceed a clip of {lat_per_clip} latents",
                    inp.blocks
                ),
            ));
        }
        let sink = match (r, &self.first_latent) {
            (0, _) => Some(self.ref_latent.clone()),
            (1, Some(first)) => Some(first.clone()),
            (1, None) => {
                return Err(Error::invalid("StreamRunner", "clip 0 produced no latent"));
            }
            _ => None,
        };
        if let Some(sink) = sink {
            for cache in &mut self.caches {
                model.prefill(cache, &sink, &self.motion, &self.text, None)?;
            }
        }
        let act = model.dtype();
        let mut out = StreamOutput {
            latents: Tensor::zeros(
                (model.cfg.out_dim, inp.blocks * fpb, g.lat_h, g.lat_w),
                act,
                &model.device(),
            )?,
            x: vec![],
            v: vec![],
            key_len: vec![],
            ref_time: vec![],
        };
        for b in 0..inp.blocks {
            let f0 = fpb * b;
            let mut x = inp.noise.narrow(1, f0, fpb)?.to_dtype(act)?;
            let audio = inp.audio.narrow(3, 4 * f0, 4 * fpb)?;
            let cond = inp.cond_states.narrow(1, f0, fpb)?;
            let current_start = (lat_per_clip * r + f0) * g.fsl();
            let cur = (current_start / g.fsl()) as i64;
            let (mut xs, mut vs, mut kl, mut rt) = (vec![x.clone()], vec![], vec![], vec![]);
            for i in 0..self.schedule.steps() {
                let relative_dist = self.rel.draw(r, b, i)?;
                let call = StreamCall {
                    x: &x,
                    t: self.schedule.timesteps[i],
                    cond_states: &cond,
                    audio: &audio,
                    current_start,
                    relative_dist,
                };
                let cache = &mut self.caches[i];
                kl.push(cache.key_len(current_start)?);
                rt.push(ref_time_for_call(cur, relative_dist));
                let v = model.forward_stream(cache, &call, &self.text, None)?;
                x = euler_step(&x, &v, self.schedule.sigmas[i], self.schedule.sigmas[i + 1])?;
                xs.push(x.clone());
                vs.push(v);
            }
            out.latents.slice_set(&x, 1, f0)?;
            if r == 0 && b == 0 {
                self.first_latent = Some(x.narrow(1, 0, 1)?);
            }
            out.x.push(xs);
            out.v.push(vs);
            out.key_len.push(kl);
            out.ref_time.push(rt);
        }
        self.clip += 1;
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn seeded_reference_positions_are_reproducible_and_in_range() {
        let draws = |seed| {
            let mut r = RelativeDist::seeded(seed);
            (0..200)
                .map(|i| r.draw(0, i, 0).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draws(420);
        assert_eq!(a, draws(420));
        assert_ne!(a, draws(421));
        assert!(a.iter().all(|d| RELATIVE_DIST_RANGE.contains(d)));
        assert!(a.contains(&4) && a.contains(&30));
        let mut t = RelativeDist::Table(vec![vec![vec![7]]]);
        assert_eq!(t.draw(0, 0, 0).unwrap(), 7);
        assert!(t.draw(0, 1, 0).is_err());
    }
}
