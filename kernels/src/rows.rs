//! Launchers for `cuda/norm.cu`, `cuda/rope.cu` and `cuda/conv.cu`: row norms, softmax,
//! row reductions, the GEMM epilogue fallback, RoPE and im2col.

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::error::{DriverExt, Error, Result};
use crate::module::{DType, In, Kernels, Out, check_len, rptr, wptr};

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RowArgs {
    rows: i64,
    n: i64,
    x_stride: i64,
    out_stride: i64,
    x_dtype: i32,
    out_dtype: i32,
    w_dtype: i32,
    b_dtype: i32,
    has_w: i32,
    has_b: i32,
    eps: f32,
    pad: f32,
}
// SAFETY: plain-old-data matching `RowArgs` in norm.cu.
unsafe impl DeviceRepr for RowArgs {}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ChannelArgs {
    batch: i64,
    channels: i64,
    spatial: i64,
    x_dtype: i32,
    out_dtype: i32,
    w_dtype: i32,
    b_dtype: i32,
    has_w: i32,
    has_b: i32,
    eps: f32,
    scale: f32,
}
// SAFETY: plain-old-data matching `ChannelArgs` in norm.cu.
unsafe impl DeviceRepr for ChannelArgs {}

/// RoPE geometry: x `[batch, tokens, heads, 2·half_dim]` and out with their strides
/// (batch, token, head; pairs contiguous), tables `[.., tokens, half_dim]` f32 with
/// batch stride `t_bs` (0 shares one table) and token stride `t_ls`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RopeArgs {
    pub batch: i64,
    pub tokens: i64,
    pub heads: i64,
    pub half_dim: i64,
    pub x_bs: i64,
    pub x_ls: i64,
    pub x_hs: i64,
    pub o_bs: i64,
    pub o_ls: i64,
    pub o_hs: i64,
    pub t_bs: i64,
    pub t_ls: i64,
    /// Filled in by [`Kernels::rope`] from the operands.
    pub x_dtype: i32,
    /// Filled in by [`Kernels::rope`] from the operands.
    pub out_dtype: i32,
}
// SAFETY: plain-old-data matching `RopeArgs` in rope.cu.
unsafe impl DeviceRepr for RopeArgs {}

/// conv3d geometry for im2col (one batch entry).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Conv3dGeom {
    pub c_in: i64,
    pub input: [i64; 3],
    pub kernel: [i64; 3],
    pub stride: [i64; 3],
    /// Padding before each axis.
    pub pad: [i64; 3],
    pub out: [i64; 3],
}
// SAFETY: plain-old-data matching `Conv3dArgs` in conv.cu.
unsafe impl DeviceRepr for Conv3dGeom {}

/// Row reductions to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Mean = 1,
    Max = 2,
    AbsMax = 3,
}

/// Activation of the bias/activation epilogue kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None = 0,
    GeluTanh = 1,
    Silu = 2,
}

