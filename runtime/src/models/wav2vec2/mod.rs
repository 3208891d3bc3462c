//! wav2vec2 (large-xlsr-53 architecture, model-spec §1.4) from its HF folder: `config.json`
//! with `model.safetensors` or `pytorch_model.bin`. Layer-norm conv feature extractor,
//! feature projection, weight-normed grouped positional conv, stable-layer-norm (pre-LN)
//! transformer layers; all `num_layers + 1` hidden states: index 0 the input of layer 1,
//! 1..L−1 raw layer outputs, L the last layer's output after the encoder's final LayerNorm.
//!
//! Input: 16 kHz mono samples already normalised as the processor does (the `media` side).
//! Dtype flow in bf16: every op rounds its output once to bf16; the weight-normed positional
//! kernel is formed in f32 and rounded once (the reference recomputes it in the weight dtype).

use std::path::Path;

use crate::device::UnaryOp;
use crate::models::vars::{Vars, VarsRoot};
use crate::pth::PthFile;
use crate::weights::{CheckpointErrorKind, SafetensorsFile};
use crate::{Conv1dOpts, DType, Device, Error, Result, Tensor};

/// Architecture fields of the HF `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Wav2Vec2Config {
    pub conv_dim: Vec<usize>,
    pub conv_kernel: Vec<usize>,
    pub conv_stride: Vec<usize>,
    pub hidden: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub ffn_dim: usize,
    pub pos_conv_kernel: usize,
    pub pos_conv_groups: usize,
    pub eps: f32,
}

impl Wav2Vec2Config {
    /// Parse and validate `config.json`: only the layer-norm feature extractor with conv
    /// biases, stable layer norm and exact GELU are supported.
    pub fn from_hf_json(v: &serde_json::Value, file: &str) -> Result<Self> {
        let bad = |field: &str, expected: &str, got: String| Error::Checkpoint {
            path: file.to_string(),
            kind: CheckpointErrorKind::ConfigMismatch {
                field: field.to_string(),
                expected: expected.to_string(),
                got,
            },
        };
        let num = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| bad(k, "an integer", format!("{:?}", v.get(k))))
        };
        let list = |k: &str| -> Result<Vec<usize>> {
            v.get(k)
                .and_then(|x| x.as_array())
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect())
                .ok_or_else(|| bad(k, "a list of integers", format!("{:?}", v.get(k))))
        };
        for (k, want) in [
            ("feat_extract_norm", serde_json::json!("layer")),
            ("do_stable_layer_norm", serde_json::json!(true)),
            ("conv_bias", serde_json::json!(true)),
            ("hidden_act", serde_json::json!("gelu")),
            ("feat_extract_activation", serde_json::json!("gelu")),
        ] {
            let got = v.get(k).cloned().unwrap_or(serde_json::Value::Null);
            if got != want {
                return Err(bad(k, &want.to_string(), got.to_string()));
            }
        }
        let cfg = Self {
            conv_dim: list("conv_dim")?,
            conv_kernel: list("conv_kernel")?,
            conv_stride: list("conv_stride")?,
            hidden: num("hidden_size")?,
            num_layers: num("num_hidden_layers")?,
            num_heads: num("num_attention_heads")?,
            ffn_dim: num("intermediate_size")?,
            pos_conv_kernel: num("num_conv_pos_embeddings")?,
            pos_conv_groups: num("num_conv_pos_embedding_groups")?,
            eps: v
                .get("layer_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5) as f32,
        };
        let n = cfg.conv_kernel.len();
        if n == 0 || cfg.conv_dim.len() != n || cfg.conv_stride.len() != n {
            return Err(bad(
                "conv_kernel",
                "conv_dim/conv_kernel/conv_stride of one length",
                format!("{cfg:?}"),
            ));
        }
        if cfg.num_heads == 0
            || !cfg.hidden.is_multiple_of(cfg.num_heads)
            || cfg.pos_conv_groups == 0
            || !cfg.hidden.is_multiple_of(cfg.pos_conv_groups)
        {
            return Err(bad(
                "num_attention_heads",
                "divisors of hidden_size",
                format!("{cfg:?}"),
            ));
        }
        Ok(cfg)
    }

    /// Output frames for `n` samples: ⌊(n − 400)/320⌋ + 1 for the standard extractor.
    pub fn num_frames(&self, n: usize) -> usize {
        self.conv_kernel
            .iter()
            .zip(&self.conv_stride)
            .fold(n, |l, (&k, &s)| if l < k { 0 } else { (l - k) / s + 1 })
    }
}

#[derive(Debug)]
struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn load(vb: &Vars, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            w: vb.get("weight", &[cout, cin])?,
            b: vb.get("bias", &[cout])?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.linear(&self.w, Some(&self.b))
    }
}

#[derive(Debug)]
struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: &Vars, c: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            w: vb.get("weight", &[c])?,
            b: vb.get("bias", &[c])?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.w), Some(&self.b), self.eps, x.dtype())
    }
}

