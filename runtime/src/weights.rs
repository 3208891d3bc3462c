//! Checkpoint loading: memory-mapped safetensors files, the diffusers-style sharded folder of
//! Wan2.2-S2V-14B (config.json + index json + shards, model-spec §2.3) and the LiveAvatar LoRA
//! merge (§2.4).
//!
//! Nothing is read eagerly: opening a folder parses the headers only, and a tensor's bytes are
//! touched when it is loaded, so a rank that loads a shard slice ([`ShardHint`]) reads only
//! those byte ranges of the mapping. Every structural problem (missing shard, truncated file,
//! missing/extra/mis-shaped tensor, LoRA for another model) is one [`Error::Checkpoint`] that
//! names the file or tensor and both shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{DType, Device, Error, Result, Tensor};

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

fn ckpt_err(path: &Path, kind: CheckpointErrorKind) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        kind,
    }
}

/// Element type of a safetensors entry (tensor dtypes plus I64 for fixtures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDType {
    Float(DType),
    I64,
}

impl StDType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BF16" => Self::Float(DType::BF16),
            "F16" => Self::Float(DType::F16),
            "F32" => Self::Float(DType::F32),
            "F8_E4M3" => Self::Float(DType::F8E4M3),
            "I64" => Self::I64,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Self::Float(d) => d.size_in_bytes(),
            Self::I64 => 8,
        }
    }
}

/// One tensor's place in a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: StDType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

/// A memory-mapped `.safetensors` file with its parsed header.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsFile {
    /// Map the file and parse its header; the data are not read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file_name = path.display().to_string();
        let io = |e: std::io::Error| {
            ckpt_err(
                &path,
                CheckpointErrorKind::Io {
                    file: file_name.clone(),
                    msg: e.to_string(),
                },
            )
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the mapping is read-only; checkpoint files are not modified while loaded
        // (same contract as the safetensors/candle loaders).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let tensors = parse_header(&mmap, &file_name).map_err(|k| ckpt_err(&path, k))?;
        Ok(Self {
            path,
            mmap,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    fn entry(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| {
            ckpt_err(
                &self.path,
                CheckpointErrorKind::MissingTensor {
                    name: name.to_string(),
                    expected: vec![],
                    more: 0,
                },
            )
        })
    }

    /// The raw little-endian bytes of a tensor (touches only its pages).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        Ok(&self.mmap[self.entry(name)?.range.clone()])
    }

    /// A float tensor as stored, on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let StDType::Float(dt) = e.dtype else {
            return Err(ckpt_err(
                &self.path,
                CheckpointErrorKind::UnsupportedDType {
                    name: name.to_string(),
                    dtype: "I64".into(),
                },
            ));
        };
        Tensor::from_bytes(&self.mmap[e.range.clone()], e.shape.clone(), dt, device)
    }

    /// A float tensor widened to f32 on the host, with its shape.
    pub fn f32_vec(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self.tensor(name, &Device::Cpu)?;
        Ok((t.to_vec_f32()?, t.dims().to_vec()))
    }

    /// An I64 tensor on the host.
    pub fn i64_vec(&self, name: &str) -> Result<Vec<i64>> {
        let e = self.entry(name)?;
        if e.dtype != StDType::I64 {
            return Err(Error::invalid("i64_vec", format!("{name} is not I64")));
        }
        Ok(self.mmap[e.range.clone()]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    /// The part of a float tensor that `hint` assigns to one rank; only the bytes of that
    /// part are read (one contiguous run per index of the dims before the split dim).
    pub fn tensor_shard(&self, name: &str, hint: ShardHint, device: &Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let StDType::Float(dt) = e.dtype else {
            return Err(Error::invalid(
                "tensor_shard",
                format!("{name} is not a float"),
            ));
        };
        let bad = |msg: String| {
            ckpt_err(
                &self.path,
                CheckpointErrorKind::BadShard {
                    name: name.to_string(),
                    msg,
                },
            )
        };
        let n = *e
            .shape
            .get(hint.dim)
            .ok_or_else(|| bad(format!("no dim {}", hint.dim)))?;
        if hint.world == 0 || hint.rank >= hint.world || n % hint.world != 0 {
            return Err(bad(format!(
                "dim {} of size {n} does not split into {} parts (rank {})",
                hint.dim, hint.world, hint.rank
            )));
        }
        let part = n / hint.world;
        let outer: usize = e.shape[..hint.dim].iter().product();
        let inner: usize = e.shape[hint.dim + 1..].iter().product::<usize>() * e.dtype.size();
        let mut bytes = Vec::with_capacity(outer * part * inner);
        for o in 0..outer {
            let start = e.range.start + (o * n + hint.rank * part) * inner;
            bytes.extend_from_slice(&self.mmap[start..start + part * inner]);
        }
        let mut shape = e.shape.clone();
        shape[hint.dim] = part;
        Tensor::from_bytes(&bytes, shape, dt, device)
    }
}

/// Split one dim of a tensor evenly over `world` ranks and take part `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHint {
    pub dim: usize,
    pub rank: usize,
    pub world: usize,
}

fn parse_header(
    buf: &[u8],
    file: &str,
) -> std::result::Result<BTreeMap<String, TensorInfo>, CheckpointErrorKind> {
    let trunc = |needed: usize| CheckpointErrorKind::Truncated {
        file: file.to_string(),
        needed,
        len: buf.len(),
    };
    let bad = |msg: String| CheckpointErrorKind::BadHeader {
        file: file.to_string(),
        msg,
    };
    if buf.len() < 8 {
        return Err(trunc(8));
    }
    let n = u64::from_le_bytes([
        buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7],
    ]) as usize;
    let data_start = n
        .checked_add(8)
        .ok_or_else(|| bad("header length overflows".into()))?;
    if buf.len() < data_start {
        return Err(trunc(data_start));
    }
    let header: serde_json::Value =
        serde_json::from_slice(&buf[8..data_start]).map_err(|e| bad(e.to_string()))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut out = BTreeMap::new();
    let mut end = data_start;
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_s = v["dtype"].as_str().unwrap_or("?");
        let dtype =
            StDType::parse(dtype_s).ok_or_else(|| CheckpointErrorKind::UnsupportedDType {
                name: name.clone(),
                dtype: dtype_s.to_string(),
            })?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(|| bad(format!("{name}: no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("{name}: bad shape")))?;
        let offs = v["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()? as usize, a[1].as_u64()? as usize)))
            .ok_or_else(|| bad(format!("{name}: bad data_offsets")))?;
        let numel: usize = shape.iter().product();
        if offs.1 < offs.0 || offs.1 - offs.0 != numel * dtype.size() {
            return Err(bad(format!(
                "{name}: data_offsets {offs:?} do not hold shape {shape:?} of {dtype_s}"
            )));
        }
        let range = data_start + offs.0..data_start + offs.1;
        end = end.max(range.end);
        out.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                range,
            },
        );
    }
    if buf.len() < end {
        return Err(trunc(end));
    }
    Ok(out)
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
        let Some((ka, kb)) = self.modules.get(module) else {
            return Ok(None);
        };
        let dev = w.device();
        let a = self.file.tensor(ka, &dev)?.to_dtype(DType::F32)?;
        let b = self.file.tensor(kb, &dev)?.to_dtype(DType::F32)?;
        let scale = self.cfg.alpha / self.cfg.rank as f32;
        let delta = b.matmul(&a)?.affine(scale, 0.0)?;
        let merged = w.to_dtype(DType::F32)?.add(&delta)?.to_dtype(w.dtype())?;
        Ok(Some(merged))
    }
}
