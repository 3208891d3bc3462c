//! Weights read once and sent over the communicator (issue 6 item 3): a rank whose node lacks
//! the checkpoint folder receives what it loads from a rank that has it.
//!
//! At Load every rank says whether it holds the folder (its index exists on this node; with
//! `--weights_from_rank0` only rank 0 counts) and each holder validates it ([`super::ckpt`]).
//! One all-gather tells every rank who holds it and whether a check failed; the first failure's
//! message is broadcast, so every rank fails with it instead of waiting. The lowest holder then
//! serves the receivers one after another and loads its own part last. A receiver runs the
//! usual loaders over sources that fetch each tensor by name ([`Remote`]): its DiT shard
//! (tp slices cut and the LoRA merged by the holder, [`VarBuilder::stored`]) and, on the
//! decoding rank, the VAE, umT5 with its tokenizer and wav2vec2, so a received model equals a
//! locally read one.
//!
//! ```text
//! receiver ── "tensor dit blocks.3.ffn.0.weight 0 1 2" ──▶ holder   (dim, rank, world)
//! receiver ◀── "ok bf16 64,128", then the tensor ──────────── holder
//! receiver ── "done" ──▶ holder, which serves the next receiver
//! ```
//!
//! Control messages are UTF-8 text (files: their bytes) carried one byte per f32 element,
//! since every backend moves f32, after a 4-element length.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use planner::ModelSpec;
use runtime::comm::{Comm, CommErrorKind};
use runtime::models::VarBuilder;
use runtime::parallel::{DitLayout, Shard};
use runtime::pth::PthFile;
use runtime::weights::{INDEX_NAME, SafetensorsFile};
use runtime::{DType, Device, Error, Shape, Tensor};

use super::ckpt::{self, CkptRequest, Parts, Validated};
use crate::compute::Failure;

/// How long a receiver may wait for the holder (which serves the receivers before it first)
/// and the holder for a receiver's next request; a dead peer still fails at once.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

mod fetch;
use fetch::{Remote, receive};

/// What this rank does with `--ckpt_dir`, agreed by every rank at Load ([`Plan::agree`]).
#[derive(Debug)]
pub enum Plan {
    /// Reads the folder on its own node.
    Local(Box<Validated>),
    /// Reads it, and first sends the ranks `to` (ascending) what they load.
    Serve(Box<Validated>, Vec<usize>),
    /// Receives everything it loads from rank `from`.
    Receive { from: usize },
}

/// The tensor files a receiver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Dit,
    Vae,
    T5,
    Wav2vec2,
}

impl Src {
    const ALL: [Src; 4] = [Src::Dit, Src::Vae, Src::T5, Src::Wav2vec2];
    fn name(self) -> &'static str {
        match self {
            Src::Dit => "dit",
            Src::Vae => "vae",
            Src::T5 => "t5",
            Src::Wav2vec2 => "wav2vec2",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// The non-tensor files a receiver asks for.
const TOKENIZER_JSON: &str = "tokenizer";
const WAV2VEC2_CONFIG: &str = "wav2vec2_config";

fn load_failure(e: impl std::fmt::Display) -> Failure {
    (proto::ErrorKind::LoadFailure, format!("{e:#}"))
}

/// A lost or silent peer is a lost peer; anything else a load failure.
fn failure(e: &anyhow::Error) -> Failure {
    let lost = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<Error>(),
            Some(Error::Comm {
                kind: CommErrorKind::PeerLost { .. } | CommErrorKind::Timeout { .. },
                ..
            })
        )
    });
    let kind = if lost {
        proto::ErrorKind::PeerLost
    } else {
        proto::ErrorKind::LoadFailure
    };
    (kind, format!("{e:#}"))
}

