//! The streaming generation loop as TPP runs it (model-spec §4.6, §4.7, §5): one
//! [`StepCache`] per denoising step, prefill at clip 0, re-prefill at clip 1 with the first
//! denoised latent of clip 0, text embedded once, Euler per block. [`StreamRunner`] runs every
//! step in one place; [`StageRunner`] runs one TPP stage's steps (the rank-per-stage layout).

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
            .map(|_| model.new_step_cache(geom))
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

/// One TPP stage (§6.1, §6.2): the denoising steps `steps` of every block, with one
/// [`StepCache`] per owned step. Stages run in separate ranks; stage 0 starts each block from
/// its noise slice, every later stage from the previous stage's latents, and the last
/// stage's output is the block's final latents. Chained over all steps in one process it
/// gives exactly [`StreamRunner`]'s latents.
#[derive(Debug)]
pub struct StageRunner<'m> {
    model: &'m CausalWanModelS2V,
    geom: StreamGeometry,
    schedule: FlowMatchSchedule,
    steps: std::ops::Range<usize>,
    caches: Vec<StepCache>,
    text: TextKv,
    motion: Tensor,
    rel: RelativeDist,
}

impl<'m> StageRunner<'m> {
    /// Embed the text once and allocate the caches of steps `steps` (a non-empty range of the
    /// schedule's steps).
    pub fn new(
        model: &'m CausalWanModelS2V,
        geom: StreamGeometry,
        schedule: FlowMatchSchedule,
        steps: std::ops::Range<usize>,
        context: &Tensor,
        motion: Tensor,
        rel: RelativeDist,
    ) -> Result<Self> {
        if steps.is_empty() || steps.end > schedule.steps() {
            return Err(Error::invalid(
                "StageRunner",
                format!(
                    "steps {steps:?} are not a non-empty part of a {}-step schedule",
                    schedule.steps()
                ),
            ));
        }
        let text = model.text_kv(&model.embed_text(context)?)?;
        let caches = steps
            .clone()
            .map(|_| model.new_step_cache(geom))
            .collect::<Result<_>>()?;
        Ok(Self {
            model,
            geom,
            schedule,
            steps,
            caches,
            text,
            motion,
            rel,
        })
    }

    /// The denoising steps this stage runs.
    pub fn steps(&self) -> std::ops::Range<usize> {
        self.steps.clone()
    }

    /// Whether this stage runs the first step (and so starts blocks from noise).
    pub fn is_first(&self) -> bool {
        self.steps.start == 0
    }

    /// Whether this stage runs the last step (its output is the block's final latents).
    pub fn is_last(&self) -> bool {
        self.steps.end == self.schedule.steps()
    }

    /// (Re-)prefill every owned cache with `sink` `[C, 1, h, w]` as the reference latent
    /// (§4.2): the reference image's latent at clip 0, clip 0's first denoised latent at
    /// clip 1 (§4.6, the sink broadcast of §6.3).
    pub fn prefill(&mut self, sink: &Tensor) -> Result<()> {
        for cache in &mut self.caches {
            self.model
                .prefill(cache, sink, &self.motion, &self.text, None)?;
        }
        Ok(())
    }

    /// Block `block` of clip `clip` through this stage's steps: `x` `[C, fpb, h, w]` is the
    /// block's noise slice (first stage) or the previous stage's output; `audio`
    /// `[1, layers, audio_dim, 4·fpb]` and `cond_states` `[C, fpb, h, w]` are the block's.
    /// Every stage draws the §4.5 values of all steps of the block, in step order, and uses
    /// its own, so the draws match a single-rank run.
    pub fn run_block(
        &mut self,
        clip: usize,
        block: usize,
        x: &Tensor,
        audio: &Tensor,
        cond_states: &Tensor,
    ) -> Result<Tensor> {
        let g = self.geom;
        let f0 = g.frames_per_block * block;
        if f0 + g.frames_per_block > g.ring_frames {
            return Err(Error::invalid(
                "StageRunner",
                format!("block {block} exceeds a clip of {} latents", g.ring_frames),
            ));
        }
        let draws = (0..self.schedule.steps())
            .map(|i| self.rel.draw(clip, block, i))
            .collect::<Result<Vec<_>>>()?;
        let current_start = (g.ring_frames * clip + f0) * g.fsl();
        let mut x = x.to_dtype(self.model.dtype())?;
        for (cache, i) in self.caches.iter_mut().zip(self.steps.clone()) {
            let call = StreamCall {
                x: &x,
                t: self.schedule.timesteps[i],
                cond_states,
                audio,
                current_start,
                relative_dist: draws[i],
            };
            let v = self.model.forward_stream(cache, &call, &self.text, None)?;
            x = euler_step(&x, &v, self.schedule.sigmas[i], self.schedule.sigmas[i + 1])?;
        }
        Ok(x)
    }
}

