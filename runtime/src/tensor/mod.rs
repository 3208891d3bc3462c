//! The one concrete tensor type.
//!
//! A [`Tensor`] is a contiguous row-major buffer with a shape, a dtype and a device; clones
//! share the buffer (`Arc`). Layout ops that change element order (`narrow`, `permute`,
//! `concat`, …) copy; `reshape` shares. The only in-place writes are [`Tensor::slice_set`],
//! [`Tensor::poison`] and the raw-byte writers used by communicators, so aliasing is visible.
//!
//! # Dtype behaviour by op (what is rounded where)
//!
//! | op | inputs | math | output dtype (one RNE rounding) |
//! | --- | --- | --- | --- |
//! | `to_dtype` | any | f32 (× fp8 scale) | target; into fp8 saturating ±448, scale 1 |
//! | `quantize_fp8` | bf16/f16/f32 | x·s in f32, s = min(448/max(amax,1e-12), 448) | fp8, scale 1/s |
//! | unary (`gelu_tanh`, `gelu`, `silu`, `exp`, …) | non-fp8 | f32 (GELU-erf via f64) | input dtype, or `unary_to(out)` |
//! | binary (`add`, `mul`, …, broadcasting) | non-fp8, may mix | f32 | torch promotion (mixed → f32), or `binary_to(out)` |
//! | `modulate` x·(1+scale)+shift, `gated_residual` x+y·gate | non-fp8, may mix | f32, no FMA | `out` argument |
//! | `sum/mean/max_last`, `reduce_last` | non-fp8 | f32 accumulation | f32 |
//! | `softmax_last` | non-fp8 | f32 | input dtype, or `softmax_last_to(out)` |
//! | `layer_norm` | non-fp8 | f32 stats, affine in f32 | `out` argument |
//! | `rms_norm` | non-fp8 | f32 stats; normalised value rounded to x's dtype, then × weight | promote(x, weight) |
//! | `channel_rms_norm` | non-fp8 | f32 throughout | `out` argument |
//! | `rope_interleaved` | x non-fp8, f32 tables | f64 complex product → f32 | `out` argument |
//! | `matmul`, `linear`, `linear_ex` | same dtype (fp8 allowed) | f32 accumulation, × fp8 scales, + bias, epilogue in f32 | x dtype, or `out` |
//! | `fp8_linear` | x any float, w fp8 | quantise x, f32 accumulation, + bias | bf16, then cast to `out` |
//! | `conv1d`, `conv3d` | x, w same non-fp8 dtype | f32 accumulation, + bias | `out` argument |
//! | `attention` | q, k, v same dtype, f32 bias | f32 scores, softmax and accumulation | `out` argument |
//! | layout (`narrow`, `cat`, `permute`, `index_select`, `upsample_nearest2d`, `slice_set`) | any | exact copy | input dtype (fp8 keeps its scale) |

mod dtype;
mod fused;
mod layout;
mod linalg;
mod ops;
mod shape;
mod vae;

pub use dtype::{DType, F8E4M3, F8E4M3_MAX, WithDType};
pub use fused::ResNormMod;
pub use linalg::{Conv1dOpts, Conv3dOpts};
pub use shape::Shape;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::device::{BackendStorage, CpuStorage, CudaStorage, Storage};
use crate::memory::{Allocation, MemoryTracker, current_category};
use crate::{Device, Error, Result};

#[derive(Debug)]
struct TensorData {
    storage: RwLock<Storage>,
    _alloc: Allocation,
}

/// A contiguous n-d array on one device.
#[derive(Clone)]
pub struct Tensor {
    data: Arc<TensorData>,
    shape: Shape,
    dtype: DType,
    device: Device,
    /// Dequantisation scale (logical value = stored × scale); 1.0 unless dtype is fp8.
    scale: f32,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}, {:?}",
            self.shape,
            self.dtype.as_str(),
            self.device
        )?;
        if self.dtype == DType::F8E4M3 {
            write!(f, ", scale {}", self.scale)?;
        }
        write!(f, "]")
    }
}

// Tensors cross threads (communicator workers, rayon): keep them Send + Sync.
const _: () = {
    fn send_sync<T: Send + Sync>() {}
    #[allow(dead_code)]
    fn check() {
        send_sync::<Tensor>();
    }
};

