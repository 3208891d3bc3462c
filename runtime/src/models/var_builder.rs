//! Named weight access with prefixes (`vb.pp("blocks.0").pp("self_attn")`), so model code
//! mirrors the checkpoint keys (candle's `VarBuilder` pattern).

use std::collections::BTreeMap;

use crate::memory::{Category, scope};
use crate::weights::{Checkpoint, CheckpointErrorKind, Lora, RandomWeights, ShardHint, StDType};
use crate::{DType, Device, Error, Result, Tensor};

/// A checkpoint another rank holds (weights read once and sent over the communicator to a
/// rank whose node lacks the folder): each tensor is fetched by name, as the holder's
/// [`VarBuilder`] reads it before the dtype conversion ([`VarBuilder::stored`]).
pub trait FetchWeights: Sync + std::fmt::Debug {
    /// Tensor `name` in its stored dtype with the LoRA merged, only `hint`'s part.
    fn fetch(&self, name: &str, hint: Option<ShardHint>, device: &Device) -> Result<Tensor>;
    /// Where the tensors come from, for error messages.
    fn origin(&self) -> String;
}

/// Where the tensors come from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    /// Seeded random weights (benchmarks without a checkpoint).
    Random(&'a RandomWeights),
    /// Tensors already in memory by full name, LoRA merged and in the model dtype (an FSDP
    /// unit after its all-gather); sharded ones are this rank's part.
    Parts(&'a BTreeMap<String, Tensor>),
    /// Fetched from the rank that holds the checkpoint (LoRA merged there).
    Fetch(&'a dyn FetchWeights),
}

/// Loads tensors of one checkpoint (with an optional LoRA merged at load) in `dtype`.
#[derive(Debug, Clone)]
pub struct VarBuilder<'a> {
    src: Source<'a>,
    lora: Option<&'a Lora>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl<'a> VarBuilder<'a> {
    /// `dtype` is the activation dtype of the model (bf16 in production, f32 for the golden
    /// tests); weights are converted to it after the LoRA merge (model-spec §2.4 order).
    pub fn new(ckpt: &'a Checkpoint, lora: Option<&'a Lora>, dtype: DType, device: Device) -> Self {
        Self {
            src: Source::Checkpoint(ckpt),
            lora,
            prefix: String::new(),
            dtype,
            device,
        }
    }

    /// Tensors from seeded random weights instead of a checkpoint (no LoRA).
    pub fn random(weights: &'a RandomWeights, dtype: DType, device: Device) -> Self {
        Self {
            src: Source::Random(weights),
            lora: None,
            prefix: String::new(),
            dtype,
            device,
        }
    }

    /// Tensors held in memory (see [`Source`]): `get` expects the full shape, `get_sharded`
    /// the shape of this rank's part.
    pub fn from_parts(parts: &'a BTreeMap<String, Tensor>, dtype: DType, device: Device) -> Self {
        Self {
            src: Source::Parts(parts),
            lora: None,
            prefix: String::new(),
            dtype,
            device,
        }
    }

    /// Tensors fetched from the rank that holds the checkpoint: `get` and `get_sharded` check
    /// the shapes that arrive and convert them to `dtype`.
    pub fn fetched(src: &'a dyn FetchWeights, dtype: DType, device: Device) -> Self {
        Self {
            src: Source::Fetch(src),
            lora: None,
            prefix: String::new(),
            dtype,
            device,
        }
    }

    /// What a holder sends for [`FetchWeights::fetch`]: tensor `name` of `ckpt` in its stored
    /// dtype, `lora` merged, only `hint`'s part (the same reads and merge as a local load, so
    /// a fetched model equals a locally read one).
    pub fn stored(
        ckpt: &Checkpoint,
        lora: Option<&Lora>,
        name: &str,
        hint: Option<ShardHint>,
        device: Device,
    ) -> Result<Tensor> {
        let info = ckpt.info(name).ok_or_else(|| Error::Checkpoint {
            path: ckpt.dir().display().to_string(),
            kind: CheckpointErrorKind::MissingTensor {
                name: name.to_string(),
                expected: Vec::new(),
                more: 0,
            },
        })?;
        let StDType::Float(dtype) = info.dtype else {
            return Err(Error::Checkpoint {
                path: ckpt.dir().display().to_string(),
                kind: CheckpointErrorKind::UnsupportedDType {
                    name: name.to_string(),
                    dtype: "I64".into(),
                },
            });
        };
        let vb = VarBuilder::new(ckpt, lora, dtype, device);
        match hint {
            Some(h) => vb.get_sharded(name, &info.shape, h),
            None => vb.get(name, &info.shape),
        }
    }

    fn origin(&self) -> String {
        match self.src {
            Source::Checkpoint(c) => c.dir().display().to_string(),
            Source::Random(_) => "<random weights>".into(),
            Source::Parts(_) => "<gathered parts>".into(),
            Source::Fetch(f) => f.origin(),
        }
    }

    fn part(
        &self,
        parts: &BTreeMap<String, Tensor>,
        full: &str,
        shape: &[usize],
    ) -> Result<Tensor> {
        let t = parts.get(full).ok_or_else(|| Error::Checkpoint {
            path: self.origin(),
            kind: CheckpointErrorKind::MissingTensor {
                name: full.to_string(),
                expected: shape.to_vec(),
                more: 0,
            },
        })?;
        if t.dims() != shape {
            return Err(Error::Checkpoint {
                path: self.origin(),
                kind: CheckpointErrorKind::ShapeMismatch {
                    name: full.to_string(),
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                },
            });
        }
        t.to_dtype(self.dtype)
    }

    /// A builder for the sub-module `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Tensor `name` of this module with the expected shape, merged with its LoRA if adapted,
    /// converted to the model dtype (charged to the weights category).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.full(name);
        let _g = scope(Category::Weights);
        let stored = match self.src {
            Source::Checkpoint(c) => c.tensor(&full, &self.device)?,
            Source::Random(r) => r.tensor(&full, &self.device)?,
            Source::Parts(p) => return self.part(p, &full, shape),
            Source::Fetch(f) => f.fetch(&full, None, &self.device)?,
        };
        if stored.dims() != shape {
            return Err(Error::Checkpoint {
                path: self.origin(),
                kind: CheckpointErrorKind::ShapeMismatch {
                    name: full,
                    expected: shape.to_vec(),
                    got: stored.dims().to_vec(),
                },
            });
        }
        let merged = match (self.lora, full.strip_suffix(".weight")) {
            (Some(lora), Some(module)) => lora.merge(module, &stored)?,
            _ => None,
        };
        merged.unwrap_or(stored).to_dtype(self.dtype)
    }

    /// [`VarBuilder::get`] converted to `dtype` (e.g. f32 for the reference's fp32 regions),
    /// the copy also charged to the weights category.
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.get(name, shape)?;
        let _g = scope(Category::Weights);
        t.to_dtype(dtype)
    }

    /// This rank's part of tensor `name` (full shape `shape`) split by `hint`; only its byte
    /// ranges are read, and the LoRA delta is formed for that part only (tensor-parallel
    /// loading, style rule 6).
    /// A hint of world size 1 is the whole tensor ([`VarBuilder::get`]).
    pub fn get_sharded(&self, name: &str, shape: &[usize], hint: ShardHint) -> Result<Tensor> {
        if hint.world == 1 {
            return self.get(name, shape);
        }
        let full = self.full(name);
        let ckpt = match self.src {
            Source::Checkpoint(c) => c,
            // Generated whole (they are seeded by name), then cut.
            Source::Random(_) => {
                let t = self.get(name, shape)?;
                let _g = scope(Category::Weights);
                return crate::parallel::shard_of(&t, hint);
            }
            Source::Parts(p) => return self.part(p, &full, &part_shape(&full, shape, hint)?),
            Source::Fetch(f) => {
                let part = part_shape(&full, shape, hint)?;
                let t = f.fetch(&full, Some(hint), &self.device)?;
                if t.dims() != part {
                    return Err(Error::Checkpoint {
                        path: self.origin(),
                        kind: CheckpointErrorKind::ShapeMismatch {
                            name: full,
                            expected: part,
                            got: t.dims().to_vec(),
                        },
                    });
                }
                let _g = scope(Category::Weights);
                return t.to_dtype(self.dtype);
            }
        };
        let got = ckpt
            .info(&full)
            .map(|i| i.shape.clone())
            .unwrap_or_default();
        if got != shape {
            return Err(Error::Checkpoint {
                path: self.origin(),
                kind: CheckpointErrorKind::ShapeMismatch {
                    name: full,
                    expected: shape.to_vec(),
                    got,
                },
            });
        }
        let _g = scope(Category::Weights);
        let stored = ckpt.tensor_shard(&full, hint, &self.device)?;
        let merged = match (self.lora, full.strip_suffix(".weight")) {
            (Some(lora), Some(module)) => lora.merge_shard(module, &stored, Some(hint))?,
            _ => None,
        };
        merged.unwrap_or(stored).to_dtype(self.dtype)
    }
}

/// The shape of `hint`'s part of a tensor of `shape`.
fn part_shape(full: &str, shape: &[usize], hint: ShardHint) -> Result<Vec<usize>> {
    let mut part = shape.to_vec();
    match part.get_mut(hint.dim) {
        Some(d) if hint.world > 0 && d.is_multiple_of(hint.world) => *d /= hint.world,
        _ => {
            return Err(Error::invalid(
                "VarBuilder",
                format!("{full}: {shape:?} does not split {} ways", hint.world),
            ));
        }
    }
    Ok(part)
}
