//! PyTorch zip checkpoints (`torch.save` of a state dict) read without Python: the T5
//! encoder `models_t5_umt5-xxl-enc-bf16.pth` and `Wan2.1_VAE.pth` (model-spec §1.3, §1.5).
//!
//! The archive is a zip of stored (uncompressed) entries, zip64 when large: `<root>/data.pkl`
//! (a pickle of the state dict) and one `<root>/data/<key>` file per storage. The pickle is
//! interpreted by a small stack machine that knows the opcodes `torch.save` emits and the few
//! globals it names (OrderedDict, `_rebuild_tensor_v2`, `_rebuild_parameter`, the float
//! storage types). Anything else (compressed entries, big-endian archives, other storage types,
//! other globals, non-tensor items) is an [`Error::Pth`], never a guess.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

mod pickle;

use crate::{DType, Device, Error, Result, Tensor};
use pickle::Value;

/// One tensor of the state dict: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PthTensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
    /// Storage key: the entry `<root>/data/<key>`.
    pub storage: String,
    /// Element offset into the storage.
    pub offset: usize,
}

/// A memory-mapped `.pth` archive with its state dict parsed (tensor bytes are read lazily).
#[derive(Debug)]
pub struct PthFile {
    path: PathBuf,
    mmap: Mmap,
    /// Zip entry name → byte range of its data in the file.
    entries: HashMap<String, (usize, usize)>,
    root: String,
    tensors: Vec<(String, PthTensorInfo)>,
    index: HashMap<String, usize>,
}

fn le_u16(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
}
fn le_u32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64)
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

