//! Devices, storage and the backend trait.
//!
//! Enum dispatch as in candle: [`Device`] names where a tensor lives, [`Storage`] holds
//! its bytes, and every op is a `match` that forwards to one [`BackendStorage`] impl
//! (`CpuStorage` always, `CudaStorage` with the `cuda` feature; without it `CudaStorage`
//! is an uninhabited stub and creating one returns [`crate::Error::CudaNotCompiled`]).
//!
//! Backend contract, for every method:
//! - all storages are contiguous row-major; shapes come in the `*Spec` structs;
//! - the tensor layer has already checked shapes, devices and dtypes;
//! - arithmetic is in f32 (f32 accumulation for sums and GEMMs) and the result is
//!   rounded once, round-to-nearest-even, to the requested `out` dtype, unless a method's
//!   doc says otherwise;
//! - fp8 operands appear only in [`BackendStorage::cast`], [`BackendStorage::gemm`] and the
//!   layout family; scales are applied by the caller through `alpha` / `mul`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
pub mod no_cuda;
#[cfg(not(feature = "cuda"))]
pub use no_cuda as cuda;

pub use cpu::CpuStorage;
pub use cuda::CudaStorage;

use crate::{DType, Result};

static POISON_OUTPUTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Make backends fill every newly allocated output buffer with NaN before an op writes it,
/// so elements an op forgets to write show up in tests (process-wide; for tests).
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether new output buffers must be NaN-filled (see [`set_poison_outputs`]).
pub fn poison_outputs() -> bool {
    POISON_OUTPUTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl Device {
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
    /// The first CUDA device, or [`crate::Error::CudaNotCompiled`] without the feature.
    pub fn cuda_if_available(ordinal: usize) -> Result<Device> {
        cuda::check_device(ordinal)?;
        Ok(Device::Cuda(ordinal))
    }
    /// Block until all work queued on this device has finished (no-op on CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(o) => cuda::synchronize(*o),
        }
    }
}

/// The bytes of one tensor on one device.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(s) => s.device(),
            Storage::Cuda(s) => s.device(),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Op descriptions passed to the backends.
// ---------------------------------------------------------------------------------------

/// Elementwise functions of one operand (evaluated in f32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), torch `gelu(approximate="tanh")`.
    GeluTanh,
    /// 0.5·x·(1 + erf(x/√2)), torch's exact `gelu` (wav2vec2).
    Gelu,
    /// x·sigmoid(x) = x / (1 + e^(−x)).
    Silu,
    Exp,
    Neg,
    Abs,
    Sqr,
    Sqrt,
    Recip,
    Tanh,
    /// x·mul + add (one f32 multiply, then one f32 add).
    Affine {
        mul: f32,
        add: f32,
    },
    /// min(max(x, min), max) (the VAE's output clamp to [−1, 1]).
    Clamp {
        min: f32,
        max: f32,
    },
}

/// Elementwise functions of two operands (evaluated in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
}

/// Fused elementwise functions of three operands a, b, c (evaluated in f32, no FMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryOp {
    /// a·(1 + b) + c: adaLN modulate with b = scale, c = shift.
    Modulate,
    /// a + b·c: gated residual with b = branch output, c = gate.
    GatedResidual,
}

/// Reductions over the last dim, accumulated in f32, f32 result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    /// max |x| (0 for an empty row).
    AbsMax,
}

/// Activation fused after a GEMM's bias add (applied to the f32 value before rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Epilogue {
    #[default]
    None,
    GeluTanh,
    Silu,
}

/// Padding mode of a 1-d convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PadMode {
    #[default]
    Zeros,
    /// Repeat the edge element (torch `padding_mode="replicate"`).
    Replicate,
}

/// Operands of a broadcasting elementwise op: the output dims and, per operand, element
/// strides into that operand's contiguous storage (0 on broadcast dims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastLayout {
    pub dims: Vec<usize>,
    pub strides: Vec<Vec<usize>>,
}

/// `out[b] = epilogue(alpha · A[b]·op(B[b]) + bias)`, bias `[n]` broadcast over rows.
/// A is `[m, k]`; B is `[n, k]` when `trans_b` (a linear weight) else `[k, n]`; out `[batch, m, n]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmSpec {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Elements between consecutive A matrices; 0 shares one A across the batch.
    pub a_batch_stride: usize,
    /// Elements between consecutive B matrices; 0 shares one B (a weight) across the batch.
    pub b_batch_stride: usize,
    pub trans_b: bool,
    /// Multiplies the f32 accumulator before the bias (carries fp8 dequantisation scales).
    pub alpha: f32,
    pub epilogue: Epilogue,
    pub out: DType,
}

/// x `[batch, c_in, l_in]`, w `[c_out, c_in/groups, kernel]`, bias `[c_out]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conv1dSpec {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub l_in: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub pad_left: usize,
    pub pad_right: usize,
    pub pad_mode: PadMode,
    pub out: DType,
}

