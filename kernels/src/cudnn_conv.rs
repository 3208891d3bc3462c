//! cuDNN's convolution forward (feature `cudnn`): the C ABI of `cudnn/conv.cpp`, one built
//! and checked graph per shape, cached, plus a workspace that grows to the largest plan's
//! need. The bias is fused into the graph when cuDNN has an engine for that; otherwise the
//! plan is the bare convolution and [`CudnnConv::forward`] says so, so that the caller adds
//! the bias.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{DriverExt, Error, Result};
use crate::module::{DType, In, Out, check_len, rptr, wptr};

#[repr(C)]
struct LavaConv {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn lava_cudnn_open(name: *const c_char) -> c_int;
    fn lava_cudnn_conv_last_error() -> *const c_char;
    #[allow(clippy::too_many_arguments)]
    fn lava_cudnn_conv_create(
        xd: *const i64,
        wd: *const i64,
        yd: *const i64,
        pre: *const i64,
        post: *const i64,
        stride: *const i64,
        dtype: c_int,
        with_bias: c_int,
        tune: c_int,
        channels_last: c_int,
        out: *mut *mut LavaConv,
        workspace: *mut i64,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn lava_cudnn_conv_run(
        p: *mut LavaConv,
        stream: *mut c_void,
        x: *mut c_void,
        w: *mut c_void,
        bias: *mut c_void,
        y: *mut c_void,
        workspace: *mut c_void,
        next_workspace: *mut i64,
    ) -> c_int;
    fn lava_cudnn_conv_plan_name(p: *mut LavaConv) -> *const c_char;
    fn lava_cudnn_conv_destroy(p: *mut LavaConv);
}

fn last_error(op: &'static str) -> Error {
    // SAFETY: the shim returns a NUL-terminated thread-local string.
    let msg = unsafe { CStr::from_ptr(lava_cudnn_conv_last_error()) }
        .to_string_lossy()
        .into_owned();
    Error::Unsupported { op, msg }
}

/// One convolution's shape: x `[batch, c_in, input…]` → y `[batch, c_out, out…]`, zero
/// padding `(before, after)` per spatial axis, groups 1, dilation 1, all contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub input: [usize; 3],
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub pad: [(usize, usize); 3],
    /// x `[batch, input…, c_in]`, w `[c_out, kernel…, c_in]`, y `[batch, out…, c_out]`.
    pub channels_last: bool,
}

impl ConvShape {
    pub fn out_dims(&self) -> [usize; 3] {
        std::array::from_fn(|i| {
            (self.input[i] + self.pad[i].0 + self.pad[i].1 - self.kernel[i]) / self.stride[i] + 1
        })
    }
}

#[derive(Debug)]
struct Plan {
    ptr: *mut LavaConv,
    workspace: usize,
    /// The bias is part of the graph.
    fused_bias: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by lava_cudnn_conv_create, destroyed once.
        unsafe { lava_cudnn_conv_destroy(self.ptr) };
    }
}

type Key = (ConvShape, DType, bool);
/// Plans by shape, the shared workspace, and why cuDNN refused a shape (for [`CudnnConv::plans`]).
type State = (
    HashMap<Key, Plan>,
    Option<CudaSlice<u8>>,
    HashMap<Key, String>,
);

/// cuDNN convolutions for one device stream.
#[derive(Debug)]
pub struct CudnnConv {
    stream: Arc<CudaStream>,
    state: Mutex<State>,
    tune: bool,
    channels_last: bool,
}

// SAFETY: plans are only used under the mutex; cuDNN handles may move between threads.
unsafe impl Send for CudnnConv {}
// SAFETY: as above.
unsafe impl Sync for CudnnConv {}

fn i64s<const N: usize>(a: [usize; N]) -> [i64; N] {
    a.map(|v| v as i64)
}

