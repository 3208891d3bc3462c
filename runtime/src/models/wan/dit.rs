//! `CausalWanModel_S2V`: the LiveAvatar streaming DiT (model-spec §3.3, §4.2, §4.4).

use std::collections::BTreeMap;

use super::super::VarBuilder;
use super::audio::{AudioInjector, CausalAudioEncoder};
use super::block::WanAttentionBlock;
use super::cache::{PrefillKv, StepCache, StreamKv};
use super::config::{REF_TIME, StreamGeometry, WanConfig};
use super::embed::{PatchConv, TextEmbedding, TimeEmbedding, cond_mask_row};
use super::framepack::FramePacker;
use super::head::Head;
use super::rope::{RopeTable, cond_positions, noisy_positions, ref_time_for_call};
use crate::weights::{Checkpoint, Lora};
use crate::{DType, Device, Error, Result, Tensor};

/// Named intermediates of one call, filled when the caller asks (golden tests).
pub type Record = BTreeMap<String, Tensor>;

/// Text K/V of every block's cross-attention, computed once per generation.
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

/// The DiT with its weights.
#[derive(Debug)]
pub struct CausalWanModelS2V {
    pub cfg: WanConfig,
    pub patch_embedding: PatchConv,
    pub cond_encoder: PatchConv,
    pub text_embedding: TextEmbedding,
    pub time: TimeEmbedding,
    pub trainable_cond_mask: Tensor,
    pub blocks: Vec<WanAttentionBlock>,
    pub head: Head,
    pub audio_injector: AudioInjector,
    pub casual_audio_encoder: CausalAudioEncoder,
    pub frame_packer: FramePacker,
    act: DType,
    device: Device,
}

