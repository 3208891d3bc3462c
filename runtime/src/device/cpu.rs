//! The CPU reference backend: obviously correct, f32 accumulation, rayon across rows.
//!
//! Non-layout ops widen their inputs to f32 vectors, compute, and round the result once to
//! the output dtype. Layout ops (copies, permutes, gathers) move elements exactly.

mod attention;
mod elementwise;
mod fused;
mod layout;
mod matmul;
mod norm;

use std::borrow::Cow;

use half::{bf16, f16};

use super::{
    AttnSpec, BackendStorage, BinaryOp, BroadcastLayout, Conv1dSpec, Conv3dSpec, Device, GemmSpec,
    ReduceOp, ResNormSpec, TernaryOp, UnaryOp,
};
use crate::{DType, Error, F8E4M3, Result, WithDType};

/// Host memory of one tensor, typed by dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    F8E4M3(Vec<F8E4M3>),
}

/// Apply `$body` to the typed vector inside a `CpuStorage`, rebuilding the same variant.
macro_rules! map_typed {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::BF16($v) => CpuStorage::BF16($body),
            CpuStorage::F16($v) => CpuStorage::F16($body),
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::F8E4M3($v) => CpuStorage::F8E4M3($body),
        }
    };
}
pub(crate) use map_typed;

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F8E4M3(_) => DType::F8E4M3,
        }
    }

    pub fn elem_count(&self) -> usize {
        match self {
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F8E4M3(v) => v.len(),
        }
    }

    /// Round each f32 to `dtype` (RNE; fp8 saturating, unit scale).
    pub fn from_f32(v: &[f32], dtype: DType) -> Self {
        use rayon::prelude::*;
        match dtype {
            DType::F32 => CpuStorage::F32(v.to_vec()),
            DType::BF16 => CpuStorage::BF16(v.par_iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(v.par_iter().map(|&x| f16::from_f32(x)).collect()),
            DType::F8E4M3 => {
                CpuStorage::F8E4M3(v.par_iter().map(|&x| F8E4M3::from_f32(x)).collect())
            }
        }
    }

    /// Like [`CpuStorage::from_f32`] but reuses the vector for f32.
    pub fn from_f32_vec(v: Vec<f32>, dtype: DType) -> Self {
        if dtype == DType::F32 {
            CpuStorage::F32(v)
        } else {
            Self::from_f32(&v, dtype)
        }
    }

    /// The stored values widened to f32 (fp8 with unit scale); borrowed when already f32.
    pub fn f32s(&self) -> Cow<'_, [f32]> {
        use rayon::prelude::*;
        match self {
            CpuStorage::F32(v) => Cow::Borrowed(v),
            CpuStorage::BF16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
            CpuStorage::F16(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
            CpuStorage::F8E4M3(v) => Cow::Owned(v.par_iter().map(|x| x.to_f32()).collect()),
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.f32s().into_owned()
    }

    /// Typed view; `None` if `T` is not this storage's dtype.
    pub fn as_slice<T: WithDType>(&self) -> Option<&[T]> {
        T::cpu_slice(self)
    }

    pub fn as_mut_slice<T: WithDType>(&mut self) -> Option<&mut [T]> {
        T::cpu_slice_mut(self)
    }

    /// Copy raw little-endian bytes into a new storage (handles any alignment).
    pub fn from_bytes(bytes: &[u8], dtype: DType) -> Self {
        match dtype {
            DType::BF16 => CpuStorage::BF16(pod_vec(bytes)),
            DType::F16 => CpuStorage::F16(pod_vec(bytes)),
            DType::F32 => CpuStorage::F32(pod_vec(bytes)),
            DType::F8E4M3 => CpuStorage::F8E4M3(pod_vec(bytes)),
        }
    }

    /// The raw bytes, without copying.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F8E4M3(v) => bytemuck::cast_slice(v),
        }
    }

    /// The raw bytes, mutable (a communicator receives straight into them).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F8E4M3(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

/// Copy bytes into a freshly allocated (hence aligned) vector of `T`.
fn pod_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut v = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut v)
        .copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
    v
}

/// A new f32 output buffer: NaN-filled when [`super::poison_outputs`] is on, else zeros.
/// Only for outputs whose every element the op assigns (never for accumulators).
pub(crate) fn out_vec(n: usize) -> Vec<f32> {
    vec![
        if super::poison_outputs() {
            f32::NAN
        } else {
            0.0
        };
        n
    ]
}

fn f32s_opt(s: Option<&CpuStorage>) -> Option<Cow<'_, [f32]>> {
    s.map(CpuStorage::f32s)
}