impl Plan {
    /// Collective over `comm` (every rank, with the same request): who holds the folder,
    /// each holder's validation, and the first failure's message for everyone. Without a
    /// communicator (one rank) the folder is read here.
    pub fn agree(
        req: &CkptRequest,
        spec: &ModelSpec,
        comm: Option<&dyn Comm>,
        device: Device,
    ) -> Result<Self, Failure> {
        let comm = match comm {
            Some(c) if c.world() > 1 => c,
            _ => {
                let v = ckpt::validate(req, spec).map_err(load_failure)?;
                return Ok(Plan::Local(Box::new(v)));
            }
        };
        let rank = comm.rank();
        let holds = if req.from_rank0 {
            rank == 0
        } else {
            req.dir.join(INDEX_NAME).is_file()
        };
        let checked = holds.then(|| ckpt::validate(req, spec));
        let flag = |b: bool| if b { 1.0f32 } else { 0.0 };
        let mine = [flag(holds), flag(matches!(checked, Some(Err(_))))];
        // A holder's validation may be slow on a shared filesystem.
        let all = with_load_timeout(comm, || gather_flags(comm, &mine, device))
            .map_err(|e| failure(&e))?;
        let holders: Vec<usize> = (0..comm.world()).filter(|&r| all[2 * r] > 0.5).collect();
        if let Some(bad) = (0..comm.world()).find(|&r| all[2 * r + 1] > 0.5) {
            let own = match &checked {
                Some(Err(e)) => Some(format!("{e:#}")),
                _ => None,
            };
            let msg = broadcast_text(comm, bad, own.as_deref(), device).map_err(|e| failure(&e))?;
            return Err(load_failure(own.unwrap_or_else(|| {
                format!("{msg} (rank {bad} reads the checkpoint for this rank)")
            })));
        }
        let Some(&server) = holders.first() else {
            // No node has it: the error a local read gives.
            return match ckpt::validate(req, spec) {
                Err(e) => Err(load_failure(e)),
                Ok(_) => Err(load_failure(format!(
                    "no rank holds the checkpoint folder {}",
                    req.dir.display()
                ))),
            };
        };
        let receivers: Vec<usize> = (0..comm.world()).filter(|r| !holders.contains(r)).collect();
        Ok(match checked {
            Some(Ok(v)) if rank == server && !receivers.is_empty() => {
                Plan::Serve(Box::new(v), receivers)
            }
            Some(Ok(v)) => Plan::Local(Box::new(v)),
            _ => Plan::Receive { from: server },
        })
    }

    /// This rank's parts: read here, served first, or received (see the module docs).
    /// Point to point over `comm` between the holder and each receiver in turn.
    pub fn load(
        &self,
        req: &CkptRequest,
        spec: &ModelSpec,
        dtype: DType,
        parts: (bool, bool),
        (device, comm): (Device, Option<&dyn Comm>),
        layout: &DitLayout,
    ) -> Result<Parts, Failure> {
        let local = |v: &Validated| {
            ckpt::load(v, spec, (dtype, req.fp8), parts, device, layout).map_err(load_failure)
        };
        let need = || comm.ok_or_else(|| load_failure("sharing weights needs a communicator"));
        match self {
            Plan::Local(v) => local(v),
            Plan::Serve(v, to) => {
                let comm = need()?;
                with_load_timeout(comm, || {
                    to.iter().try_for_each(|&r| serve(comm, v, r, device))
                })
                .map_err(|e| failure(&e))?;
                local(v)
            }
            Plan::Receive { from } => {
                let comm = need()?;
                with_load_timeout(comm, || {
                    let remote = Remote::new(comm, *from, &req.dir, device);
                    let got = receive(&remote, spec, (dtype, req.fp8), parts, device, layout);
                    // Done in any case, so the holder goes on to the next receiver.
                    let done = remote.done();
                    let parts = got?;
                    done?;
                    Ok(parts)
                })
                .map_err(|e| failure(&e))
            }
        }
    }
}

/// `f` with the communicator's timeout raised to [`LOAD_TIMEOUT`].
fn with_load_timeout<T>(
    comm: &dyn Comm,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let usual = comm.timeout();
    comm.set_timeout(usual.max(LOAD_TIMEOUT));
    let out = f();
    comm.set_timeout(usual);
    out
}

/// A malformed message or an error the holder answered.
fn fetch_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument {
        op: "fetching weights",
        msg: e.to_string(),
    }
}

/// Every rank's two flags, rank-major.
fn gather_flags(comm: &dyn Comm, mine: &[f32; 2], device: Device) -> anyhow::Result<Vec<f32>> {
    let t = Tensor::from_vec(mine.to_vec(), 2, &Device::Cpu)?.to_device(&device)?;
    let all = comm
        .all_gather(&t, 0)
        .context("agreeing who reads the checkpoint")?;
    Ok(all.to_vec_f32()?)
}

