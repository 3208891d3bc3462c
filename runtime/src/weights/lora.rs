//! The LiveAvatar LoRA (model-spec §2.4): PEFT keys, checks against the checkpoint, and the
//! merge W + (alpha/r)·B·A with an f32 delta and one rounding.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{Checkpoint, CheckpointErrorKind, SafetensorsFile, ShardHint, ckpt_err};
use crate::{DType, Error, Result, Tensor};

/// LoRA hyper-parameters (model-spec §2.4: rank 128, alpha 64 for LiveAvatar).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
}

impl LoraConfig {
    pub const LIVEAVATAR: LoraConfig = LoraConfig {
        rank: 128,
        alpha: 64.0,
    };
}

/// A PEFT LoRA file: `<module>.lora_A.default.weight` `[r, in]` and
/// `<module>.lora_B.default.weight` `[out, r]`, optionally prefixed `base_model.model.`.
#[derive(Debug)]
pub struct Lora {
    file: SafetensorsFile,
    cfg: LoraConfig,
    /// module name → (A key, B key)
    modules: BTreeMap<String, (String, String)>,
}

const LORA_PREFIX: &str = "base_model.model.";

impl Lora {
    pub fn open(path: impl AsRef<Path>, cfg: LoraConfig) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let mut a: BTreeMap<String, String> = BTreeMap::new();
        let mut b: BTreeMap<String, String> = BTreeMap::new();
        for key in file.names() {
            let k = key.strip_prefix(LORA_PREFIX).unwrap_or(key);
            if let Some(m) = k.strip_suffix(".lora_A.default.weight") {
                a.insert(m.to_string(), key.to_string());
            } else if let Some(m) = k.strip_suffix(".lora_B.default.weight") {
                b.insert(m.to_string(), key.to_string());
            } else {
                return Err(ckpt_err(
                    file.path(),
                    CheckpointErrorKind::Lora {
                        module: k.to_string(),
                        msg: "key is neither lora_A.default.weight nor lora_B.default.weight"
                            .into(),
                    },
                ));
            }
        }
        let all: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let mut modules = BTreeMap::new();
        for m in all {
            match (a.get(m), b.get(m)) {
                (Some(ka), Some(kb)) => {
                    modules.insert(m.clone(), (ka.clone(), kb.clone()));
                }
                _ => {
                    return Err(ckpt_err(
                        file.path(),
                        CheckpointErrorKind::Lora {
                            module: m.clone(),
                            msg: "has only one of lora_A / lora_B".into(),
                        },
                    ));
                }
            }
        }
        Ok(Self { file, cfg, modules })
    }

    /// Names of the adapted linears (without `.weight`).
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// Check that every adapted module exists in `ckpt` and that A `[r, in]`, B `[out, r]`
    /// fit its weight `[out, in]` at the configured rank.
    pub fn check_against(&self, ckpt: &Checkpoint) -> Result<()> {
        for (m, (ka, kb)) in &self.modules {
            let err = |msg: String| {
                ckpt_err(
                    self.file.path(),
                    CheckpointErrorKind::Lora {
                        module: m.clone(),
                        msg,
                    },
                )
            };
            let Some(w) = ckpt.info(&format!("{m}.weight")) else {
                return Err(err("the checkpoint has no such linear".into()));
            };
            let sa = self
                .file
                .info(ka)
                .map(|i| i.shape.clone())
                .unwrap_or_default();
            let sb = self
                .file
                .info(kb)
                .map(|i| i.shape.clone())
                .unwrap_or_default();
            let r = self.cfg.rank;
            if w.shape.len() != 2 || sa != [r, w.shape[1]] || sb != [w.shape[0], r] {
                return Err(err(format!(
                    "A {sa:?} and B {sb:?} do not fit weight {:?} at rank {r}",
                    w.shape
                )));
            }
        }
        Ok(())
    }

    /// `W + (alpha/r)·(B·A)` for module `module` (the weight's name without `.weight`) if
    /// it is adapted: B·A and the scaling in f32, added to W widened to f32, one rounding
    /// back to W's dtype (PEFT's merge, model-spec §2.4). `None` if not adapted.
    pub fn merge(&self, module: &str, w: &Tensor) -> Result<Option<Tensor>> {
        self.merge_shard(module, w, None)
    }

    /// [`Lora::merge`] for one rank's part of a 2-d weight `[out, in]` split by `hint`
    /// (dim 0: rows of B; dim 1: columns of A), reading only the adapter's matching bytes.
    pub fn merge_shard(
        &self,
        module: &str,
        w: &Tensor,
        hint: Option<ShardHint>,
    ) -> Result<Option<Tensor>> {
        let Some((ka, kb)) = self.modules.get(module) else {
            return Ok(None);
        };
        let dev = w.device();
        let part = |key: &str, dim: usize| match hint {
            Some(h) if h.dim == dim => self.file.tensor_shard(key, ShardHint { dim, ..h }, &dev),
            _ => self.file.tensor(key, &dev),
        };
        if hint.is_some_and(|h| h.dim > 1) {
            return Err(Error::invalid(
                "merge_shard",
                format!("{module}: 2-d weights only"),
            ));
        }
        let a = part(ka, 1)?.to_dtype(DType::F32)?;
        let b = part(kb, 0)?.to_dtype(DType::F32)?;
        let scale = self.cfg.alpha / self.cfg.rank as f32;
        let delta = b.matmul(&a)?.affine(scale, 0.0)?;
        let merged = w.to_dtype(DType::F32)?.add(&delta)?.to_dtype(w.dtype())?;
        Ok(Some(merged))
    }
}