impl PthFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let err = |msg: String| Error::Pth {
            path: path.display().to_string(),
            msg,
        };
        let file = File::open(&path).map_err(|e| err(format!("cannot open: {e}")))?;
        // SAFETY: the mapping is read-only; a checkpoint modified while mapped is outside
        // the contract (as for every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| err(format!("cannot map: {e}")))?;
        let entries = zip_entries(&mmap).map_err(&err)?;
        let pkl = entries
            .keys()
            .filter(|k| k.ends_with("/data.pkl"))
            .cloned()
            .collect::<Vec<_>>();
        let [pkl] = pkl.as_slice() else {
            return Err(err(format!(
                "expected one <root>/data.pkl, found {} (not a torch.save zip archive?)",
                pkl.len()
            )));
        };
        let root = pkl.trim_end_matches("data.pkl").to_string();
        if let Some(&(s, n)) = entries.get(&format!("{root}byteorder")) {
            let order = &mmap[s..s + n];
            if order != b"little" {
                return Err(err(format!(
                    "byte order {:?} is not supported",
                    String::from_utf8_lossy(order)
                )));
            }
        }
        let (s, n) = entries[pkl.as_str()];
        let value = pickle::load(&mmap[s..s + n]).map_err(|m| err(format!("data.pkl: {m}")))?;
        let Value::Dict(items) = value else {
            return Err(err(format!(
                "the pickle is not a state dict but {}",
                value.kind()
            )));
        };
        let mut tensors = Vec::with_capacity(items.len());
        for (k, v) in items {
            let Value::Str(name) = k else {
                return Err(err(format!("state dict key {} is not a string", k.kind())));
            };
            let Value::Tensor(info) = v else {
                return Err(err(format!(
                    "state dict entry {name} is a {}, not a tensor",
                    v.kind()
                )));
            };
            tensors.push((name, info));
        }
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(Self {
            path,
            mmap,
            entries,
            root,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in the order of the state dict.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    pub fn info(&self, name: &str) -> Option<&PthTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    fn err(&self, msg: String) -> Error {
        Error::Pth {
            path: self.path.display().to_string(),
            msg,
        }
    }

    /// The tensor `name` in its stored dtype (strided views are gathered into a contiguous copy).
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self
            .info(name)
            .ok_or_else(|| self.err(format!("no tensor named {name}")))?;
        let entry = format!("{}data/{}", self.root, info.storage);
        let &(start, len) = self
            .entries
            .get(&entry)
            .ok_or_else(|| self.err(format!("{name}: storage entry {entry} is missing")))?;
        let storage = &self.mmap[start..start + len];
        let es = info.dtype.size_in_bytes();
        let numel: usize = info.shape.iter().product();
        // Largest element index the view touches.
        let last = info.offset
            + info
                .shape
                .iter()
                .zip(&info.stride)
                .map(|(&d, &s)| d.saturating_sub(1) * s)
                .sum::<usize>();
        if numel > 0 && (last + 1) * es > len {
            return Err(self.err(format!(
                "{name}: view {:?} stride {:?} offset {} exceeds its storage of {} bytes",
                info.shape, info.stride, info.offset, len
            )));
        }
        let contiguous = {
            let mut want = 1;
            let mut ok = true;
            for (&d, &s) in info.shape.iter().zip(&info.stride).rev() {
                if d != 1 && s != want {
                    ok = false;
                }
                want *= d;
            }
            ok
        };
        let shape = info.shape.clone();
        if contiguous {
            let b = &storage[info.offset * es..(info.offset + numel) * es];
            return Tensor::from_bytes(b, shape, info.dtype, device);
        }
        let mut out = Vec::with_capacity(numel * es);
        let mut idx = vec![0usize; shape.len()];
        for _ in 0..numel {
            let e = info.offset
                + idx
                    .iter()
                    .zip(&info.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&storage[e * es..(e + 1) * es]);
            for d in (0..shape.len()).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Tensor::from_bytes(&out, shape, info.dtype, device)
    }
}

/// Zip entry name → (data offset, size); only stored (method 0) entries are accepted.
fn zip_entries(b: &[u8]) -> std::result::Result<HashMap<String, (usize, usize)>, String> {
    let short = || "truncated zip structure".to_string();
    // End of central directory: 22 bytes + up to 64 KiB comment, searched from the end.
    let lo = b.len().saturating_sub(22 + 65535);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("no zip end-of-central-directory record (not a torch.save zip archive?)")?;
    let mut count = le_u16(b, eocd + 10).ok_or_else(short)?;
    let mut cd_off = le_u32(b, eocd + 16).ok_or_else(short)?;
    // Zip64: a locator right before the EOCD points at the zip64 EOCD record, whose counts
    // and offsets take precedence.
    let loc = eocd.checked_sub(20);
    if let Some(loc) = loc.filter(|&l| b[l..l + 4] == [0x50, 0x4b, 0x06, 0x07]) {
        let rec = le_u64(b, loc + 8).ok_or_else(short)? as usize;
        if b.get(rec..rec + 4) != Some(&[0x50, 0x4b, 0x06, 0x06]) {
            return Err("zip64 end-of-central-directory record missing".into());
        }
        count = le_u64(b, rec + 32).ok_or_else(short)?;
        cd_off = le_u64(b, rec + 48).ok_or_else(short)?;
    } else if count == 0xffff || cd_off == 0xffff_ffff {
        return Err("zip64 locator missing".into());
    }
    let mut out = HashMap::new();
    let mut p = cd_off as usize;
    for _ in 0..count {
        if b.get(p..p + 4) != Some(&[0x50, 0x4b, 0x01, 0x02]) {
            return Err(format!("bad central directory entry at byte {p}"));
        }
        let method = le_u16(b, p + 10).ok_or_else(short)?;
        let mut csize = le_u32(b, p + 20).ok_or_else(short)?;
        let mut usize_ = le_u32(b, p + 24).ok_or_else(short)?;
        let name_len = le_u16(b, p + 28).ok_or_else(short)? as usize;
        let extra_len = le_u16(b, p + 30).ok_or_else(short)? as usize;
        let comment_len = le_u16(b, p + 32).ok_or_else(short)? as usize;
        let mut local = le_u32(b, p + 42).ok_or_else(short)?;
        let name = b.get(p + 46..p + 46 + name_len).ok_or_else(short)?;
        let name = String::from_utf8_lossy(name).into_owned();
        // Zip64 extra field: the 0xffffffff fields in order usize, csize, local offset.
        let extra = b
            .get(p + 46 + name_len..p + 46 + name_len + extra_len)
            .ok_or_else(short)?;
        let mut q = 0;
        while q + 4 <= extra.len() {
            let id = le_u16(extra, q).ok_or_else(short)?;
            let n = le_u16(extra, q + 2).ok_or_else(short)? as usize;
            if id == 1 {
                let mut r = q + 4;
                for f in [&mut usize_, &mut csize, &mut local] {
                    if *f == 0xffff_ffff {
                        *f = le_u64(extra, r).ok_or_else(short)?;
                        r += 8;
                    }
                }
            }
            q += 4 + n;
        }
        if method != 0 {
            return Err(format!(
                "entry {name} is compressed (method {method}); torch.save writes stored entries"
            ));
        }
        if csize != usize_ {
            return Err(format!("entry {name}: stored sizes differ"));
        }
        let l = local as usize;
        if b.get(l..l + 4) != Some(&[0x50, 0x4b, 0x03, 0x04]) {
            return Err(format!("entry {name}: bad local header"));
        }
        let ln = le_u16(b, l + 26).ok_or_else(short)? as usize;
        let le = le_u16(b, l + 28).ok_or_else(short)? as usize;
        let start = l + 30 + ln + le;
        let size = usize_ as usize;
        if start + size > b.len() {
            return Err(format!("entry {name} runs past the end of the file"));
        }
        out.insert(name, (start, size));
        p += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}