/// Charge an allocation of `elems` elements of `dtype` on `device` to the current category.
pub(crate) fn track(device: &Device, dtype: DType, elems: usize) -> Result<Allocation> {
    MemoryTracker::for_device(device).allocate(current_category(), elems * dtype.size_in_bytes())
}

impl Tensor {
    // === Construction ===

    /// Wrap a storage produced under `alloc` (which must already be charged).
    pub(crate) fn wrap(storage: Storage, shape: Shape, alloc: Allocation, scale: f32) -> Self {
        let dtype = storage.dtype();
        let device = storage.device();
        Tensor {
            data: Arc::new(TensorData {
                storage: RwLock::new(storage),
                _alloc: alloc,
            }),
            shape,
            dtype,
            device,
            scale,
        }
    }

    /// Adopt a backend storage (charged to the current category now).
    pub fn from_storage(storage: Storage, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        let n = match &storage {
            Storage::Cpu(s) => s.elem_count(),
            Storage::Cuda(s) => s.elem_count(),
        };
        if n != shape.elem_count() {
            return Err(Error::ElementCount {
                op: "from_storage",
                got: n,
                shape,
            });
        }
        let alloc = track(&storage.device(), storage.dtype(), n)?;
        Ok(Self::wrap(storage, shape, alloc, 1.0))
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Self> {
        let shape = shape.into();
        let n = shape.elem_count();
        let alloc = track(device, dtype, n)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(device, n, dtype)?),
            Device::Cuda(_) => Storage::Cuda(CudaStorage::zeros(device, n, dtype)?),
        };
        Ok(Self::wrap(storage, shape, alloc, 1.0))
    }

    /// A buffer the caller will overwrite completely: zeros on the CPU, not initialised on a
    /// GPU, NaN on both while [`crate::device::set_poison_outputs`] is on.
    pub(crate) fn uninit(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Self> {
        if device.is_cuda() {
            // No memset on the GPU: the backend poisons new buffers itself when asked to.
            let shape = shape.into();
            let n = shape.elem_count();
            let alloc = track(device, dtype, n)?;
            let st = Storage::Cuda(crate::device::cuda::uninit(device, n, dtype)?);
            return Ok(Self::wrap(st, shape, alloc, 1.0));
        }
        let t = Self::zeros(shape, dtype, device)?;
        if crate::device::poison_outputs() {
            t.poison()?;
        }
        Ok(t)
    }

    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Self> {
        Self::full(1.0, shape, dtype, device)
    }

    /// A one-element tensor of shape `[1]` (broadcasts against anything).
    pub fn scalar(value: f32, dtype: DType, device: &Device) -> Result<Self> {
        Self::full(value, 1usize, dtype, device)
    }

    /// Every element `value` rounded to `dtype`.
    pub fn full(
        value: f32,
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let t = Self::zeros(shape, dtype, device)?;
        t.storage_mut()?.fill_value(value)?;
        Ok(t)
    }

    /// Build from host data of the matching element type.
    pub fn from_vec<T: WithDType>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.elem_count() {
            return Err(Error::ElementCount {
                op: "from_vec",
                got: data.len(),
                shape,
            });
        }
        let cpu = T::into_cpu_storage(data);
        Self::from_cpu_storage(cpu, shape, device)
    }

    pub fn from_slice<T: WithDType>(
        data: &[T],
        shape: impl Into<Shape>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape, device)
    }

    /// Build a `dtype` tensor from f32 values, rounding each (RNE; fp8 saturates, scale 1).
    pub fn from_f32(
        data: &[f32],
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.elem_count() {
            return Err(Error::ElementCount {
                op: "from_f32",
                got: data.len(),
                shape,
            });
        }
        Self::from_cpu_storage(CpuStorage::from_f32(data, dtype), shape, device)
    }

    /// Build from raw little-endian bytes of `dtype` (e.g. a safetensors slice or a message).
    pub fn from_bytes(
        bytes: &[u8],
        shape: impl Into<Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if bytes.len() != shape.elem_count() * dtype.size_in_bytes() {
            return Err(Error::ElementCount {
                op: "from_bytes",
                got: bytes.len() / dtype.size_in_bytes(),
                shape,
            });
        }
        Self::from_cpu_storage(CpuStorage::from_bytes(bytes, dtype), shape, device)
    }

    fn from_cpu_storage(cpu: CpuStorage, shape: Shape, device: &Device) -> Result<Self> {
        let alloc = track(device, cpu.dtype(), cpu.elem_count())?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(cpu),
            Device::Cuda(_) => Storage::Cuda(CudaStorage::from_cpu(device, &cpu)?),
        };
        Ok(Self::wrap(storage, shape, alloc, 1.0))
    }

    // === Accessors ===

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn rank(&self) -> usize {
        self.shape.rank()
    }
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape.dim(d)
    }
    pub fn dims2(&self) -> Result<(usize, usize)> {
        self.shape.dims2()
    }
    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        self.shape.dims3()
    }
    pub fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        self.shape.dims4()
    }
    pub fn dims5(&self) -> Result<(usize, usize, usize, usize, usize)> {
        self.shape.dims5()
    }
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }
    /// Size of the buffer in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
    /// Dequantisation scale of an fp8 tensor (logical = stored × scale); 1.0 otherwise.
    pub fn fp8_scale(&self) -> f32 {
        self.scale
    }
    /// The same buffer with another fp8 dequantisation scale (e.g. loaded from a checkpoint).
    pub fn with_fp8_scale(&self, scale: f32) -> Result<Self> {
        if self.dtype != DType::F8E4M3 {
            return Err(Error::DTypeMismatch {
                op: "with_fp8_scale",
                expected: DType::F8E4M3,
                got: self.dtype,
            });
        }
        let mut t = self.clone();
        t.scale = scale;
        Ok(t)
    }
    /// Whether both tensors share one buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    /// Read access to the backend storage.
    pub fn storage(&self) -> Result<RwLockReadGuard<'_, Storage>> {
        self.data.storage.read().map_err(|_| Error::LockPoisoned)
    }
    /// Write access to the backend storage (in-place writes are seen by every clone).
    pub fn storage_mut(&self) -> Result<RwLockWriteGuard<'_, Storage>> {
        self.data.storage.write().map_err(|_| Error::LockPoisoned)
    }

    // === Host access ===

    /// The elements as `T` (must be this tensor's dtype); copies from the device if needed.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch {
                op: "to_vec",
                expected: self.dtype,
                got: T::DTYPE,
            });
        }
        let cpu = self.to_cpu_storage()?;
        T::cpu_slice(&cpu)
            .map(<[T]>::to_vec)
            .ok_or(Error::DTypeMismatch {
                op: "to_vec",
                expected: self.dtype,
                got: T::DTYPE,
            })
    }

    /// The logical values widened to f32 (fp8 multiplied by its scale).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        let mut v = self.to_cpu_storage()?.to_f32_vec();
        if self.scale != 1.0 {
            v.iter_mut().for_each(|x| *x *= self.scale);
        }
        Ok(v)
    }

    /// The stored values as a scalar (tensor of one element), widened to f32.
    pub fn to_scalar_f32(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            return Err(Error::ElementCount {
                op: "to_scalar_f32",
                got: self.elem_count(),
                shape: self.shape.clone(),
            });
        }
        Ok(self.to_vec_f32()?[0])
    }

    /// A host copy of the storage.
    pub fn to_cpu_storage(&self) -> Result<CpuStorage> {
        match &*self.storage()? {
            Storage::Cpu(s) => s.try_clone(),
            Storage::Cuda(s) => s.to_cpu(),
        }
    }

    /// The raw little-endian bytes (a host copy).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.to_cpu_storage()?.as_bytes().to_vec())
    }

    /// Run `f` on the host storage of a CPU tensor without copying.
    pub fn with_cpu_storage<R>(&self, f: impl FnOnce(&CpuStorage) -> R) -> Result<R> {
        match &*self.storage()? {
            Storage::Cpu(s) => Ok(f(s)),
            Storage::Cuda(s) => Err(Error::DeviceMismatch {
                op: "with_cpu_storage",
                lhs: Device::Cpu,
                rhs: s.device(),
            }),
        }
    }

    /// Run `f` on the mutable host storage of a CPU tensor (writes are seen by every clone).
    pub fn with_cpu_storage_mut<R>(&self, f: impl FnOnce(&mut CpuStorage) -> R) -> Result<R> {
        match &mut *self.storage_mut()? {
            Storage::Cpu(s) => Ok(f(s)),
            Storage::Cuda(s) => Err(Error::DeviceMismatch {
                op: "with_cpu_storage_mut",
                lhs: Device::Cpu,
                rhs: s.device(),
            }),
        }
    }

    /// Overwrite the whole buffer with raw bytes of this dtype (e.g. a received message).
    pub fn copy_from_bytes(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.size_in_bytes() {
            return Err(Error::ElementCount {
                op: "copy_from_bytes",
                got: bytes.len() / self.dtype.size_in_bytes(),
                shape: self.shape.clone(),
            });
        }
        let src = CpuStorage::from_bytes(bytes, self.dtype);
        let mut st = self.storage_mut()?;
        match &mut *st {
            Storage::Cpu(s) => *s = src,
            Storage::Cuda(s) => {
                let n = src.elem_count();
                // The staging copy is a device allocation too.
                let _staging = track(&self.device, self.dtype, n)?;
                let up = CudaStorage::from_cpu(&self.device, &src)?;
                up.copy2d(s, 1, n, n, 0, n, 0)?;
            }
        }
        Ok(())
    }

    // === Device, copies, poisoning ===

    /// A copy on `device` (a clone sharing the buffer if it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if *device == self.device {
            return Ok(self.clone());
        }
        let cpu = self.to_cpu_storage()?;
        let mut t = Self::from_cpu_storage(cpu, self.shape.clone(), device)?;
        t.scale = self.scale;
        Ok(t)
    }

    /// A deep copy with its own buffer.
    pub fn try_clone(&self) -> Result<Self> {
        let alloc = track(&self.device, self.dtype, self.elem_count())?;
        let st = match &*self.storage()? {
            Storage::Cpu(s) => Storage::Cpu(s.try_clone()?),
            Storage::Cuda(s) => Storage::Cuda(s.try_clone()?),
        };
        Ok(Self::wrap(st, self.shape.clone(), alloc, self.scale))
    }

    /// Fill with NaN (tests poison outputs so unwritten elements show up).
    pub fn poison(&self) -> Result<()> {
        self.storage_mut()?.fill_value(f32::NAN)
    }

    /// Same buffer, new shape with the same element count.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if shape.elem_count() != self.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                lhs: self.shape.clone(),
                rhs: shape,
            });
        }
        let mut t = self.clone();
        t.shape = shape;
        Ok(t)
    }
}

