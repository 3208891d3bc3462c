//! A cuBLASLt wrapper: row-major GEMMs (bf16, f16, f32, fp8 e4m3 operands; f32
//! accumulation) with bias and GELU-tanh epilogues, strided batches, and the descriptors,
//! layouts and chosen algorithm cached per shape. cudarc's safe `Matmul` re-runs the
//! heuristic on every call and cannot cache; its f16 `Gemm` trait needs a bare
//! `libcublas.so`, so neither is used.
//!
//! Row-major `out[m, n] = A[m, k] · op(B)` is column-major `outᵀ[n, m] = op(B)ᵀ · Aᵀ`:
//! cuBLASLt's "A" is our B (transposed when B is a `[n, k]` linear weight), its "B" is our A,
//! and the bias (length n) runs along cuBLASLt's rows, as its epilogue expects.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{DriverExt, Error, Result};
use crate::module::{DType, In, Out, check_len, rptr, wptr};

/// cuBLASLt workspace (NVIDIA recommends 32 MiB on Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;
const CANDIDATES: usize = 8;

/// Epilogues cuBLASLt runs itself (applied to alpha·AB + bias in f32, before the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LtEpilogue {
    #[default]
    None,
    /// GELU, tanh approximation.
    GeluTanh,
}

/// One GEMM's shape: row-major `out[b] = epi(alpha·A[b]·op(B[b]) + bias)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmDesc {
    /// dtype of A and B (equal).
    pub ab: DType,
    pub out: DType,
    /// dtype of the bias, if any (cuBLASLt supports bias = out dtype; others may be refused).
    pub bias: Option<DType>,
    pub epilogue: LtEpilogue,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    /// Row strides (elements) of A `[m, k]`, B (`[n, k]` when `trans_b`, else `[k, n]`), out.
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// Batch strides in elements (0 shares the operand across the batch).
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub trans_b: bool,
}

impl GemmDesc {
    /// A plain contiguous row-major GEMM without bias.
    pub fn new(ab: DType, out: DType, m: usize, n: usize, k: usize, trans_b: bool) -> Self {
        Self {
            ab,
            out,
            bias: None,
            epilogue: LtEpilogue::None,
            m,
            n,
            k,
            batch: 1,
            lda: k,
            ldb: if trans_b { k } else { n },
            ldc: n,
            stride_a: m * k,
            stride_b: n * k,
            stride_c: m * n,
            trans_b,
        }
    }
}

fn cuda_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F8E4M3 => sys::cudaDataType::CUDA_R_8F_E4M3,
    }
}

/// Cached descriptors and algorithm of one [`GemmDesc`].
#[derive(Debug)]
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    candidates: Vec<sys::cublasLtMatmulHeuristicResult_t>,
    /// Index into `candidates` once chosen.
    chosen: Option<usize>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed once; errors at
        // teardown have nowhere to go.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

unsafe fn set_desc<T>(
    d: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    // SAFETY: `v` is a live value of the attribute's type; the caller owns `d`.
    unsafe {
        lt::set_matmul_desc_attribute(d, attr, v as *const T as *const c_void, size_of::<T>())
            .w("cublasLtMatmulDescSetAttribute")
    }
}

fn layout(
    dt: DType,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: usize,
) -> Result<sys::cublasLtMatrixLayout_t> {
    let l = lt::create_matrix_layout(cuda_type(dt), rows as u64, cols as u64, ld as i64)
        .w("cublasLtMatrixLayoutCreate")?;
    if batch > 1 {
        let (bc, st) = (batch as i32, stride as i64);
        // SAFETY: `l` was just created; values have the attribute types (int32, int64).
        unsafe {
            lt::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &bc as *const i32 as *const c_void,
                4,
            )
            .w("cublasLtMatrixLayoutSetAttribute(batch)")?;
            lt::set_matrix_layout_attribute(
                l,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &st as *const i64 as *const c_void,
                8,
            )
            .w("cublasLtMatrixLayoutSetAttribute(stride)")?;
        }
    }
    Ok(l)
}

/// One cuBLASLt handle with its workspace and plan cache, bound to one stream.
#[derive(Debug)]
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<GemmDesc, Plan>>,
    stream: Arc<CudaStream>,
    autotune: bool,
}

