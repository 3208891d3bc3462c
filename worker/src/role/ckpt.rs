//! A real checkpoint folder (model-spec §2.3, §1.3–1.5): the DiT shards with config.json and
//! the index, the LiveAvatar LoRA (§2.4), `Wan2.1_VAE.pth`, umT5 with its tokenizer and
//! wav2vec2. [`validate`] opens every file (headers only) and checks the DiT's names and
//! shapes and the LoRA's fit before anything large is allocated; [`load`] then builds this
//! rank's parts. The encoders run once per generation on the decoding rank ([`Encoders`]),
//! which sends the text context and the audio features to the DiT ranks.
//!
//! umT5's vocabulary size is read from the checkpoint's `token_embedding.weight` (every other
//! T5 number comes from the model spec), so a small-vocabulary test checkpoint loads too.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use planner::ModelSpec;
use runtime::models::t5::{T5Config, T5Encoder, T5Tokenizer};
use runtime::models::vae::{VaeConfig, WanVae};
use runtime::models::vars::{TensorSource, VarsRoot};
use runtime::models::wan::{CausalWanModelS2V, WanConfig};
use runtime::models::wav2vec2::Wav2Vec2;
use runtime::parallel::DitLayout;
use runtime::pth::PthFile;
use runtime::weights::{Checkpoint, Lora, LoraConfig};
use runtime::{DType, Device, Tensor};

/// File and folder names inside `--ckpt_dir` (model-spec §2.3, §1.3–1.5, §9 `--ckpt_dir`).
pub const VAE_FILE: &str = "Wan2.1_VAE.pth";
pub const T5_FILE: &str = "models_t5_umt5-xxl-enc-bf16.pth";
pub const TOKENIZER_DIR: &str = "google/umt5-xxl";
pub const WAV2VEC2_DIR: &str = "wav2vec2-large-xlsr-53-english";
/// umT5's embedding, whose rows are the vocabulary size.
pub const T5_VOCAB_TENSOR: &str = "token_embedding.weight";

/// What the launcher asked this rank to load.
#[derive(Debug, Clone, Default)]
pub struct CkptRequest {
    pub dir: PathBuf,
    /// `--lora_path_dmd`; merged at load when given.
    pub lora: Option<PathBuf>,
    /// `--fp8`: the linears of §8.1 in FP8 e4m3 after the merge.
    pub fp8: bool,
    /// `--weights_from_rank0`: only rank 0 reads the folder, the others receive from it
    /// ([`super::scatter`]); otherwise only ranks whose node lacks the folder receive.
    pub from_rank0: bool,
}

/// Every file of the folder, opened and checked (headers only, nothing large read).
#[derive(Debug)]
pub struct Validated {
    pub cfg: WanConfig,
    pub dit: Checkpoint,
    pub lora: Option<Lora>,
    pub vae: PthFile,
    pub t5: PthFile,
    pub tokenizer: PathBuf,
    pub wav2vec2: PathBuf,
}

fn need(path: &Path, what: &str, dir: bool) -> Result<()> {
    let ok = if dir { path.is_dir() } else { path.is_file() };
    if !ok {
        bail!("{what} {} does not exist", path.display());
    }
    Ok(())
}

