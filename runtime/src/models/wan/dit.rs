//! `CausalWanModel_S2V`: the LiveAvatar streaming DiT (model-spec §3.3, §4.2, §4.4), whole or
//! one rank's part of a parallel layout (docs/parallelism.md).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use super::super::VarBuilder;
use super::block::{FrameRuns, WanAttentionBlock};
use super::cache::{PrefillKv, StepCache, StreamKv};
use super::config::{REF_TIME, StreamGeometry, WanConfig};
use super::embed::cond_mask_row;
use super::parts::{FsdpUnits, Holding, Root};
use super::rope::{RopeTable, cond_positions, noisy_positions, ref_time_for_call};
use crate::parallel::{Attention, DitLayout, SeqShard, UlyssesKv};
use crate::weights::{Checkpoint, Lora};
use crate::{DType, Device, Error, Result, Shape, Tensor};

/// Named intermediates of one call, filled when the caller asks (golden tests).
pub type Record = BTreeMap<String, Tensor>;

/// Text K/V of the cross-attention of each of this rank's blocks (its tp heads), in block
/// order, computed once per generation.
#[derive(Debug, Clone)]
pub struct TextKv {
    pub layers: Vec<(Tensor, Tensor)>,
}

/// Inputs of one streaming call (§3.2); latents are `[C, F, h, w]` without batch dim.
#[derive(Debug, Clone)]
pub struct StreamCall<'a> {
    pub x: &'a Tensor,
    /// The step's timestep, identical for the block's frames.
    pub t: f32,
    pub cond_states: &'a Tensor,
    /// `[1, layers, audio_dim, 4F]`: this block's video frames.
    pub audio: &'a Tensor,
    /// (12·r + 3·b)·fsl.
    pub current_start: usize,
    /// The §4.5 draw in 4..=30.
    pub relative_dist: u32,
}

/// The DiT, or one rank's part of it under a [`DitLayout`] (docs/parallelism.md): its tp
/// share of its pp sub-stage's blocks and root parts, resident or FSDP-sharded, with the
/// attention core of its Ulysses group. Every rank of a layout calls the same methods with
/// the same arguments in the same order (they are collectives over its groups); each returns
/// what the unsharded model returns.
#[derive(Debug)]
pub struct CausalWanModelS2V {
    pub cfg: WanConfig,
    /// This rank's blocks (`block_range()`), resident; empty under FSDP.
    pub blocks: Vec<WanAttentionBlock>,
    /// This rank's root part, resident; `None` under FSDP.
    pub root: Option<Root>,
    fsdp: Option<FsdpUnits>,
    layout: DitLayout,
    holding: Holding,
    attn: Attention,
    act: DType,
    device: Device,
}

impl CausalWanModelS2V {
    /// The whole model on one rank.
    pub fn load(cfg: &WanConfig, vb: &VarBuilder) -> Result<Self> {
        Self::load_rank(cfg, vb, &DitLayout::single())
    }

    /// This rank's part under `layout`, reading only its bytes (its tp shards of its
    /// sub-stage's tensors; under FSDP one unit at a time, keeping 1/sp of each). Collective
    /// over the layout's groups only under FSDP (none happen while loading otherwise).
    pub fn load_rank(cfg: &WanConfig, vb: &VarBuilder, layout: &DitLayout) -> Result<Self> {
        let tp = layout.tp.world();
        layout.cache_heads(cfg.num_heads)?;
        if !cfg.ffn_dim.is_multiple_of(tp) {
            return Err(Error::invalid(
                "CausalWanModelS2V",
                format!("ffn_dim {} does not split over tp {tp}", cfg.ffn_dim),
            ));
        }
        let blocks = layout.blocks(cfg.num_layers);
        if blocks.is_empty() || blocks.end > cfg.num_layers {
            return Err(Error::invalid(
                "CausalWanModelS2V",
                format!("block range {blocks:?} of {} blocks", cfg.num_layers),
            ));
        }
        let holding = Holding::new(cfg, layout.is_first(), layout.is_last(), blocks);
        let attn = match layout.sp.world() {
            1 => Attention::local(),
            _ => Attention::ulysses(layout.sp.clone()),
        };
        let (root, blocks, fsdp) = if layout.fsdp {
            let units = FsdpUnits::load(vb, cfg, &holding, &layout.tp, &layout.sp)?;
            (None, Vec::new(), Some(units))
        } else {
            let blocks = holding
                .blocks
                .clone()
                .map(|i| WanAttentionBlock::load(&vb.pp("blocks").pp(i), cfg, &layout.tp))
                .collect::<Result<_>>()?;
            (
                Some(Root::load(vb, cfg, &holding, &layout.tp)?),
                blocks,
                None,
            )
        };
        Ok(Self {
            cfg: cfg.clone(),
            blocks,
            root,
            fsdp,
            layout: layout.clone(),
            holding,
            attn,
            act: vb.dtype(),
            device: vb.device(),
        })
    }

