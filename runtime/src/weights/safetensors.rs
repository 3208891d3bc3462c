//! A memory-mapped `.safetensors` file: header parsed at open, bytes touched on access.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{CheckpointErrorKind, ckpt_err};
use crate::{DType, Device, Error, Result, Tensor};

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
