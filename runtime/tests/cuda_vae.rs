//! CUDA paths of the VAE decoder, each checked against the CPU reference backend on the same
//! fresh random inputs (outputs poisoned first): conv3d at the decoder's kinds of shapes in
//! bf16 (cuDNN with the `cudnn` feature: bias fused in the graph, a bias of another dtype
//! added after, no bias; im2col + cuBLASLt otherwise), and the fused channel norm → SiLU with
//! its f32 cache frames. Needs `--features cuda` and a GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use runtime::device::set_poison_outputs;
use runtime::testing::{Rng, assert_close, tolerance};
use runtime::{Conv3dOpts, DType, Device, Result, Tensor};

const GPU: Device = Device::Cuda(0);

fn both(rng: &mut Rng, shape: &[usize], std: f32, dt: DType) -> Result<(Tensor, Tensor)> {
    let (c, _) = rng.randn(shape.to_vec(), std, dt, &Device::Cpu)?;
    let g = c.to_device(&GPU)?;
    Ok((c, g))
}

#[test]
fn vae_conv3d_matches_cpu() -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(501);
    let causal = Conv3dOpts {
        stride: [1; 3],
        pad: [(2, 0), (1, 1), (1, 1)],
    };
    let spatial = Conv3dOpts {
        stride: [1; 3],
        pad: [(0, 0), (1, 1), (1, 1)],
    };
    let none = Conv3dOpts {
        stride: [1; 3],
        pad: [(0, 0); 3],
    };
    // (x dims, c_out, kernel, opts): causal 3×3×3 with and without padding frames (the cached
    // form), per-frame 3×3, the temporal (3,1,1) upsample conv, 1×1×1, the strided
    // downsamples, and a batch of 2.
    let cases: &[([usize; 5], usize, [usize; 3], Conv3dOpts)] = &[
        ([1, 16, 3, 12, 20], 24, [3, 3, 3], causal),
        ([1, 24, 6, 10, 14], 24, [3, 3, 3], spatial),
        ([1, 32, 4, 12, 8], 16, [1, 3, 3], spatial),
        ([1, 16, 3, 6, 10], 32, [3, 1, 1], none),
        ([1, 24, 2, 8, 10], 40, [1, 1, 1], none),
        (
            [1, 8, 5, 6, 6],
            8,
            [3, 1, 1],
            Conv3dOpts {
                stride: [2, 1, 1],
                pad: [(0, 0); 3],
            },
        ),
        (
            [1, 8, 2, 9, 12],
            8,
            [1, 3, 3],
            Conv3dOpts {
                stride: [1, 2, 2],
                pad: [(0, 0), (0, 1), (0, 1)],
            },
        ),
        ([2, 8, 3, 7, 9], 3, [3, 3, 3], causal),
    ];
    for &(xd, co, k, o) in cases {
        let (xc, xg) = both(&mut rng, &xd, 1.0, DType::BF16)?;
        let fan = (xd[1] * k.iter().product::<usize>()) as f32;
        let (wc, wg) = both(
            &mut rng,
            &[co, xd[1], k[0], k[1], k[2]],
            fan.powf(-0.5),
            DType::BF16,
        )?;
        for bias_dt in [Some(DType::BF16), Some(DType::F32), None] {
            let b = bias_dt
                .map(|dt| both(&mut rng, &[co], 0.5, dt))
                .transpose()?;
            let want = xc
                .conv3d(&wc, b.as_ref().map(|b| &b.0), o, DType::BF16)?
                .to_vec_f32()?;
            let got = xg.conv3d(&wg, b.as_ref().map(|b| &b.1), o, DType::BF16)?;
            assert_close(
                &format!("conv3d x {xd:?} k {k:?} -> {co} {o:?} bias {bias_dt:?}"),
                &got,
                &want,
                tolerance(DType::BF16),
            )?;
        }
    }
    Ok(())
}

#[test]
fn channel_norm_silu_matches_cpu() -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(502);
    // (x dims, x dtype, out dtype, prefix frames (f32), tail frames)
    let cases: &[([usize; 5], DType, DType, usize, usize)] = &[
        ([1, 24, 4, 10, 14], DType::BF16, DType::BF16, 2, 2),
        ([1, 24, 1, 10, 14], DType::BF16, DType::BF16, 1, 2),
        ([1, 24, 1, 10, 14], DType::BF16, DType::BF16, 0, 2),
        ([2, 16, 3, 5, 7], DType::F32, DType::F32, 2, 2),
        ([1, 96, 2, 4, 33], DType::F32, DType::BF16, 0, 0),
    ];
    for &(xd, xdt, out, p, tail) in cases {
        let (xc, xg) = both(&mut rng, &xd, 1.0, xdt)?;
        let (gc, gg) = both(&mut rng, &[xd[1]], 0.5, DType::F32)?;
        let pre = (p > 0)
            .then(|| both(&mut rng, &[xd[0], xd[1], p, xd[3], xd[4]], 1.0, DType::F32))
            .transpose()?;
        let (want, want_tail) = xc.channel_norm_silu(&gc, pre.as_ref().map(|x| &x.0), tail, out)?;
        let (got, got_tail) = xg.channel_norm_silu(&gg, pre.as_ref().map(|x| &x.1), tail, out)?;
        // The unfused ops give the same values: cat(prefix rounded, f32 norm → f32 SiLU →
        // one rounding).
        let normed = xc
            .channel_rms_norm(&gc, None, DType::F32)?
            .unary_to(runtime::device::UnaryOp::Silu, out)?;
        let unfused = match &pre {
            Some((pc, _)) => Tensor::cat(&[&pc.to_dtype(out)?, &normed], 2)?,
            None => normed,
        };
        let tol = if out == DType::F32 {
            1e-5
        } else {
            tolerance(out)
        };
        assert_close(
            "fused vs unfused (cpu)",
            &want,
            &unfused.to_vec_f32()?,
            1e-6,
        )?;
        assert_close(
            &format!("channel_norm_silu {xd:?} {xdt:?} -> {out:?} prefix {p}"),
            &got,
            &want.to_vec_f32()?,
            tol,
        )?;
        match (want_tail, got_tail) {
            (Some(w), Some(g)) => {
                assert_eq!(g.dims(), w.dims());
                assert_eq!(g.dtype(), DType::F32);
                assert_close("tail frames", &g, &w.to_vec_f32()?, 1e-5)?;
            }
            (None, None) => assert_eq!(tail, 0),
            _ => panic!("tail present on one backend only"),
        }
    }
    Ok(())
}