impl CudnnConv {
    /// Load libcudnn.so.9 ([`Error::LibraryMissing`] when it is not there). With `tune`, the
    /// first run of each shape times every engine cuDNN offers and keeps the fastest
    /// (synchronising the device once per shape).
    pub fn new(stream: Arc<CudaStream>, tune: bool) -> Result<Self> {
        let name = CString::new("libcudnn.so.9").map_err(|_| Error::Unsupported {
            op: "cudnn",
            msg: "library name".into(),
        })?;
        // SAFETY: a NUL-terminated name; the shim only dlopens it (once per process).
        if unsafe { lava_cudnn_open(name.as_ptr()) } != 0 {
            return Err(Error::LibraryMissing {
                lib: "cudnn",
                hint: crate::probe::LIB_HINT.to_string(),
            });
        }
        Ok(Self {
            stream,
            state: Mutex::new((HashMap::new(), None, HashMap::new())),
            tune,
            channels_last: false,
        })
    }

    /// Prefer channels-last convolutions (the caller transposes around them).
    pub fn prefer_channels_last(mut self, on: bool) -> Self {
        self.channels_last = on;
        self
    }

    /// Whether the caller should run convolutions channels last.
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Whether plans are autotuned.
    pub fn tuned(&self) -> bool {
        self.tune
    }