#[derive(Debug)]
struct ConvLayer {
    w: Tensor,
    b: Tensor,
    stride: usize,
    norm: LayerNorm,
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    final_layer_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl EncoderLayer {
    fn load(vb: &Vars, c: &Wav2Vec2Config) -> Result<Self> {
        let (d, f) = (c.hidden, c.ffn_dim);
        let a = vb.pp("attention");
        let ff = vb.pp("feed_forward");
        Ok(Self {
            layer_norm: LayerNorm::load(&vb.pp("layer_norm"), d, c.eps)?,
            q: Linear::load(&a.pp("q_proj"), d, d)?,
            k: Linear::load(&a.pp("k_proj"), d, d)?,
            v: Linear::load(&a.pp("v_proj"), d, d)?,
            out: Linear::load(&a.pp("out_proj"), d, d)?,
            final_layer_norm: LayerNorm::load(&vb.pp("final_layer_norm"), d, c.eps)?,
            ff_in: Linear::load(&ff.pp("intermediate_dense"), d, f)?,
            ff_out: Linear::load(&ff.pp("output_dense"), f, d)?,
        })
    }

    /// x [T, D] → [T, D] (pre-LN attention and FFN, each with a residual).
    fn forward(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let act = x.dtype();
        let (t, d) = x.dims2()?;
        let hd = d / heads;
        let y = self.layer_norm.forward(x)?;
        // The reference scales q by hd^-1/2 after its projection (a rounded product in bf16).
        let q = self
            .q
            .forward(&y)?
            .affine((hd as f32).powf(-0.5), 0.0)?
            .reshape((1, t, heads, hd))?;
        let k = self.k.forward(&y)?.reshape((1, t, heads, hd))?;
        let v = self.v.forward(&y)?.reshape((1, t, heads, hd))?;
        let o = q.attention(&k, &v, None, 1.0, act)?.reshape((t, d))?;
        let x = x.add(&self.out.forward(&o)?)?;
        let y = self.final_layer_norm.forward(&x)?;
        let y = self.ff_in.forward(&y)?.unary_to(UnaryOp::Gelu, act)?;
        x.add(&self.ff_out.forward(&y)?)
    }
}

/// The wav2vec2 network (no CTC head).
#[derive(Debug)]
pub struct Wav2Vec2 {
    cfg: Wav2Vec2Config,
    convs: Vec<ConvLayer>,
    fp_norm: LayerNorm,
    fp_proj: Linear,
    pos_w: Tensor,
    pos_b: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
}

/// Tensors of the CTC checkpoint the network does not use.
fn unused(name: &str) -> bool {
    name.starts_with("lm_head.") || name.ends_with("masked_spec_embed")
}

impl Wav2Vec2 {
    /// Load from an HF folder (`config.json` + `model.safetensors` or `pytorch_model.bin`).
    pub fn load_dir(dir: impl AsRef<Path>, dtype: DType, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("config.json");
        let file = cfg_path.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Checkpoint {
            path: dir.display().to_string(),
            kind: CheckpointErrorKind::Io {
                file: file.clone(),
                msg: e.to_string(),
            },
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: dir.display().to_string(),
                kind: CheckpointErrorKind::BadJson {
                    file: file.clone(),
                    msg: e.to_string(),
                },
            })?;
        let cfg = Wav2Vec2Config::from_hf_json(&json, &file)?;
        let st = dir.join("model.safetensors");
        let bin = dir.join("pytorch_model.bin");
        if st.exists() {
            let src = SafetensorsFile::open(&st)?;
            Self::load(&VarsRoot::new(&src, dtype, device), cfg)
        } else if bin.exists() {
            let src = PthFile::open(&bin)?;
            Self::load(&VarsRoot::new(&src, dtype, device), cfg)
        } else {
            Err(Error::Checkpoint {
                path: dir.display().to_string(),
                kind: CheckpointErrorKind::Io {
                    file: st.display().to_string(),
                    msg: "neither model.safetensors nor pytorch_model.bin exists".into(),
                },
            })
        }
    }

