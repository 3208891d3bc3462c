//! Shapes: the dims of a contiguous row-major tensor.

use crate::{Error, Result};

/// The dims of a tensor, outermost first. Every tensor is contiguous and row-major.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Shape {
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }
    /// Size of dim `d`, or [`Error::DimOutOfRange`].
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.0.get(d).copied().ok_or_else(|| Error::DimOutOfRange {
            op: "dim",
            dim: d,
            shape: self.clone(),
        })
    }
    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.0[i + 1];
        }
        s
    }
    /// `(outer, dim, inner)` element counts around dim `d`.
    pub fn split_at_dim(&self, d: usize) -> Result<(usize, usize, usize)> {
        let n = self.dim(d)?;
        Ok((
            self.0[..d].iter().product(),
            n,
            self.0[d + 1..].iter().product(),
        ))
    }
    /// `(rows, cols)` with `cols` the last dim (1 for a scalar).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.0.last().copied().unwrap_or(1);
        (self.elem_count() / cols.max(1), cols)
    }
    fn expect_rank(&self, n: usize, op: &'static str) -> Result<()> {
        if self.0.len() == n {
            Ok(())
        } else {
            Err(Error::UnexpectedRank {
                op,
                expected: n,
                got: self.clone(),
            })
        }
    }
    pub fn dims1(&self) -> Result<usize> {
        self.expect_rank(1, "dims1")?;
        Ok(self.0[0])
    }
    pub fn dims2(&self) -> Result<(usize, usize)> {
        self.expect_rank(2, "dims2")?;
        Ok((self.0[0], self.0[1]))
    }
    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        self.expect_rank(3, "dims3")?;
        Ok((self.0[0], self.0[1], self.0[2]))
    }
    pub fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        self.expect_rank(4, "dims4")?;
        Ok((self.0[0], self.0[1], self.0[2], self.0[3]))
    }
    pub fn dims5(&self) -> Result<(usize, usize, usize, usize, usize)> {
        self.expect_rank(5, "dims5")?;
        Ok((self.0[0], self.0[1], self.0[2], self.0[3], self.0[4]))
    }

    /// Numpy-style broadcast of two shapes (aligned at the last dim).
    pub fn broadcast_with(&self, rhs: &Shape, op: &'static str) -> Result<Shape> {
        let n = self.rank().max(rhs.rank());
        let mut out = vec![0; n];
        for (i, o) in out.iter_mut().enumerate() {
            let a = dim_from_end(self, n - 1 - i);
            let b = dim_from_end(rhs, n - 1 - i);
            *o = match (a, b) {
                (a, b) if a == b => a,
                (1, b) => b,
                (a, 1) => a,
                _ => {
                    return Err(Error::BroadcastIncompatible {
                        op,
                        lhs: self.clone(),
                        rhs: rhs.clone(),
                    });
                }
            };
        }
        Ok(Shape(out))
    }

    /// Strides (in elements) that read `self` as if it had shape `out` (0 on broadcast dims).
    pub fn broadcast_strides(&self, out: &Shape) -> Vec<usize> {
        let own = self.strides();
        let n = out.rank();
        let off = n - self.rank();
        (0..n)
            .map(|i| {
                if i < off || self.0[i - off] == 1 {
                    0
                } else {
                    own[i - off]
                }
            })
            .collect()
    }
}

fn dim_from_end(s: &Shape, k: usize) -> usize {
    if k < s.rank() {
        s.0[s.rank() - 1 - k]
    } else {
        1
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}
impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape(vec![d])
    }
}
macro_rules! tuple_shape {
    ($($n:ident),+) => {
        impl From<($(tuple_shape!(@u $n),)+)> for Shape {
            #[allow(non_snake_case)]
            fn from(($($n,)+): ($(tuple_shape!(@u $n),)+)) -> Self {
                Shape(vec![$($n),+])
            }
        }
    };
    (@u $n:ident) => { usize };
}
tuple_shape!(A);
tuple_shape!(A, B);
tuple_shape!(A, B, C);
tuple_shape!(A, B, C, D);
tuple_shape!(A, B, C, D, E);
tuple_shape!(A, B, C, D, E, F);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_rules() {
        let a = Shape::from((2, 1, 4));
        let b = Shape::from((3, 1));
        let o = a.broadcast_with(&b, "t").unwrap();
        assert_eq!(o.dims(), &[2, 3, 4]);
        assert_eq!(a.broadcast_strides(&o), vec![4, 0, 1]);
        assert_eq!(b.broadcast_strides(&o), vec![0, 1, 0]);
        assert!(
            Shape::from((2, 3))
                .broadcast_with(&(4,).into(), "t")
                .is_err()
        );
    }
}