impl CausalWanModelS2V {
    pub fn load(cfg: &WanConfig, vb: &VarBuilder) -> Result<Self> {
        let (d, c) = (cfg.dim, cfg);
        Ok(Self {
            patch_embedding: PatchConv::load(&vb.pp("patch_embedding"), d, c.in_dim, [1, 2, 2])?,
            cond_encoder: PatchConv::load(&vb.pp("cond_encoder"), d, c.cond_dim, [1, 2, 2])?,
            text_embedding: TextEmbedding::load(&vb.pp("text_embedding"), c)?,
            time: TimeEmbedding::load(vb, c)?,
            trainable_cond_mask: vb.pp("trainable_cond_mask").get("weight", &[3, d])?,
            blocks: (0..c.num_layers)
                .map(|i| WanAttentionBlock::load(&vb.pp("blocks").pp(i), c))
                .collect::<Result<_>>()?,
            head: Head::load(&vb.pp("head"), c)?,
            audio_injector: AudioInjector::load(&vb.pp("audio_injector"), c)?,
            casual_audio_encoder: CausalAudioEncoder::load(&vb.pp("casual_audio_encoder"), c)?,
            frame_packer: FramePacker::load(&vb.pp("frame_packer"), c)?,
            cfg: cfg.clone(),
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
        cfg.check_config_json(ckpt.config(), &ckpt.dir().display().to_string())?;
        ckpt.check_tensors(&cfg.expected_tensors())?;
        if let Some(l) = lora {
            l.check_against(ckpt)?;
        }
        Self::load(cfg, &VarBuilder::new(ckpt, lora, dtype, device))
    }

    /// The `--fp8` option (model-spec §8.1), applied after the LoRA merge: per-tensor FP8
    /// e4m3 weights for the 460 linears of the blocks (self/cross q, k, v, o, ffn.0, ffn.2)
    /// and the audio injectors (q, k, v, o, AdaLN); text/time embeddings, time projection,
    /// head.head, the audio encoder and all convolutions stay as they are.
    pub fn quantize_fp8(&mut self) -> Result<()> {
        for b in &mut self.blocks {
            b.self_attn.quantize_fp8()?;
            b.cross_attn.quantize_fp8()?;
            b.ffn_0.quantize_fp8()?;
            b.ffn_2.quantize_fp8()?;
        }
        for a in &mut self.audio_injector.injector {
            a.quantize_fp8()?;
        }
        for l in &mut self.audio_injector.injector_adain_layers {
            l.quantize_fp8()?;
        }
        Ok(())
    }

    /// The activation dtype (the weights' dtype).
    pub fn dtype(&self) -> DType {
        self.act
    }
    pub fn device(&self) -> Device {
        self.device
    }

    /// context `[L_txt, text_dim]` → `[1, text_len, dim]` (§3.3 step 5).
    pub fn embed_text(&self, context: &Tensor) -> Result<Tensor> {
        self.text_embedding.forward(context)
    }

    /// Per-block text K/V, once per generation.
    pub fn text_kv(&self, text: &Tensor) -> Result<TextKv> {
        // Kept for the whole generation: charged like the step caches (docs/memory.md).
        let _kv = crate::memory::scope(crate::memory::Category::KvCache);
        Ok(TextKv {
            layers: self
                .blocks
                .iter()
                .map(|b| b.text_kv(text))
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
    /// RoPE with the reference at time 30; stores every layer's sink K/V in `cache`.
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
        let mask = &self.trainable_cond_mask;
        let refs = self
            .patch_embedding
            .forward(ref_latent)?
            .add(&cond_mask_row(mask, 1)?)?;
        let motion = self
            .frame_packer
            .forward(motion)?
            .add(&cond_mask_row(mask, 2)?)?;
        let mut x = Tensor::cat(&[&refs, &motion], 1)?;
        let (_, e0) = self.time.forward(&[0.0], &self.device)?;
        let rope = self.rope(&cond_positions(REF_TIME, &g))?;
        if let Some(r) = rec.as_deref_mut() {
            r.insert("patch_embed".into(), x.clone());
        }
        let mut kv = PrefillKv { cache, rope: &rope };
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(i, &x, &e0, &mut kv, &text.layers[i])?;
            if let (0, Some(r)) = (i, rec.as_deref_mut()) {
                r.insert("block0_out".into(), x.clone());
            }
        }
        Ok(())
    }

    /// One streaming call (§3.3, §4.4): returns the flow prediction `[C, F, h, w]`.
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

        let (tokens, global) = self.casual_audio_encoder.forward(call.audio, self.act)?;
        let mut x = self
            .patch_embedding
            .forward(call.x)?
            .add(&self.cond_encoder.forward(call.cond_states)?)?
            .add(&cond_mask_row(&self.trainable_cond_mask, 0)?)?;
        // Real-t rows only: the zero_timestep rows are used by the prefill.
        let (e, e0) = self.time.forward(&vec![call.t; frames], &self.device)?;
        let noisy = self.rope(&noisy_positions(cur, &g))?;
        let ref_time = ref_time_for_call(cur, call.relative_dist);
        let cond = self.rope(&cond_positions(ref_time, &g))?;
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
        let mut kv = StreamKv {
            cache,
            noisy: &noisy,
            cond: &cond,
            write,
            window,
        };
        let inject = &self.cfg.audio_inject_layers;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(i, &x, &e0, &mut kv, &text.layers[i])?;
            if let (0, Some(r)) = (i, rec.as_deref_mut()) {
                r.insert("block0_out".into(), x.clone());
            }
            if let Some(j) = inject.iter().position(|&l| l == i) {
                x = self.audio_injector.forward(j, &x, &tokens, &global)?;
                if let (0, Some(r)) = (j, rec.as_deref_mut()) {
                    r.insert("inject0_out".into(), x.clone());
                }
            }
        }
        if let Some(r) = rec.as_deref_mut() {
            r.insert("head_in".into(), x.clone());
        }
        let y = self.head.forward(&x, &e)?;
        if let Some(r) = rec {
            r.insert("head_out".into(), y.clone());
        }
        self.head.unpatchify(&y, frames, g.hp(), g.wp())
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