impl ClipInputs {
    /// Block `b`'s noise `[C, fpb, h, w]`, audio `[1, layers, audio_dim, 4·fpb]` and pose
    /// latents `[C, fpb, h, w]`.
    pub fn block(&self, b: usize, frames_per_block: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let f0 = frames_per_block * b;
        Ok((
            self.noise.narrow(1, f0, frames_per_block)?,
            self.audio.narrow(3, 4 * f0, 4 * frames_per_block)?,
            self.cond_states.narrow(1, f0, frames_per_block)?,
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// TPP stages chained in one process (4 × 1 step, 2 × 2 steps) give exactly the
    /// single-runner latents over two clips (clip 1 re-prefilled with clip 0's first latent).
    #[test]
    fn chained_stages_equal_the_single_runner() {
        use crate::models::VarBuilder;
        use crate::sampling::clip_noise;
        use crate::weights::RandomWeights;
        use crate::{DType, Device};

        let spec = planner::ModelSpec::builtin("tiny").unwrap();
        let cfg = crate::models::wan::WanConfig::from(&spec);
        let rw = RandomWeights::new(3, cfg.expected_tensors());
        let model =
            CausalWanModelS2V::load(&cfg, &VarBuilder::random(&rw, DType::F32, Device::Cpu))
                .unwrap();
        let (dev, c, seed) = (Device::Cpu, &model.cfg, 11u64);
        let (h, w) = (16, 8);
        let g = StreamGeometry::new(h, w, 3, 12).unwrap();
        let mut rng = NoiseGenerator::new(5);
        let context = rng.randn((7, c.text_dim), DType::F32, &dev).unwrap();
        let ref_latent = rng.randn((c.in_dim, 1, h, w), DType::F32, &dev).unwrap();
        let motion = rng.randn((c.in_dim, 19, h, w), DType::F32, &dev).unwrap();
        let clips: Vec<ClipInputs> = [(0usize, 4usize), (1, 2)]
            .iter()
            .map(|&(r, blocks)| ClipInputs {
                noise: clip_noise(seed, r, (c.in_dim, 12, h, w), DType::F32, &dev).unwrap(),
                audio: rng
                    .randn((1, c.audio_layers, c.audio_dim, 48), DType::F32, &dev)
                    .unwrap(),
                cond_states: Tensor::zeros((c.cond_dim, 12, h, w), DType::F32, &dev).unwrap(),
                blocks,
            })
            .collect();
        let sched = || FlowMatchSchedule::liveavatar(4).unwrap();

        let mut single = StreamRunner::new(
            &model,
            g,
            sched(),
            &context,
            ref_latent.clone(),
            motion.clone(),
            RelativeDist::seeded(seed),
        )
        .unwrap();
        // Block by block (a clip's latents are `[C, F, h, w]`, blocks interleaved per channel).
        let mut want = Vec::new();
        for clip in &clips {
            let out = single.run_clip(clip).unwrap().latents;
            for b in 0..clip.blocks {
                want.extend(out.narrow(1, 3 * b, 3).unwrap().to_vec_f32().unwrap());
            }
        }

        for split in [vec![0..1, 1..2, 2..3, 3..4], vec![0..2, 2..4]] {
            let mut stages: Vec<StageRunner> = split
                .iter()
                .map(|s| {
                    let rel = RelativeDist::seeded(seed);
                    StageRunner::new(&model, g, sched(), s.clone(), &context, motion.clone(), rel)
                        .unwrap()
                })
                .collect();
            assert!(stages[0].is_first() && stages.last().unwrap().is_last());
            let (mut got, mut first) = (Vec::new(), None);
            for (r, clip) in clips.iter().enumerate() {
                let sink = if r == 0 {
                    &ref_latent
                } else {
                    first.as_ref().unwrap()
                };
                for s in &mut stages {
                    s.prefill(sink).unwrap();
                }
                for b in 0..clip.blocks {
                    let (mut x, audio, cond) = clip.block(b, 3).unwrap();
                    for s in &mut stages {
                        x = s.run_block(r, b, &x, &audio, &cond).unwrap();
                    }
                    if (r, b) == (0, 0) {
                        first = Some(x.narrow(1, 0, 1).unwrap());
                    }
                    got.extend(x.to_vec_f32().unwrap());
                }
            }
            assert!(got == want, "stages {split:?}: the latents differ");
        }
        assert!(
            StageRunner::new(
                &model,
                g,
                sched(),
                3..5,
                &context,
                motion,
                RelativeDist::seeded(1)
            )
            .is_err()
        );
    }

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