    /// Load from a source with HF names, with or without the CTC model's `wav2vec2.` prefix.
    pub fn load(root: &VarsRoot, cfg: Wav2Vec2Config) -> Result<Self> {
        let top = root.vars();
        let vb = if root_has(root, "wav2vec2.feature_projection.projection.weight") {
            top.pp("wav2vec2")
        } else {
            top
        };
        let mut convs = Vec::new();
        let mut cin = 1;
        for (i, ((&c, &k), &s)) in cfg
            .conv_dim
            .iter()
            .zip(&cfg.conv_kernel)
            .zip(&cfg.conv_stride)
            .enumerate()
        {
            let l = vb.pp("feature_extractor").pp("conv_layers").pp(i);
            convs.push(ConvLayer {
                w: l.pp("conv").get("weight", &[c, cin, k])?,
                b: l.pp("conv").get("bias", &[c])?,
                stride: s,
                norm: LayerNorm::load(&l.pp("layer_norm"), c, cfg.eps)?,
            });
            cin = c;
        }
        let (d, k, g) = (cfg.hidden, cfg.pos_conv_kernel, cfg.pos_conv_groups);
        let pc = vb.pp("encoder").pp("pos_conv_embed").pp("conv");
        let (wg, wv) = if root_has(root, &pc.name("weight_g")) {
            (
                pc.get_as("weight_g", &[1, 1, k], DType::F32)?,
                pc.get_as("weight_v", &[d, d / g, k], DType::F32)?,
            )
        } else {
            let p = pc.pp("parametrizations").pp("weight");
            (
                p.get_as("original0", &[1, 1, k], DType::F32)?,
                p.get_as("original1", &[d, d / g, k], DType::F32)?,
            )
        };
        let pos_w = weight_norm_dim2(&wg, &wv)?.to_dtype(vb.dtype())?;
        let enc = vb.pp("encoder");
        let layers = (0..cfg.num_layers)
            .map(|i| EncoderLayer::load(&enc.pp("layers").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let last = *cfg.conv_dim.last().unwrap_or(&cin);
        let fp = vb.pp("feature_projection");
        let m = Self {
            fp_norm: LayerNorm::load(&fp.pp("layer_norm"), last, cfg.eps)?,
            fp_proj: Linear::load(&fp.pp("projection"), last, d)?,
            pos_b: pc.get("bias", &[d])?,
            final_norm: LayerNorm::load(&enc.pp("layer_norm"), d, cfg.eps)?,
            pos_w,
            convs,
            layers,
            cfg,
        };
        root.check_all_used(unused)?;
        Ok(m)
    }

    pub fn config(&self) -> &Wav2Vec2Config {
        &self.cfg
    }

    /// All hidden states of `wav` (normalised 16 kHz samples): `[num_layers + 1, T50, hidden]`.
    pub fn hidden_states(&self, wav: &[f32]) -> Result<Tensor> {
        let t50 = self.cfg.num_frames(wav.len());
        if t50 == 0 {
            return Err(Error::invalid(
                "wav2vec2",
                format!("{} samples are fewer than one frame needs", wav.len()),
            ));
        }
        let act = self.pos_w.dtype();
        let dev = self.pos_w.device();
        let mut x = Tensor::from_f32(wav, (1, 1, wav.len()), act, &dev)?;
        for c in &self.convs {
            let o = Conv1dOpts {
                stride: c.stride,
                ..Default::default()
            };
            let y = x.conv1d(&c.w, Some(&c.b), o, act)?; // [1, C, T]
            let y = c.norm.forward(&y.transpose(1, 2)?)?; // [1, T, C]
            x = y.unary_to(UnaryOp::Gelu, act)?.transpose(1, 2)?;
        }
        let x = x.squeeze(0)?.transpose(0, 1)?; // [T, C]
        let x = self.fp_proj.forward(&self.fp_norm.forward(&x)?)?; // [T, D]
        let (t, d) = x.dims2()?;
        // Grouped positional conv with padding K/2; an even kernel yields one extra frame,
        // which is dropped.
        let k = self.cfg.pos_conv_kernel;
        let o = Conv1dOpts {
            groups: self.cfg.pos_conv_groups,
            pad: (k / 2, k / 2),
            ..Default::default()
        };
        let p = x
            .transpose(0, 1)?
            .reshape((1, d, t))?
            .conv1d(&self.pos_w, Some(&self.pos_b), o, act)?
            .narrow(2, 0, t)?
            .unary_to(UnaryOp::Gelu, act)?
            .reshape((d, t))?
            .transpose(0, 1)?;
        let mut x = x.add(&p)?;
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        for l in &self.layers {
            states.push(x.clone());
            x = l.forward(&x, self.cfg.num_heads)?;
        }
        states.push(self.final_norm.forward(&x)?);
        let refs: Vec<Tensor> = states
            .iter()
            .map(|s| s.unsqueeze(0))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = refs.iter().collect();
        Tensor::cat(&refs, 0)
    }
}

fn root_has(root: &VarsRoot, name: &str) -> bool {
    root.contains(name)
}

/// `weight = g · v / ‖v‖`, the norm over all dims but the kernel axis (weight_norm, dim 2).
fn weight_norm_dim2(g: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (o, i, k) = v.dims3()?;
    let gv = g.to_vec_f32()?;
    let vv = v.to_vec_f32()?;
    let mut norm = vec![0f64; k];
    for (n, x) in vv.iter().enumerate() {
        norm[n % k] += (*x as f64) * (*x as f64);
    }
    let w: Vec<f32> = vv
        .iter()
        .enumerate()
        .map(|(n, x)| gv[n % k] * x / (norm[n % k].sqrt() as f32))
        .collect();
    Tensor::from_f32(&w, (o, i, k), DType::F32, &v.device())
}