impl BackendStorage for CpuStorage {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn dtype(&self) -> DType {
        CpuStorage::dtype(self)
    }
    fn elem_count(&self) -> usize {
        CpuStorage::elem_count(self)
    }
    fn zeros(device: &Device, elems: usize, dtype: DType) -> Result<Self> {
        if !device.is_cpu() {
            return Err(Error::DeviceMismatch {
                op: "CpuStorage::zeros",
                lhs: Device::Cpu,
                rhs: *device,
            });
        }
        Ok(match dtype {
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; elems]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; elems]),
            DType::F32 => CpuStorage::F32(vec![0.0; elems]),
            DType::F8E4M3 => CpuStorage::F8E4M3(vec![F8E4M3(0); elems]),
        })
    }
    fn from_cpu(_device: &Device, src: &CpuStorage) -> Result<Self> {
        Ok(src.clone())
    }
    fn to_cpu(&self) -> Result<CpuStorage> {
        Ok(self.clone())
    }
    fn try_clone(&self) -> Result<Self> {
        Ok(self.clone())
    }
    fn fill(&mut self, value: f32) -> Result<()> {
        match self {
            CpuStorage::BF16(v) => v.fill(bf16::from_f32(value)),
            CpuStorage::F16(v) => v.fill(f16::from_f32(value)),
            CpuStorage::F32(v) => v.fill(value),
            CpuStorage::F8E4M3(v) => v.fill(F8E4M3::from_f32(value)),
        }
        Ok(())
    }

    fn copy2d(
        &self,
        dst: &mut Self,
        rows: usize,
        cols: usize,
        src_stride: usize,
        src_offset: usize,
        dst_stride: usize,
        dst_offset: usize,
    ) -> Result<()> {
        layout::copy2d(
            self, dst, rows, cols, src_stride, src_offset, dst_stride, dst_offset,
        )
    }
    fn permute(&self, dims: &[usize], perm: &[usize]) -> Result<Self> {
        Ok(layout::permute(self, dims, perm))
    }
    fn index_select(&self, outer: usize, dim: usize, inner: usize, ids: &[u32]) -> Result<Self> {
        layout::index_select(self, outer, dim, inner, ids)
    }
    fn upsample_nearest2d(
        &self,
        outer: usize,
        h: usize,
        w: usize,
        fh: usize,
        fw: usize,
    ) -> Result<Self> {
        Ok(layout::upsample_nearest2d(self, outer, h, w, fh, fw))
    }

    fn cast(&self, dtype: DType, mul: f32) -> Result<Self> {
        if mul == 1.0 {
            return Ok(Self::from_f32(&self.f32s(), dtype));
        }
        let v: Vec<f32> = self.f32s().iter().map(|x| x * mul).collect();
        Ok(Self::from_f32_vec(v, dtype))
    }

    fn unary(&self, op: UnaryOp, out: DType) -> Result<Self> {
        Ok(Self::from_f32_vec(
            elementwise::unary(&self.f32s(), op),
            out,
        ))
    }
    fn binary(
        &self,
        rhs: &Self,
        op: BinaryOp,
        layout: &BroadcastLayout,
        out: DType,
    ) -> Result<Self> {
        let v = elementwise::binary(&self.f32s(), &rhs.f32s(), op, layout);
        Ok(Self::from_f32_vec(v, out))
    }
    fn ternary(
        &self,
        b: &Self,
        c: &Self,
        op: TernaryOp,
        layout: &BroadcastLayout,
        out: DType,
    ) -> Result<Self> {
        let v = elementwise::ternary(&self.f32s(), &b.f32s(), &c.f32s(), op, layout);
        Ok(Self::from_f32_vec(v, out))
    }
    fn reduce(&self, op: ReduceOp, rows: usize, cols: usize) -> Result<Self> {
        Ok(CpuStorage::F32(elementwise::reduce(
            &self.f32s(),
            op,
            rows,
            cols,
        )))
    }
    fn softmax(&self, rows: usize, cols: usize, out: DType) -> Result<Self> {
        Ok(Self::from_f32_vec(
            elementwise::softmax(&self.f32s(), rows, cols),
            out,
        ))
    }

    fn layer_norm(
        &self,
        weight: Option<&Self>,
        bias: Option<&Self>,
        rows: usize,
        cols: usize,
        eps: f32,
        out: DType,
    ) -> Result<Self> {
        let (w, b) = (f32s_opt(weight), f32s_opt(bias));
        let v = norm::layer_norm(&self.f32s(), w.as_deref(), b.as_deref(), rows, cols, eps);
        Ok(Self::from_f32_vec(v, out))
    }
    fn rms_norm(
        &self,
        weight: Option<&Self>,
        rows: usize,
        cols: usize,
        eps: f32,
        out: DType,
    ) -> Result<Self> {
        let w = f32s_opt(weight);
        let mid = self.dtype();
        let v = norm::rms_norm(&self.f32s(), w.as_deref(), rows, cols, eps, mid);
        Ok(Self::from_f32_vec(v, out))
    }
    fn channel_rms_norm(
        &self,
        gamma: &Self,
        bias: Option<&Self>,
        n: usize,
        c: usize,
        s: usize,
        out: DType,
    ) -> Result<Self> {
        let b = f32s_opt(bias);
        let v = norm::channel_rms_norm(&self.f32s(), &gamma.f32s(), b.as_deref(), n, c, s);
        Ok(Self::from_f32_vec(v, out))
    }
    fn channel_norm_silu(
        &self,
        gamma: &Self,
        prefix: Option<(&Self, usize)>,
        n: usize,
        c: usize,
        t: usize,
        s: usize,
        tail: usize,
        out: DType,
    ) -> Result<(Self, Option<Self>)> {
        use rayon::prelude::*;
        let mut v = norm::channel_rms_norm(&self.f32s(), &gamma.f32s(), None, n, c, t * s);
        v.par_iter_mut().for_each(|x| *x = elementwise::silu(*x));
        let row = (t * s).max(1);
        let tail = (tail > 0).then(|| {
            let k = tail.min(t);
            let rows = v.chunks(row).flat_map(|r| &r[(t - k) * s..]);
            CpuStorage::F32(rows.copied().collect())
        });
        let v = match prefix {
            Some((pre, p)) if p > 0 => {
                // Per (n, c) row: the prefix frames, then this row.
                let pv = pre.f32s();
                pv.chunks(p * s.max(1))
                    .zip(v.chunks(row))
                    .flat_map(|(a, b)| a.iter().chain(b))
                    .copied()
                    .collect()
            }
            _ => v,
        };
        Ok((Self::from_f32_vec(v, out), tail))
    }
    fn rope_interleaved(
        &self,
        cos: &Self,
        sin: &Self,
        b: usize,
        l: usize,
        h: usize,
        d: usize,
        out: DType,
    ) -> Result<Self> {
        let v = norm::rope_interleaved(&self.f32s(), &cos.f32s(), &sin.f32s(), b, l, h, d);
        Ok(Self::from_f32_vec(v, out))
    }

    fn rms_norm_rope(
        &self,
        weight: &Self,
        cos: &Self,
        sin: &Self,
        rows: usize,
        heads: usize,
        head_dim: usize,
        eps: f32,
        norm: DType,
        out: DType,
    ) -> Result<Self> {
        let v = fused::rms_norm_rope(
            &self.f32s(),
            self.dtype(),
            &weight.f32s(),
            &cos.f32s(),
            &sin.f32s(),
            rows,
            heads,
            head_dim,
            eps,
            norm,
        );
        Ok(Self::from_f32_vec(v, out))
    }

    fn res_norm_mod(
        &self,
        y: Option<&Self>,
        gate: Option<&Self>,
        weight: Option<&Self>,
        bias: Option<&Self>,
        scale: Option<&Self>,
        shift: Option<&Self>,
        spec: &ResNormSpec,
    ) -> Result<(Option<Self>, Self)> {
        let [y, gate, weight, bias, scale, shift] =
            [y, gate, weight, bias, scale, shift].map(f32s_opt);
        let (res, out) = fused::res_norm_mod(
            &self.f32s(),
            y.as_deref(),
            gate.as_deref(),
            weight.as_deref(),
            bias.as_deref(),
            scale.as_deref(),
            shift.as_deref(),
            spec,
        );
        Ok((
            spec.res.map(|d| Self::from_f32_vec(res, d)),
            Self::from_f32_vec(out, spec.out),
        ))
    }

    fn gemm(&self, b: &Self, bias: Option<&Self>, spec: &GemmSpec) -> Result<Self> {
        let bias = f32s_opt(bias);
        let v = matmul::gemm(&self.f32s(), &b.f32s(), bias.as_deref(), spec);
        Ok(Self::from_f32_vec(v, spec.out))
    }
    fn conv1d(&self, w: &Self, bias: Option<&Self>, spec: &Conv1dSpec) -> Result<Self> {
        let bias = f32s_opt(bias);
        let v = matmul::conv1d(&self.f32s(), &w.f32s(), bias.as_deref(), spec);
        Ok(Self::from_f32_vec(v, spec.out))
    }
    fn conv3d(&self, w: &Self, bias: Option<&Self>, spec: &Conv3dSpec) -> Result<Self> {
        let bias = f32s_opt(bias);
        let v = matmul::conv3d(&self.f32s(), &w.f32s(), bias.as_deref(), spec);
        Ok(Self::from_f32_vec(v, spec.out))
    }

    fn attention(&self, k: &Self, v: &Self, bias: Option<&Self>, spec: &AttnSpec) -> Result<Self> {
        let bias = f32s_opt(bias);
        let o = attention::attention(&self.f32s(), &k.f32s(), &v.f32s(), bias.as_deref(), spec);
        Ok(Self::from_f32_vec(o, spec.out))
    }
}
