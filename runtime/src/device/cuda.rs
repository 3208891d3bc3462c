//! The CUDA backend (feature `cuda`): one context, one stream, the embedded kernels and a
//! cuBLASLt handle per device, created on first use. Storage is a byte buffer plus a dtype;
//! every op is a checked launcher from the `kernels` crate, or cuBLASLt (GEMMs, convs as
//! im2col + GEMM, attention without the fast kernel). Work is queued on the device's one
//! stream, so ops are ordered without events (cudarc's event tracking is off).
//!
//! A missing driver or library is an [`Error::Cuda`] naming the fix, never a panic: the
//! presence of libcuda is checked before the first driver call.

mod fused;
mod linalg;
pub mod profile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::{bf16, f16};
use kernels::{In, Kernels, Out, Strided, StridedMut, gemm::Lt};

use super::{
    AttnSpec, BackendStorage, BinaryOp, BroadcastLayout, Conv1dSpec, Conv3dSpec, CpuStorage,
    Device, GemmSpec, ReduceOp, ResNormSpec, TernaryOp, UnaryOp,
};
use crate::memory::{Allocation, Category, MemoryTracker};
use crate::{DType, Error, F8E4M3, Result};

/// One GPU's handles.
#[derive(Debug)]
pub(crate) struct CudaDev {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    lt: Lt,
    /// cuBLASLt's workspace, charged to [`Category::Workspace`] for the device's lifetime.
    _lt_charge: Allocation,
    /// cuDNN's fused attention, or why it is not available (`LAVA_ATTENTION=own` turns it
    /// off; the project's own kernel then runs).
    #[cfg(feature = "cudnn")]
    cudnn: std::result::Result<kernels::cudnn::CudnnSdpa, String>,
    /// cuDNN convolutions, or why not (`LAVA_CONV=im2col` turns them off, `LAVA_CONV=tune`
    /// times every engine per shape on first use, `cl` / `tune-cl` run them channels last).
    #[cfg(feature = "cudnn")]
    conv: std::result::Result<kernels::cudnn_conv::CudnnConv, String>,
    /// Per-op device time when `LAVA_PROFILE=1` ([`profile`]).
    prof: profile::Recorder,
}

impl CudaDev {
    fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to dlopen libcuda; cudarc panics on first use if it is absent.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "the NVIDIA driver library libcuda.so.1 is not loadable (no GPU driver here); \
                 run `lava-worker doctor` for details"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(ce)?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "CUDA device {ordinal} requested, {count} visible"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(ce)?;
        // SAFETY: this backend queues everything on one stream per device, so cudarc's
        // per-slice events are not needed (and would cost a record per use).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(ce)?;
        // Freed buffers stay in the stream-ordered pool across synchronisations instead of
        // going back to the driver (the runtime allocates its outputs per op).
        kernels::keep_pool_memory(&ctx).map_err(ke)?;
        let kernels = Kernels::load(&ctx).map_err(ke)?;
        let lt = Lt::new(Arc::clone(&stream), true).map_err(ke)?;
        let _lt_charge = MemoryTracker::for_device(&Device::Cuda(ordinal))
            .allocate(Category::Workspace, kernels::gemm::WORKSPACE_BYTES)?;
        #[cfg(feature = "cudnn")]
        let cudnn = if std::env::var("LAVA_ATTENTION").is_ok_and(|v| v == "own") {
            Err("off (LAVA_ATTENTION=own)".to_string())
        } else {
            kernels::cudnn::CudnnSdpa::new(Arc::clone(&stream)).map_err(|e| e.to_string())
        };
        #[cfg(feature = "cudnn")]
        let conv = match std::env::var("LAVA_CONV").as_deref() {
            Ok("im2col") => Err("off (LAVA_CONV=im2col)".to_string()),
            // "tune", "cl" (channels last, transposed around each conv), "tune-cl".
            v => {
                let v = v.unwrap_or("");
                kernels::cudnn_conv::CudnnConv::new(Arc::clone(&stream), v.starts_with("tune"))
                    .map(|c| c.prefer_channels_last(v.ends_with("cl")))
                    .map_err(|e| e.to_string())
            }
        };
        Ok(Self {
            ordinal,
            ctx,
            stream,
            kernels,
            lt,
            _lt_charge,
            #[cfg(feature = "cudnn")]
            cudnn,
            #[cfg(feature = "cudnn")]
            conv,
            prof: profile::Recorder::default(),
        })
    }

    /// Make this device's context current on the calling thread (cuBLASLt needs it).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(ce)
    }

    /// An uninitialised buffer of `elems` elements (NaN-filled when output poisoning is on).
    fn alloc(self: &Arc<Self>, elems: usize, dtype: DType) -> Result<CudaStorage> {
        let bytes = (elems * dtype.size_in_bytes()).max(1);
        // SAFETY: every op writes its whole output before it is read (tests poison
        // outputs to prove it).
        let buf = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(ce)?;
        let mut s = CudaStorage {
            buf,
            dtype,
            len: elems,
            dev: Arc::clone(self),
            charge: None,
        };
        if super::poison_outputs() {
            s.fill(f32::NAN)?;
        }
        Ok(s)
    }
}

