//! The causal audio encoder (`casual_audio_encoder`, model-spec §3.3 step 1) and the audio
//! injectors (`audio_injector`, §3.3.2).

use std::ops::Range;

use super::super::VarBuilder;
use super::attention::{Linear, sdpa};
use super::block::FrameRuns;
use super::config::WanConfig;
use crate::device::PadMode;
use crate::parallel::{GatheredColumn, SharedComm, TpAttention};
use crate::{Conv1dOpts, DType, Error, Result, Tensor};

/// `CausalConv1d`: kernel 3, left replicate padding of 2, in f32.
#[derive(Debug, Clone)]
pub struct CausalConv1d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
}

impl CausalConv1d {
    fn load(vb: &VarBuilder, c_out: usize, c_in: usize, stride: usize) -> Result<Self> {
        let vb = vb.pp("conv");
        Ok(Self {
            weight: vb.get_as("weight", &[c_out, c_in, 3], DType::F32)?,
            bias: vb.get_as("bias", &[c_out], DType::F32)?,
            stride,
        })
    }

    /// x `[B, C, T]` f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let opts = Conv1dOpts {
            stride: self.stride,
            groups: 1,
            pad: (2, 0),
            pad_mode: PadMode::Replicate,
        };
        x.conv1d(&self.weight, Some(&self.bias), opts, DType::F32)
    }
}

/// `casual_audio_encoder` (sic): SiLU-weighted mean of the wav2vec2 layers, then a local and
/// a global path of causal convs that share conv2/conv3, all in f32.
#[derive(Debug, Clone)]
pub struct CausalAudioEncoder {
    pub weights: Tensor,
    pub conv1_local: CausalConv1d,
    pub conv1_global: CausalConv1d,
    pub conv2: CausalConv1d,
    pub conv3: CausalConv1d,
    pub final_linear: Linear,
    pub padding_tokens: Tensor,
    pub num_audio_token: usize,
    pub motion_frames: usize,
    pub eps: f32,
}

impl CausalAudioEncoder {
    pub fn load(vb: &VarBuilder, c: &WanConfig) -> Result<Self> {
        let (d, q) = (c.dim, c.dim / 4);
        let enc = vb.pp("encoder");
        Ok(Self {
            weights: vb.get_as("weights", &[1, c.audio_layers, 1, 1], DType::F32)?,
            conv1_local: CausalConv1d::load(
                &enc.pp("conv1_local"),
                q * c.num_audio_token,
                c.audio_dim,
                1,
            )?,
            conv1_global: CausalConv1d::load(&enc.pp("conv1_global"), q, c.audio_dim, 1)?,
            conv2: CausalConv1d::load(&enc.pp("conv2"), d / 2, q, 2)?,
            conv3: CausalConv1d::load(&enc.pp("conv3"), d, d / 2, 2)?,
            final_linear: Linear::load(&enc.pp("final_linear"), d, d)?.to_f32()?,
            padding_tokens: enc.get_as("padding_tokens", &[1, 1, 1, d], DType::F32)?,
            num_audio_token: c.num_audio_token,
            motion_frames: c.motion_frames,
            eps: c.eps,
        })
    }

    /// LayerNorm (no affine) over channels of `[B, C, T]`, then SiLU.
    fn norm_act(&self, y: &Tensor) -> Result<Tensor> {
        y.transpose(1, 2)?
            .layer_norm(None, None, self.eps, DType::F32)?
            .silu()?
            .transpose(1, 2)
    }

    /// audio `[1, layers, audio_dim, 4F]` (one block's video frames) → audio tokens
    /// `[1, F, num_audio_token + 1, dim]` and global vectors `[F, dim]`, both in `act`.
    pub fn forward(&self, audio: &Tensor, act: DType) -> Result<(Tensor, Tensor)> {
        let (_, layers, c_in, t) = audio.dims4()?;
        let frames = t / 4;
        // 73 copies of the block's first frame in front.
        let ids: Vec<u32> = std::iter::repeat_n(0, self.motion_frames)
            .chain(0..t as u32)
            .collect();
        let x = audio.to_dtype(DType::F32)?.index_select(&ids, 3)?;
        let tt = ids.len();
        let w = self.weights.silu()?.reshape((1, layers))?;
        let feat = w
            .matmul(&x.reshape((layers, c_in * tt))?)?
            .div(&w.sum_last()?)?
            .reshape((1, c_in, tt))?;

        let loc = self.conv1_local.forward(&feat)?;
        let (_, ch, t1) = loc.dims3()?;
        // Contiguous channel groups become a batch of num_audio_token sequences.
        let loc = loc.reshape((self.num_audio_token, ch / self.num_audio_token, t1))?;
        let loc = self.norm_act(&loc)?;
        let loc = self.norm_act(&self.conv2.forward(&loc)?)?;
        let loc = self.norm_act(&self.conv3.forward(&loc)?)?; // [n, dim, T3]
        let (_, d, t3) = loc.dims3()?;
        let loc = loc.permute(&[2, 0, 1])?.unsqueeze(0)?; // [1, T3, n, dim]
        let pad = self.padding_tokens.index_select(&vec![0; t3], 1)?;
        let tokens = Tensor::cat(&[&loc, &pad], 2)?.narrow(1, t3 - frames, frames)?;

        let g = self.norm_act(&self.conv1_global.forward(&feat)?)?;
        let g = self.norm_act(&self.conv2.forward(&g)?)?;
        let g = self.norm_act(&self.conv3.forward(&g)?)?;
        let g = self
            .final_linear
            .forward(&g.transpose(1, 2)?)?
            .reshape((t3, d))?
            .narrow(0, t3 - frames, frames)?;
        Ok((tokens.to_dtype(act)?, g.to_dtype(act)?))
    }
}

