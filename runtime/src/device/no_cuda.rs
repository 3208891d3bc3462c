//! The CUDA backend when the `cuda` feature is off: an uninhabited storage type, so every
//! match arm on it is statically dead, and constructors that return
//! [`Error::CudaNotCompiled`]. `cargo test` thus needs no CUDA toolkit (candle's
//! `dummy_cuda_backend.rs`).

use super::{
    AttnSpec, BackendStorage, BinaryOp, BroadcastLayout, Conv1dSpec, Conv3dSpec, CpuStorage,
    Device, GemmSpec, ReduceOp, ResNormSpec, TernaryOp, UnaryOp,
};
use crate::{DType, Error, Result};

/// No value of this type can exist without the `cuda` feature.
#[derive(Debug)]
pub enum CudaStorage {}

pub fn check_device(_ordinal: usize) -> Result<()> {
    Err(Error::CudaNotCompiled)
}

pub fn synchronize(_ordinal: usize) -> Result<()> {
    Err(Error::CudaNotCompiled)
}

pub fn memory_info(_ordinal: usize) -> Result<(String, u64, u64)> {
    Err(Error::CudaNotCompiled)
}

pub(crate) fn uninit(_: &Device, _: usize, _: DType) -> Result<CudaStorage> {
    Err(Error::CudaNotCompiled)
}

impl BackendStorage for CudaStorage {
    fn device(&self) -> Device {
        match *self {}
    }
    fn dtype(&self) -> DType {
        match *self {}
    }
    fn elem_count(&self) -> usize {
        match *self {}
    }
    fn zeros(_: &Device, _: usize, _: DType) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    fn from_cpu(_: &Device, _: &CpuStorage) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    fn to_cpu(&self) -> Result<CpuStorage> {
        match *self {}
    }
    fn try_clone(&self) -> Result<Self> {
        match *self {}
    }
    fn fill(&mut self, _: f32) -> Result<()> {
        match *self {}
    }
    fn copy2d(
        &self,
        _: &mut Self,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        match *self {}
    }
    fn permute(&self, _: &[usize], _: &[usize]) -> Result<Self> {
        match *self {}
    }
    fn index_select(&self, _: usize, _: usize, _: usize, _: &[u32]) -> Result<Self> {
        match *self {}
    }
    fn upsample_nearest2d(&self, _: usize, _: usize, _: usize, _: usize, _: usize) -> Result<Self> {
        match *self {}
    }
    fn cast(&self, _: DType, _: f32) -> Result<Self> {
        match *self {}
    }
    fn unary(&self, _: UnaryOp, _: DType) -> Result<Self> {
        match *self {}
    }
    fn binary(&self, _: &Self, _: BinaryOp, _: &BroadcastLayout, _: DType) -> Result<Self> {
        match *self {}
    }
    fn ternary(
        &self,
        _: &Self,
        _: &Self,
        _: TernaryOp,
        _: &BroadcastLayout,
        _: DType,
    ) -> Result<Self> {
        match *self {}
    }
    fn reduce(&self, _: ReduceOp, _: usize, _: usize) -> Result<Self> {
        match *self {}
    }
    fn softmax(&self, _: usize, _: usize, _: DType) -> Result<Self> {
        match *self {}
    }
    fn layer_norm(
        &self,
        _: Option<&Self>,
        _: Option<&Self>,
        _: usize,
        _: usize,
        _: f32,
        _: DType,
    ) -> Result<Self> {
        match *self {}
    }
    fn rms_norm(&self, _: Option<&Self>, _: usize, _: usize, _: f32, _: DType) -> Result<Self> {
        match *self {}
    }
    fn channel_rms_norm(
        &self,
        _: &Self,
        _: Option<&Self>,
        _: usize,
        _: usize,
        _: usize,
        _: DType,
    ) -> Result<Self> {
        match *self {}
    }
    fn channel_norm_silu(
        &self,
        _: &Self,
        _: Option<(&Self, usize)>,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: DType,
    ) -> Result<(Self, Option<Self>)> {
        match *self {}
    }
    fn rope_interleaved(
        &self,
        _: &Self,
        _: &Self,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: DType,
    ) -> Result<Self> {
        match *self {}
    }
    fn gemm(&self, _: &Self, _: Option<&Self>, _: &GemmSpec) -> Result<Self> {
        match *self {}
    }
    fn conv1d(&self, _: &Self, _: Option<&Self>, _: &Conv1dSpec) -> Result<Self> {
        match *self {}
    }
    fn conv3d(&self, _: &Self, _: Option<&Self>, _: &Conv3dSpec) -> Result<Self> {
        match *self {}
    }
    fn attention(&self, _: &Self, _: &Self, _: Option<&Self>, _: &AttnSpec) -> Result<Self> {
        match *self {}
    }
    fn rms_norm_rope(
        &self,
        _: &Self,
        _: &Self,
        _: &Self,
        _: usize,
        _: usize,
        _: usize,
        _: f32,
        _: DType,
        _: DType,
    ) -> Result<Self> {
        match *self {}
    }
    fn res_norm_mod(
        &self,
        _: Option<&Self>,
        _: Option<&Self>,
        _: Option<&Self>,
        _: Option<&Self>,
        _: Option<&Self>,
        _: Option<&Self>,
        _: &ResNormSpec,
    ) -> Result<(Option<Self>, Self)> {
        match *self {}
    }
}