fn devices() -> &'static Mutex<HashMap<usize, Arc<CudaDev>>> {
    static DEVS: OnceLock<Mutex<HashMap<usize, Arc<CudaDev>>>> = OnceLock::new();
    DEVS.get_or_init(Default::default)
}

/// The shared handles of `ordinal`, created on first use.
pub(crate) fn dev(ordinal: usize) -> Result<Arc<CudaDev>> {
    let mut map = devices().lock().map_err(|_| Error::LockPoisoned)?;
    let d = match map.get(&ordinal) {
        Some(d) => Arc::clone(d),
        None => {
            let d = Arc::new(CudaDev::new(ordinal)?);
            map.insert(ordinal, Arc::clone(&d));
            d
        }
    };
    d.bind()?;
    Ok(d)
}

fn ordinal_of(device: &Device) -> Result<usize> {
    match device {
        Device::Cuda(o) => Ok(*o),
        Device::Cpu => Err(Error::invalid(
            "cuda",
            "a CPU device was passed to the CUDA backend",
        )),
    }
}

pub use kernels::probe::{Found, Gpu, Report, probe};

/// Create the device's context, stream, kernels and cuBLASLt handle and run one tiny
/// kernel and one GEMM; describe where the kernels came from. For `doctor`.
pub fn check_kernels(ordinal: usize) -> Result<String> {
    let d = dev(ordinal)?;
    let from: Vec<String> = d
        .kernels
        .loaded_from
        .iter()
        .map(|(m, f)| format!("{m}:{f}"))
        .collect();
    let dev = Device::Cuda(ordinal);
    let a = CudaStorage::from_cpu(&dev, &CpuStorage::F32(vec![1.0, 2.0, 3.0, 4.0]))?;
    let spec = GemmSpec {
        batch: 1,
        m: 2,
        n: 2,
        k: 2,
        a_batch_stride: 0,
        b_batch_stride: 0,
        trans_b: true,
        alpha: 1.0,
        epilogue: super::Epilogue::None,
        out: DType::F32,
    };
    let got = a.gemm(&a, None, &spec)?.to_cpu()?;
    // [[1,2],[3,4]] · [[1,2],[3,4]]ᵀ
    if got != CpuStorage::F32(vec![5.0, 11.0, 11.0, 25.0]) {
        return Err(Error::Cuda(format!("cuBLASLt smoke GEMM gave {got:?}")));
    }
    #[cfg(feature = "cudnn")]
    let attn = match &d.cudnn {
        Ok(c) => format!("cuDNN SDPA {}", c.version()),
        Err(e) => format!("own kernel (cuDNN SDPA unavailable: {e})"),
    };
    #[cfg(not(feature = "cudnn"))]
    let attn = "own kernel (built without `cudnn`)".to_string();
    #[cfg(feature = "cudnn")]
    let conv = match &d.conv {
        Ok(c) => format!(
            "cuDNN{}{}",
            if c.tuned() { " autotuned" } else { "" },
            if c.channels_last() {
                " channels-last"
            } else {
                ""
            }
        ),
        Err(e) => format!("im2col + cuBLASLt (cuDNN conv unavailable: {e})"),
    };
    #[cfg(not(feature = "cudnn"))]
    let conv = "im2col + cuBLASLt (built without `cudnn`)".to_string();
    Ok(format!(
        "kernels loaded ({}), cuBLASLt GEMM ok, attention: {attn}, conv3d: {conv}",
        from.join(" ")
    ))
}

