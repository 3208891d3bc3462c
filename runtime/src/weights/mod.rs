//! Checkpoint loading: memory-mapped safetensors files, the diffusers-style sharded folder of
//! Wan2.2-S2V-14B (config.json + index json + shards, model-spec §2.3) and the LiveAvatar LoRA
//! merge (§2.4).
//!
//! Nothing is read eagerly: opening a folder parses the headers only, and a tensor's bytes are
//! touched when it is loaded, so a rank that loads a shard slice ([`ShardHint`]) reads only
//! those byte ranges of the mapping. Every structural problem (missing shard, truncated file,
//! missing/extra/mis-shaped tensor, LoRA for another model) is one [`Error::Checkpoint`] that
//! names the file or tensor and both shapes.

mod lora;
mod random;
mod safetensors;

pub use lora::{Lora, LoraConfig};
pub use random::{RandomWeights, init_of as random_init_of, values as random_values};
pub use safetensors::{SafetensorsFile, ShardHint, StDType, TensorInfo};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Device, Error, Result, Tensor};

/// File names of the diffusers layout.
pub const CONFIG_NAME: &str = "config.json";
pub const INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";

/// What is wrong with a checkpoint (the path is in [`Error::Checkpoint`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointErrorKind {
    #[error("cannot read {file}: {msg}")]
    Io { file: String, msg: String },
    #[error("shard {file} named by the index for {count} tensors (e.g. {example}) does not exist")]
    MissingShard {
        file: String,
        count: usize,
        example: String,
    },
    #[error("{file} is truncated: its header needs {needed} bytes, the file has {len}")]
    Truncated {
        file: String,
        needed: usize,
        len: usize,
    },
    #[error("{file}: malformed safetensors header: {msg}")]
    BadHeader { file: String, msg: String },
    #[error("{file}: {msg}")]
    BadJson { file: String, msg: String },
    #[error("tensor {name} (expected shape {expected:?}) is missing{}", more_note(*more))]
    MissingTensor {
        name: String,
        expected: Vec<usize>,
        more: usize,
    },
    #[error("unexpected tensor {name} with shape {shape:?} (not part of the model){}", more_note(*more))]
    ExtraTensor {
        name: String,
        shape: Vec<usize>,
        more: usize,
    },
    #[error("tensor {name}: checkpoint shape {got:?}, model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor {name}: dtype {dtype} is not supported")]
    UnsupportedDType { name: String, dtype: String },
    #[error("tensor {name}: the index says {index_file}, but it is in {file}")]
    IndexMismatch {
        name: String,
        index_file: String,
        file: String,
    },
    #[error("config.json field {field}: checkpoint has {got}, model spec has {expected}")]
    ConfigMismatch {
        field: String,
        expected: String,
        got: String,
    },
    #[error("LoRA module {module}: {msg} (a LoRA for another model?)")]
    Lora { module: String, msg: String },
    #[error("shard hint for {name}: {msg}")]
    BadShard { name: String, msg: String },
}

fn more_note(more: usize) -> String {
    if more == 0 {
        String::new()
    } else {
        format!(" (and {more} more)")
    }
}

pub(crate) fn ckpt_err(path: &Path, kind: CheckpointErrorKind) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        kind,
    }
}

/// A diffusers-style checkpoint folder: config.json, the index and its shards.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    files: Vec<SafetensorsFile>,
    /// tensor name → index into `files`
    location: BTreeMap<String, usize>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ckpt_err(
            path,
            CheckpointErrorKind::Io {
                file: file.clone(),
                msg: e.to_string(),
            },
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        ckpt_err(
            path,
            CheckpointErrorKind::BadJson {
                file,
                msg: e.to_string(),
            },
        )
    })
}