    /// Validate the folder (config.json, every name and shape, the LoRA's fit) before
    /// loading anything, then load with the LoRA merged, in `dtype` on `device`.
    pub fn from_checkpoint(
        cfg: &WanConfig,
        ckpt: &Checkpoint,
        lora: Option<&Lora>,
        dtype: DType,
        device: Device,
    ) -> Result<Self> {
        Self::from_checkpoint_rank(cfg, ckpt, lora, dtype, device, &DitLayout::single())
    }

    /// [`CausalWanModelS2V::from_checkpoint`] for one rank of `layout`.
    pub fn from_checkpoint_rank(
        cfg: &WanConfig,
        ckpt: &Checkpoint,
        lora: Option<&Lora>,
        dtype: DType,
        device: Device,
        layout: &DitLayout,
    ) -> Result<Self> {
        cfg.check_config_json(ckpt.config(), &ckpt.dir().display().to_string())?;
        ckpt.check_tensors(&cfg.expected_tensors())?;
        if let Some(l) = lora {
            l.check_against(ckpt)?;
        }
        Self::load_rank(cfg, &VarBuilder::new(ckpt, lora, dtype, device), layout)
    }

    /// The `--fp8` option (model-spec §8.1), applied after the LoRA merge: per-tensor FP8
    /// e4m3 weights for the 460 linears of the blocks (self/cross q, k, v, o, ffn.0, ffn.2)
    /// and the audio injectors (q, k, v, o, AdaLN); text/time embeddings, time projection,
    /// head.head, the audio encoder and all convolutions stay as they are. Under tp each rank
    /// quantises its shard (its own scale). Not with FSDP (a unit holds one dtype).
    pub fn quantize_fp8(&mut self) -> Result<()> {
        let Some(root) = &mut self.root else {
            return Err(Error::invalid(
                "CausalWanModelS2V",
                "--fp8 with FSDP is not supported",
            ));
        };
        for b in &mut self.blocks {
            b.quantize_fp8()?;
        }
        root.audio_injector.quantize_fp8()
    }

    /// The activation dtype (the weights' dtype).
    pub fn dtype(&self) -> DType {
        self.act
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn layout(&self) -> &DitLayout {
        &self.layout
    }
    /// The blocks this rank runs.
    pub fn block_range(&self) -> Range<usize> {
        self.holding.blocks.clone()
    }

    /// The root part, gathered for the duration of a forward under FSDP.
    fn root_part(&self) -> Result<Cow<'_, Root>> {
        match (&self.root, &self.fsdp) {
            (Some(r), _) => Ok(Cow::Borrowed(r)),
            (None, Some(u)) => Ok(Cow::Owned(u.root(
                &self.cfg,
                &self.holding,
                &self.layout.tp,
            )?)),
            (None, None) => Err(Error::invalid("CausalWanModelS2V", "no root part")),
        }
    }

