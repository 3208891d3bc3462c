//! Building blocks of the Wan2.1 VAE (model-spec §1.5): `CausalConv3d`, `RMS_norm`,
//! `ResidualBlock`, `AttentionBlock`, `Resample`, with the causal caches (CACHE_T = 2).
//!
//! Dtype flow (§1.5, the reference under bf16 autocast): norm and SiLU run in f32, every conv
//! rounds its input to the activation dtype `act` and writes `act`, residual adds stay in
//! `act`. A cache keeps the conv's input frames in the dtype they had (f32 after norm/SiLU,
//! `act` on the residual stream), as the reference stores them. With `act = F32` every
//! rounding is a no-op.

use crate::device::UnaryOp;
use crate::models::vars::Vars;
use crate::{Conv3dOpts, DType, Error, Result, Tensor};

/// Frames a causal conv keeps from the previous chunk.
pub const CACHE_T: usize = 2;

/// One cache slot per cached conv, in execution order.
#[derive(Debug, Clone, Default)]
pub enum Slot {
    #[default]
    Empty,
    /// Temporal upsample after its first chunk: the next chunk pads with zeros.
    Rep,
    Frames(Tensor),
}

/// The causal caches of one encoder or decoder stream; `idx` walks the slots in one chunk.
#[derive(Debug, Clone, Default)]
pub struct Caches {
    slots: Vec<Slot>,
    idx: usize,
}

impl Caches {
    pub fn new() -> Self {
        Self::default()
    }
    /// Start a chunk.
    pub fn rewind(&mut self) {
        self.idx = 0;
    }
    fn take(&mut self) -> Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.slots[self.idx].clone()
    }
    fn put(&mut self, s: Slot) {
        self.slots[self.idx] = s;
        self.idx += 1;
    }
    /// Slots in use and the bytes their tensors hold.
    pub fn usage(&self) -> (usize, usize) {
        self.slots.iter().fold((0, 0), |(n, b), s| match s {
            Slot::Frames(t) => (n + 1, b + t.size_in_bytes()),
            Slot::Rep => (n + 1, b),
            Slot::Empty => (n, b),
        })
    }
}

/// The last CACHE_T frames of the stream after appending `x` (`old` supplies the earlier one
/// when `x` has a single frame).
fn next_cache(x: &Tensor, old: &Slot) -> Result<Tensor> {
    let t = x.dim(2)?;
    let n = t.min(CACHE_T);
    let c = x.narrow(2, t - n, n)?;
    match old {
        Slot::Frames(o) if n < CACHE_T => {
            let last = o.narrow(2, o.dim(2)? - 1, 1)?.to_dtype(c.dtype())?;
            Tensor::cat(&[&last, &c], 2)
        }
        _ => Ok(c),
    }
}

/// Conv3d with `kt − 1` frames of causal temporal padding (cached frames first, then zeros)
/// and symmetric spatial zero padding; a strided temporal conv gets no padding.
#[derive(Debug)]
pub struct CausalConv3d {
    weight: Tensor,
    bias: Tensor,
    stride: [usize; 3],
    tpad: usize,
    spad: (usize, usize),
}

impl CausalConv3d {
    pub fn load(
        vb: &Vars,
        cin: usize,
        cout: usize,
        k: [usize; 3],
        stride: [usize; 3],
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get("weight", &[cout, cin, k[0], k[1], k[2]])?,
            bias: vb.get("bias", &[cout])?,
            stride,
            tpad: if stride[0] == 1 { k[0] - 1 } else { 0 },
            spad: (k[1] / 2, k[2] / 2),
        })
    }

    /// `x` `[B, Cin, T, H, W]` with optional past frames → `[B, Cout, T', H, W]` in `act`.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>, act: DType) -> Result<Tensor> {
        let x = x.to_dtype(act)?;
        let (x, tpad) = match cache {
            Some(c) if self.tpad > 0 => {
                let c = c.to_dtype(act)?;
                let n = c.dim(2)?;
                (Tensor::cat(&[&c, &x], 2)?, self.tpad.saturating_sub(n))
            }
            _ => (x, self.tpad),
        };
        self.conv_padded(&x, tpad, act)
    }

    /// The conv on `x` already holding any past frames, with `tpad` zero frames in front.
    fn conv_padded(&self, x: &Tensor, tpad: usize, act: DType) -> Result<Tensor> {
        let o = Conv3dOpts {
            stride: self.stride,
            pad: [
                (tpad, 0),
                (self.spad.0, self.spad.0),
                (self.spad.1, self.spad.1),
            ],
        };
        x.conv3d(&self.weight, Some(&self.bias), o, act)
    }

    /// A cached forward: uses and then advances this conv's slot.
    pub fn forward_cached(&self, x: &Tensor, caches: &mut Caches, act: DType) -> Result<Tensor> {
        let old = caches.take();
        let y = match &old {
            Slot::Frames(c) => self.forward(x, Some(c), act)?,
            _ => self.forward(x, None, act)?,
        };
        caches.put(Slot::Frames(next_cache(x, &old)?));
        Ok(y)
    }

    /// norm → SiLU → this conv with its cache, in one pass before the conv: the fused norm
    /// writes the conv's input in `act` behind the cached frames (no concatenation) and hands
    /// back the f32 frames to cache, as the reference keeps them.
    pub fn forward_normed(
        &self,
        norm: &RmsNorm,
        x: &Tensor,
        caches: &mut Caches,
        act: DType,
    ) -> Result<Tensor> {
        let old = caches.take();
        let prefix = match &old {
            Slot::Frames(c) if self.tpad > 0 => Some(c),
            _ => None,
        };
        let (y, tail) = norm.norm_silu(x, prefix, CACHE_T, act)?;
        let tail = tail.ok_or_else(|| Error::invalid("vae conv", "input without frames"))?;
        let n = prefix.map_or(Ok(0), |c| c.dim(2))?;
        let y = self.conv_padded(&y, self.tpad.saturating_sub(n), act)?;
        caches.put(Slot::Frames(next_cache(&tail, &old)?));
        Ok(y)
    }
}