    /// `y = conv(x, w) (+ bias)`; x, w, bias and y of one dtype (bf16, f16 or f32), compute
    /// in f32. Returns whether the bias was applied (false: cuDNN had no fused engine for
    /// this shape and the caller must add it).
    pub fn forward(
        &self,
        x: In<'_>,
        w: In<'_>,
        bias: Option<In<'_>>,
        y: Out<'_>,
        g: &ConvShape,
    ) -> Result<bool> {
        let dt = x.dtype;
        let code = match dt {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
            DType::F8E4M3 => {
                return Err(Error::Unsupported {
                    op: "cudnn conv",
                    msg: "fp8".into(),
                });
            }
        };
        for (name, d) in [
            ("w", Some(w.dtype)),
            ("y", Some(y.dtype)),
            ("bias", bias.map(|b| b.dtype)),
        ] {
            if d.is_some_and(|d| d != dt) {
                return Err(Error::Unsupported {
                    op: "cudnn conv",
                    msg: format!("{name} is {d:?}, x is {dt:?}"),
                });
            }
        }
        let od = g.out_dims();
        let xd = [g.batch, g.c_in, g.input[0], g.input[1], g.input[2]];
        let wd = [g.c_out, g.c_in, g.kernel[0], g.kernel[1], g.kernel[2]];
        let yd = [g.batch, g.c_out, od[0], od[1], od[2]];
        let n = |d: [usize; 5]| d.iter().product::<usize>();
        check_len("cudnn conv", "x", n(xd), dt, x.buf.len())?;
        check_len("cudnn conv", "w", n(wd), dt, w.buf.len())?;
        check_len("cudnn conv", "y", n(yd), dt, y.buf.len())?;
        if let Some(b) = bias {
            check_len("cudnn conv", "bias", g.c_out, dt, b.buf.len())?;
        }
        if n(yd) == 0 {
            return Ok(true);
        }
        let mut guard = self.state.lock().map_err(|_| Error::Unsupported {
            op: "cudnn conv",
            msg: "lock poisoned".into(),
        })?;
        let (plans, ws, refused) = &mut *guard;
        let want_bias = bias.is_some();
        let key: Key = (*g, dt, want_bias);
        if let Some(msg) = refused.get(&key) {
            return Err(Error::Unsupported {
                op: "cudnn conv plan",
                msg: msg.clone(),
            });
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = plans.entry(key) {
            let pre = i64s(g.pad.map(|p| p.0));
            let post = i64s(g.pad.map(|p| p.1));
            let st = i64s(g.stride);
            let (xd, wd, yd) = (i64s(xd), i64s(wd), i64s(yd));
            let create = |with_bias: bool| -> Result<Plan> {
                let mut ptr = std::ptr::null_mut();
                let mut need = 0i64;
                // SAFETY: every array has the length the shim reads (5 dims, 3 axes); the
                // outputs are written on success.
                let rc = unsafe {
                    lava_cudnn_conv_create(
                        xd.as_ptr(),
                        wd.as_ptr(),
                        yd.as_ptr(),
                        pre.as_ptr(),
                        post.as_ptr(),
                        st.as_ptr(),
                        code,
                        with_bias as c_int,
                        self.tune as c_int,
                        g.channels_last as c_int,
                        &mut ptr,
                        &mut need,
                    )
                };
                if rc != 0 {
                    return Err(last_error("cudnn conv plan"));
                }
                Ok(Plan {
                    ptr,
                    workspace: need.max(0) as usize,
                    fused_bias: with_bias,
                })
            };
            let plan = match create(want_bias) {
                Ok(p) => Ok(p),
                // No fused engine: the bare convolution, bias added by the caller.
                Err(e) if want_bias => {
                    create(false).map_err(|e2| format!("{e}; without bias: {e2}"))
                }
                Err(e) => Err(e.to_string()),
            };
            let plan = match plan {
                Ok(p) => p,
                Err(msg) => {
                    // Remembered, so a refused shape is not re-planned on every call.
                    refused.insert(key, msg.clone());
                    return Err(Error::Unsupported {
                        op: "cudnn conv plan",
                        msg,
                    });
                }
            };
            slot.insert(plan);
        }
        let Some(plan) = plans.get_mut(&key) else {
            return Err(Error::Unsupported {
                op: "cudnn conv",
                msg: "plan vanished".into(),
            });
        };
        if ws.as_ref().is_none_or(|w| w.len() < plan.workspace.max(1)) {
            // The old buffer may still be read by queued work: free it in stream order.
            *ws = None;
            // SAFETY: scratch space for cuDNN; no initial contents needed.
            *ws = Some(
                unsafe { self.stream.alloc::<u8>(plan.workspace.max(1)) }
                    .w("alloc cuDNN workspace")?,
            );
        }
        let Some(ws) = ws.as_ref() else {
            return Err(Error::Unsupported {
                op: "cudnn conv",
                msg: "workspace missing".into(),
            });
        };
        let s = &*self.stream;
        let (xp, _gx) = rptr(x.buf, s);
        let (wp, _gw) = rptr(w.buf, s);
        let bp = match (bias, plan.fused_bias) {
            (Some(b), true) => Some(rptr(b.buf, s)),
            _ => None,
        };
        let (wsp, _gws) = rptr(ws, s);
        let (yp, _gy) = wptr(y.buf, s);
        let mut next = plan.workspace as i64;
        // SAFETY: the plan matches these shapes (the cache key), every length was checked,
        // and the workspace holds at least the plan's need.
        let rc = unsafe {
            lava_cudnn_conv_run(
                plan.ptr,
                s.cu_stream() as *mut c_void,
                xp as *mut c_void,
                wp as *mut c_void,
                bp.as_ref()
                    .map_or(std::ptr::null_mut(), |b| b.0 as *mut c_void),
                yp as *mut c_void,
                wsp as *mut c_void,
                &mut next,
            )
        };
        if rc != 0 {
            return Err(last_error("cudnn conv run"));
        }
        plan.workspace = next.max(0) as usize;
        Ok(plan.fused_bias || !want_bias)
    }

    /// One line per planned shape: dims, dtype, bias fused or not, the engine cuDNN chose.
    pub fn plans(&self) -> Vec<String> {
        let Ok(guard) = self.state.lock() else {
            return vec!["lock poisoned".into()];
        };
        let mut v: Vec<String> = guard
            .0
            .iter()
            .map(|((g, dt, b), p)| {
                // SAFETY: a live plan; the shim returns a NUL-terminated thread-local string.
                let name = unsafe { CStr::from_ptr(lava_cudnn_conv_plan_name(p.ptr)) }
                    .to_string_lossy()
                    .into_owned();
                format!(
                    "x [{},{},{:?}]{} k {:?} s {:?} pad {:?} → {} {dt:?} bias {} ws {} engine {name}",
                    g.batch,
                    g.c_in,
                    g.input,
                    if g.channels_last { " NDHWC" } else { "" },
                    g.kernel,
                    g.stride,
                    g.pad,
                    g.c_out,
                    match (b, p.fused_bias) {
                        (false, _) => "none",
                        (true, true) => "fused",
                        (true, false) => "separate",
                    },
                    p.workspace
                )
            })
            .collect();
        v.extend(guard.2.iter().map(|((g, dt, b), msg)| {
            format!(
                "REFUSED x [{},{},{:?}]{} k {:?} s {:?} pad {:?} → {} {dt:?} bias {b}: {msg}",
                g.batch,
                g.c_in,
                g.input,
                if g.channels_last { " NDHWC" } else { "" },
                g.kernel,
                g.stride,
                g.pad,
                g.c_out
            )
        }));
        v.sort();
        v
    }
}
