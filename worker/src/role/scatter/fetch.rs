//! A receiving rank's side of [`super`]: the holder's files as tensor sources, one request
//! and its answer at a time.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context as _;
use planner::ModelSpec;
use runtime::comm::Comm;
use runtime::models::t5::T5Tokenizer;
use runtime::models::vars::{TensorSource, VarsRoot};
use runtime::models::wan::{CausalWanModelS2V, WanConfig};
use runtime::models::wav2vec2::{Wav2Vec2, Wav2Vec2Config};
use runtime::models::{FetchWeights, VarBuilder};
use runtime::parallel::{DitLayout, Shard};
use runtime::{DType, Device, Error, Shape, Tensor};

use super::{Src, TOKENIZER_JSON, WAV2VEC2_CONFIG, fetch_error, recv_bytes, send_bytes};
use crate::role::ckpt::{self, EncoderFiles, Parts};

/// The holder seen from a receiver: one request and its answer at a time.
#[derive(Debug)]
pub struct Remote<'a> {
    comm: &'a dyn Comm,
    holder: usize,
    /// `rank N:<folder>` for messages.
    origin: String,
    /// Where the communicator's tensors live.
    device: Device,
    /// Tensors and bytes received; the lock also keeps requests whole.
    got: Mutex<(usize, usize)>,
}

impl<'a> Remote<'a> {
    pub fn new(comm: &'a dyn Comm, holder: usize, dir: &Path, device: Device) -> Self {
        Self {
            comm,
            holder,
            origin: format!("rank {holder}:{}", dir.display()),
            device,
            got: Mutex::new((0, 0)),
        }
    }

    /// Sends `req`; the holder's payload after "ok", its message after "err" as an error.
    fn call(
        &self,
        req: &str,
        then: impl FnOnce(&[u8]) -> runtime::Result<()>,
    ) -> runtime::Result<()> {
        let _one = self.got.lock().map_err(|_| Error::LockPoisoned)?;
        send_bytes(self.comm, req.as_bytes(), self.holder, self.device)?;
        let reply = recv_bytes(self.comm, self.holder)?;
        match reply.split_first_chunk::<3>() {
            Some((b"ok\t", rest)) => then(rest),
            _ => {
                let text = String::from_utf8_lossy(&reply);
                let msg = text.strip_prefix("err\t").unwrap_or(&text);
                Err(fetch_error(format!(
                    "rank {} answered {req:?}: {msg}",
                    self.holder
                )))
            }
        }
    }

    fn tensor(
        &self,
        src: Src,
        name: &str,
        hint: Option<Shard>,
        device: &Device,
    ) -> runtime::Result<Tensor> {
        let mut req = format!("tensor\t{}\t{name}", src.name());
        if let Some(h) = hint {
            req.push_str(&format!("\t{}\t{}\t{}", h.dim, h.rank, h.world));
        }
        let mut out = None;
        self.call(&req, |head| {
            let head = String::from_utf8_lossy(head);
            let (dt, dims) = head
                .split_once('\t')
                .ok_or_else(|| fetch_error(format!("bad header {head:?}")))?;
            let dtype = [DType::BF16, DType::F16, DType::F32]
                .into_iter()
                .find(|d| d.as_str() == dt)
                .ok_or_else(|| fetch_error(format!("dtype {dt:?}")))?;
            let shape = parse_dims(dims)?;
            out = Some(self.comm.recv(&Shape::from(shape), dtype, self.holder)?);
            Ok(())
        })?;
        let t = out.ok_or_else(|| fetch_error("no tensor"))?;
        if let Ok(mut g) = self.got.lock() {
            g.0 += 1;
            g.1 += t.elem_count() * t.dtype().size_in_bytes();
        }
        t.to_device(device)
    }

    fn bytes(&self, req: &str) -> runtime::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.call(req, |b| {
            out = b.to_vec();
            Ok(())
        })?;
        Ok(out)
    }

    /// The receiver has everything: the holder moves on.
    pub fn done(&self) -> runtime::Result<()> {
        let _one = self.got.lock().map_err(|_| Error::LockPoisoned)?;
        send_bytes(self.comm, b"done", self.holder, self.device)
    }
}

fn parse_dims(s: &str) -> runtime::Result<Vec<usize>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|d| {
            d.parse()
                .map_err(|_| fetch_error(format!("bad shape {s:?}")))
        })
        .collect()
}