/// Open and check the whole folder against `spec` (every rank that reads it does this; the
/// first failure fails every rank with its message, [`super::scatter::Plan::agree`]).
pub fn validate(req: &CkptRequest, spec: &ModelSpec) -> Result<Validated> {
    let cfg = WanConfig::from(spec);
    let dit = Checkpoint::open(&req.dir)?;
    cfg.check_config_json(dit.config(), &req.dir.display().to_string())?;
    dit.check_tensors(&cfg.expected_tensors())?;
    let lora = match &req.lora {
        Some(p) => {
            need(p, "LoRA file", false)?;
            let l =
                Lora::open(p, lora_config(p)?).with_context(|| format!("LoRA {}", p.display()))?;
            l.check_against(&dit)?;
            Some(l)
        }
        None => None,
    };
    let open_pth = |name: &str| -> Result<PthFile> {
        let p = req.dir.join(name);
        need(&p, "checkpoint file", false)?;
        Ok(PthFile::open(&p)?)
    };
    let vae = open_pth(VAE_FILE)?;
    let t5 = open_pth(T5_FILE)?;
    let t5_dim = spec.t5.dim as usize;
    match t5.info(T5_VOCAB_TENSOR).map(|i| i.shape.clone()) {
        Some(s) if s.len() == 2 && s[1] == t5_dim => {}
        other => bail!(
            "{}: tensor token_embedding.weight has shape {other:?}, the model expects [vocab, {t5_dim}]",
            req.dir.join(T5_FILE).display()
        ),
    }
    let tokenizer = req.dir.join(TOKENIZER_DIR);
    need(&tokenizer.join("tokenizer.json"), "tokenizer file", false)?;
    let wav2vec2 = req.dir.join(WAV2VEC2_DIR);
    need(&wav2vec2.join("config.json"), "wav2vec2 config", false)?;
    Ok(Validated {
        cfg,
        dit,
        lora,
        vae,
        t5,
        tokenizer,
        wav2vec2,
    })
}

/// The LoRA's rank from its first `lora_A` `[r, in]`, with LiveAvatar's scaling alpha/r = 0.5
/// (§2.4: rank 128, alpha 64), so a small-rank test adapter merges like the real one; every
/// module's fit at this rank is checked against the checkpoint.
fn lora_config(path: &Path) -> Result<LoraConfig> {
    let st = runtime::weights::SafetensorsFile::open(path)?;
    let rank = st
        .names()
        .find(|n| n.ends_with(".lora_A.default.weight"))
        .and_then(|n| st.info(n))
        .and_then(|i| i.shape.first().copied())
        .filter(|&r| r > 0)
        .with_context(|| format!("LoRA {}: no lora_A.default.weight tensor", path.display()))?;
    let scale = LoraConfig::LIVEAVATAR.alpha / LoraConfig::LIVEAVATAR.rank as f32;
    Ok(LoraConfig {
        rank,
        alpha: scale * rank as f32,
    })
}

/// umT5 with its tokenizer and wav2vec2, on the rank that runs them.
#[derive(Debug)]
pub struct Encoders {
    t5: T5Encoder,
    tokenizer: T5Tokenizer,
    wav2vec2: Wav2Vec2,
}

/// This rank's parts from a validated folder.
#[derive(Debug)]
pub struct Parts {
    pub dit: Option<CausalWanModelS2V>,
    pub vae: Option<WanVae>,
    pub encoders: Option<Encoders>,
}

/// The decoding rank's encoder and VAE files, read here or fetched from a holder rank.
pub struct EncoderFiles<'a> {
    pub wav2vec2: Wav2Vec2,
    /// Where wav2vec2 came from, for messages.
    pub wav2vec2_origin: String,
    pub tokenizer: T5Tokenizer,
    pub t5: &'a dyn TensorSource,
    /// Rows of umT5's `token_embedding.weight` (checked by [`validate`]).
    pub t5_vocab: usize,
    pub vae: &'a dyn TensorSource,
}

/// Load the parts this rank holds: the encoders and the VAE on the decoding rank (small, so
/// their own loaders' shape checks come first), then this rank's share of the DiT.
pub fn load(
    v: &Validated,
    spec: &ModelSpec,
    (dtype, fp8): (DType, bool),
    (dit, vae): (bool, bool),
    device: Device,
    layout: &DitLayout,
) -> Result<Parts> {
    let (vae, encoders) = if vae {
        let w2v = Wav2Vec2::load_dir(&v.wav2vec2, DType::F32, device)
            .with_context(|| format!("wav2vec2 {}", v.wav2vec2.display()))?;
        let files = EncoderFiles {
            wav2vec2: w2v,
            wav2vec2_origin: v.wav2vec2.display().to_string(),
            tokenizer: T5Tokenizer::from_file(&v.tokenizer, spec.dit.text_len as usize)?,
            t5: &v.t5,
            t5_vocab: v.t5.info(T5_VOCAB_TENSOR).map_or(0, |i| i.shape[0]),
            vae: &v.vae,
        };
        let (vae, enc) = encoders(files, spec, dtype, device)?;
        (Some(vae), Some(enc))
    } else {
        (None, None)
    };
    let dit = if dit {
        let m = CausalWanModelS2V::from_checkpoint_rank(
            &v.cfg,
            &v.dit,
            v.lora.as_ref(),
            dtype,
            device,
            layout,
        )?;
        Some(quantized(m, fp8)?)
    } else {
        None
    };
    Ok(Parts { dit, vae, encoders })
}

