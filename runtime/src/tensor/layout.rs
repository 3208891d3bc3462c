//! Layout ops. All copy exactly (no rounding, any dtype; fp8 keeps its scale) except
//! `reshape`-like ones, which share the buffer.

use super::Tensor;
use super::ops::{Pick, dispatch, same_device};
use crate::device::{BackendStorage, CpuStorage, CudaStorage, Storage};
use crate::{Error, Result, Shape};

impl Tensor {
    fn check_dim(&self, op: &'static str, dim: usize) -> Result<()> {
        if dim >= self.rank() {
            return Err(Error::DimOutOfRange {
                op,
                dim,
                shape: self.shape().clone(),
            });
        }
        Ok(())
    }

    /// Insert a dim of size 1 at `dim` (shares the buffer).
    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        if dim > self.rank() {
            return Err(Error::DimOutOfRange {
                op: "unsqueeze",
                dim,
                shape: self.shape().clone(),
            });
        }
        let mut d = self.dims().to_vec();
        d.insert(dim, 1);
        self.reshape(d)
    }

    /// Remove a dim of size 1 (shares the buffer).
    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        self.check_dim("squeeze", dim)?;
        if self.dims()[dim] != 1 {
            return Err(Error::invalid(
                "squeeze",
                format!("dim {dim} of {:?} is not 1", self.shape()),
            ));
        }
        let mut d = self.dims().to_vec();
        d.remove(dim);
        self.reshape(d)
    }

    /// Merge dims `from..` into one (shares the buffer).
    pub fn flatten_from(&self, from: usize) -> Result<Tensor> {
        self.check_dim("flatten_from", from)?;
        let mut d = self.dims()[..from].to_vec();
        d.push(self.dims()[from..].iter().product());
        self.reshape(d)
    }

    /// Elements `start..start+len` along `dim` (a copy).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        self.check_dim("narrow", dim)?;
        let (outer, n, inner) = self.shape().split_at_dim(dim)?;
        if start.checked_add(len).is_none_or(|end| end > n) {
            return Err(Error::invalid(
                "narrow",
                format!("{start}+{len} > {n} on dim {dim} of {:?}", self.shape()),
            ));
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        let out = Tensor::uninit(dims, self.dtype(), &self.device())?.with_scale_of(self);
        {
            let src = self.storage()?;
            let mut dst = out.storage_mut()?;
            copy2d(
                &src,
                &mut dst,
                outer,
                len * inner,
                n * inner,
                start * inner,
                len * inner,
                0,
            )?;
        }
        Ok(out)
    }

    /// `n` equal pieces along `dim`.
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        let size = self.dim(dim)?;
        if n == 0 || size % n != 0 {
            return Err(Error::invalid(
                "chunk",
                format!("{size} not divisible into {n} chunks"),
            ));
        }
        (0..n)
            .map(|i| self.narrow(dim, i * size / n, size / n))
            .collect()
    }

    /// Concatenate along `dim`; all parts share dtype, device and the other dims.
    pub fn cat(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
        let first = parts
            .first()
            .ok_or_else(|| Error::invalid("cat", "no tensors"))?;
        first.check_dim("cat", dim)?;
        same_device("cat", parts)?;
        let mut dims = first.dims().to_vec();
        dims[dim] = 0;
        for p in parts {
            let mut pd = p.dims().to_vec();
            if p.dtype() != first.dtype() || p.fp8_scale() != first.fp8_scale() {
                return Err(Error::DTypeMismatch {
                    op: "cat",
                    expected: first.dtype(),
                    got: p.dtype(),
                });
            }
            if pd.len() != dims.len() {
                return Err(Error::ShapeMismatch {
                    op: "cat",
                    lhs: first.shape().clone(),
                    rhs: p.shape().clone(),
                });
            }
            dims[dim] += pd[dim];
            pd[dim] = 0;
            let mut fd = first.dims().to_vec();
            fd[dim] = 0;
            if pd != fd {
                return Err(Error::ShapeMismatch {
                    op: "cat",
                    lhs: first.shape().clone(),
                    rhs: p.shape().clone(),
                });
            }
        }
        let out = Tensor::uninit(dims, first.dtype(), &first.device())?.with_scale_of(first);
        let mut at = 0;
        for p in parts {
            out.slice_set(p, dim, at)?;
            at += p.dims()[dim];
        }
        Ok(out)
    }

    /// Stack equally shaped tensors along a new dim `dim`.
    pub fn stack(parts: &[&Tensor], dim: usize) -> Result<Tensor> {
        let un: Vec<Tensor> = parts
            .iter()
            .map(|t| t.unsqueeze(dim))
            .collect::<Result<_>>()?;
        Tensor::cat(&un.iter().collect::<Vec<_>>(), dim)
    }

    /// Repeat size-1 dims (and prepend missing leading dims) to reach `shape`: an exact copy,
    /// torch's `expand(...).contiguous()`.
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let target = shape.into();
        let err = || Error::BroadcastIncompatible {
            op: "broadcast_as",
            lhs: self.shape().clone(),
            rhs: target.clone(),
        };
        if target.rank() < self.rank() {
            return Err(err());
        }
        let mut dims = vec![1; target.rank() - self.rank()];
        dims.extend_from_slice(self.dims());
        let mut t = self.reshape(dims)?;
        for (d, &n) in target.dims().iter().enumerate() {
            match t.dims()[d] {
                s if s == n => {}
                1 => t = t.index_select(&vec![0; n], d)?,
                _ => return Err(err()),
            }
        }
        Ok(t)
    }

    /// Write `src` into `self[.., start..start+src.dim(dim), ..]` in place (KV-cache writes).
    /// `src` must match `self` on every other dim and in dtype.
    pub fn slice_set(&self, src: &Tensor, dim: usize, start: usize) -> Result<()> {
        self.check_dim("slice_set", dim)?;
        same_device("slice_set", &[self, src])?;
        if self.same_storage(src) {
            return Err(Error::invalid(
                "slice_set",
                "source and destination share a buffer",
            ));
        }
        if src.dtype() != self.dtype() {
            return Err(Error::DTypeMismatch {
                op: "slice_set",
                expected: self.dtype(),
                got: src.dtype(),
            });
        }
        let mut expect = self.dims().to_vec();
        let len = src.dims().get(dim).copied().unwrap_or(0);
        expect[dim] = len;
        if src.dims() != expect.as_slice()
            || start
                .checked_add(len)
                .is_none_or(|end| end > self.dims()[dim])
        {
            return Err(Error::ShapeMismatch {
                op: "slice_set",
                lhs: self.shape().clone(),
                rhs: src.shape().clone(),
            });
        }
        let (outer, n, inner) = self.shape().split_at_dim(dim)?;
        let s = src.storage()?;
        let mut d = self.storage_mut()?;
        copy2d(
            &s,
            &mut d,
            outer,
            len * inner,
            len * inner,
            0,
            n * inner,
            start * inner,
        )
    }

    /// Reorder dims: output dim i is input dim `perm[i]` (a copy).
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank()
            || perm
                .iter()
                .any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::invalid(
                "permute",
                format!("{perm:?} is not a permutation for {:?}", self.shape()),
            ));
        }
        let dims: Vec<usize> = perm.iter().map(|&p| self.dims()[p]).collect();
        let a = self.storage()?;
        let in_dims = self.dims().to_vec();
        Tensor::produce(
            &self.device(),
            dims.into(),
            self.dtype(),
            self.fp8_scale(),
            || Ok(dispatch!(&*a, |x: S| x.permute(&in_dims, perm))),
        )
    }

    /// Swap two dims (a copy).
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        self.check_dim("transpose", d0.max(d1))?;
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(d0, d1);
        self.permute(&perm)
    }

    /// Rows `ids` (host indices) along `dim`.
    pub fn index_select(&self, ids: &[u32], dim: usize) -> Result<Tensor> {
        let (outer, n, inner) = self.shape().split_at_dim(dim)?;
        let mut dims = self.dims().to_vec();
        dims[dim] = ids.len();
        let a = self.storage()?;
        Tensor::produce(
            &self.device(),
            dims.into(),
            self.dtype(),
            self.fp8_scale(),
            || Ok(dispatch!(&*a, |x: S| x.index_select(outer, n, inner, ids))),
        )
    }

    /// Nearest upsampling of the last two dims by integer factors (`[.., H, W]` →
    /// `[.., H·fh, W·fw]`); equals torch `nearest` and `nearest-exact` for integer factors.
    pub fn upsample_nearest2d(&self, fh: usize, fw: usize) -> Result<Tensor> {
        if self.rank() < 2 || fh == 0 || fw == 0 {
            return Err(Error::invalid(
                "upsample_nearest2d",
                format!("{:?} by ({fh}, {fw})", self.shape()),
            ));
        }
        let r = self.rank();
        let (h, w) = (self.dims()[r - 2], self.dims()[r - 1]);
        let outer = self.elem_count() / (h * w).max(1);
        let mut dims = self.dims().to_vec();
        dims[r - 2] *= fh;
        dims[r - 1] *= fw;
        let a = self.storage()?;
        Tensor::produce(
            &self.device(),
            Shape::from(dims),
            self.dtype(),
            self.fp8_scale(),
            || Ok(dispatch!(&*a, |x: S| x.upsample_nearest2d(outer, h, w, fh, fw))),
        )
    }

    fn with_scale_of(mut self, other: &Tensor) -> Tensor {
        self.scale = other.scale;
        self
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn copy2d(
    src: &Storage,
    dst: &mut Storage,
    rows: usize,
    cols: usize,
    src_stride: usize,
    src_offset: usize,
    dst_stride: usize,
    dst_offset: usize,
) -> Result<()> {
    match dst {
        Storage::Cpu(d) => CpuStorage::pick(src)?.copy2d(
            d, rows, cols, src_stride, src_offset, dst_stride, dst_offset,
        ),
        Storage::Cuda(d) => CudaStorage::pick(src)?.copy2d(
            d, rows, cols, src_stride, src_offset, dst_stride, dst_offset,
        ),
    }
}