/// A 2-D conv applied per frame, stored as `[Cout, Cin, kh, kw]` (nn.Conv2d).
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv2d {
    pub fn load(vb: &Vars, cin: usize, cout: usize, k: usize) -> Result<Self> {
        let w = vb.get("weight", &[cout, cin, k, k])?;
        Ok(Self {
            weight: w.reshape((cout, cin, 1, k, k))?,
            bias: vb.get("bias", &[cout])?,
        })
    }
    /// On `[B, C, T, H, W]` frame by frame; `pad` = ((top, bottom), (left, right)).
    pub fn forward(
        &self,
        x: &Tensor,
        pad: [(usize, usize); 2],
        stride: usize,
        act: DType,
    ) -> Result<Tensor> {
        let o = Conv3dOpts {
            stride: [1, stride, stride],
            pad: [(0, 0), pad[0], pad[1]],
        };
        x.to_dtype(act)?
            .conv3d(&self.weight, Some(&self.bias), o, act)
    }
}

/// `RMS_norm`: L2-normalise over channels × sqrt(C) × gamma, in f32.
#[derive(Debug)]
pub struct RmsNorm {
    gamma: Tensor,
}

impl RmsNorm {
    /// `images`: gamma stored `[C, 1, 1]` (attention) instead of `[C, 1, 1, 1]`.
    pub fn load(vb: &Vars, c: usize, images: bool) -> Result<Self> {
        let shape: &[usize] = if images { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        let gamma = vb.get_as("gamma", shape, DType::F32)?.reshape(c)?;
        Ok(Self { gamma })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.channel_rms_norm(&self.gamma, None, DType::F32)
    }
    /// norm then SiLU, both f32.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)?.unary_to(UnaryOp::Silu, DType::F32)
    }
    /// norm then SiLU in f32 in one pass, rounded once to `out`, behind the frames of
    /// `prefix`, plus the last `tail` frames of the f32 value (what a following cached conv
    /// keeps); see [`Tensor::channel_norm_silu`].
    pub fn norm_silu(
        &self,
        x: &Tensor,
        prefix: Option<&Tensor>,
        tail: usize,
        out: DType,
    ) -> Result<(Tensor, Option<Tensor>)> {
        x.channel_norm_silu(&self.gamma, prefix, tail, out)
    }
}

/// `ResidualBlock`: residual.{0 norm, 2 conv, 3 norm, 6 conv}, 1×1×1 shortcut if widths differ.
#[derive(Debug)]
pub struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub fn load(vb: &Vars, cin: usize, cout: usize) -> Result<Self> {
        let r = vb.pp("residual");
        Ok(Self {
            norm1: RmsNorm::load(&r.pp(0), cin, false)?,
            conv1: CausalConv3d::load(&r.pp(2), cin, cout, [3; 3], [1; 3])?,
            norm2: RmsNorm::load(&r.pp(3), cout, false)?,
            conv2: CausalConv3d::load(&r.pp(6), cout, cout, [3; 3], [1; 3])?,
            shortcut: if cin != cout {
                Some(CausalConv3d::load(
                    &vb.pp("shortcut"),
                    cin,
                    cout,
                    [1; 3],
                    [1; 3],
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, caches: &mut Caches, act: DType) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None, act)?,
            None => x.clone(),
        };
        let y = self.conv1.forward_normed(&self.norm1, x, caches, act)?;
        let y = self.conv2.forward_normed(&self.norm2, &y, caches, act)?;
        y.binary_to(&h, crate::device::BinaryOp::Add, act)
    }
}

/// `AttentionBlock`: single-head self-attention over the pixels of each frame.
#[derive(Debug)]
pub struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
    dim: usize,
}