/// `n` as four 16-bit pieces (exact in f32).
fn len_tensor(n: usize, device: Device) -> runtime::Result<Tensor> {
    let n = n as u64;
    let v: Vec<f32> = (0..4).map(|i| ((n >> (16 * i)) & 0xffff) as f32).collect();
    Tensor::from_vec(v, 4, &Device::Cpu)?.to_device(&device)
}

fn len_of(t: &Tensor) -> runtime::Result<usize> {
    let v = t.to_vec_f32()?;
    let n = v
        .iter()
        .enumerate()
        .fold(0u64, |n, (i, x)| n | ((*x as u64) << (16 * i)));
    usize::try_from(n).map_err(|_| fetch_error(format!("message of {n} bytes")))
}

fn bytes_tensor(b: &[u8], device: Device) -> runtime::Result<Tensor> {
    let v: Vec<f32> = b.iter().map(|&x| f32::from(x)).collect();
    Tensor::from_vec(v, b.len(), &Device::Cpu)?.to_device(&device)
}

fn bytes_of(t: &Tensor) -> runtime::Result<Vec<u8>> {
    // Every element is a byte value sent by `bytes_tensor`.
    Ok(t.to_vec_f32()?.into_iter().map(|x| x as u8).collect())
}

fn send_bytes(comm: &dyn Comm, b: &[u8], peer: usize, device: Device) -> runtime::Result<()> {
    comm.send(&len_tensor(b.len(), device)?, peer)?;
    if !b.is_empty() {
        comm.send(&bytes_tensor(b, device)?, peer)?;
    }
    Ok(())
}

fn recv_bytes(comm: &dyn Comm, peer: usize) -> runtime::Result<Vec<u8>> {
    let n = len_of(&comm.recv(&Shape::from(vec![4]), DType::F32, peer)?)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    bytes_of(&comm.recv(&Shape::from(vec![n]), DType::F32, peer)?)
}

/// Collective: `root`'s text on every rank.
fn broadcast_text(
    comm: &dyn Comm,
    root: usize,
    text: Option<&str>,
    device: Device,
) -> anyhow::Result<String> {
    let b = text.unwrap_or_default().as_bytes();
    let n = len_of(&comm.broadcast(&len_tensor(b.len(), device)?, root)?)?;
    let payload = if comm.rank() == root {
        bytes_tensor(b, device)?
    } else {
        Tensor::zeros(n, DType::F32, &device)?
    };
    let got = comm
        .broadcast(&payload, root)
        .with_context(|| format!("receiving rank {root}'s checkpoint error"))?;
    Ok(String::from_utf8_lossy(&bytes_of(&got)?).into_owned())
}

// ---- the holder -------------------------------------------------------------------------