/// One line per cuDNN convolution plan made on `ordinal` (empty without the `cudnn` feature).
pub fn conv_plans(ordinal: usize) -> Result<Vec<String>> {
    #[cfg(feature = "cudnn")]
    return Ok(linalg::conv_plans(&*dev(ordinal)?));
    #[cfg(not(feature = "cudnn"))]
    {
        dev(ordinal)?;
        Ok(Vec::new())
    }
}

pub fn check_device(ordinal: usize) -> Result<()> {
    dev(ordinal).map(|_| ())
}

pub fn synchronize(ordinal: usize) -> Result<()> {
    dev(ordinal)?.stream.synchronize().map_err(ce)
}

/// The GPU's name and its (total, free) memory in bytes, free as the driver reports it now.
pub fn memory_info(ordinal: usize) -> Result<(String, u64, u64)> {
    let d = dev(ordinal)?;
    let name = d.ctx.name().map_err(ce)?;
    let (free, total) = d.ctx.mem_get_info().map_err(ce)?;
    Ok((name, total as u64, free as u64))
}

pub(crate) fn ce(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda(e.to_string())
}

pub(crate) fn ke(e: kernels::Error) -> Error {
    Error::Cuda(e.to_string())
}

pub(crate) fn kd(d: DType) -> kernels::DType {
    match d {
        DType::F32 => kernels::DType::F32,
        DType::BF16 => kernels::DType::BF16,
        DType::F16 => kernels::DType::F16,
        DType::F8E4M3 => kernels::DType::F8E4M3,
    }
}

/// A buffer of `elems` elements on `device` that the caller overwrites completely: not
/// zeroed (NaN-filled when output poisoning is on).
pub(crate) fn uninit(device: &Device, elems: usize, dtype: DType) -> Result<CudaStorage> {
    dev(ordinal_of(device)?)?.alloc(elems, dtype)
}

/// The bytes of one tensor on one GPU.
#[derive(Debug)]
pub struct CudaStorage {
    buf: CudaSlice<u8>,
    dtype: DType,
    len: usize,
    dev: Arc<CudaDev>,
    /// Set on the backend's own temporaries (im2col columns, f32 accumulators, attention
    /// scores), charged to [`Category::Workspace`]; tensors are charged by the tensor layer.
    charge: Option<Allocation>,
}