impl AttentionBlock {
    pub fn load(vb: &Vars, dim: usize) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::load(&vb.pp("norm"), dim, true)?,
            to_qkv: Conv2d::load(&vb.pp("to_qkv"), dim, 3 * dim, 1)?,
            proj: Conv2d::load(&vb.pp("proj"), dim, dim, 1)?,
            dim,
        })
    }

    pub fn forward(&self, x: &Tensor, act: DType) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        if b != 1 || c != self.dim {
            return Err(Error::invalid(
                "vae attention",
                format!(
                    "x {:?}: batch 1 with {} channels expected",
                    x.dims(),
                    self.dim
                ),
            ));
        }
        let qkv = self
            .to_qkv
            .forward(&self.norm.forward(x)?, [(0, 0); 2], 1, act)?; // [1, 3c, t, h, w]
        // [3c, t, hw] → [t, hw, 3c]; q, k, v are channel thirds.
        let qkv = qkv.reshape((3 * c, t, h * w))?.permute(&[1, 2, 0])?;
        let part = |i: usize| qkv.narrow(2, i * c, c)?.reshape((t, h * w, 1, c));
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let o = q.attention(&k, &v, None, 1.0 / (c as f32).sqrt(), act)?; // [t, hw, 1, c]
        let o = o
            .reshape((t, h * w, c))?
            .permute(&[2, 0, 1])?
            .reshape((1, c, t, h, w))?;
        let o = self.proj.forward(&o, [(0, 0); 2], 1, act)?;
        o.binary_to(x, crate::device::BinaryOp::Add, act)
    }
}

/// Which `Resample` variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleMode {
    Upsample2d,
    Upsample3d,
    Downsample2d,
    Downsample3d,
}

/// `Resample`: per-frame 2× spatial up/down sampling (`resample.1` conv) and, for the 3-D
/// modes, a causal temporal 2× conv (`time_conv`).
#[derive(Debug)]
pub struct Resample {
    mode: ResampleMode,
    conv: Conv2d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    pub fn load(vb: &Vars, dim: usize, mode: ResampleMode) -> Result<Self> {
        use ResampleMode::*;
        let up = matches!(mode, Upsample2d | Upsample3d);
        let conv = Conv2d::load(
            &vb.pp("resample").pp(1),
            dim,
            if up { dim / 2 } else { dim },
            3,
        )?;
        let tc = vb.pp("time_conv");
        let time_conv = match mode {
            Upsample3d => Some(CausalConv3d::load(&tc, dim, 2 * dim, [3, 1, 1], [1; 3])?),
            Downsample3d => Some(CausalConv3d::load(&tc, dim, dim, [3, 1, 1], [2, 1, 1])?),
            _ => None,
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    pub fn forward(&self, x: &Tensor, caches: &mut Caches, act: DType) -> Result<Tensor> {
        let mut x = x.clone();
        if let (ResampleMode::Upsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            let old = caches.take();
            if let Slot::Empty = old {
                // First chunk: no temporal upsampling; the next chunk pads with zeros.
                caches.put(Slot::Rep);
            } else {
                let mut new = next_cache(&x, &old)?;
                if let Slot::Rep = old
                    && new.dim(2)? < CACHE_T
                {
                    let z = Tensor::zeros(new.dims(), new.dtype(), &new.device())?;
                    new = Tensor::cat(&[&z, &new], 2)?;
                }
                let y = match &old {
                    Slot::Frames(c) => tc.forward(&x, Some(c), act)?,
                    _ => tc.forward(&x, None, act)?,
                };
                caches.put(Slot::Frames(new));
                // Channels [0, c) are frame 2i, [c, 2c) frame 2i + 1.
                let (b, c2, t, h, w) = y.dims5()?;
                let c = c2 / 2;
                x = y
                    .reshape(vec![b, 2, c, t, h, w])?
                    .permute(&[0, 2, 3, 1, 4, 5])?
                    .reshape((b, c, 2 * t, h, w))?;
            }
        }
        x = match self.mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                let up = x.upsample_nearest2d(2, 2)?;
                self.conv.forward(&up, [(1, 1), (1, 1)], 1, act)?
            }
            _ => self.conv.forward(&x, [(0, 1), (0, 1)], 2, act)?,
        };
        if let (ResampleMode::Downsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            let old = caches.take();
            let t = x.dim(2)?;
            match old {
                // First chunk: no temporal downsampling.
                Slot::Empty | Slot::Rep => caches.put(Slot::Frames(x.clone())),
                Slot::Frames(o) => {
                    let new = x.narrow(2, t - 1, 1)?;
                    let prev = o.narrow(2, o.dim(2)? - 1, 1)?.to_dtype(x.dtype())?;
                    x = tc.forward(&Tensor::cat(&[&prev, &x], 2)?, None, act)?;
                    caches.put(Slot::Frames(new));
                }
            }
        }
        Ok(x)
    }
}
