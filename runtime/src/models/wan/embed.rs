//! Input embeddings (model-spec §3.3 steps 2, 4, 5): patch / cond embedding (Conv3d with
//! stride = kernel), `trainable_cond_mask`, the sinusoidal time embedding with its MLP and
//! projection (fp32), and the text embedding.

use super::super::VarBuilder;
use super::attention::Linear;
use super::config::WanConfig;
use crate::parallel::{GatheredColumn, SharedComm};
use crate::{Conv3dOpts, Device, Result, Tensor};

/// A patchifying `nn.Conv3d` (`patch_embedding`, `cond_encoder`, `frame_packer.proj*`).
#[derive(Debug, Clone)]
pub struct PatchConv {
    pub weight: Tensor,
    pub bias: Tensor,
    pub kernel: [usize; 3],
}

impl PatchConv {
    pub fn load(vb: &VarBuilder, dim: usize, c_in: usize, kernel: [usize; 3]) -> Result<Self> {
        let [kt, kh, kw] = kernel;
        Ok(Self {
            weight: vb.get("weight", &[dim, c_in, kt, kh, kw])?,
            bias: vb.get("bias", &[dim])?,
            kernel,
        })
    }

    /// Latents `[C, F, h, w]` → tokens `[1, L, dim]` in (frame, row, column) order.
    pub fn forward(&self, lat: &Tensor) -> Result<Tensor> {
        let x = lat.unsqueeze(0)?.to_dtype(self.weight.dtype())?;
        let opts = Conv3dOpts {
            stride: self.kernel,
            ..Default::default()
        };
        let y = x.conv3d(&self.weight, Some(&self.bias), opts, self.weight.dtype())?;
        let (b, d, t, h, w) = y.dims5()?;
        y.reshape((b, d, t * h * w))?.transpose(1, 2)
    }
}

/// `time_embedding` (Linear, SiLU, Linear) and `time_projection` (SiLU, Linear), in f32.
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    pub embedding_0: Linear,
    pub embedding_2: Linear,
    /// Column-parallel over tp, output gathered (6·dim rows of dim: the largest root linear).
    pub projection_1: GatheredColumn,
    pub freq_dim: usize,
    pub dim: usize,
}

impl TimeEmbedding {
    pub fn load(vb: &VarBuilder, c: &WanConfig, tp: &SharedComm) -> Result<Self> {
        let te = vb.pp("time_embedding");
        let proj = vb.pp("time_projection").pp("1");
        Ok(Self {
            embedding_0: Linear::load(&te.pp("0"), c.dim, c.freq_dim)?.to_f32()?,
            embedding_2: Linear::load(&te.pp("2"), c.dim, c.dim)?.to_f32()?,
            projection_1: GatheredColumn::load(&proj, 6 * c.dim, c.dim, tp.clone())?.to_f32()?,
            freq_dim: c.freq_dim,
            dim: c.dim,
        })
    }

    /// Sinusoid of width freq_dim: cos then sin of t·10000^(−k/half), in f64, cast to f32.
    pub fn sinusoid(&self, t: &[f32]) -> Vec<f32> {
        let half = self.freq_dim / 2;
        let mut out = Vec::with_capacity(t.len() * self.freq_dim);
        for &tv in t {
            let args: Vec<f64> = (0..half)
                .map(|k| tv as f64 * 10000f64.powf(-(k as f64) / half as f64))
                .collect();
            out.extend(args.iter().map(|a| a.cos() as f32));
            out.extend(args.iter().map(|a| a.sin() as f32));
        }
        out
    }

    /// t `[n]` → (e `[n, dim]`, e0 `[n, 6, dim]`), both f32.
    pub fn forward(&self, t: &[f32], device: &Device) -> Result<(Tensor, Tensor)> {
        let s = Tensor::from_vec(self.sinusoid(t), (t.len(), self.freq_dim), device)?;
        let e = self
            .embedding_2
            .forward(&self.embedding_0.forward(&s)?.silu()?)?;
        let e0 = self.projection_1.forward(&e.silu()?)?;
        Ok((e.clone(), e0.reshape((t.len(), 6, self.dim))?))
    }
}

/// `text_embedding` (Linear, GELU-tanh, Linear) on the zero-padded context.
#[derive(Debug, Clone)]
pub struct TextEmbedding {
    pub embedding_0: Linear,
    pub embedding_2: Linear,
    pub text_len: usize,
    pub text_dim: usize,
}

impl TextEmbedding {
    pub fn load(vb: &VarBuilder, c: &WanConfig) -> Result<Self> {
        Ok(Self {
            embedding_0: Linear::load(&vb.pp("0"), c.dim, c.text_dim)?,
            embedding_2: Linear::load(&vb.pp("2"), c.dim, c.dim)?,
            text_len: c.text_len,
            text_dim: c.text_dim,
        })
    }

    /// context `[L_txt, text_dim]` (real tokens only) → `[1, text_len, dim]`: padding rows
    /// are zeros and stay attended (no mask, §3.3 step 5).
    pub fn forward(&self, context: &Tensor) -> Result<Tensor> {
        let (l, d) = context.dims2()?;
        if l > self.text_len || d != self.text_dim {
            return Err(crate::Error::invalid(
                "text_embedding",
                format!(
                    "text context [{l}, {d}] does not fit [<= {}, {}]",
                    self.text_len, self.text_dim
                ),
            ));
        }
        let act = self.embedding_0.weight.dtype();
        let padded = Tensor::zeros((self.text_len, d), act, &context.device())?;
        padded.slice_set(&context.to_dtype(act)?, 0, 0)?;
        let h = self.embedding_0.forward(&padded)?.gelu_tanh()?;
        self.embedding_2.forward(&h)?.unsqueeze(0)
    }
}

/// `trainable_cond_mask.weight` rows: 0 noisy, 1 reference, 2 motion tokens.
pub fn cond_mask_row(mask: &Tensor, row: usize) -> Result<Tensor> {
    mask.narrow(0, row, 1)
}
