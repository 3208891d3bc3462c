//! cuDNN's fused attention (feature `cudnn`): the C ABI of `cudnn/sdpa.cpp`, one built and
//! checked graph per shape, cached, plus a workspace that grows to the largest plan's need.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};

use crate::attention::AttnArgs;
use crate::error::{DriverExt, Error, Result};
use crate::module::{DType, In, Out, check_len, rptr, wptr};

#[repr(C)]
struct LavaSdpa {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn lava_cudnn_last_error() -> *const c_char;
    fn lava_cudnn_open(name: *const c_char) -> c_int;
    fn lava_cudnn_version() -> usize;
    fn lava_cudnn_sdpa_create(
        b: i64,
        h: i64,
        sq: i64,
        skv: i64,
        d: i64,
        qs: *const i64,
        ks: *const i64,
        vs: *const i64,
        os: *const i64,
        scale: f32,
        out: *mut *mut LavaSdpa,
        workspace: *mut i64,
    ) -> c_int;
    fn lava_cudnn_sdpa_run(
        p: *mut LavaSdpa,
        stream: *mut c_void,
        q: *mut c_void,
        k: *mut c_void,
        v: *mut c_void,
        o: *mut c_void,
        workspace: *mut c_void,
    ) -> c_int;
    fn lava_cudnn_sdpa_destroy(p: *mut LavaSdpa);
}

fn last_error(op: &'static str) -> Error {
    // SAFETY: the shim returns a NUL-terminated thread-local string.
    let msg = unsafe { CStr::from_ptr(lava_cudnn_last_error()) }
        .to_string_lossy()
        .into_owned();
    Error::Unsupported { op, msg }
}

#[derive(Debug)]
struct Plan {
    ptr: *mut LavaSdpa,
    workspace: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by lava_cudnn_sdpa_create, destroyed once.
        unsafe { lava_cudnn_sdpa_destroy(self.ptr) };
    }
}

type Key = (usize, usize, i32, i32, [i64; 12], u32);
/// Plans by shape, and the shared workspace.
type State = (HashMap<Key, Plan>, Option<CudaSlice<u8>>);

/// cuDNN SDPA for one device stream.
#[derive(Debug)]
pub struct CudnnSdpa {
    stream: Arc<CudaStream>,
    state: Mutex<State>,
    version: usize,
}

// SAFETY: plans are only used under the mutex; cuDNN handles may move between threads.
unsafe impl Send for CudnnSdpa {}
// SAFETY: as above.
unsafe impl Sync for CudnnSdpa {}

