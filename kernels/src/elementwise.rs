//! Launchers for `cuda/elementwise.cu`: strided unary/binary/ternary math, exact copies
//! (permute, slices, concatenation, nearest upsampling), index_select and fill.

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, PushKernelArg};

use crate::error::{DriverExt, Error, Result};
use crate::module::{In, Kernels, Out, check_len, rptr, wptr};

const MAX_DIMS: usize = 6;

/// Unary functions (f32 math); codes match `elementwise.cu`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    /// x·mul (a cast when mul = 1).
    Scale(f32),
    GeluTanh,
    Silu,
    /// x·mul + add.
    Affine {
        mul: f32,
        add: f32,
    },
    Exp,
    Neg,
    Abs,
    Sqr,
    Sqrt,
    Recip,
    Tanh,
    /// 0.5·x·(1 + erf(x/√2)).
    GeluErf,
    /// min(max(x, min), max).
    Clamp {
        min: f32,
        max: f32,
    },
}

impl UnaryOp {
    fn code(self) -> (i32, f32, f32) {
        match self {
            UnaryOp::Scale(m) => (0, m, 0.0),
            UnaryOp::GeluTanh => (1, 0.0, 0.0),
            UnaryOp::Silu => (2, 0.0, 0.0),
            UnaryOp::Affine { mul, add } => (3, mul, add),
            UnaryOp::Exp => (4, 0.0, 0.0),
            UnaryOp::Neg => (5, 0.0, 0.0),
            UnaryOp::Abs => (6, 0.0, 0.0),
            UnaryOp::Sqr => (7, 0.0, 0.0),
            UnaryOp::Sqrt => (8, 0.0, 0.0),
            UnaryOp::Recip => (9, 0.0, 0.0),
            UnaryOp::Tanh => (10, 0.0, 0.0),
            UnaryOp::GeluErf => (11, 0.0, 0.0),
            UnaryOp::Clamp { min, max } => (12, min, max),
        }
    }
}

/// Binary functions; codes match `elementwise.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
    Maximum = 4,
    Minimum = 5,
}

/// Fused three-operand functions; codes match `elementwise.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryOp {
    /// a·(1 + b) + c.
    Modulate = 0,
    /// a + b·c.
    GatedResidual = 1,
}

/// An operand read through element strides over the launch's index space.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub src: In<'a>,
    /// Element offset of index 0.
    pub offset: usize,
    /// One stride per dim of the index space (0 broadcasts).
    pub strides: &'a [usize],
}

/// The written operand of a strided launch.
#[derive(Debug)]
pub struct StridedMut<'a> {
    pub dst: Out<'a>,
    pub offset: usize,
    pub strides: &'a [usize],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ElemArgs {
    ndim: i32,
    dtype: [i32; 4],
    pad: i32,
    numel: i64,
    shape: [i64; MAX_DIMS],
    stride: [[i64; MAX_DIMS]; 4],
    p0: f32,
    p1: f32,
}
// SAFETY: plain-old-data with the C layout of `ElemArgs` in common.cuh.
unsafe impl DeviceRepr for ElemArgs {}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CopyFactors {
    f: [i32; MAX_DIMS],
}
// SAFETY: plain-old-data matching `CopyFactors` in elementwise.cu.
unsafe impl DeviceRepr for CopyFactors {}

/// Merge dims that are contiguous in every operand and drop size-1 dims, so most launches
/// index with one or two dims. Returns (dims, strides per operand).
fn coalesce(dims: &[usize], strides: &[&[usize]]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut out_dims: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for (d, &size) in dims.iter().enumerate() {
        if size == 1 {
            continue;
        }
        let mergeable = !out_dims.is_empty()
            && strides
                .iter()
                .zip(&out_strides)
                .all(|(s, o)| o[o.len() - 1] == s[d] * size);
        if mergeable {
            let last = out_dims.len() - 1;
            out_dims[last] *= size;
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o[last] = s[d];
            }
        } else {
            out_dims.push(size);
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o.push(s[d]);
            }
        }
    }
    (out_dims, out_strides)
}