/// Answers `peer`'s requests until it says done.
fn serve(comm: &dyn Comm, v: &Validated, peer: usize, device: Device) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let w2v = OnceLock::new();
    let (mut tensors, mut bytes) = (0usize, 0usize);
    loop {
        let req = recv_bytes(comm, peer)
            .with_context(|| format!("serving the checkpoint to rank {peer}"))?;
        let req = String::from_utf8_lossy(&req).into_owned();
        if req == "done" {
            break;
        }
        match answer(v, &w2v, &req, device) {
            Ok(Answer::Tensor(t)) => {
                let head = format!("ok\t{}\t{}", t.dtype().as_str(), join(t.dims()));
                send_bytes(comm, head.as_bytes(), peer, device)?;
                comm.send(&t, peer)?;
                tensors += 1;
                bytes += t.elem_count() * t.dtype().size_in_bytes();
            }
            Ok(Answer::Bytes(b)) => {
                let mut head = b"ok\t".to_vec();
                head.extend_from_slice(&b);
                send_bytes(comm, &head, peer, device)?;
            }
            Err(e) => send_bytes(comm, format!("err\t{e:#}").as_bytes(), peer, device)?,
        }
    }
    log!(
        "sent rank {peer} its weights: {tensors} tensors, {:.1} MB in {:.1} s",
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

enum Answer {
    Tensor(Tensor),
    Bytes(Vec<u8>),
}

fn join(dims: &[usize]) -> String {
    dims.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A tensor file of the holder's folder.
#[derive(Debug)]
enum File {
    Pth(PthFile),
    St(SafetensorsFile),
}

#[derive(Debug, Clone, Copy)]
enum FileRef<'a> {
    Pth(&'a PthFile),
    St(&'a SafetensorsFile),
}

impl FileRef<'_> {
    fn load(self, name: &str, device: Device) -> runtime::Result<Tensor> {
        match self {
            FileRef::Pth(f) => f.tensor(name, &device),
            FileRef::St(f) => f.tensor(name, &device),
        }
    }
    /// `name\tshape` lines, from the headers only.
    fn listing(self) -> String {
        let line = |n: &str, s: &[usize]| format!("{n}\t{}\n", join(s));
        match self {
            FileRef::Pth(f) => f
                .names()
                .filter_map(|n| f.info(n).map(|i| line(n, &i.shape)))
                .collect(),
            FileRef::St(f) => f
                .names()
                .filter_map(|n| f.info(n).map(|i| line(n, &i.shape)))
                .collect(),
        }
    }
}

/// The holder's files by request name (wav2vec2's opened on first use).
fn source<'a>(v: &'a Validated, w2v: &'a OnceLock<File>, src: Src) -> anyhow::Result<FileRef<'a>> {
    Ok(match src {
        Src::Dit => anyhow::bail!("the DiT is fetched tensor by tensor, not as a file"),
        Src::Vae => FileRef::Pth(&v.vae),
        Src::T5 => FileRef::Pth(&v.t5),
        Src::Wav2vec2 => {
            let f = match w2v.get() {
                Some(f) => f,
                None => {
                    let opened = open_wav2vec2(&v.wav2vec2)?;
                    w2v.get_or_init(|| opened)
                }
            };
            match f {
                File::Pth(f) => FileRef::Pth(f),
                File::St(f) => FileRef::St(f),
            }
        }
    })
}

/// wav2vec2's weights as `Wav2Vec2::load_dir` finds them.
fn open_wav2vec2(dir: &Path) -> anyhow::Result<File> {
    let (st, bin) = (dir.join("model.safetensors"), dir.join("pytorch_model.bin"));
    Ok(if st.exists() {
        File::St(SafetensorsFile::open(&st)?)
    } else if bin.exists() {
        File::Pth(PthFile::open(&bin)?)
    } else {
        anyhow::bail!(
            "wav2vec2 {}: neither model.safetensors nor pytorch_model.bin",
            dir.display()
        )
    })
}

fn answer(
    v: &Validated,
    w2v: &OnceLock<File>,
    req: &str,
    device: Device,
) -> anyhow::Result<Answer> {
    let f: Vec<&str> = req.split('\t').collect();
    let src = |s: &str| Src::parse(s).with_context(|| format!("unknown source {s:?}"));
    match f.as_slice() {
        ["tensor", s, name, rest @ ..] => {
            let hint = match rest {
                [] => None,
                [d, r, w] => Some(Shard {
                    dim: d.parse()?,
                    rank: r.parse()?,
                    world: w.parse()?,
                }),
                _ => anyhow::bail!("bad request {req:?}"),
            };
            let t = match (src(s)?, hint) {
                (Src::Dit, h) => VarBuilder::stored(&v.dit, v.lora.as_ref(), name, h, device)?,
                (other, None) => source(v, w2v, other)?.load(name, device)?,
                (other, Some(_)) => anyhow::bail!("{} tensors are not sharded", other.name()),
            };
            // fp8 does not travel (the communicators refuse it); f32 holds it exactly.
            Ok(Answer::Tensor(if t.dtype() == DType::F8E4M3 {
                t.to_dtype(DType::F32)?
            } else {
                t
            }))
        }
        ["names", s] => Ok(Answer::Bytes(
            source(v, w2v, src(s)?)?.listing().into_bytes(),
        )),
        ["file", f] if *f == TOKENIZER_JSON => {
            let p = v.tokenizer.join("tokenizer.json");
            Ok(Answer::Bytes(
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            ))
        }
        ["file", f] if *f == WAV2VEC2_CONFIG => {
            let p = v.wav2vec2.join("config.json");
            Ok(Answer::Bytes(
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            ))
        }
        _ => anyhow::bail!("bad request {req:?}"),
    }
}

#[cfg(test)]
mod tests;