impl Conv1dSpec {
    pub fn l_out(&self) -> usize {
        (self.l_in + self.pad_left + self.pad_right - self.kernel) / self.stride + 1
    }
}

/// x `[batch, c_in, t, h, w]`, w `[c_out, c_in, kt, kh, kw]`, bias `[c_out]`; zero padding
/// `(before, after)` per axis (t, h, w). Causal temporal padding is `pad[0] = (2, 0)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conv3dSpec {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub input: [usize; 3],
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub pad: [(usize, usize); 3],
    pub out: DType,
}

impl Conv3dSpec {
    /// Output (t, h, w).
    pub fn out_dims(&self) -> [usize; 3] {
        std::array::from_fn(|i| {
            (self.input[i] + self.pad[i].0 + self.pad[i].1 - self.kernel[i]) / self.stride[i] + 1
        })
    }
}

/// q `[batch, lq, heads, head_dim]`, k and v `[batch, lk, heads, head_dim]`, out like q.
/// Optional additive bias `[batch or 1, heads, lq, lk]` (f32), added to the scaled scores.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnSpec {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// The bias has a leading dim of 1 shared by every batch entry.
    pub bias_shared_over_batch: bool,
    pub out: DType,
}

/// Fused residual + LayerNorm + adaLN modulation over the rows of `[rows, cols]`
/// (model-spec §3.3.1), the block's element-wise chain in one pass. With `g = row /
/// (rows / groups)`:
/// - `r = x (+ y (· gate[g]))` in f32 (one multiply, one add, no FMA), stored rounded to
///   `res` when asked for;
/// - `n = LayerNorm(round_to(ln_in, r))` (f32 statistics, biased variance, `· w + b` when
///   given), rounded to `norm`;
/// - `out = n·(1 + scale[g]) + shift[g]` in f32 when scale/shift are given, else `n`; one
///   rounding to `out`.
///
/// Every step rounds exactly where the unfused ops round, so the result equals
/// `gated_residual` / `binary_to` + `to_dtype` + `layer_norm` + `modulate` run one by one.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNormSpec {
    pub rows: usize,
    pub cols: usize,
    /// Row groups of the gate / scale / shift tables `[groups, cols]` (latent frames).
    pub groups: usize,
    pub eps: f32,
    pub res: Option<DType>,
    pub ln_in: DType,
    pub norm: DType,
    pub out: DType,
}

// ---------------------------------------------------------------------------------------
// The backend trait.
// ---------------------------------------------------------------------------------------

/// One device's implementation of every primitive, grouped by op family.
/// `self` is the first operand; other operands are storages of the same backend.
pub trait BackendStorage: Sized + std::fmt::Debug + Send + Sync {
    // === Identity and transfer ===
    fn device(&self) -> Device;
    fn dtype(&self) -> DType;
    fn elem_count(&self) -> usize;
    /// A zero-filled buffer of `elems` elements on `device`.
    fn zeros(device: &Device, elems: usize, dtype: DType) -> Result<Self>;
    /// Copy host data to `device` (same dtype, same element count).
    fn from_cpu(device: &Device, src: &CpuStorage) -> Result<Self>;
    /// Copy to the host (synchronous).
    fn to_cpu(&self) -> Result<CpuStorage>;
    /// A deep copy (may fail on out of memory, hence not `Clone`).
    fn try_clone(&self) -> Result<Self>;
    /// Overwrite every element with `value` rounded to the dtype (NaN for poisoning).
    fn fill(&mut self, value: f32) -> Result<()>;

    // === Layout: exact copies, any dtype, no rounding ===
    /// Copy `rows × cols` elements: `dst[dst_offset + r·dst_stride + c] = self[src_offset + r·src_stride + c]`.
    #[allow(clippy::too_many_arguments)]
    fn copy2d(
        &self,
        dst: &mut Self,
        rows: usize,
        cols: usize,
        src_stride: usize,
        src_offset: usize,
        dst_stride: usize,
        dst_offset: usize,
    ) -> Result<()>;
    /// Transpose: output dim `i` is input dim `perm[i]`.
    fn permute(&self, dims: &[usize], perm: &[usize]) -> Result<Self>;
    /// Gather along the middle of `(outer, dim, inner)`: out `[outer, ids.len(), inner]`.
    fn index_select(&self, outer: usize, dim: usize, inner: usize, ids: &[u32]) -> Result<Self>;
    /// Nearest upsampling of the last two dims of `[outer, h, w]` by integer factors.
    fn upsample_nearest2d(
        &self,
        outer: usize,
        h: usize,
        w: usize,
        fh: usize,
        fw: usize,
    ) -> Result<Self>;

    // === Casts ===
    /// `out = round_to(dtype, to_f32(self) · mul)`; into fp8 the cast saturates to ±448.
    fn cast(&self, dtype: DType, mul: f32) -> Result<Self>;