/// The DiT's tensors from the holder (LoRA merged there).
#[derive(Debug)]
struct RemoteDit<'a>(&'a Remote<'a>);

impl FetchWeights for RemoteDit<'_> {
    fn fetch(&self, name: &str, hint: Option<Shard>, device: &Device) -> runtime::Result<Tensor> {
        self.0.tensor(Src::Dit, name, hint, device)
    }
    fn origin(&self) -> String {
        self.0.origin.clone()
    }
}

/// One of the holder's `.pth` / safetensors files, its names and shapes asked once.
struct RemoteFile<'a> {
    remote: &'a Remote<'a>,
    src: Src,
    shapes: BTreeMap<String, Vec<usize>>,
    origin: String,
}

impl<'a> RemoteFile<'a> {
    fn new(remote: &'a Remote<'a>, src: Src, file: &str) -> runtime::Result<Self> {
        let list = remote.bytes(&format!("names\t{}", src.name()))?;
        let mut shapes = BTreeMap::new();
        for line in String::from_utf8_lossy(&list).lines() {
            let (n, d) = line
                .split_once('\t')
                .ok_or_else(|| fetch_error(format!("bad name line {line:?}")))?;
            shapes.insert(n.to_string(), parse_dims(d)?);
        }
        Ok(Self {
            remote,
            src,
            shapes,
            origin: format!("{}/{file}", remote.origin),
        })
    }
}

impl TensorSource for RemoteFile<'_> {
    fn load(&self, name: &str, device: &Device) -> runtime::Result<Tensor> {
        self.remote.tensor(self.src, name, None, device)
    }
    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
    fn origin(&self) -> String {
        self.origin.clone()
    }
}

/// A receiver's parts, loaded by the usual loaders over the holder's files.
pub(super) fn receive(
    r: &Remote,
    spec: &ModelSpec,
    (dtype, fp8): (DType, bool),
    (dit, vae): (bool, bool),
    device: Device,
    layout: &DitLayout,
) -> anyhow::Result<Parts> {
    let t0 = Instant::now();
    let (vae, encoders) = if vae {
        let w2v_origin = format!("{}/{}", r.origin, ckpt::WAV2VEC2_DIR);
        let json: serde_json::Value =
            serde_json::from_slice(&r.bytes(&format!("file\t{WAV2VEC2_CONFIG}"))?)
                .with_context(|| format!("{w2v_origin}/config.json"))?;
        let cfg = Wav2Vec2Config::from_hf_json(&json, &format!("{w2v_origin}/config.json"))?;
        let w2v_src = RemoteFile::new(r, Src::Wav2vec2, ckpt::WAV2VEC2_DIR)?;
        let w2v = Wav2Vec2::load(&VarsRoot::new(&w2v_src, DType::F32, device), cfg)
            .with_context(|| format!("wav2vec2 {w2v_origin}"))?;
        let tok_origin = format!("{}/{}/tokenizer.json", r.origin, ckpt::TOKENIZER_DIR);
        let tokenizer = T5Tokenizer::from_bytes(
            &r.bytes(&format!("file\t{TOKENIZER_JSON}"))?,
            &tok_origin,
            spec.dit.text_len as usize,
        )?;
        let t5 = RemoteFile::new(r, Src::T5, ckpt::T5_FILE)?;
        let vae = RemoteFile::new(r, Src::Vae, ckpt::VAE_FILE)?;
        let t5_vocab = t5
            .shapes
            .get(ckpt::T5_VOCAB_TENSOR)
            .and_then(|s| s.first().copied())
            .unwrap_or(0);
        let files = EncoderFiles {
            wav2vec2: w2v,
            wav2vec2_origin: w2v_origin,
            tokenizer,
            t5: &t5,
            t5_vocab,
            vae: &vae,
        };
        let (v, e) = ckpt::encoders(files, spec, dtype, device)?;
        (Some(v), Some(e))
    } else {
        (None, None)
    };
    let dit = if dit {
        let cfg = WanConfig::from(spec);
        let src = RemoteDit(r);
        let m =
            CausalWanModelS2V::load_rank(&cfg, &VarBuilder::fetched(&src, dtype, device), layout)?;
        Some(ckpt::quantized(m, fp8)?)
    } else {
        None
    };
    let (n, bytes) = r.got.lock().map(|g| *g).unwrap_or_default();
    log!(
        "received its weights from {}: {n} tensors, {:.1} MB in {:.1} s",
        r.origin,
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(Parts { dit, vae, encoders })
}