impl CudaStorage {
    fn input(&self) -> In<'_> {
        In {
            buf: &self.buf,
            dtype: kd(self.dtype),
        }
    }
    fn output(&mut self) -> Out<'_> {
        Out {
            buf: &mut self.buf,
            dtype: kd(self.dtype),
        }
    }
    fn k(&self) -> &Kernels {
        &self.dev.kernels
    }
    fn s(&self) -> &CudaStream {
        &self.dev.stream
    }
    /// Charge this (temporary) buffer to the device's workspace accounting.
    pub(super) fn charge_workspace(mut self) -> Result<Self> {
        let bytes = self.len * self.dtype.size_in_bytes();
        self.charge =
            Some(MemoryTracker::for_device(&self.device()).allocate(Category::Workspace, bytes)?);
        Ok(self)
    }

    /// A temporary buffer, charged to the workspace category while it lives.
    pub(super) fn scratch(&self, elems: usize, dtype: DType) -> Result<CudaStorage> {
        self.new_like(elems, dtype)?.charge_workspace()
    }

    fn new_like(&self, elems: usize, dtype: DType) -> Result<CudaStorage> {
        self.dev.bind()?;
        self.dev.alloc(elems, dtype)
    }
    /// One launch of `copy` from `self` (strided) into a fresh contiguous buffer of `dims`.
    fn gather(&self, dims: &[usize], strides: &[usize], factors: Option<&[usize]>) -> Result<Self> {
        let n = dims.iter().product();
        let mut out = self.new_like(n, self.dtype)?;
        let os = kernels::contiguous_strides(dims);
        self.k()
            .copy(
                self.s(),
                Strided {
                    src: self.input(),
                    offset: 0,
                    strides,
                },
                StridedMut {
                    dst: out.output(),
                    offset: 0,
                    strides: &os,
                },
                dims,
                factors,
            )
            .map_err(ke)?;
        Ok(out)
    }
}

/// The first `n` elements of a byte buffer as `T`.
fn view<T>(buf: &CudaSlice<u8>, n: usize) -> Result<cudarc::driver::CudaView<'_, T>> {
    // SAFETY: T is one of f32/bf16/f16/u8 (plain data), and the length is checked by
    // `transmute`, which returns None when `n` elements do not fit.
    unsafe { buf.transmute::<T>(n) }.ok_or_else(|| {
        Error::Cuda(format!(
            "buffer of {} bytes holds fewer than {n} elements",
            buf.len()
        ))
    })
}

fn cpu_bytes(src: &CpuStorage) -> &[u8] {
    match src {
        CpuStorage::BF16(v) => bytemuck::cast_slice(v),
        CpuStorage::F16(v) => bytemuck::cast_slice(v),
        CpuStorage::F32(v) => bytemuck::cast_slice(v),
        CpuStorage::F8E4M3(v) => bytemuck::cast_slice(v),
    }
}

fn unary_op(op: UnaryOp) -> kernels::UnaryOp {
    use kernels::UnaryOp as K;
    match op {
        UnaryOp::GeluTanh => K::GeluTanh,
        UnaryOp::Silu => K::Silu,
        UnaryOp::Exp => K::Exp,
        UnaryOp::Neg => K::Neg,
        UnaryOp::Abs => K::Abs,
        UnaryOp::Sqr => K::Sqr,
        UnaryOp::Sqrt => K::Sqrt,
        UnaryOp::Recip => K::Recip,
        UnaryOp::Tanh => K::Tanh,
        UnaryOp::Affine { mul, add } => K::Affine { mul, add },
        UnaryOp::Gelu => K::GeluErf,
        UnaryOp::Clamp { min, max } => K::Clamp { min, max },
    }
}

impl BackendStorage for CudaStorage {
    fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn elem_count(&self) -> usize {
        self.len
    }

    fn zeros(device: &Device, elems: usize, dtype: DType) -> Result<Self> {
        let d = dev(ordinal_of(device)?)?;
        let bytes = (elems * dtype.size_in_bytes()).max(1);
        let buf = d.stream.alloc_zeros::<u8>(bytes).map_err(ce)?;
        Ok(Self {
            buf,
            dtype,
            len: elems,
            dev: d,
            charge: None,
        })
    }

    fn from_cpu(device: &Device, src: &CpuStorage) -> Result<Self> {
        let d = dev(ordinal_of(device)?)?;
        let bytes = cpu_bytes(src);
        let buf = if bytes.is_empty() {
            d.stream.alloc_zeros::<u8>(1).map_err(ce)?
        } else {
            d.stream.clone_htod(bytes).map_err(ce)?
        };
        Ok(Self {
            buf,
            dtype: src.dtype(),
            len: src.elem_count(),
            dev: d,
            charge: None,
        })
    }

