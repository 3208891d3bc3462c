//! The Wan VAE's fused norm → SiLU (model-spec §1.5): one pass that also hands back the f32
//! causal-cache frames of the convolution it feeds.

use super::ops::{expect_shape, not_fp8, same_device};
use super::{ReadAll, Shape, Tensor, track};
use crate::device::{BackendStorage, Storage};
use crate::{DType, Error, Result};

impl Tensor {
    /// x `[N, C, T, ...]`: `SiLU(channel_rms_norm(x, gamma))` computed in f32 and rounded
    /// once to `out` (what the reference's f32 norm + SiLU followed by a conv's cast gives),
    /// placed after the frames of `prefix` `[N, C, P, ...]` (rounded to `out`; a conv's
    /// cached frames, so that the conv input needs no concatenation): `[N, C, P + T, ...]`.
    /// With `tail > 0` also the last `min(tail, T)` frames of the f32 norm → SiLU value as an
    /// f32 `[N, C, min(tail, T), ...]` tensor (the frames the reference caches). `gamma`: `[C]`.
    pub fn channel_norm_silu(
        &self,
        gamma: &Tensor,
        prefix: Option<&Tensor>,
        tail: usize,
        out: DType,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if self.rank() < 3 {
            return Err(Error::UnexpectedRank {
                op: "channel_norm_silu",
                expected: 3,
                got: self.shape().clone(),
            });
        }
        let d = self.dims();
        let (n, c, t) = (d[0], d[1], d[2]);
        let s: usize = d[3..].iter().product();
        let mut all = vec![self, gamma];
        all.extend(prefix);
        same_device("channel_norm_silu", &all)?;
        not_fp8("channel_norm_silu", &all)?;
        expect_shape("channel_norm_silu", gamma, &Shape::from(c))?;
        let p = match prefix {
            Some(pre) => {
                let pd = pre.dims();
                if pd.len() != d.len() || pd[0] != n || pd[1] != c || pd[3..] != d[3..] {
                    return Err(Error::ShapeMismatch {
                        op: "channel_norm_silu",
                        lhs: self.shape().clone(),
                        rhs: pre.shape().clone(),
                    });
                }
                pd[2]
            }
            None => 0,
        };
        let k = tail.min(t);
        let g = ReadAll::new(&[Some(self), Some(gamma), prefix])?;
        let dev = self.device();
        let out_alloc = track(&dev, out, n * c * (p + t) * s)?;
        let tail_alloc = (k > 0)
            .then(|| track(&dev, DType::F32, n * c * k * s))
            .transpose()?;
        #[allow(clippy::type_complexity)]
        fn run<S: BackendStorage>(
            x: &S,
            gamma: &S,
            prefix: Option<(&S, usize)>,
            dims: (usize, usize, usize, usize, usize),
            out: DType,
        ) -> Result<(S, Option<S>)> {
            let (n, c, t, s, k) = dims;
            x.channel_norm_silu(gamma, prefix, n, c, t, s, k, out)
        }
        let dims = (n, c, t, s, k);
        let (y, cache) = match (g.get(0)?, g.get(1)?, g.opt(2)?) {
            (Storage::Cpu(x), Storage::Cpu(w), pre) => {
                let pre = match pre {
                    Some(Storage::Cpu(v)) => Some((v, p)),
                    None => None,
                    Some(_) => return Err(mixed()),
                };
                let (y, c) = run(x, w, pre, dims, out)?;
                (Storage::Cpu(y), c.map(Storage::Cpu))
            }
            (Storage::Cuda(x), Storage::Cuda(w), pre) => {
                let pre = match pre {
                    Some(Storage::Cuda(v)) => Some((v, p)),
                    None => None,
                    Some(_) => return Err(mixed()),
                };
                let (y, c) = run(x, w, pre, dims, out)?;
                (Storage::Cuda(y), c.map(Storage::Cuda))
            }
            _ => return Err(mixed()),
        };
        let mut ydims = d.to_vec();
        ydims[2] = p + t;
        let y = Tensor::wrap(y, Shape::from(ydims), out_alloc, 1.0);
        let cache = match (cache, tail_alloc) {
            (Some(st), Some(a)) => {
                let mut dims = d.to_vec();
                dims[2] = k;
                Some(Tensor::wrap(st, Shape::from(dims), a, 1.0))
            }
            _ => None,
        };
        Ok((y, cache))
    }
}

fn mixed() -> Error {
    Error::invalid("channel_norm_silu", "operands on different backends")
}
