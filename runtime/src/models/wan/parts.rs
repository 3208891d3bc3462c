//! The parts of one DiT rank (model-spec §7.3 units): the root part (embeddings and encoders
//! on the first pp sub-stage, the head on the last, the audio injectors of this rank's blocks)
//! and the blocks; and where their weights live between calls: resident, or FSDP-sharded over
//! the Ulysses group and rebuilt from an all-gather when used.

use std::collections::BTreeMap;
use std::ops::Range;

use super::super::VarBuilder;
use super::audio::{AudioInjector, CausalAudioEncoder};
use super::block::WanAttentionBlock;
use super::config::WanConfig;
use super::embed::{PatchConv, TextEmbedding, TimeEmbedding};
use super::framepack::FramePacker;
use super::head::Head;
use crate::parallel::{ShardedUnit, SharedComm, tp::block_hint};
use crate::{DType, Device, Result, Tensor};

/// Checkpoint prefixes of the first sub-stage's modules.
const EMBED_MODULES: [&str; 8] = [
    "patch_embedding.",
    "cond_encoder.",
    "text_embedding.",
    "time_embedding.",
    "time_projection.",
    "trainable_cond_mask.",
    "casual_audio_encoder.",
    "frame_packer.",
];

/// The embeddings and encoders (first pp sub-stage; replicated over tp and sp).
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub patch_embedding: PatchConv,
    pub cond_encoder: PatchConv,
    pub text_embedding: TextEmbedding,
    pub time: TimeEmbedding,
    pub trainable_cond_mask: Tensor,
    pub casual_audio_encoder: CausalAudioEncoder,
    pub frame_packer: FramePacker,
}

impl Embeddings {
    pub fn load(vb: &VarBuilder, c: &WanConfig, tp: &SharedComm) -> Result<Self> {
        let d = c.dim;
        Ok(Self {
            patch_embedding: PatchConv::load(&vb.pp("patch_embedding"), d, c.in_dim, [1, 2, 2])?,
            cond_encoder: PatchConv::load(&vb.pp("cond_encoder"), d, c.cond_dim, [1, 2, 2])?,
            text_embedding: TextEmbedding::load(&vb.pp("text_embedding"), c)?,
            time: TimeEmbedding::load(vb, c, tp)?,
            trainable_cond_mask: vb.pp("trainable_cond_mask").get("weight", &[3, d])?,
            casual_audio_encoder: CausalAudioEncoder::load(&vb.pp("casual_audio_encoder"), c)?,
            frame_packer: FramePacker::load(&vb.pp("frame_packer"), c)?,
        })
    }
}

/// What this rank holds of the reference's FSDP root unit (everything outside the blocks).
#[derive(Debug, Clone)]
pub struct Root {
    /// First pp sub-stage only.
    pub embed: Option<Embeddings>,
    /// The injectors after this rank's blocks, for its tp heads.
    pub audio_injector: AudioInjector,
    /// Last pp sub-stage only.
    pub head: Option<Head>,
}

/// Which parts a rank holds.
#[derive(Debug, Clone)]
pub struct Holding {
    pub first: bool,
    pub last: bool,
    pub blocks: Range<usize>,
    /// Indices j of `audio_injector.injector.{j}` (after blocks in `blocks`).
    pub injectors: Range<usize>,
}

impl Holding {
    pub fn new(c: &WanConfig, first: bool, last: bool, blocks: Range<usize>) -> Self {
        let before = |b: usize| c.audio_inject_layers.iter().filter(|&&l| l < b).count();
        Self {
            first,
            last,
            injectors: before(blocks.start)..before(blocks.end),
            blocks,
        }
    }