    fn to_cpu(&self) -> Result<CpuStorage> {
        self.dev.bind()?;
        let s = &self.dev.stream;
        let n = self.len;
        // SAFETY (transmutes): the buffer holds `len` elements of `dtype`, written by ops of
        // this backend; bf16/f16/f32 have no invalid bit patterns.
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(s.clone_dtoh(&view::<f32>(&self.buf, n)?).map_err(ce)?),
            DType::BF16 => {
                CpuStorage::BF16(s.clone_dtoh(&view::<bf16>(&self.buf, n)?).map_err(ce)?)
            }
            DType::F16 => CpuStorage::F16(s.clone_dtoh(&view::<f16>(&self.buf, n)?).map_err(ce)?),
            DType::F8E4M3 => {
                let b = s.clone_dtoh(&view::<u8>(&self.buf, n)?).map_err(ce)?;
                CpuStorage::F8E4M3(b.into_iter().map(F8E4M3).collect())
            }
        })
    }

    fn try_clone(&self) -> Result<Self> {
        let _p = self
            .dev
            .span(|| format!("clone {} {}", self.len, self.dtype.as_str()));
        self.dev.bind()?;
        let buf = self.dev.stream.clone_dtod(&self.buf).map_err(ce)?;
        Ok(Self {
            buf,
            dtype: self.dtype,
            len: self.len,
            dev: Arc::clone(&self.dev),
            charge: None,
        })
    }

    fn fill(&mut self, value: f32) -> Result<()> {
        self.dev.bind()?;
        let (k, s) = (&self.dev.kernels, &self.dev.stream);
        let dtype = kd(self.dtype);
        // The buffer may hold one padding byte (empty tensors); filling it is harmless.
        k.fill(
            s,
            Out {
                buf: &mut self.buf,
                dtype,
            },
            value,
        )
        .map_err(ke)
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
        let _p = self
            .dev
            .span(|| format!("copy2d {rows}x{cols} {}", self.dtype.as_str()));
        if self.dtype != dst.dtype {
            return Err(Error::DTypeMismatch {
                op: "copy2d",
                expected: dst.dtype,
                got: self.dtype,
            });
        }
        self.dev.bind()?;
        if rows == 1 || (src_stride == cols && dst_stride == cols) {
            // One contiguous run: a device-to-device memcpy (copy engine, full bandwidth).
            let (es, n) = (self.dtype.size_in_bytes(), rows * cols);
            if n == 0 {
                return Ok(());
            }
            let (so, d0) = (src_offset * es, dst_offset * es);
            if so + n * es > self.buf.len() || d0 + n * es > dst.buf.len() {
                return Err(Error::invalid("copy2d", "range outside the buffers"));
            }
            let src = self.buf.slice(so..so + n * es);
            let mut dv = dst.buf.slice_mut(d0..d0 + n * es);
            return self.dev.stream.memcpy_dtod(&src, &mut dv).map_err(ce);
        }
        let (ss, ds) = ([src_stride, 1], [dst_stride, 1]);
        self.k()
            .copy(
                self.s(),
                Strided {
                    src: self.input(),
                    offset: src_offset,
                    strides: &ss,
                },
                StridedMut {
                    dst: dst.output(),
                    offset: dst_offset,
                    strides: &ds,
                },
                &[rows, cols],
                None,
            )
            .map_err(ke)
    }

    fn permute(&self, dims: &[usize], perm: &[usize]) -> Result<Self> {
        let _p = self.dev.span(|| format!("permute {dims:?} {perm:?}"));
        let is = kernels::contiguous_strides(dims);
        let od: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        let st: Vec<usize> = perm.iter().map(|&p| is[p]).collect();
        self.gather(&od, &st, None)
    }

    fn index_select(&self, outer: usize, dim: usize, inner: usize, ids: &[u32]) -> Result<Self> {
        let _p = self
            .dev
            .span(|| format!("index_select {outer}x{dim}x{inner}"));
        let mut out = self.new_like(outer * ids.len() * inner, self.dtype)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let dids = self.dev.stream.clone_htod(ids).map_err(ce)?;
        let max = ids.iter().copied().max().unwrap_or(0);
        let dt = kd(self.dtype);
        self.k()
            .index_select(
                self.s(),
                self.input(),
                Out {
                    buf: &mut out.buf,
                    dtype: dt,
                },
                outer,
                dim,
                inner,
                &dids,
                max,
            )
            .map_err(ke)?;
        Ok(out)
    }

    fn upsample_nearest2d(
        &self,
        outer: usize,
        h: usize,
        w: usize,
        fh: usize,
        fw: usize,
    ) -> Result<Self> {
        let _p = self.dev.span(|| format!("upsample {outer}x{h}x{w}"));
        self.gather(&[outer, h * fh, w * fw], &[h * w, w, 1], Some(&[1, fh, fw]))
    }

    fn cast(&self, dtype: DType, mul: f32) -> Result<Self> {
        let _p = self.dev.span(|| {
            format!(
                "cast {} {}->{}",
                self.len,
                self.dtype.as_str(),
                dtype.as_str()
            )
        });
        let mut out = self.new_like(self.len, dtype)?;
        self.k()
            .unary(
                self.s(),
                kernels::UnaryOp::Scale(mul),
                Strided {
                    src: self.input(),
                    offset: 0,
                    strides: &[1],
                },
                StridedMut {
                    dst: out.output(),
                    offset: 0,
                    strides: &[1],
                },
                &[self.len],
            )
            .map_err(ke)?;
        Ok(out)
    }

    fn unary(&self, op: UnaryOp, out_dtype: DType) -> Result<Self> {
        let _p = self.dev.span(|| {
            format!(
                "unary {op:?} {} {}->{}",
                self.len,
                self.dtype.as_str(),
                out_dtype.as_str()
            )
        });
        let mut out = self.new_like(self.len, out_dtype)?;
        self.k()
            .unary(
                self.s(),
                unary_op(op),
                Strided {
                    src: self.input(),
                    offset: 0,
                    strides: &[1],
                },
                StridedMut {
                    dst: out.output(),
                    offset: 0,
                    strides: &[1],
                },
                &[self.len],
            )
            .map_err(ke)?;
        Ok(out)
    }

    fn binary(
        &self,
        rhs: &Self,
        op: BinaryOp,
        layout: &BroadcastLayout,
        out_dtype: DType,
    ) -> Result<Self> {
        let _p = self.dev.span(|| {
            format!(
                "binary {op:?} {:?} {}->{}",
                layout.dims,
                self.dtype.as_str(),
                out_dtype.as_str()
            )
        });
        let n = layout.dims.iter().product();
        let mut out = self.new_like(n, out_dtype)?;
        let os = kernels::contiguous_strides(&layout.dims);
        let op = match op {
            BinaryOp::Add => kernels::BinaryOp::Add,
            BinaryOp::Sub => kernels::BinaryOp::Sub,
            BinaryOp::Mul => kernels::BinaryOp::Mul,
            BinaryOp::Div => kernels::BinaryOp::Div,
            BinaryOp::Maximum => kernels::BinaryOp::Maximum,
            BinaryOp::Minimum => kernels::BinaryOp::Minimum,
        };
        self.k()
            .binary(
                self.s(),
                op,
                Strided {
                    src: self.input(),
                    offset: 0,
                    strides: &layout.strides[0],
                },
                Strided {
                    src: rhs.input(),
                    offset: 0,
                    strides: &layout.strides[1],
                },
                StridedMut {
                    dst: out.output(),
                    offset: 0,
                    strides: &os,
                },
                &layout.dims,
            )
            .map_err(ke)?;
        Ok(out)
    }

    fn ternary(
        &self,
        b: &Self,
        c: &Self,
        op: TernaryOp,
        layout: &BroadcastLayout,
        out_dtype: DType,
    ) -> Result<Self> {
        let _p = self.dev.span(|| {
            format!(
                "ternary {op:?} {:?} {}->{}",
                layout.dims,
                self.dtype.as_str(),
                out_dtype.as_str()
            )
        });
        let n = layout.dims.iter().product();
        let mut out = self.new_like(n, out_dtype)?;
        let os = kernels::contiguous_strides(&layout.dims);
        let op = match op {
            TernaryOp::Modulate => kernels::TernaryOp::Modulate,
            TernaryOp::GatedResidual => kernels::TernaryOp::GatedResidual,
        };
        let st = |i: usize| layout.strides[i].as_slice();
        self.k()
            .ternary(
                self.s(),
                op,
                Strided {
                    src: self.input(),
                    offset: 0,
                    strides: st(0),
                },
                Strided {
                    src: b.input(),
                    offset: 0,
                    strides: st(1),
                },
                Strided {
                    src: c.input(),
                    offset: 0,
                    strides: st(2),
                },
                StridedMut {
                    dst: out.output(),
                    offset: 0,
                    strides: &os,
                },
                &layout.dims,
            )
            .map_err(ke)?;
        Ok(out)
    }

    fn reduce(&self, op: ReduceOp, rows: usize, cols: usize) -> Result<Self> {
        let _p = self.dev.span(|| format!("reduce {op:?} {rows}x{cols}"));
        let mut out = self.new_like(rows, DType::F32)?;
        let op = match op {
            ReduceOp::Sum => kernels::ReduceOp::Sum,
            ReduceOp::Mean => kernels::ReduceOp::Mean,
            ReduceOp::Max => kernels::ReduceOp::Max,
            ReduceOp::AbsMax => kernels::ReduceOp::AbsMax,
        };
        self.k()
            .reduce_rows(self.s(), op, self.input(), out.output(), rows, cols)
            .map_err(ke)?;
        Ok(out)
    }

    fn softmax(&self, rows: usize, cols: usize, out_dtype: DType) -> Result<Self> {
        let _p = self.dev.span(|| format!("softmax {rows}x{cols}"));
        let mut out = self.new_like(rows * cols, out_dtype)?;
        self.k()
            .softmax(self.s(), self.input(), out.output(), rows, cols)
            .map_err(ke)?;
        Ok(out)
    }

    fn layer_norm(
        &self,
        weight: Option<&Self>,
        bias: Option<&Self>,
        rows: usize,
        cols: usize,
        eps: f32,
        out_dtype: DType,
    ) -> Result<Self> {
        let _p = self.dev.span(|| {
            format!(
                "layer_norm {rows}x{cols} {}->{} affine {}",
                self.dtype.as_str(),
                out_dtype.as_str(),
                weight.is_some()
            )
        });
        let mut out = self.new_like(rows * cols, out_dtype)?;
        self.k()
            .layer_norm(
                self.s(),
                self.input(),
                weight.map(|w| w.input()),
                bias.map(|b| b.input()),
                out.output(),
                rows,
                cols,
                eps,
            )
            .map_err(ke)?;
        Ok(out)
    }

    fn rms_norm(
        &self,
        weight: Option<&Self>,
        rows: usize,
        cols: usize,
        eps: f32,
        out_dtype: DType,
    ) -> Result<Self> {
        let _p = self.dev.span(|| {
            format!(
                "rms_norm {rows}x{cols} {}->{}",
                self.dtype.as_str(),
                out_dtype.as_str()
            )
        });
        let mut out = self.new_like(rows * cols, out_dtype)?;
        self.k()
            .rms_norm(
                self.s(),
                self.input(),
                weight.map(|w| w.input()),
                out.output(),
                rows,
                cols,
                eps,
            )
            .map_err(ke)?;
        Ok(out)
    }

    fn channel_rms_norm(
        &self,
        gamma: &Self,
        bias: Option<&Self>,
        n: usize,
        c: usize,
        s: usize,
        out_dtype: DType,
    ) -> Result<Self> {
        let _p = self.dev.span(|| format!("channel_rms_norm {n}x{c}x{s}"));
        let mut out = self.new_like(n * c * s, out_dtype)?;
        self.k()
            .channel_rms_norm(
                self.s(),
                self.input(),
                Some(gamma.input()),
                bias.map(|b| b.input()),
                out.output(),
                n,
                c,
                s,
                1e-12,
                (c as f32).sqrt(),
            )
            .map_err(ke)?;
        Ok(out)
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
        out_dtype: DType,
    ) -> Result<(Self, Option<Self>)> {
        let _p = self
            .dev
            .span(|| format!("norm_silu {c}x{t}x{s} {}", self.dtype.as_str()));
        let p = prefix.map_or(0, |x| x.1);
        let mut out = self.new_like(n * c * (p + t) * s, out_dtype)?;
        let k = tail.min(t);
        let mut cache = if tail > 0 {
            Some(self.new_like(n * c * k * s, DType::F32)?)
        } else {
            None
        };
        self.k()
            .channel_norm_silu(
                self.s(),
                self.input(),
                gamma.input(),
                prefix.map(|(x, p)| (x.input(), p)),
                out.output(),
                cache.as_mut().map(|x| (x.output(), k)),
                n,
                c,
                t,
                s,
                1e-12,
                (c as f32).sqrt(),
            )
            .map_err(ke)?;
        Ok((out, cache))
    }

    fn rope_interleaved(
        &self,
        cos: &Self,
        sin: &Self,
        b: usize,
        l: usize,
        h: usize,
        d: usize,
        out_dtype: DType,
    ) -> Result<Self> {
        let _p = self.dev.span(|| {
            format!(
                "rope {b}x{l}x{h}x{d} {}->{}",
                self.dtype.as_str(),
                out_dtype.as_str()
            )
        });
        let mut out = self.new_like(b * l * h * d, out_dtype)?;
        let (bs, ls, hs) = ((l * h * d) as i64, (h * d) as i64, d as i64);
        let a = kernels::RopeArgs {
            batch: b as i64,
            tokens: l as i64,
            heads: h as i64,
            half_dim: (d / 2) as i64,
            x_bs: bs,
            x_ls: ls,
            x_hs: hs,
            o_bs: bs,
            o_ls: ls,
            o_hs: hs,
            t_bs: 0,
            t_ls: (d / 2) as i64,
            ..Default::default()
        };
        self.k()
            .rope(
                self.s(),
                self.input(),
                cos.input(),
                sin.input(),
                out.output(),
                a,
            )
            .map_err(ke)?;
        Ok(out)
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
        fused::rms_norm_rope(
            self, weight, cos, sin, rows, heads, head_dim, eps, norm, out,
        )
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
        fused::res_norm_mod(self, y, gate, weight, bias, scale, shift, spec)
    }

    fn gemm(&self, b: &Self, bias: Option<&Self>, spec: &GemmSpec) -> Result<Self> {
        linalg::gemm(self, b, bias, spec)
    }

    fn conv1d(&self, w: &Self, bias: Option<&Self>, spec: &Conv1dSpec) -> Result<Self> {
        linalg::conv1d(self, w, bias, spec)
    }

    fn conv3d(&self, w: &Self, bias: Option<&Self>, spec: &Conv3dSpec) -> Result<Self> {
        linalg::conv3d(self, w, bias, spec)
    }

    fn attention(&self, k: &Self, v: &Self, bias: Option<&Self>, spec: &AttnSpec) -> Result<Self> {
        linalg::attention(self, k, v, bias, spec)
    }
}

// === Raw access for the NCCL communicator (comm/nccl) ===

impl CudaStorage {
    /// The raw byte buffer (at least `elem_count × dtype size` bytes).
    pub(crate) fn raw_buf(&self) -> &CudaSlice<u8> {
        &self.buf
    }
    pub(crate) fn raw_buf_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.buf
    }
}

/// The stream every op on device `ordinal` is queued on; NCCL uses it too.
pub(crate) fn stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    Ok(Arc::clone(&dev(ordinal)?.stream))
}