/// Read guards over several operands, locking each distinct buffer once, so an op whose
/// operands alias (`x.mul(&x)`) never read-locks one `RwLock` twice on one thread.
pub(crate) struct ReadAll<'a> {
    guards: Vec<RwLockReadGuard<'a, Storage>>,
    slot: Vec<Option<usize>>,
}

impl<'a> ReadAll<'a> {
    pub(crate) fn new(ts: &[Option<&'a Tensor>]) -> Result<Self> {
        let mut owners: Vec<&'a Tensor> = Vec::new();
        let mut guards = Vec::new();
        let mut slot = Vec::with_capacity(ts.len());
        for t in ts {
            slot.push(match t {
                None => None,
                Some(t) => Some(match owners.iter().position(|o| o.same_storage(t)) {
                    Some(i) => i,
                    None => {
                        owners.push(t);
                        guards.push(t.storage()?);
                        guards.len() - 1
                    }
                }),
            });
        }
        Ok(Self { guards, slot })
    }
    /// Operand `i`, which must have been given as `Some`.
    pub(crate) fn get(&self, i: usize) -> Result<&Storage> {
        self.opt(i)?
            .ok_or_else(|| Error::invalid("ReadAll::get", format!("operand {i} is absent")))
    }
    pub(crate) fn opt(&self, i: usize) -> Result<Option<&Storage>> {
        match self.slot.get(i) {
            Some(s) => Ok(s.map(|k| &*self.guards[k])),
            None => Err(Error::invalid("ReadAll::opt", format!("no operand {i}"))),
        }
    }
}

impl Storage {
    fn fill_value(&mut self, v: f32) -> Result<()> {
        match self {
            Storage::Cpu(s) => s.fill(v),
            Storage::Cuda(s) => s.fill(v),
        }
    }
}