/// `--fp8` after the merge (model-spec §8.1).
pub fn quantized(mut m: CausalWanModelS2V, fp8: bool) -> Result<CausalWanModelS2V> {
    if fp8 {
        m.quantize_fp8()?;
    }
    Ok(m)
}

/// The VAE and the encoders from their files, wav2vec2 checked against the DiT's audio input.
pub fn encoders(
    f: EncoderFiles,
    spec: &ModelSpec,
    dtype: DType,
    device: Device,
) -> Result<(WanVae, Encoders)> {
    let w2v = f.wav2vec2;
    if w2v.config().hidden != spec.dit.audio_dim as usize {
        bail!(
            "wav2vec2 {}: hidden size {}, the DiT's audio_dim is {}",
            f.wav2vec2_origin,
            w2v.config().hidden,
            spec.dit.audio_dim
        );
    }
    if w2v.config().num_layers + 1 != spec.dit.audio_layers as usize {
        bail!(
            "wav2vec2 {}: {} layers give {} hidden states, the DiT takes {}",
            f.wav2vec2_origin,
            w2v.config().num_layers,
            w2v.config().num_layers + 1,
            spec.dit.audio_layers
        );
    }
    let t5_cfg = T5Config {
        vocab: f.t5_vocab,
        ..T5Config::from_spec(&spec.t5)
    };
    let t5 = T5Encoder::load(&VarsRoot::new(f.t5, dtype, device), t5_cfg)?;
    let wan_vae = WanVae::load(
        &VarsRoot::new(f.vae, dtype, device),
        VaeConfig::from_spec(&spec.vae)?,
    )?;
    Ok((
        wan_vae,
        Encoders {
            t5,
            tokenizer: f.tokenizer,
            wav2vec2: w2v,
        },
    ))
}

impl Encoders {
    /// `[text_len, text_dim]`: umT5 over the real tokens, zero-padded (model-spec §11.8).
    pub fn text_context(&self, prompt: &str, text_len: usize) -> Result<Tensor> {
        let tokens = self.tokenizer.encode(prompt)?;
        let out = self.t5.forward(tokens.real_ids())?.to_dtype(DType::F32)?;
        let (l, d) = out.dims2()?;
        let mut v = out.to_device(&Device::Cpu)?.to_vec_f32()?;
        v.truncate(l.min(text_len) * d);
        v.resize(text_len * d, 0.0);
        Ok(Tensor::from_vec(v, (text_len, d), &Device::Cpu)?)
    }

    /// `[1, layers, dim, frames]`: wav2vec2's hidden states mapped to video frames (§10.3).
    pub fn audio_features(&self, samples_16k: &[f32], frames: usize) -> Result<Tensor> {
        let input = media::frames::wav2vec2_input_values(samples_16k);
        let hs = self.wav2vec2.hidden_states(&input)?.to_dtype(DType::F32)?;
        let (layers, t50, width) = hs.dims3()?;
        let data = hs.to_device(&Device::Cpu)?.to_vec_f32()?;
        let cf =
            media::frames::clip_features(&media::frames::Features::new(layers, t50, width, data)?)?;
        let have = cf.frames();
        if have < frames {
            bail!("the audio features cover {have} video frames, the generation needs {frames}");
        }
        let mut out = Vec::with_capacity(layers * width * frames);
        for row in cf.data.chunks_exact(have) {
            out.extend_from_slice(&row[..frames]);
        }
        Ok(Tensor::from_vec(
            out,
            (1, layers, width, frames),
            &Device::Cpu,
        )?)
    }
}