fn row_cfg(rows: usize) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize {
        return Err(Error::Unsupported {
            op: "row kernel",
            msg: format!("{rows} rows"),
        });
    }
    Ok(LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn opt_ptr(
    b: Option<In<'_>>,
    s: &CudaStream,
    op: &'static str,
    need: usize,
) -> Result<(u64, i32, i32)> {
    match b {
        None => Ok((0, 0, 0)),
        Some(i) => {
            check_len(op, "weight/bias", need, i.dtype, i.buf.len())?;
            let (p, _g) = rptr(i.buf, s);
            Ok((p, i.dtype.code(), 1))
        }
    }
}

impl Kernels {
    /// LayerNorm over contiguous rows `[rows, n]`, optional affine.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        s: &CudaStream,
        x: In<'_>,
        w: Option<In<'_>>,
        b: Option<In<'_>>,
        out: Out<'_>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        check_len("layer_norm", "x", rows * n, x.dtype, x.buf.len())?;
        check_len("layer_norm", "out", rows * n, out.dtype, out.buf.len())?;
        let (wp, wd, hw) = opt_ptr(w, s, "layer_norm", n)?;
        let (bp, bd, hb) = opt_ptr(b, s, "layer_norm", n)?;
        let a = RowArgs {
            rows: rows as i64,
            n: n as i64,
            x_stride: n as i64,
            out_stride: n as i64,
            x_dtype: x.dtype.code(),
            out_dtype: out.dtype.code(),
            w_dtype: wd,
            b_dtype: bd,
            has_w: hw,
            has_b: hb,
            eps,
            pad: 0.0,
        };
        if rows == 0 {
            return Ok(());
        }
        let (xp, _gx) = rptr(x.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_layernorm")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&xp).arg(&wp).arg(&bp).arg(&op_);
        // SAFETY: arguments match lava_layernorm; lengths checked.
        unsafe { l.launch(row_cfg(rows)?) }.w("launch lava_layernorm")?;
        Ok(())
    }

    /// RMSNorm over contiguous rows: `round(x.dtype, x·rsqrt(mean(x²)+eps)) · w`.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        s: &CudaStream,
        x: In<'_>,
        w: Option<In<'_>>,
        out: Out<'_>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        check_len("rms_norm", "x", rows * n, x.dtype, x.buf.len())?;
        check_len("rms_norm", "out", rows * n, out.dtype, out.buf.len())?;
        let (wp, wd, hw) = opt_ptr(w, s, "rms_norm", n)?;
        let a = RowArgs {
            rows: rows as i64,
            n: n as i64,
            x_stride: n as i64,
            out_stride: n as i64,
            x_dtype: x.dtype.code(),
            out_dtype: out.dtype.code(),
            w_dtype: wd,
            has_w: hw,
            eps,
            ..Default::default()
        };
        if rows == 0 {
            return Ok(());
        }
        let (xp, _gx) = rptr(x.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_rmsnorm")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&xp).arg(&wp).arg(&op_);
        // SAFETY: arguments match lava_rmsnorm; lengths checked.
        unsafe { l.launch(row_cfg(rows)?) }.w("launch lava_rmsnorm")?;
        Ok(())
    }

    /// Softmax over contiguous rows `[rows, n]`.
    pub fn softmax(
        &self,
        s: &CudaStream,
        x: In<'_>,
        out: Out<'_>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        check_len("softmax", "x", rows * n, x.dtype, x.buf.len())?;
        check_len("softmax", "out", rows * n, out.dtype, out.buf.len())?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let a = RowArgs {
            rows: rows as i64,
            n: n as i64,
            x_stride: n as i64,
            out_stride: n as i64,
            x_dtype: x.dtype.code(),
            out_dtype: out.dtype.code(),
            ..Default::default()
        };
        let (xp, _gx) = rptr(x.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_softmax")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&xp).arg(&op_);
        // SAFETY: arguments match lava_softmax; lengths checked.
        unsafe { l.launch(row_cfg(rows)?) }.w("launch lava_softmax")?;
        Ok(())
    }

    /// Row reduction of contiguous `[rows, n]` into f32 `[rows]`.
    pub fn reduce_rows(
        &self,
        s: &CudaStream,
        op: ReduceOp,
        x: In<'_>,
        out: Out<'_>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        check_len("reduce", "x", rows * n, x.dtype, x.buf.len())?;
        if out.dtype != DType::F32 {
            return Err(Error::Unsupported {
                op: "reduce",
                msg: format!("output {:?} (f32 only)", out.dtype),
            });
        }
        check_len("reduce", "out", rows, out.dtype, out.buf.len())?;
        if rows == 0 {
            return Ok(());
        }
        let a = RowArgs {
            rows: rows as i64,
            n: n as i64,
            x_stride: n as i64,
            out_stride: 1,
            x_dtype: x.dtype.code(),
            out_dtype: DType::F32.code(),
            ..Default::default()
        };
        let code = op as i32;
        let (xp, _gx) = rptr(x.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_reduce_rows")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&code).arg(&xp).arg(&op_);
        // SAFETY: arguments match lava_reduce_rows; lengths checked.
        unsafe { l.launch(row_cfg(rows)?) }.w("launch lava_reduce_rows")?;
        Ok(())
    }

    /// The VAE's channel RMS norm on contiguous `[batch, c, spatial]`.
    #[allow(clippy::too_many_arguments)]
    pub fn channel_rms_norm(
        &self,
        s: &CudaStream,
        x: In<'_>,
        gamma: Option<In<'_>>,
        bias: Option<In<'_>>,
        out: Out<'_>,
        batch: usize,
        c: usize,
        spatial: usize,
        eps: f32,
        scale: f32,
    ) -> Result<()> {
        let n = batch * c * spatial;
        check_len("channel_rms_norm", "x", n, x.dtype, x.buf.len())?;
        check_len("channel_rms_norm", "out", n, out.dtype, out.buf.len())?;
        let (wp, wd, hw) = opt_ptr(gamma, s, "channel_rms_norm", c)?;
        let (bp, bd, hb) = opt_ptr(bias, s, "channel_rms_norm", c)?;
        if n == 0 {
            return Ok(());
        }
        let a = ChannelArgs {
            batch: batch as i64,
            channels: c as i64,
            spatial: spatial as i64,
            x_dtype: x.dtype.code(),
            out_dtype: out.dtype.code(),
            w_dtype: wd,
            b_dtype: bd,
            has_w: hw,
            has_b: hb,
            eps,
            scale,
        };
        let (xp, _gx) = rptr(x.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_channel_rmsnorm")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&xp).arg(&wp).arg(&bp).arg(&op_);
        // SAFETY: arguments match lava_channel_rmsnorm; lengths checked.
        unsafe { l.launch(self.grid(batch * spatial)) }.w("launch lava_channel_rmsnorm")?;
        Ok(())
    }

    /// `out = act(x + bias)` on contiguous `[rows, cols]`, bias per column (or, with
    /// `bias_per_row`, per row, repeating every `bias.len()` rows). `x = None` works in place
    /// on `out` (x's dtype = out's dtype).
    #[allow(clippy::too_many_arguments)]
    pub fn bias_act(
        &self,
        s: &CudaStream,
        x: Option<In<'_>>,
        bias: Option<In<'_>>,
        out: Out<'_>,
        rows: usize,
        cols: usize,
        bias_per_row: bool,
        act: Act,
    ) -> Result<()> {
        let n = rows * cols;
        check_len("bias_act", "out", n, out.dtype, out.buf.len())?;
        let bias_n = match (bias, bias_per_row) {
            (Some(b), true) => b.elems(),
            _ => cols,
        };
        if bias_per_row && (bias_n == 0 || !rows.is_multiple_of(bias_n)) {
            return Err(Error::Unsupported {
                op: "bias_act",
                msg: format!("{rows} rows with a per-row bias of {bias_n}"),
            });
        }
        let (bp, bd, hb) = opt_ptr(
            bias,
            s,
            "bias_act",
            if bias_per_row { bias_n } else { cols },
        )?;
        if n == 0 {
            return Ok(());
        }
        let (r, c, bn) = (rows as i64, cols as i64, bias_n as i64);
        let (od, per_row, act) = (out.dtype.code(), bias_per_row as i32, act as i32);
        let (op_, _go) = wptr(out.buf, s);
        let (xp, xd, _gx) = match x {
            Some(i) => {
                check_len("bias_act", "x", n, i.dtype, i.buf.len())?;
                let (p, g) = rptr(i.buf, s);
                (p, i.dtype.code(), Some(g))
            }
            None => (op_, od, None),
        };
        let f = self.func("lava_bias_act")?;
        let mut l = s.launch_builder(f);
        l.arg(&r)
            .arg(&c)
            .arg(&bn)
            .arg(&xd)
            .arg(&od)
            .arg(&bd)
            .arg(&hb)
            .arg(&per_row)
            .arg(&act);
        l.arg(&xp).arg(&bp).arg(&op_);
        // SAFETY: arguments match lava_bias_act; lengths checked.
        unsafe { l.launch(self.grid(n)) }.w("launch lava_bias_act")?;
        Ok(())
    }

    /// Interleaved-pair RoPE; `a` gives the geometry and strides (dtypes are filled in).
    pub fn rope(
        &self,
        s: &CudaStream,
        x: In<'_>,
        cos: In<'_>,
        sin: In<'_>,
        out: Out<'_>,
        mut a: RopeArgs,
    ) -> Result<()> {
        if cos.dtype != DType::F32 || sin.dtype != DType::F32 {
            return Err(Error::Unsupported {
                op: "rope",
                msg: "cos/sin tables must be f32".into(),
            });
        }
        let last = |bs: i64, ls: i64, hs: i64| -> usize {
            ((a.batch - 1) * bs + (a.tokens - 1) * ls + (a.heads - 1) * hs + 2 * a.half_dim)
                as usize
        };
        let total = (a.batch * a.tokens * a.heads * a.half_dim) as usize;
        if total == 0 {
            return Ok(());
        }
        if a.heads * a.half_dim > i64::from(i32::MAX) {
            return Err(Error::Unsupported {
                op: "rope",
                msg: format!("{} pairs per token", a.heads * a.half_dim),
            });
        }
        check_len(
            "rope",
            "x",
            last(a.x_bs, a.x_ls, a.x_hs),
            x.dtype,
            x.buf.len(),
        )?;
        check_len(
            "rope",
            "out",
            last(a.o_bs, a.o_ls, a.o_hs),
            out.dtype,
            out.buf.len(),
        )?;
        let tl = ((a.batch - 1) * a.t_bs + (a.tokens - 1) * a.t_ls + a.half_dim) as usize;
        check_len("rope", "cos", tl, DType::F32, cos.buf.len())?;
        check_len("rope", "sin", tl, DType::F32, sin.buf.len())?;
        a.x_dtype = x.dtype.code();
        a.out_dtype = out.dtype.code();
        let (xp, _gx) = rptr(x.buf, s);
        let (cp, _gc) = rptr(cos.buf, s);
        let (sp, _gs) = rptr(sin.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_rope")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&xp).arg(&cp).arg(&sp).arg(&op_);
        let rows = (a.batch * a.tokens) as usize;
        let cfg = LaunchConfig {
            grid_dim: (rows.clamp(1, self.sm_count as usize * 64) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match lava_rope; spans checked.
        unsafe { l.launch(cfg) }.w("launch lava_rope")?;
        Ok(())
    }

    /// im2col of one conv1d input `[c_in, l_in]` (element offset `x_off`) into
    /// `[c_in·kernel, l_out]`.
    #[allow(clippy::too_many_arguments)]
    pub fn im2col1d(
        &self,
        s: &CudaStream,
        x: In<'_>,
        x_off: usize,
        col: Out<'_>,
        c_in: usize,
        l_in: usize,
        kernel: usize,
        stride: usize,
        pad_left: usize,
        l_out: usize,
        replicate: bool,
    ) -> Result<()> {
        if x.dtype.size() != col.dtype.size() {
            return Err(Error::Unsupported {
                op: "im2col1d",
                msg: "dtype mismatch".into(),
            });
        }
        check_len("im2col1d", "x", x_off + c_in * l_in, x.dtype, x.buf.len())?;
        let n = c_in * kernel * l_out;
        check_len("im2col1d", "col", n, col.dtype, col.buf.len())?;
        if n == 0 {
            return Ok(());
        }
        let es = x.dtype.size() as i32;
        let (xp, _gx) = rptr(x.buf, s);
        let xp = xp + (x_off * es as usize) as u64;
        let (cp, _gc) = wptr(col.buf, s);
        let v = [c_in, l_in, kernel, stride, pad_left, l_out].map(|v| v as i64);
        let rep = replicate as i32;
        let f = self.func("lava_im2col1d")?;
        let mut l = s.launch_builder(f);
        l.arg(&es).arg(&xp).arg(&cp);
        for x in &v {
            l.arg(x);
        }
        l.arg(&rep);
        // SAFETY: arguments match lava_im2col1d; lengths checked.
        unsafe { l.launch(self.grid(n)) }.w("launch lava_im2col1d")?;
        Ok(())
    }

    /// im2col of one conv3d input `[c_in, t, h, w]` (element offset `x_off`) into
    /// `[c_in·kt·kh·kw, t'·h'·w']`.
    pub fn im2col3d(
        &self,
        s: &CudaStream,
        x: In<'_>,
        x_off: usize,
        col: Out<'_>,
        g: &Conv3dGeom,
    ) -> Result<()> {
        if x.dtype.size() != col.dtype.size() {
            return Err(Error::Unsupported {
                op: "im2col3d",
                msg: "dtype mismatch".into(),
            });
        }
        let vin = (g.c_in * g.input.iter().product::<i64>()) as usize;
        check_len("im2col3d", "x", x_off + vin, x.dtype, x.buf.len())?;
        let n =
            (g.c_in * g.kernel.iter().product::<i64>() * g.out.iter().product::<i64>()) as usize;
        check_len("im2col3d", "col", n, col.dtype, col.buf.len())?;
        if n == 0 {
            return Ok(());
        }
        let es = x.dtype.size() as i32;
        let (xp, _gx) = rptr(x.buf, s);
        let xp = xp + (x_off * es as usize) as u64;
        let (cp, _gc) = wptr(col.buf, s);
        let f = self.func("lava_im2col3d")?;
        let mut l = s.launch_builder(f);
        l.arg(g).arg(&es).arg(&xp).arg(&cp);
        // SAFETY: arguments match lava_im2col3d; lengths checked.
        unsafe { l.launch(self.grid(n)) }.w("launch lava_im2col3d")?;
        Ok(())
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ResNormArgs {
    rows: i64,
    n: i64,
    per_group: i64,
    x_dtype: i32,
    y_dtype: i32,
    gate_dtype: i32,
    w_dtype: i32,
    b_dtype: i32,
    sc_dtype: i32,
    sh_dtype: i32,
    res_dtype: i32,
    ln_in_dtype: i32,
    norm_dtype: i32,
    out_dtype: i32,
    has_y: i32,
    has_gate: i32,
    has_w: i32,
    has_b: i32,
    has_mod: i32,
    eps: f32,
    pad: i32,
    vec4: i32,
    pad2: i32,
}
// SAFETY: plain-old-data matching `ResNormArgs` in norm.cu.
unsafe impl DeviceRepr for ResNormArgs {}

/// Shape and rounding points of [`Kernels::res_norm_mod`] (see `lava_res_norm_mod` in
/// norm.cu): `rows × n`, gate/scale/shift tables with one row per `per_group` rows.
#[derive(Debug, Clone, Copy)]
pub struct ResNormGeom {
    pub rows: usize,
    pub n: usize,
    pub per_group: usize,
    pub eps: f32,
    pub ln_in: DType,
    pub norm: DType,
}

/// Operands of [`Kernels::res_norm_mod`]; tables are `[rows / per_group, n]`.
#[derive(Debug)]
pub struct ResNormIo<'a> {
    pub x: In<'a>,
    pub y: Option<In<'a>>,
    pub gate: Option<In<'a>>,
    pub weight: Option<In<'a>>,
    pub bias: Option<In<'a>>,
    pub scale: Option<In<'a>>,
    pub shift: Option<In<'a>>,
    pub res: Option<Out<'a>>,
    pub out: Out<'a>,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RmsRopeArgs {
    rows: i64,
    heads: i64,
    head_dim: i64,
    x_dtype: i32,
    w_dtype: i32,
    norm_dtype: i32,
    out_dtype: i32,
    eps: f32,
    pad: i32,
}
// SAFETY: plain-old-data matching `RmsRopeArgs` in rope.cu.
unsafe impl DeviceRepr for RmsRopeArgs {}

impl Kernels {
    /// Residual + LayerNorm + modulation of contiguous rows in one launch.
    pub fn res_norm_mod(&self, s: &CudaStream, g: &ResNormGeom, io: ResNormIo<'_>) -> Result<()> {
        let (rows, n) = (g.rows, g.n);
        let groups = rows.checked_div(g.per_group).unwrap_or(0);
        if g.per_group == 0 || rows % g.per_group != 0 {
            return Err(Error::Unsupported {
                op: "res_norm_mod",
                msg: format!("{rows} rows in groups of {}", g.per_group),
            });
        }
        let op = "res_norm_mod";
        check_len(op, "x", rows * n, io.x.dtype, io.x.buf.len())?;
        check_len(op, "out", rows * n, io.out.dtype, io.out.buf.len())?;
        if let Some(y) = &io.y {
            check_len(op, "y", rows * n, y.dtype, y.buf.len())?;
        }
        if let Some(r) = &io.res {
            check_len(op, "res", rows * n, r.dtype, r.buf.len())?;
        }
        if io.gate.is_some() && io.y.is_none() {
            return Err(Error::Unsupported {
                op,
                msg: "a gate without y".into(),
            });
        }
        if io.scale.is_some() != io.shift.is_some() {
            return Err(Error::Unsupported {
                op,
                msg: "scale and shift go together".into(),
            });
        }
        let (yp, yd, hy) = opt_ptr(io.y, s, op, rows * n)?;
        let (gp, gd, hg) = opt_ptr(io.gate, s, op, groups * n)?;
        let (wp, wd, hw) = opt_ptr(io.weight, s, op, n)?;
        let (bp, bd, hb) = opt_ptr(io.bias, s, op, n)?;
        let (scp, scd, hm) = opt_ptr(io.scale, s, op, groups * n)?;
        let (shp, shd, _) = opt_ptr(io.shift, s, op, groups * n)?;
        let res_dtype = io.res.as_ref().map_or(-1, |r| r.dtype.code());
        let a = ResNormArgs {
            rows: rows as i64,
            n: n as i64,
            per_group: g.per_group as i64,
            x_dtype: io.x.dtype.code(),
            y_dtype: yd,
            gate_dtype: gd,
            w_dtype: wd,
            b_dtype: bd,
            sc_dtype: scd,
            sh_dtype: shd,
            res_dtype,
            ln_in_dtype: g.ln_in.code(),
            norm_dtype: g.norm.code(),
            out_dtype: io.out.dtype.code(),
            has_y: hy,
            has_gate: hg,
            has_w: hw,
            has_b: hb,
            has_mod: hm,
            eps: g.eps,
            // The row lives in shared memory when it fits the default 48 KiB.
            pad: i32::from(n * 4 <= 48 * 1024),
            vec4: 0,
            pad2: 0,
        };
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let mut cfg = row_cfg(rows)?;
        if a.pad != 0 {
            cfg.shared_mem_bytes = (n * 4) as u32;
        }
        let (xp, _gx) = rptr(io.x.buf, s);
        let mut res_buf = io.res;
        let (rp, _gr) = match res_buf.as_mut() {
            Some(r) => {
                let (p, g) = wptr(r.buf, s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (op_, _go) = wptr(io.out.buf, s);
        // Four columns per access when the row is cached and every operand is aligned.
        let mut a = a;
        a.vec4 = i32::from(
            a.pad != 0
                && n % 4 == 0
                && crate::elementwise::rowwise_enabled()
                && [xp, yp, gp, wp, bp, scp, shp, rp, op_]
                    .iter()
                    .all(|p| p % 16 == 0),
        );
        let f = self.func("lava_res_norm_mod")?;
        let mut l = s.launch_builder(f);
        l.arg(&a)
            .arg(&xp)
            .arg(&yp)
            .arg(&gp)
            .arg(&wp)
            .arg(&bp)
            .arg(&scp)
            .arg(&shp)
            .arg(&rp)
            .arg(&op_);
        // SAFETY: arguments match lava_res_norm_mod; every length checked above.
        unsafe { l.launch(cfg) }.w("launch lava_res_norm_mod")?;
        Ok(())
    }

    /// RMSNorm over rows of `heads · head_dim`, × w, then interleaved RoPE with per-row
    /// tables cos/sin f32 `[rows, head_dim/2]`; `norm` is the dtype of the normed value.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_rope(
        &self,
        s: &CudaStream,
        x: In<'_>,
        w: In<'_>,
        cos: In<'_>,
        sin: In<'_>,
        out: Out<'_>,
        rows: usize,
        heads: usize,
        head_dim: usize,
        eps: f32,
        norm: DType,
    ) -> Result<()> {
        let op = "rms_norm_rope";
        let n = heads * head_dim;
        if !head_dim.is_multiple_of(2) || cos.dtype != DType::F32 || sin.dtype != DType::F32 {
            return Err(Error::Unsupported {
                op,
                msg: format!(
                    "head dim {head_dim}, tables {:?}/{:?}",
                    cos.dtype, sin.dtype
                ),
            });
        }
        check_len(op, "x", rows * n, x.dtype, x.buf.len())?;
        check_len(op, "w", n, w.dtype, w.buf.len())?;
        check_len(op, "cos", rows * head_dim / 2, cos.dtype, cos.buf.len())?;
        check_len(op, "sin", rows * head_dim / 2, sin.dtype, sin.buf.len())?;
        check_len(op, "out", rows * n, out.dtype, out.buf.len())?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let a = RmsRopeArgs {
            rows: rows as i64,
            heads: heads as i64,
            head_dim: head_dim as i64,
            x_dtype: x.dtype.code(),
            w_dtype: w.dtype.code(),
            norm_dtype: norm.code(),
            out_dtype: out.dtype.code(),
            eps,
            pad: 0,
        };
        let (xp, _gx) = rptr(x.buf, s);
        let (wp, _gw) = rptr(w.buf, s);
        let (cp, _gc) = rptr(cos.buf, s);
        let (sp, _gs) = rptr(sin.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_rmsnorm_rope")?;
        let mut l = s.launch_builder(f);
        l.arg(&a).arg(&xp).arg(&wp).arg(&cp).arg(&sp).arg(&op_);
        // SAFETY: arguments match lava_rmsnorm_rope; lengths checked.
        unsafe { l.launch(row_cfg(rows)?) }.w("launch lava_rmsnorm_rope")?;
        Ok(())
    }
}