    /// Checkpoint names and full shapes of the root part this rank holds.
    fn root_tensors(&self, c: &WanConfig) -> Vec<(String, Vec<usize>)> {
        let inj: Vec<String> = self
            .injectors
            .clone()
            .flat_map(|j| {
                [
                    format!("audio_injector.injector.{j}."),
                    format!("audio_injector.injector_adain_layers.{j}."),
                ]
            })
            .collect();
        c.expected_tensors()
            .into_iter()
            .filter(|(n, _)| {
                (self.first && EMBED_MODULES.iter().any(|p| n.starts_with(p)))
                    || (self.last && n.starts_with("head."))
                    || inj.iter().any(|p| n.starts_with(p.as_str()))
            })
            .collect()
    }
}

impl Root {
    pub fn load(vb: &VarBuilder, c: &WanConfig, h: &Holding, tp: &SharedComm) -> Result<Self> {
        Ok(Self {
            embed: h.first.then(|| Embeddings::load(vb, c, tp)).transpose()?,
            audio_injector: AudioInjector::load(
                &vb.pp("audio_injector"),
                c,
                h.injectors.clone(),
                tp,
            )?,
            head: h.last.then(|| Head::load(&vb.pp("head"), c)).transpose()?,
        })
    }
}

fn block_tensors(c: &WanConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("blocks.{i}.");
    c.expected_tensors()
        .into_iter()
        .filter(|(n, _)| n.starts_with(&p))
        .collect()
}

/// This rank's part (its tp shard) of `tensors`, as read by `vb`.
fn read_unit(
    vb: &VarBuilder,
    tensors: &[(String, Vec<usize>)],
    tp: &SharedComm,
) -> Result<Vec<(String, Tensor)>> {
    tensors
        .iter()
        .map(|(n, s)| {
            let t = match block_hint(n, tp.rank(), tp.world()) {
                Some(h) => vb.get_sharded(n, s, h)?,
                None => vb.get(n, s)?,
            };
            Ok((n.clone(), t))
        })
        .collect()
}

/// FSDP units of one rank: its root part and each of its blocks, 1/sp of each kept here.
#[derive(Debug)]
pub struct FsdpUnits {
    root: ShardedUnit,
    blocks: Vec<ShardedUnit>,
    dtype: DType,
    device: Device,
}

impl FsdpUnits {
    /// Reads one unit at a time (this rank's tp part of it, LoRA merged, in the model dtype)
    /// and keeps this rank's chunk: the peak is one unit.
    pub fn load(
        vb: &VarBuilder,
        c: &WanConfig,
        h: &Holding,
        tp: &SharedComm,
        sp: &SharedComm,
    ) -> Result<Self> {
        let unit =
            |t: &[(String, Vec<usize>)]| ShardedUnit::from_full(&read_unit(vb, t, tp)?, sp.clone());
        Ok(Self {
            root: unit(&h.root_tensors(c))?,
            blocks: h
                .blocks
                .clone()
                .map(|i| unit(&block_tensors(c, i)))
                .collect::<Result<_>>()?,
            dtype: vb.dtype(),
            device: vb.device(),
        })
    }

    /// Collective over sp: the root part, whole.
    pub fn root(&self, c: &WanConfig, h: &Holding, tp: &SharedComm) -> Result<Root> {
        let g = self.root.gather()?;
        Root::load(&self.vb(g.tensors()), c, h, tp)
    }

    /// Collective over sp: the `k`-th block of this rank, whole.
    pub fn block(
        &self,
        k: usize,
        c: &WanConfig,
        h: &Holding,
        tp: &SharedComm,
    ) -> Result<WanAttentionBlock> {
        let unit = self.blocks.get(k).ok_or_else(|| {
            crate::Error::invalid("FsdpUnits", format!("no block {k} on this rank"))
        })?;
        let g = unit.gather()?;
        let vb = self.vb(g.tensors()).pp("blocks").pp(h.blocks.start + k);
        WanAttentionBlock::load(&vb, c, tp)
    }

    fn vb<'a>(&self, parts: &'a BTreeMap<String, Tensor>) -> VarBuilder<'a> {
        VarBuilder::from_parts(parts, self.dtype, self.device)
    }
}