/// `audio_injector`: per injector a cross-attention (`injector.{j}`) whose query is an
/// AdaLayerNorm of the tokens driven by the frame's global audio vector
/// (`injector_adain_layers.{j}.linear`, shift then scale, eps 1e-5). A rank holds the
/// injectors `first..` of its blocks (layer pipeline), each for its tp heads.
#[derive(Debug, Clone)]
pub struct AudioInjector {
    pub injector: Vec<TpAttention>,
    /// Column-parallel over tp, output (per-frame shift and scale) gathered.
    pub injector_adain_layers: Vec<GatheredColumn>,
    /// Index j of `injector[0]`.
    pub first: usize,
    pub adain_eps: f32,
}

impl AudioInjector {
    /// Injectors `js` (those after this rank's blocks) for this rank's heads of `tp`.
    pub fn load(vb: &VarBuilder, c: &WanConfig, js: Range<usize>, tp: &SharedComm) -> Result<Self> {
        let d = c.dim;
        Ok(Self {
            injector: js
                .clone()
                .map(|j| {
                    TpAttention::load(&vb.pp("injector").pp(j), d, c.num_heads, c.eps, tp.clone())
                })
                .collect::<Result<_>>()?,
            injector_adain_layers: js
                .clone()
                .map(|j| {
                    let vb = vb.pp("injector_adain_layers").pp(j).pp("linear");
                    GatheredColumn::load(&vb, 2 * d, d, tp.clone())
                })
                .collect::<Result<_>>()?,
            first: js.start,
            adain_eps: c.adain_eps,
        })
    }

    /// FP8 for q, k, v, o and the AdaLN linear (§8.1).
    pub fn quantize_fp8(&mut self) -> Result<()> {
        for a in &mut self.injector {
            a.quantize_fp8()?;
        }
        for l in &mut self.injector_adain_layers {
            l.quantize_fp8()?;
        }
        Ok(())
    }

    /// Injector `j` on this rank's noisy tokens x `[1, t, dim]`; tokens `[1, F, 5, dim]`,
    /// global `[F, dim]`; `runs` maps x's tokens to frames. Each token attends only to its
    /// frame's audio tokens (a Ulysses chunk needs no other rank's tokens for this); the
    /// result is added in the activation dtype.
    pub fn forward(
        &self,
        j: usize,
        x: &Tensor,
        tokens: &Tensor,
        global: &Tensor,
        runs: &FrameRuns,
    ) -> Result<Tensor> {
        let k = j
            .checked_sub(self.first)
            .filter(|&k| k < self.injector.len())
            .ok_or_else(|| {
                Error::invalid(
                    "AudioInjector",
                    format!(
                        "injector {j} is not held here ({}..{})",
                        self.first,
                        self.first + self.injector.len()
                    ),
                )
            })?;
        let act = x.dtype();
        let d = x.dims3()?.2;
        let (_, frames, n, _) = tokens.dims4()?;
        let ada = self.injector_adain_layers[k].forward(&global.silu()?)?;
        let shift = ada.narrow(1, 0, d)?.unsqueeze(1)?;
        let scale = ada.narrow(1, d, d)?.unsqueeze(1)?;
        let att = &self.injector[k];
        let (ak, av) = att.key_value(&tokens.reshape((frames, n, d))?)?;
        let out = runs.map(&[x], &[&scale, &shift, &ak, &av], |h, r| {
            let u = h[0].layer_norm(None, None, self.adain_eps, act)?;
            let u = u.mul(&r[0].affine(1.0, 1.0)?)?.add(&r[1])?;
            att.out(&sdpa(&att.query(&u)?, &r[2], &r[3])?)
        })?;
        x.add(&out)
    }
}