/// Elements an operand spans: offset + Σ (dim − 1)·stride + 1 (0 for an empty space).
fn span(dims: &[usize], strides: &[usize], offset: usize) -> usize {
    if dims.contains(&0) {
        return 0;
    }
    offset
        + dims
            .iter()
            .zip(strides)
            .map(|(d, s)| (d - 1) * s)
            .sum::<usize>()
        + 1
}

fn elem_args(
    op: &'static str,
    dims: &[usize],
    ins: &[&Strided<'_>],
    out: &StridedMut<'_>,
) -> Result<ElemArgs> {
    for s in ins.iter().map(|i| i.strides).chain([out.strides]) {
        if s.len() != dims.len() {
            return Err(Error::Unsupported {
                op,
                msg: format!("{} strides for {} dims", s.len(), dims.len()),
            });
        }
    }
    for (k, i) in ins.iter().enumerate() {
        let name = ["in0", "in1", "in2"][k];
        check_len(
            op,
            name,
            span(dims, i.strides, i.offset),
            i.src.dtype,
            i.src.buf.len(),
        )?;
    }
    check_len(
        op,
        "out",
        span(dims, out.strides, out.offset),
        out.dst.dtype,
        out.dst.buf.len(),
    )?;
    let mut all: Vec<&[usize]> = ins.iter().map(|i| i.strides).collect();
    all.push(out.strides);
    let (cd, cs) = coalesce(dims, &all);
    if cd.len() > MAX_DIMS {
        return Err(Error::Unsupported {
            op,
            msg: format!("{} non-contiguous dims (at most {MAX_DIMS})", cd.len()),
        });
    }
    let mut a = ElemArgs {
        ndim: cd.len() as i32,
        numel: dims.iter().product::<usize>() as i64,
        ..Default::default()
    };
    for (k, i) in ins.iter().enumerate() {
        a.dtype[k] = i.src.dtype.code();
    }
    a.dtype[3] = out.dst.dtype.code();
    for (d, &size) in cd.iter().enumerate() {
        a.shape[d] = size as i64;
        for (k, st) in cs.iter().take(ins.len()).enumerate() {
            a.stride[k][d] = st[d] as i64;
        }
        a.stride[3][d] = cs[ins.len()][d] as i64;
    }
    Ok(a)
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RowwiseArgs {
    rows: i64,
    n: i64,
    per_group: i64,
    dtype: [i32; 4],
    grouped: [i32; 3],
    nin: i32,
    op: i32,
    pad: i32,
}
// SAFETY: plain-old-data matching `RowwiseArgs` in elementwise.cu.
unsafe impl DeviceRepr for RowwiseArgs {}

/// Whether the vectorised row paths may run (`LAVA_ROWWISE=0` turns them off: this one and
/// the 4-column path of `res_norm_mod`).
pub(crate) fn rowwise_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LAVA_ROWWISE").map_or(true, |v| v != "0"))
}

/// The row layout of a coalesced binary/ternary launch, if it has one: every input full
/// (`[rows, n]` contiguous) or one row per group of rows, out full, no offsets, `n % 4 == 0`.
fn rowwise_args(a: &ElemArgs, nin: usize, offsets: &[usize]) -> Option<RowwiseArgs> {
    if !rowwise_enabled() || offsets.iter().any(|&o| o != 0) {
        return None;
    }
    let nd = a.ndim as usize;
    let shape = &a.shape[..nd];
    let n = *shape.last()?;
    if n % 4 != 0 || nd > 3 {
        return None;
    }
    // (rows, per_group) and the full / grouped stride patterns of this rank.
    let (rows, per_group, full, grouped): (i64, i64, Vec<i64>, Vec<i64>) = match nd {
        1 => (1, 1, vec![1], vec![]),
        2 => (shape[0], shape[0], vec![n, 1], vec![0, 1]),
        3 => (
            shape[0] * shape[1],
            shape[1],
            vec![shape[1] * n, n, 1],
            vec![n, 0, 1],
        ),
        _ => return None,
    };
    let mut r = RowwiseArgs {
        rows,
        n,
        per_group,
        dtype: a.dtype,
        nin: nin as i32,
        ..Default::default()
    };
    if a.stride[3][..nd] != full[..] {
        return None;
    }
    for k in 0..nin {
        let st = &a.stride[k][..nd];
        if st == &full[..] {
            r.grouped[k] = 0;
        } else if !grouped.is_empty() && st == &grouped[..] {
            r.grouped[k] = 1;
        } else {
            return None;
        }
    }
    Some(r)
}

impl Kernels {
    /// The row fast path of `binary` / `ternary` (`lava_rowwise`); false when the layout
    /// does not fit it.
    fn try_rowwise(
        &self,
        s: &CudaStream,
        a: &ElemArgs,
        op: i32,
        ins: &[&Strided<'_>],
        out: &mut StridedMut<'_>,
    ) -> Result<bool> {
        let mut offs: Vec<usize> = ins.iter().map(|i| i.offset).collect();
        offs.push(out.offset);
        let Some(mut r) = rowwise_args(a, ins.len(), &offs) else {
            return Ok(false);
        };
        r.op = op;
        let (xp, _gx) = rptr(ins[0].src.buf, s);
        let (yp, _gy) = rptr(ins[1].src.buf, s);
        let zp = match ins.get(2) {
            Some(z) => rptr(z.src.buf, s).0,
            None => 0,
        };
        let (op_, _go) = wptr(out.dst.buf, s);
        // 16-byte vector accesses need 16-byte aligned bases.
        if [xp, yp, zp, op_].iter().any(|p| p % 16 != 0) {
            return Ok(false);
        }
        let f = self.func("lava_rowwise")?;
        let mut b = s.launch_builder(f);
        b.arg(&r).arg(&xp).arg(&yp).arg(&zp).arg(&op_);
        // SAFETY: argument list matches lava_rowwise; every operand's span was checked by
        // elem_args over the same index space.
        unsafe { b.launch(self.grid((r.rows * r.n / 4) as usize)) }.w("launch lava_rowwise")?;
        Ok(true)
    }

    /// `out[i] = op(x[i])` over `dims`, rounded once to out's dtype.
    pub fn unary(
        &self,
        s: &CudaStream,
        op: UnaryOp,
        x: Strided<'_>,
        out: StridedMut<'_>,
        dims: &[usize],
    ) -> Result<()> {
        let mut a = elem_args("unary", dims, &[&x], &out)?;
        if a.numel == 0 {
            return Ok(());
        }
        let (code, p0, p1) = op.code();
        (a.p0, a.p1) = (p0, p1);
        let (xp, _gx) = rptr(x.src.buf, s);
        let (op_, _go) = wptr(out.dst.buf, s);
        let xp = xp + (x.offset * x.src.dtype.size()) as u64;
        let op_ = op_ + (out.offset * out.dst.dtype.size()) as u64;
        let f = self.func("lava_unary")?;
        let mut b = s.launch_builder(f);
        b.arg(&a).arg(&code).arg(&xp).arg(&op_);
        // SAFETY: argument list matches lava_unary; bounds were checked by elem_args.
        unsafe { b.launch(self.grid(a.numel as usize)) }.w("launch lava_unary")?;
        Ok(())
    }

    /// `out[i] = op(a[i], b[i])` over `dims` with broadcasting strides.
    pub fn binary(
        &self,
        s: &CudaStream,
        op: BinaryOp,
        x: Strided<'_>,
        y: Strided<'_>,
        out: StridedMut<'_>,
        dims: &[usize],
    ) -> Result<()> {
        let a = elem_args("binary", dims, &[&x, &y], &out)?;
        if a.numel == 0 {
            return Ok(());
        }
        let mut out = out;
        if self.try_rowwise(s, &a, op as i32, &[&x, &y], &mut out)? {
            return Ok(());
        }
        let (xp, _gx) = rptr(x.src.buf, s);
        let (yp, _gy) = rptr(y.src.buf, s);
        let (op_, _go) = wptr(out.dst.buf, s);
        let xp = xp + (x.offset * x.src.dtype.size()) as u64;
        let yp = yp + (y.offset * y.src.dtype.size()) as u64;
        let op_ = op_ + (out.offset * out.dst.dtype.size()) as u64;
        let code = op as i32;
        let f = self.func("lava_binary")?;
        let mut b = s.launch_builder(f);
        b.arg(&a).arg(&code).arg(&xp).arg(&yp).arg(&op_);
        // SAFETY: argument list matches lava_binary; bounds checked.
        unsafe { b.launch(self.grid(a.numel as usize)) }.w("launch lava_binary")?;
        Ok(())
    }

    /// `out[i] = op(a[i], b[i], c[i])` over `dims` with broadcasting strides.
    #[allow(clippy::too_many_arguments)]
    pub fn ternary(
        &self,
        s: &CudaStream,
        op: TernaryOp,
        x: Strided<'_>,
        y: Strided<'_>,
        z: Strided<'_>,
        out: StridedMut<'_>,
        dims: &[usize],
    ) -> Result<()> {
        let a = elem_args("ternary", dims, &[&x, &y, &z], &out)?;
        if a.numel == 0 {
            return Ok(());
        }
        let mut out = out;
        if self.try_rowwise(s, &a, op as i32, &[&x, &y, &z], &mut out)? {
            return Ok(());
        }
        let (xp, _gx) = rptr(x.src.buf, s);
        let (yp, _gy) = rptr(y.src.buf, s);
        let (zp, _gz) = rptr(z.src.buf, s);
        let (op_, _go) = wptr(out.dst.buf, s);
        let xp = xp + (x.offset * x.src.dtype.size()) as u64;
        let yp = yp + (y.offset * y.src.dtype.size()) as u64;
        let zp = zp + (z.offset * z.src.dtype.size()) as u64;
        let op_ = op_ + (out.offset * out.dst.dtype.size()) as u64;
        let code = op as i32;
        let f = self.func("lava_ternary")?;
        let mut b = s.launch_builder(f);
        b.arg(&a).arg(&code).arg(&xp).arg(&yp).arg(&zp).arg(&op_);
        // SAFETY: argument list matches lava_ternary; bounds checked.
        unsafe { b.launch(self.grid(a.numel as usize)) }.w("launch lava_ternary")?;
        Ok(())
    }

    /// Exact strided copy over `dims` (same dtype). With `factors`, input index along dim d
    /// is `out_index / factors[d]` (nearest upsampling); the input strides then describe the
    /// input's own layout and its span is `dims[d] / factors[d]`.
    pub fn copy(
        &self,
        s: &CudaStream,
        x: Strided<'_>,
        out: StridedMut<'_>,
        dims: &[usize],
        factors: Option<&[usize]>,
    ) -> Result<()> {
        if x.src.dtype.size() != out.dst.dtype.size() {
            return Err(Error::Unsupported {
                op: "copy",
                msg: format!("{:?} into {:?}", x.src.dtype, out.dst.dtype),
            });
        }
        let mut fac = CopyFactors { f: [1; MAX_DIMS] };
        let a = match factors {
            None => elem_args("copy", dims, &[&x], &out)?,
            Some(f) => {
                if f.len() != dims.len() || dims.len() > MAX_DIMS || f.contains(&0) {
                    return Err(Error::Unsupported {
                        op: "upsample",
                        msg: format!("factors {f:?} for dims {dims:?}"),
                    });
                }
                let in_dims: Vec<usize> = dims.iter().zip(f).map(|(d, k)| d / k).collect();
                check_len(
                    "upsample",
                    "in",
                    span(&in_dims, x.strides, x.offset),
                    x.src.dtype,
                    x.src.buf.len(),
                )?;
                check_len(
                    "upsample",
                    "out",
                    span(dims, out.strides, out.offset),
                    out.dst.dtype,
                    out.dst.buf.len(),
                )?;
                let mut a = ElemArgs {
                    ndim: dims.len() as i32,
                    numel: dims.iter().product::<usize>() as i64,
                    ..Default::default()
                };
                for d in 0..dims.len() {
                    a.shape[d] = dims[d] as i64;
                    a.stride[0][d] = x.strides[d] as i64;
                    a.stride[3][d] = out.strides[d] as i64;
                    fac.f[d] = f[d] as i32;
                }
                a
            }
        };
        if a.numel == 0 {
            return Ok(());
        }
        let es = x.src.dtype.size() as i32;
        let (xp, _gx) = rptr(x.src.buf, s);
        let (op_, _go) = wptr(out.dst.buf, s);
        let xp = xp + (x.offset * es as usize) as u64;
        let op_ = op_ + (out.offset * es as usize) as u64;
        let f = self.func("lava_copy_raw")?;
        let mut b = s.launch_builder(f);
        b.arg(&a).arg(&fac).arg(&es).arg(&xp).arg(&op_);
        // SAFETY: argument list matches lava_copy_raw; bounds checked.
        unsafe { b.launch(self.grid(a.numel as usize)) }.w("launch lava_copy_raw")?;
        Ok(())
    }

    /// `out[o, j, i] = x[o, ids[j], i]`; `ids` were checked against `dim` by the caller
    /// (`ids_max` is their maximum, re-checked here).
    #[allow(clippy::too_many_arguments)]
    pub fn index_select(
        &self,
        s: &CudaStream,
        x: In<'_>,
        out: Out<'_>,
        outer: usize,
        dim: usize,
        inner: usize,
        ids: &CudaSlice<u32>,
        ids_max: u32,
    ) -> Result<()> {
        let n = ids.len();
        if n > 0 && ids_max as usize >= dim {
            return Err(Error::Unsupported {
                op: "index_select",
                msg: format!("index {ids_max} out of range for dim {dim}"),
            });
        }
        check_len(
            "index_select",
            "x",
            outer * dim * inner,
            x.dtype,
            x.buf.len(),
        )?;
        check_len(
            "index_select",
            "out",
            outer * n * inner,
            out.dtype,
            out.buf.len(),
        )?;
        let total = outer * n * inner;
        if total == 0 {
            return Ok(());
        }
        let es = x.dtype.size() as i32;
        let (xp, _gx) = rptr(x.buf, s);
        let (op_, _go) = wptr(out.buf, s);
        let (ip, _gi) = cudarc::driver::DevicePtr::device_ptr(ids, s);
        let (o, d, i, nn) = (outer as i64, dim as i64, inner as i64, n as i64);
        let f = self.func("lava_index_select")?;
        let mut b = s.launch_builder(f);
        b.arg(&o)
            .arg(&d)
            .arg(&i)
            .arg(&nn)
            .arg(&es)
            .arg(&ip)
            .arg(&xp)
            .arg(&op_);
        // SAFETY: argument list matches lava_index_select; bounds checked.
        unsafe { b.launch(self.grid(total)) }.w("launch lava_index_select")?;
        Ok(())
    }

    /// Every element of `out` = `value` rounded to its dtype.
    pub fn fill(&self, s: &CudaStream, out: Out<'_>, value: f32) -> Result<()> {
        let n = out.elems() as i64;
        if n == 0 {
            return Ok(());
        }
        let dt = out.dtype.code();
        let (op_, _go) = wptr(out.buf, s);
        let f = self.func("lava_fill")?;
        let mut b = s.launch_builder(f);
        b.arg(&op_).arg(&dt).arg(&n).arg(&value);
        // SAFETY: argument list matches lava_fill; n is the buffer's element count.
        unsafe { b.launch(self.grid(n as usize)) }.w("launch lava_fill")?;
        Ok(())
    }
}

/// Row-major strides of `dims`.
pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut st = vec![1; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * dims[d + 1];
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_contiguous_and_keeps_broadcast() {
        // [2, 3, 4] contiguous with a bias broadcast over the first two dims.
        let c = contiguous_strides(&[2, 3, 4]);
        let (d, s) = coalesce(&[2, 3, 4], &[&c, &[0, 0, 1], &c]);
        assert_eq!(d, vec![6, 4]);
        assert_eq!(s, vec![vec![4, 1], vec![0, 1], vec![4, 1]]);
        let (d, s) = coalesce(&[2, 1, 4], &[&[4, 4, 1]]);
        assert_eq!((d, s), (vec![8], vec![vec![1]]));
        // A transpose does not merge.
        let (d, _) = coalesce(&[3, 4], &[&[1, 3], &[4, 1]]);
        assert_eq!(d, vec![3, 4]);
    }

    #[test]
    fn span_counts_last_element() {
        assert_eq!(span(&[2, 3], &[3, 1], 0), 6);
        assert_eq!(span(&[2, 3], &[0, 1], 5), 8);
        assert_eq!(span(&[0, 3], &[3, 1], 5), 0);
    }
}