    // === Elementwise (f32 math, one rounding to `out`) ===
    fn unary(&self, op: UnaryOp, out: DType) -> Result<Self>;
    fn binary(
        &self,
        rhs: &Self,
        op: BinaryOp,
        layout: &BroadcastLayout,
        out: DType,
    ) -> Result<Self>;
    fn ternary(
        &self,
        b: &Self,
        c: &Self,
        op: TernaryOp,
        layout: &BroadcastLayout,
        out: DType,
    ) -> Result<Self>;

    // === Reductions over the last dim of `[rows, cols]` ===
    /// f32 `[rows]`.
    fn reduce(&self, op: ReduceOp, rows: usize, cols: usize) -> Result<Self>;
    /// Numerically stable softmax (max subtracted), f32 math, rounded to `out`.
    fn softmax(&self, rows: usize, cols: usize, out: DType) -> Result<Self>;

    // === Norms over the last dim of `[rows, cols]` (f32 statistics) ===
    /// `(x − mean)/sqrt(var + eps)` (biased var) `[· w + b]`, affine in f32, one rounding to `out`.
    fn layer_norm(
        &self,
        weight: Option<&Self>,
        bias: Option<&Self>,
        rows: usize,
        cols: usize,
        eps: f32,
        out: DType,
    ) -> Result<Self>;
    /// `n = round_to(dtype(self), x·rsqrt(mean(x²) + eps))`, then `round_to(out, n · w)`.
    fn rms_norm(
        &self,
        weight: Option<&Self>,
        rows: usize,
        cols: usize,
        eps: f32,
        out: DType,
    ) -> Result<Self>;
    /// x `[n, c, s]`: `x / max(‖x[:, ·, s]‖₂, 1e-12) · sqrt(c) · gamma[c] (+ bias[c])` over the
    /// channel dim, all in f32 (the Wan VAE `RMS_norm`, which runs in fp32 under autocast).
    fn channel_rms_norm(
        &self,
        gamma: &Self,
        bias: Option<&Self>,
        n: usize,
        c: usize,
        s: usize,
        out: DType,
    ) -> Result<Self>;
    /// x `[n, c, t, s]`: `SiLU(channel_rms_norm(x, gamma))` (no bias) in f32, rounded once to
    /// `out`, after the `p` frames of `prefix` `[n, c, p, s]` (rounded to `out`): the result is
    /// `[n, c, p + t, s]`. With `tail > 0` also the last `tail` frames of the f32 norm → SiLU
    /// value as a separate f32 `[n, c, tail, s]` (the causal cache of the VAE convolution the
    /// output feeds; `prefix` is that conv's previous cache).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<(Self, Option<Self>)>;

    // === Position ===
    /// x `[b, l, h, d]`, cos/sin f32 `[l, d/2]`: pair (2i, 2i+1) → (re·cos − im·sin,
    /// re·sin + im·cos), computed in f64, rounded to f32 then to `out` (the reference's flow).
    #[allow(clippy::too_many_arguments)]
    fn rope_interleaved(
        &self,
        cos: &Self,
        sin: &Self,
        b: usize,
        l: usize,
        h: usize,
        d: usize,
        out: DType,
    ) -> Result<Self>;

    /// RMSNorm over rows of `[rows, heads·head_dim]` then interleaved RoPE per row (token):
    /// `n = round_to(dtype(self), x·rsqrt(mean(x²) + eps))`, `m = round_to(norm, n · w)`,
    /// pairs of `m` rotated with cos/sin f32 `[rows, head_dim/2]` in f64, rounded to f32 and
    /// then to `out` ([`BackendStorage::rms_norm`] followed by
    /// [`BackendStorage::rope_interleaved`]).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<Self>;

    // === Fused element-wise chains ===
    /// See [`ResNormSpec`]; returns (the residual when `spec.res` is set, the output).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn res_norm_mod(
        &self,
        y: Option<&Self>,
        gate: Option<&Self>,
        weight: Option<&Self>,
        bias: Option<&Self>,
        scale: Option<&Self>,
        shift: Option<&Self>,
        spec: &ResNormSpec,
    ) -> Result<(Option<Self>, Self)>;

    // === Matmul and convolution (f32 accumulation) ===
    /// See [`GemmSpec`]. A and B share a dtype (fp8 allowed); bias is f32, bf16 or f16.
    fn gemm(&self, b: &Self, bias: Option<&Self>, spec: &GemmSpec) -> Result<Self>;
    /// See [`Conv1dSpec`]; x and w share a dtype; out `[batch, c_out, l_out]`.
    fn conv1d(&self, w: &Self, bias: Option<&Self>, spec: &Conv1dSpec) -> Result<Self>;
    /// See [`Conv3dSpec`]; x and w share a dtype; out `[batch, c_out, t', h', w']`.
    fn conv3d(&self, w: &Self, bias: Option<&Self>, spec: &Conv3dSpec) -> Result<Self>;

    // === Attention ===
    /// Non-causal multi-head attention, see [`AttnSpec`]: softmax(scale·q·kᵀ + bias)·v with f32
    /// scores, f32 softmax and f32 accumulation; out rounded once.
    fn attention(&self, k: &Self, v: &Self, bias: Option<&Self>, spec: &AttnSpec) -> Result<Self>;
}
