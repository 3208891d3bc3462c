//! The VAE's fused norm → SiLU op on the CPU backend against the unfused ops it replaces:
//! `cat(prefix → out, SiLU(channel_rms_norm(x)) → out)` and the f32 tail frames
//! (`cuda_vae.rs` checks the CUDA kernel against this CPU reference).
#![allow(clippy::unwrap_used)]

use runtime::device::UnaryOp;
use runtime::testing::{Rng, assert_close};
use runtime::{DType, Device, Result, Tensor};

#[test]
fn channel_norm_silu_equals_unfused_ops() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = Rng::new(77);
    for (xd, xdt, out, p, tail) in [
        ([1, 6, 4, 3, 5], DType::BF16, DType::BF16, 2, 2),
        ([2, 5, 1, 2, 3], DType::F32, DType::F32, 1, 2),
        ([1, 4, 3, 2, 2], DType::F32, DType::BF16, 0, 0),
    ] {
        let (x, _) = rng.randn(xd.to_vec(), 1.0, xdt, &dev)?;
        let (g, _) = rng.randn(vec![xd[1]], 0.5, DType::F32, &dev)?;
        let pre = if p > 0 {
            Some(
                rng.randn(vec![xd[0], xd[1], p, xd[3], xd[4]], 1.0, DType::F32, &dev)?
                    .0,
            )
        } else {
            None
        };
        let (y, t) = x.channel_norm_silu(&g, pre.as_ref(), tail, out)?;
        let f32s = x
            .channel_rms_norm(&g, None, DType::F32)?
            .unary_to(UnaryOp::Silu, DType::F32)?;
        let normed = f32s.to_dtype(out)?;
        let want = match &pre {
            Some(pc) => Tensor::cat(&[&pc.to_dtype(out)?, &normed], 2)?,
            None => normed,
        };
        assert_eq!(y.dims(), want.dims());
        assert_eq!(y.dtype(), out);
        // Same arithmetic, same rounding: exactly equal.
        assert_close("fused", &y, &want.to_vec_f32()?, 0.0)?;
        match t {
            Some(t) => {
                let k = tail.min(xd[2]);
                let want_t = f32s.narrow(2, xd[2] - k, k)?;
                assert_eq!(t.dims(), want_t.dims());
                assert_eq!(t.dtype(), DType::F32);
                assert_close("tail", &t, &want_t.to_vec_f32()?, 0.0)?;
            }
            None => assert_eq!(tail, 0),
        }
    }
    // A prefix of another shape is refused.
    let (x, _) = rng.randn(vec![1, 4, 2, 3, 3], 1.0, DType::F32, &dev)?;
    let (g, _) = rng.randn(vec![4], 1.0, DType::F32, &dev)?;
    let bad = Tensor::zeros((1, 4, 2, 3, 2), DType::F32, &dev)?;
    assert!(x.channel_norm_silu(&g, Some(&bad), 2, DType::F32).is_err());
    Ok(())
}