// SAFETY: the handle is only used under the `plans` lock (descriptors are mutated per call
// for the bias pointer), and cuBLASLt handles may be used from any thread.
unsafe impl Send for Lt {}
// SAFETY: as above.
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(mut p) = self.plans.lock() {
            p.clear();
        }
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Lt {
    /// A handle for `stream`. Fails with [`Error::LibraryMissing`] when libcublasLt cannot
    /// be loaded. With `autotune`, the first call of each shape times the heuristic's top
    /// candidates on the real operands and keeps the fastest.
    pub fn new(stream: Arc<CudaStream>, autotune: bool) -> Result<Self> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::LibraryMissing {
                lib: "cublasLt",
                hint: crate::probe::LIB_HINT.into(),
            });
        }
        let handle = lt::create_handle().w("cublasLtCreate")?;
        // SAFETY: the workspace is only handed to cuBLASLt, which needs no initial contents.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.w("alloc workspace")?;
        Ok(Self {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            stream,
            autotune,
        })
    }

    fn plan(&self, d: &GemmDesc) -> Result<Plan> {
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .w("cublasLtMatmulDescCreate")?;
        // cuBLASLt "A" = our B, "B" = our A (see the module doc).
        let (op_a, op_b) = (
            if d.trans_b {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N
            },
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        );
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            candidates: Vec::new(),
            chosen: None,
        };
        // SAFETY: `desc` is live; values match each attribute's type.
        unsafe {
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &op_a,
            )?;
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &op_b,
            )?;
            let epi = match (d.bias.is_some(), d.epilogue) {
                (false, LtEpilogue::None) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
                (true, LtEpilogue::None) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                (false, LtEpilogue::GeluTanh) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
                (true, LtEpilogue::GeluTanh) => {
                    sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS
                }
            };
            set_desc(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epi,
            )?;
            if let Some(bt) = d.bias {
                let t = cuda_type(bt);
                set_desc(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &t,
                )?;
            }
        }
        plan.a = if d.trans_b {
            layout(d.ab, d.k, d.n, d.ldb, d.batch, d.stride_b)?
        } else {
            layout(d.ab, d.n, d.k, d.ldb, d.batch, d.stride_b)?
        };
        plan.b = layout(d.ab, d.k, d.m, d.lda, d.batch, d.stride_a)?;
        plan.c = layout(d.out, d.n, d.m, d.ldc, d.batch, d.stride_c)?;

        let pref = lt::create_matmul_pref().w("cublasLtMatmulPreferenceCreate")?;
        let ws = WORKSPACE_BYTES;
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(CANDIDATES);
        let mut found = 0i32;
        // SAFETY: all descriptors are live; `results` has room for CANDIDATES entries.
        let status = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                size_of::<usize>(),
            )
            .w("cublasLtMatmulPreferenceSetAttribute")
            .and_then(|_| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut found,
                )
                .result()
                .w("cublasLtMatmulAlgoGetHeuristic")
            })
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        // A refused shape (e.g. fp8 with k not a multiple of 16) is Unsupported, so callers
        // can take another path.
        status.map_err(|e| Error::Unsupported {
            op: "gemm",
            msg: format!("cuBLASLt heuristic for {d:?}: {e}"),
        })?;
        // SAFETY: cuBLASLt initialised `found` entries.
        unsafe { results.set_len(found.clamp(0, CANDIDATES as i32) as usize) };
        plan.candidates = results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .collect();
        if plan.candidates.is_empty() {
            return Err(Error::Unsupported {
                op: "gemm",
                msg: format!("cuBLASLt has no algorithm for {d:?}"),
            });
        }
        Ok(plan)
    }

    /// Run one GEMM (see [`GemmDesc`]); `alpha` scales A·B before the bias.
    pub fn matmul(
        &self,
        d: &GemmDesc,
        alpha: f32,
        a: In<'_>,
        b: In<'_>,
        bias: Option<In<'_>>,
        out: Out<'_>,
    ) -> Result<()> {
        self.matmul_at(d, alpha, (a, 0), (b, 0), bias, (out, 0))
    }

    /// [`Lt::matmul`] with element offsets into A, B and out (e.g. one batch entry of a
    /// conv, one batch of attention heads).
    pub fn matmul_at(
        &self,
        d: &GemmDesc,
        alpha: f32,
        (a, a_off): (In<'_>, usize),
        (b, b_off): (In<'_>, usize),
        bias: Option<In<'_>>,
        (out, out_off): (Out<'_>, usize),
    ) -> Result<()> {
        if a.dtype != d.ab
            || b.dtype != d.ab
            || out.dtype != d.out
            || bias.map(|x| x.dtype) != d.bias
        {
            return Err(Error::Unsupported {
                op: "gemm",
                msg: format!(
                    "operands {:?}/{:?}/{:?}/{:?} do not match {d:?}",
                    a.dtype,
                    b.dtype,
                    bias.map(|x| x.dtype),
                    out.dtype
                ),
            });
        }
        if d.m == 0 || d.n == 0 || d.batch == 0 {
            return Ok(());
        }
        let last = |stride: usize, rows: usize, ld: usize, cols: usize| {
            (d.batch - 1) * stride + (rows - 1) * ld + cols
        };
        check_len(
            "gemm",
            "a",
            last(d.stride_a, d.m, d.lda, d.k),
            d.ab,
            a.buf.len(),
        )?;
        let (brows, bcols) = if d.trans_b { (d.n, d.k) } else { (d.k, d.n) };
        check_len(
            "gemm",
            "b",
            last(d.stride_b, brows, d.ldb, bcols),
            d.ab,
            b.buf.len(),
        )?;
        check_len(
            "gemm",
            "out",
            last(d.stride_c, d.m, d.ldc, d.n),
            d.out,
            out.buf.len(),
        )?;
        if let Some(x) = bias {
            check_len("gemm", "bias", d.n, x.dtype, x.buf.len())?;
        }
        if d.k == 0 {
            return Err(Error::Unsupported {
                op: "gemm",
                msg: "k = 0".into(),
            });
        }
        let s = &*self.stream;
        let mut plans = self.plans.lock().map_err(|_| Error::Unsupported {
            op: "gemm",
            msg: "plan cache lock poisoned".into(),
        })?;
        if !plans.contains_key(d) {
            let p = self.plan(d)?;
            plans.insert(*d, p);
        }
        let Some(plan) = plans.get_mut(d) else {
            return Err(Error::Unsupported {
                op: "gemm",
                msg: "plan vanished".into(),
            });
        };
        let (ap, _ga) = rptr(a.buf, s);
        let (bp, _gb) = rptr(b.buf, s);
        // cuBLASLt writes the workspace; no other user exists, so the read-side address is fine.
        let (wp, _gw) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, s);
        let (op_, _go) = wptr(out.buf, s);
        let ap = ap + (a_off * d.ab.size()) as u64;
        let bp = bp + (b_off * d.ab.size()) as u64;
        let op_ = op_ + (out_off * d.out.size()) as u64;
        if let Some(x) = bias {
            let (p, _g) = rptr(x.buf, s);
            let p = p as *const c_void;
            // SAFETY: plan.desc is live; the pointer stays valid for this call.
            unsafe {
                set_desc(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &p,
                )?;
            }
        }
        let beta = 0.0f32;
        let run = |algo: &sys::cublasLtMatmulHeuristicResult_t| -> Result<()> {
            // SAFETY: descriptors are live and match the operands, whose spans were
            // checked; the workspace is WORKSPACE_BYTES long; beta = 0 so C is not read.
            unsafe {
                lt::matmul(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    bp as *const c_void,
                    plan.a,
                    ap as *const c_void,
                    plan.b,
                    op_ as *const c_void,
                    plan.c,
                    op_ as *mut c_void,
                    plan.c,
                    &algo.algo,
                    wp as *mut c_void,
                    WORKSPACE_BYTES,
                    s.cu_stream() as sys::cudaStream_t,
                )
                .w("cublasLtMatmul")
            }
        };
        let chosen = match plan.chosen {
            Some(i) => i,
            None => {
                let i = if self.autotune && plan.candidates.len() > 1 {
                    self.tune(&plan.candidates, &run)?
                } else {
                    0
                };
                plan.chosen = Some(i);
                i
            }
        };
        run(&plan.candidates[chosen])
    }

    /// Time every candidate (1 warm-up + 3 runs, CUDA events) and return the fastest index.
    fn tune(
        &self,
        cands: &[sys::cublasLtMatmulHeuristicResult_t],
        run: &dyn Fn(&sys::cublasLtMatmulHeuristicResult_t) -> Result<()>,
    ) -> Result<usize> {
        let ctx = self.stream.context();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let (e0, e1) = (
            ctx.new_event(flags).w("cuEventCreate")?,
            ctx.new_event(flags).w("cuEventCreate")?,
        );
        let mut best = (0, f32::INFINITY);
        for (i, c) in cands.iter().enumerate() {
            if run(c).is_err() {
                continue; // a candidate may refuse at run time; the others still count
            }
            e0.record(&self.stream).w("cuEventRecord")?;
            for _ in 0..3 {
                run(c)?;
            }
            e1.record(&self.stream).w("cuEventRecord")?;
            let ms = e0.elapsed_ms(&e1).w("cuEventElapsedTime")?;
            if ms < best.1 {
                best = (i, ms);
            }
        }
        Ok(best.0)
    }

    /// Number of cached shapes (for tests and `doctor`).
    pub fn cached_plans(&self) -> usize {
        self.plans.lock().map(|p| p.len()).unwrap_or(0)
    }
}