impl CudnnSdpa {
    /// Load libcudnn.so.9; [`Error::LibraryMissing`] when it is not there.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let name = CString::new("libcudnn.so.9").map_err(|_| Error::Unsupported {
            op: "cudnn",
            msg: "library name".into(),
        })?;
        // SAFETY: a NUL-terminated name; the shim only dlopens it.
        if unsafe { lava_cudnn_open(name.as_ptr()) } != 0 {
            return Err(Error::LibraryMissing {
                lib: "cudnn",
                hint: format!("{}; {}", last_error("cudnn"), crate::probe::LIB_HINT),
            });
        }
        Ok(Self {
            stream,
            state: Mutex::new((HashMap::new(), None)),
            // SAFETY: the library is open.
            version: unsafe { lava_cudnn_version() },
        })
    }

    /// cuDNN's version number (e.g. 91900).
    pub fn version(&self) -> usize {
        self.version
    }

    /// `o = softmax(q·kᵀ·scale)·v`, bf16, layout as [`AttnArgs`] (`[B, L, H, D]` + strides).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: In<'_>,
        k: In<'_>,
        v: In<'_>,
        o: Out<'_>,
        a: &AttnArgs,
        batch: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> Result<()> {
        for dt in [q.dtype, k.dtype, v.dtype, o.dtype] {
            if dt != DType::BF16 {
                return Err(Error::Unsupported {
                    op: "cudnn attention",
                    msg: format!("{dt:?} (bf16 only)"),
                });
            }
        }
        let span = |bs: i64, ls: i64, hs: i64, l: i32| -> usize {
            ((batch as i64 - 1) * bs + (l as i64 - 1) * ls + (heads as i64 - 1) * hs) as usize
                + head_dim
        };
        check_len(
            "cudnn attention",
            "q",
            span(a.q_bs, a.q_ls, a.q_hs, a.lq),
            DType::BF16,
            q.buf.len(),
        )?;
        check_len(
            "cudnn attention",
            "k",
            span(a.k_bs, a.k_ls, a.k_hs, a.lk),
            DType::BF16,
            k.buf.len(),
        )?;
        check_len(
            "cudnn attention",
            "v",
            span(a.v_bs, a.v_ls, a.v_hs, a.lk),
            DType::BF16,
            v.buf.len(),
        )?;
        check_len(
            "cudnn attention",
            "o",
            span(a.o_bs, a.o_ls, a.o_hs, a.lq),
            DType::BF16,
            o.buf.len(),
        )?;
        let st = [
            a.q_bs, a.q_hs, a.q_ls, a.k_bs, a.k_hs, a.k_ls, a.v_bs, a.v_hs, a.v_ls, a.o_bs, a.o_hs,
            a.o_ls,
        ];
        let key: Key = (batch, heads, a.lq, a.lk, st, scale.to_bits());
        let mut guard = self.state.lock().map_err(|_| Error::Unsupported {
            op: "cudnn attention",
            msg: "lock poisoned".into(),
        })?;
        let (plans, ws) = &mut *guard;
        if let std::collections::hash_map::Entry::Vacant(slot) = plans.entry(key) {
            let mut ptr = std::ptr::null_mut();
            let mut need = 0i64;
            // SAFETY: stride arrays have 3 entries each; the outputs are written on success.
            let rc = unsafe {
                lava_cudnn_sdpa_create(
                    batch as i64,
                    heads as i64,
                    a.lq as i64,
                    a.lk as i64,
                    head_dim as i64,
                    st[0..3].as_ptr(),
                    st[3..6].as_ptr(),
                    st[6..9].as_ptr(),
                    st[9..12].as_ptr(),
                    scale,
                    &mut ptr,
                    &mut need,
                )
            };
            if rc != 0 {
                return Err(last_error("cudnn sdpa plan"));
            }
            slot.insert(Plan {
                ptr,
                workspace: need.max(0) as usize,
            });
        }
        let Some(plan) = plans.get(&key) else {
            return Err(Error::Unsupported {
                op: "cudnn attention",
                msg: "plan vanished".into(),
            });
        };
        if ws.as_ref().is_none_or(|w| w.len() < plan.workspace.max(1)) {
            // SAFETY: scratch space for cuDNN; no initial contents needed.
            *ws = Some(
                unsafe { self.stream.alloc::<u8>(plan.workspace.max(1)) }
                    .w("alloc cuDNN workspace")?,
            );
        }
        let Some(ws) = ws.as_ref() else {
            return Err(Error::Unsupported {
                op: "cudnn attention",
                msg: "workspace missing".into(),
            });
        };
        let s = &*self.stream;
        let (qp, _gq) = rptr(q.buf, s);
        let (kp, _gk) = rptr(k.buf, s);
        let (vp, _gv) = rptr(v.buf, s);
        let (wp, _gw) = rptr(ws, s);
        let (op_, _go) = wptr(o.buf, s);
        // SAFETY: the plan matches these shapes and strides (the cache key), every span was
        // checked, and the workspace holds at least the plan's need.
        let rc = unsafe {
            lava_cudnn_sdpa_run(
                plan.ptr,
                s.cu_stream() as *mut c_void,
                qp as *mut c_void,
                kp as *mut c_void,
                vp as *mut c_void,
                op_ as *mut c_void,
                wp as *mut c_void,
            )
        };
        if rc != 0 {
            return Err(last_error("cudnn sdpa run"));
        }
        Ok(())
    }
}