impl Checkpoint {
    /// Open a folder: read config.json and the index, map every shard and parse its header.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = read_json(&dir.join(CONFIG_NAME))?;
        let index = read_json(&dir.join(INDEX_NAME))?;
        let map = index["weight_map"].as_object().ok_or_else(|| {
            ckpt_err(
                &dir,
                CheckpointErrorKind::BadJson {
                    file: INDEX_NAME.into(),
                    msg: "no weight_map object".into(),
                },
            )
        })?;
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, f) in map {
            let f = f.as_str().unwrap_or_default().to_string();
            by_file.entry(f).or_default().push(name.clone());
        }
        let mut files = Vec::new();
        let mut location = BTreeMap::new();
        for (fname, names) in &by_file {
            let path = dir.join(fname);
            if !path.is_file() {
                return Err(ckpt_err(
                    &dir,
                    CheckpointErrorKind::MissingShard {
                        file: fname.clone(),
                        count: names.len(),
                        example: names[0].clone(),
                    },
                ));
            }
            let st = SafetensorsFile::open(&path)?;
            for n in st.names() {
                if map.get(n).and_then(|v| v.as_str()) != Some(fname.as_str()) {
                    return Err(ckpt_err(
                        &dir,
                        CheckpointErrorKind::IndexMismatch {
                            name: n.to_string(),
                            index_file: map
                                .get(n)
                                .and_then(|v| v.as_str())
                                .unwrap_or("nothing")
                                .to_string(),
                            file: fname.clone(),
                        },
                    ));
                }
            }
            for n in names {
                if st.info(n).is_none() {
                    return Err(ckpt_err(
                        &path,
                        CheckpointErrorKind::MissingTensor {
                            name: n.clone(),
                            expected: vec![],
                            more: 0,
                        },
                    ));
                }
                location.insert(n.clone(), files.len());
            }
            files.push(st);
        }
        Ok(Self {
            dir,
            config,
            files,
            location,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The parsed config.json.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.location
            .get(name)
            .and_then(|&f| self.files[f].info(name))
    }

    fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        self.location
            .get(name)
            .map(|&f| &self.files[f])
            .ok_or_else(|| {
                ckpt_err(
                    &self.dir,
                    CheckpointErrorKind::MissingTensor {
                        name: name.to_string(),
                        expected: vec![],
                        more: 0,
                    },
                )
            })
    }

    /// Check names and shapes against what the model expects: the first missing, extra or
    /// mis-shaped tensor is the error (with a count of further ones).
    pub fn check_tensors(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        let want: BTreeMap<&str, &Vec<usize>> =
            expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let missing: Vec<_> = want
            .iter()
            .filter(|(n, _)| !self.location.contains_key(**n))
            .collect();
        if let Some((n, s)) = missing.first() {
            return Err(ckpt_err(
                &self.dir,
                CheckpointErrorKind::MissingTensor {
                    name: n.to_string(),
                    expected: s.to_vec(),
                    more: missing.len() - 1,
                },
            ));
        }
        let extra: Vec<&str> = self.names().filter(|n| !want.contains_key(n)).collect();
        if let Some(n) = extra.first() {
            let shape = self.info(n).map(|i| i.shape.clone()).unwrap_or_default();
            return Err(ckpt_err(
                &self.dir,
                CheckpointErrorKind::ExtraTensor {
                    name: n.to_string(),
                    shape,
                    more: extra.len() - 1,
                },
            ));
        }
        for (n, s) in want {
            let got = self.info(n).map(|i| i.shape.clone()).unwrap_or_default();
            if &got != s {
                return Err(ckpt_err(
                    &self.dir,
                    CheckpointErrorKind::ShapeMismatch {
                        name: n.to_string(),
                        expected: s.clone(),
                        got,
                    },
                ));
            }
        }
        Ok(())
    }

    /// A whole tensor as stored, on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.file_of(name)?.tensor(name, device)
    }

    /// This rank's part of a tensor (reads only its byte ranges).
    pub fn tensor_shard(&self, name: &str, hint: ShardHint, device: &Device) -> Result<Tensor> {
        self.file_of(name)?.tensor_shard(name, hint, device)
    }
}