    /// This rank's `k`-th block, gathered just before it runs under FSDP.
    fn block(&self, k: usize) -> Result<Cow<'_, WanAttentionBlock>> {
        if let Some(u) = &self.fsdp {
            return Ok(Cow::Owned(u.block(
                k,
                &self.cfg,
                &self.holding,
                &self.layout.tp,
            )?));
        }
        self.blocks.get(k).map(Cow::Borrowed).ok_or_else(|| {
            Error::invalid("CausalWanModelS2V", format!("no block {k} on this rank"))
        })
    }

    /// What a [`StepCache`] of this rank holds: its blocks, H/(tp·sp) heads of each (the
    /// head width is unchanged). Equal to `cfg` on one rank.
    pub fn cache_config(&self) -> Result<WanConfig> {
        let h = self.layout.cache_heads(self.cfg.num_heads)?;
        let mut c = self.cfg.clone();
        c.dim = h * self.cfg.head_dim();
        c.num_heads = h;
        c.num_layers = self.holding.blocks.len();
        Ok(c)
    }

    /// A step cache for this rank's part (see [`CausalWanModelS2V::cache_config`]).
    pub fn new_step_cache(&self, geom: StreamGeometry) -> Result<StepCache> {
        StepCache::new(&self.cache_config()?, geom, self.act, &self.device)
    }

    fn send_on(&self, tensors: &[&Tensor]) -> Result<()> {
        match &self.layout.pp {
            Some(p) if !p.boundary.is_last() => p.boundary.send(tensors),
            _ => Ok(()),
        }
    }

    /// The previous sub-stage's `n` tensors.
    fn recv_prev(&self, n: usize) -> Result<Vec<Tensor>> {
        let Some(p) = &self.layout.pp else {
            return Err(Error::invalid(
                "CausalWanModelS2V",
                "no embeddings and no previous sub-stage",
            ));
        };
        let v = p.boundary.recv()?;
        if v.len() != n {
            return Err(Error::invalid(
                "CausalWanModelS2V",
                format!(
                    "the previous sub-stage sent {} tensors, expected {n}",
                    v.len()
                ),
            ));
        }
        Ok(v)
    }

    /// context `[L_txt, text_dim]` → `[1, text_len, dim]` (§3.3 step 5). Under a layer
    /// pipeline the first sub-stage embeds it and the result goes down the pipeline (the
    /// others ignore `context`); every rank returns it.
    pub fn embed_text(&self, context: &Tensor) -> Result<Tensor> {
        let text = match &self.root_part()?.embed {
            Some(e) => e.text_embedding.forward(context)?,
            None => self.recv_prev(1)?.remove(0),
        };
        self.send_on(&[&text])?;
        Ok(text)
    }

    /// Text K/V of this rank's blocks (their tp heads), once per generation.
    pub fn text_kv(&self, text: &Tensor) -> Result<TextKv> {
        // Kept for the whole generation: charged like the step caches (docs/memory.md).
        let _kv = crate::memory::scope(crate::memory::Category::KvCache);
        Ok(TextKv {
            layers: (0..self.holding.blocks.len())
                .map(|k| self.block(k)?.text_kv(text))
                .collect::<Result<_>>()?,
        })
    }

    fn rope(&self, pos: &[super::rope::Pos]) -> Result<RopeTable> {
        let c = &self.cfg;
        RopeTable::new(
            pos,
            c.head_dim(),
            c.rope_theta,
            c.rope_max_positions,
            &self.device,
        )
    }

    /// The prefill ("sink") pass (§4.2): ref tokens then frame-pack tokens, t = 0 modulation,
    /// RoPE with the reference at time 30; stores every layer's sink K/V in `cache` (this
    /// rank's layers and heads, the whole sink).
    pub fn prefill(
        &self,
        cache: &mut StepCache,
        ref_latent: &Tensor,
        motion: &Tensor,
        text: &TextKv,
        mut rec: Option<&mut Record>,
    ) -> Result<()> {
        let g = *cache.geometry();
        let (_, _, h, w) = ref_latent.dims4()?;
        if (h, w) != (g.lat_h, g.lat_w) {
            return Err(geometry_error(h, w, &g));
        }
        let root = self.root_part()?;
        let seq = SeqShard::over(g.lc(), &self.layout.sp)?;
        let (mut x, e0) = match &root.embed {
            Some(em) => {
                let mask = &em.trainable_cond_mask;
                let refs = em
                    .patch_embedding
                    .forward(ref_latent)?
                    .add(&cond_mask_row(mask, 1)?)?;
                let motion = em
                    .frame_packer
                    .forward(motion)?
                    .add(&cond_mask_row(mask, 2)?)?;
                let x = Tensor::cat(&[&refs, &motion], 1)?;
                if let Some(r) = rec.as_deref_mut() {
                    r.insert("patch_embed".into(), x.clone());
                }
                (seq.split(&x, 1)?, em.time.forward(&[0.0], &self.device)?.1)
            }
            None => {
                let mut v = self.recv_prev(2)?;
                let e0 = v.remove(1);
                (v.remove(0), e0)
            }
        };
        // One t = 0 row for every token.
        let runs = FrameRuns::chunk(seq.offset(), seq.local_len(), 1, g.lc())?;
        let rope = self.rope(&cond_positions(REF_TIME, &g))?;
        let mut inner = PrefillKv { cache, rope: &rope };
        let mut kv = UlyssesKv {
            attn: &self.attn,
            seq,
            inner: &mut inner,
        };
        for (k, i) in self.holding.blocks.clone().enumerate() {
            x = self
                .block(k)?
                .forward(k, &x, &e0, &runs, &mut kv, &text.layers[k])?;
            if let (0, Some(r)) = (i, rec.as_deref_mut()) {
                r.insert("block0_out".into(), x.clone());
            }
        }
        self.send_on(&[&x, &e0])
    }

    /// One streaming call (§3.3, §4.4): returns the flow prediction `[C, F, h, w]` (on
    /// every rank of the layout).
    pub fn forward_stream(
        &self,
        cache: &mut StepCache,
        call: &StreamCall,
        text: &TextKv,
        mut rec: Option<&mut Record>,
    ) -> Result<Tensor> {
        let g = *cache.geometry();
        let (_, frames, h, w) = call.x.dims4()?;
        if (h, w) != (g.lat_h, g.lat_w) || frames != g.frames_per_block {
            return Err(geometry_error(h, w, &g));
        }
        if !cache.is_prefilled() {
            return Err(Error::invalid(
                "forward_stream",
                "streaming call before the prefill",
            ));
        }
        let fsl = g.fsl();
        let cur = (call.current_start / fsl) as i64;
        let (write, window) = cache.window(call.current_start)?;
        let root = self.root_part()?;
        let seq = SeqShard::over(g.lq(), &self.layout.sp)?;
        let runs = FrameRuns::chunk(seq.offset(), seq.local_len(), frames, fsl)?;
        let noisy = self.rope(&noisy_positions(cur, &g))?;
        let ref_time = ref_time_for_call(cur, call.relative_dist);
        let cond = self.rope(&cond_positions(ref_time, &g))?;

        let (mut x, e0, e, tokens, global) = match &root.embed {
            Some(em) => {
                let (tokens, global) = em.casual_audio_encoder.forward(call.audio, self.act)?;
                let x = em
                    .patch_embedding
                    .forward(call.x)?
                    .add(&em.cond_encoder.forward(call.cond_states)?)?
                    .add(&cond_mask_row(&em.trainable_cond_mask, 0)?)?;
                // Real-t rows only: the zero_timestep rows are used by the prefill.
                let (e, e0) = em.time.forward(&vec![call.t; frames], &self.device)?;
                if let Some(r) = rec.as_deref_mut() {
                    let key_len = cache.key_len(call.current_start)? as f32;
                    for (k, v) in [
                        ("audio_tokens", tokens.clone()),
                        ("audio_global", global.clone()),
                        ("time_e", e.clone()),
                        ("time_e0", e0.clone()),
                        ("patch_embed", x.clone()),
                        ("rope_noisy_cos", noisy.cos.clone()),
                        ("rope_noisy_sin", noisy.sin.clone()),
                        ("rope_cond_cos", cond.cos.clone()),
                        ("rope_cond_sin", cond.sin.clone()),
                        ("key_len", Tensor::from_vec(vec![key_len], 1, &Device::Cpu)?),
                        (
                            "ref_time",
                            Tensor::from_vec(vec![ref_time as f32], 1, &Device::Cpu)?,
                        ),
                    ] {
                        r.insert(k.into(), v);
                    }
                }
                (seq.split(&x, 1)?, e0, e, tokens, global)
            }
            None => {
                let mut v = self.recv_prev(5)?.into_iter();
                let mut next = || {
                    v.next()
                        .ok_or_else(|| Error::invalid("forward_stream", "short message"))
                };
                (next()?, next()?, next()?, next()?, next()?)
            }
        };
        let mut inner = StreamKv {
            cache,
            noisy: &noisy,
            cond: &cond,
            write,
            window,
        };
        let mut kv = UlyssesKv {
            attn: &self.attn,
            seq,
            inner: &mut inner,
        };
        let inject = &self.cfg.audio_inject_layers;
        for (k, i) in self.holding.blocks.clone().enumerate() {
            x = self
                .block(k)?
                .forward(k, &x, &e0, &runs, &mut kv, &text.layers[k])?;
            if let (0, Some(r)) = (i, rec.as_deref_mut()) {
                r.insert("block0_out".into(), x.clone());
            }
            if let Some(j) = inject.iter().position(|&l| l == i) {
                x = root
                    .audio_injector
                    .forward(j, &x, &tokens, &global, &runs)?;
                if let (0, Some(r)) = (j, rec.as_deref_mut()) {
                    r.insert("inject0_out".into(), x.clone());
                }
            }
        }
        let out = match &root.head {
            Some(head) => {
                if let Some(r) = rec.as_deref_mut() {
                    r.insert("head_in".into(), x.clone());
                }
                let y = seq.gather(&head.forward(&x, &e, &runs)?, 1, &self.layout.sp)?;
                if let Some(r) = rec {
                    r.insert("head_out".into(), y.clone());
                }
                Some(head.unpatchify(&y, frames, g.hp(), g.wp())?)
            }
            None => {
                self.send_on(&[&x, &e0, &e, &tokens, &global])?;
                None
            }
        };
        // The small prediction goes to every sub-stage, so the runner above is layout-agnostic.
        match (&self.layout.pp, out) {
            (Some(p), out) => {
                let shape = Shape::from(vec![self.cfg.out_dim, frames, h, w]);
                p.boundary
                    .broadcast_from_last(out.as_ref(), &shape, self.act, &self.device)
            }
            (None, Some(y)) => Ok(y),
            (None, None) => Err(Error::invalid("forward_stream", "no head on this rank")),
        }
    }
}

fn geometry_error(h: usize, w: usize, g: &StreamGeometry) -> Error {
    Error::invalid(
        "CausalWanModelS2V",
        format!(
            "latent {h}x{w} ({} frames per block) does not match the step cache's {}x{}",
            g.frames_per_block, g.lat_h, g.lat_w
        ),
    )
}
