//! The Wan VAE's fused norm → SiLU (model-spec §1.5): one pass that also hands back the f32
//! causal-cache frames of the convolution it feeds.

use super::ops::{expect_shape, not_fp8, same_device};
use super::{ReadAll, Shape, Tensor, track};
use crate::device::{BackendStorage, Storage};
use crate::{DType, Error, Result};

impl Tensor {
    /// x `[N, C, T, ...]`: `SiLU(channel_rms_norm(x, gamma))` computed in f32 and rounded
    /// once to `out` (what the reference's f32 norm + SiLU followed by a conv's cast gives),
    /// plus, with `tail > 0`, the last `min(tail, T)` frames of the f32 value as an f32
    /// `[N, C, min(tail, T), ...]` tensor (the frames the reference caches). `gamma`: `[C]`.
    pub fn channel_norm_silu(
        &self,
        gamma: &Tensor,
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
        same_device("channel_norm_silu", &[self, gamma])?;
        not_fp8("channel_norm_silu", &[self, gamma])?;
        expect_shape("channel_norm_silu", gamma, &Shape::from(c))?;
        let k = tail.min(t);
        let g = ReadAll::new(&[Some(self), Some(gamma)])?;
        let dev = self.device();
        let out_alloc = track(&dev, out, n * c * t * s)?;
        let tail_alloc = (k > 0)
            .then(|| track(&dev, DType::F32, n * c * k * s))
            .transpose()?;
        fn run<S: BackendStorage>(
            x: &S,
            gamma: &S,
            dims: (usize, usize, usize, usize, usize),
            out: DType,
        ) -> Result<(S, Option<S>)> {
            let (n, c, t, s, k) = dims;
            x.channel_norm_silu(gamma, n, c, t, s, k, out)
        }
        let dims = (n, c, t, s, k);
        let (y, cache) = match (g.get(0)?, g.get(1)?) {
            (Storage::Cpu(x), Storage::Cpu(w)) => {
                let (y, c) = run(x, w, dims, out)?;
                (Storage::Cpu(y), c.map(Storage::Cpu))
            }
            (Storage::Cuda(x), Storage::Cuda(w)) => {
                let (y, c) = run(x, w, dims, out)?;
                (Storage::Cuda(y), c.map(Storage::Cuda))
            }
            _ => {
                return Err(Error::invalid(
                    "channel_norm_silu",
                    "x and gamma on different backends",
                ));
            }
        };
        let y = Tensor::wrap(y, self.shape().clone(), out_alloc, 1.0);
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
