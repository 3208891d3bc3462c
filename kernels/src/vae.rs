//! Launchers for `cuda/vae.cu`: the Wan VAE's fused channel RMS norm → SiLU.

use cudarc::driver::{CudaStream, DeviceRepr, PushKernelArg};

use crate::error::{DriverExt, Error, Result};
use crate::module::{DType, In, Kernels, Out, check_len, rptr, wptr};

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct NormSiluArgs {
    batch: i64,
    channels: i64,
    frames: i64,
    spatial: i64,
    tail: i64,
    prefix: i64,
    x_dtype: i32,
    out_dtype: i32,
    w_dtype: i32,
    pre_dtype: i32,
    eps: f32,
    scale: f32,
}
// SAFETY: plain-old-data matching `NormSiluArgs` in vae.cu.
unsafe impl DeviceRepr for NormSiluArgs {}

impl Kernels {
    /// x `[batch, c, frames, spatial]` contiguous: `SiLU(x / max(‖x‖₂ over c, eps) · scale ·
    /// gamma[c])` computed in f32, one rounding to out's dtype, written after the `p` frames
    /// of `prefix` `(pre [batch, c, p, spatial], p)` (copied, rounded to out's dtype):
    /// out `[batch, c, p + frames, spatial]`. With `tail` `(buffer, k)`, the last `k` frames
    /// of the f32 result are also written to the f32 `[batch, c, k, spatial]` buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn channel_norm_silu(
        &self,
        s: &CudaStream,
        x: In<'_>,
        gamma: In<'_>,
        prefix: Option<(In<'_>, usize)>,
        out: Out<'_>,
        tail: Option<(Out<'_>, usize)>,
        batch: usize,
        c: usize,
        frames: usize,
        spatial: usize,
        eps: f32,
        scale: f32,
    ) -> Result<()> {
        let n = batch * c * frames * spatial;
        let p = prefix.as_ref().map_or(0, |x| x.1);
        check_len("channel_norm_silu", "x", n, x.dtype, x.buf.len())?;
        let n_out = batch * c * (p + frames) * spatial;
        check_len("channel_norm_silu", "out", n_out, out.dtype, out.buf.len())?;
        if let Some((pre, p)) = &prefix {
            check_len(
                "channel_norm_silu",
                "prefix",
                batch * c * p * spatial,
                pre.dtype,
                pre.buf.len(),
            )?;
        }
        check_len(
            "channel_norm_silu",
            "gamma",
            c,
            gamma.dtype,
            gamma.buf.len(),
        )?;
        let k = tail.as_ref().map_or(0, |t| t.1);
        if let Some((t, k)) = &tail {
            if t.dtype != DType::F32 || *k > frames {
                return Err(Error::Unsupported {
                    op: "channel_norm_silu",
                    msg: format!(
                        "tail of {k} f32 frames of {frames} expected, got {:?}",
                        t.dtype
                    ),
                });
            }
            check_len(
                "channel_norm_silu",
                "tail",
                batch * c * k * spatial,
                t.dtype,
                t.buf.len(),
            )?;
        }
        if n_out == 0 {
            return Ok(());
        }
        let a = NormSiluArgs {
            batch: batch as i64,
            channels: c as i64,
            frames: frames as i64,
            spatial: spatial as i64,
            tail: k as i64,
            prefix: p as i64,
            x_dtype: x.dtype.code(),
            out_dtype: out.dtype.code(),
            w_dtype: gamma.dtype.code(),
            pre_dtype: prefix.as_ref().map_or(0, |x| x.0.dtype.code()),
            eps,
            scale,
        };
        let (xp, _gx) = rptr(x.buf, s);
        let (wp, _gw) = rptr(gamma.buf, s);
        let (pp, _gp) = match &prefix {
            Some((pre, _)) => {
                let (ptr, g) = rptr(pre.buf, s);
                (ptr, Some(g))
            }
            None => (0, None),
        };
        let (op_, _go) = wptr(out.buf, s);
        let (tp, _gt) = match tail {
            Some((t, _)) => {
                let (p, g) = wptr(t.buf, s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let f = self.func("lava_channel_norm_silu")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&xp).arg(&wp).arg(&pp).arg(&op_).arg(&tp);
        // SAFETY: arguments match lava_channel_norm_silu; lengths checked.
        unsafe { l.launch(self.grid(batch * (p + frames) * spatial)) }
            .w("launch lava_channel_norm_silu")?;
        Ok(())
    }
}

impl Kernels {
    /// `out[b, c, r] = x[b, r, c]` for contiguous `[batch, rows, cols]` of 2- or 4-byte
    /// elements (tiled through shared memory; both sides coalesced).
    pub fn transpose(
        &self,
        s: &CudaStream,
        x: In<'_>,
        out: Out<'_>,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = batch * rows * cols;
        let es = x.dtype.size();
        if out.dtype.size() != es || !(es == 2 || es == 4) {
            return Err(Error::Unsupported {
                op: "transpose",
                msg: format!("{:?} -> {:?}", x.dtype, out.dtype),
            });
        }
        check_len("transpose", "x", n, x.dtype, x.buf.len())?;
        check_len("transpose", "out", n, out.dtype, out.buf.len())?;
        if n == 0 {
            return Ok(());
        }
        if batch > 65_535 || rows.div_ceil(32) > 65_535 {
            return Err(Error::Unsupported {
                op: "transpose",
                msg: format!("grid too large for [{batch}, {rows}, {cols}]"),
            });
        }
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (
                cols.div_ceil(32) as u32,
                rows.div_ceil(32) as u32,
                batch as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (es, r, c) = (es as i32, rows as i64, cols as i64);
        let (xp, _gx) = rptr(x.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_transpose_tiled")?;
        let mut l = s.launch_builder(f);
        l.arg(&es).arg(&r).arg(&c).arg(&xp).arg(&op_);
        // SAFETY: arguments match lava_transpose_tiled; lengths and grid checked.
        unsafe { l.launch(cfg) }.w("launch lava_transpose_tiled")?;
        Ok(())
    }
}
