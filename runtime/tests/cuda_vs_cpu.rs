//! CUDA paths the shared op tests do not reach, each checked against the CPU reference
//! backend on the same fresh random inputs (outputs poisoned first): the FlashAttention-
//! style kernel (bf16, head dim 128, query and key counts that are not tile multiples),
//! cuBLASLt's fused bias + GELU epilogue, the f32-accumulator + epilogue-kernel path (SiLU,
//! a bias of another dtype), batched GEMMs with a shared weight, and cuBLASLt's fp8 path
//! (k a multiple of 16). Needs `--features cuda` and a GPU.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use runtime::device::{Epilogue, set_poison_outputs};
use runtime::testing::{Rng, assert_close, tolerance};
use runtime::{DType, Device, Result, Tensor};

const GPU: Device = Device::Cuda(0);

fn both(rng: &mut Rng, shape: &[usize], std: f32, dt: DType) -> Result<(Tensor, Tensor)> {
    let (c, _) = rng.randn(shape.to_vec(), std, dt, &Device::Cpu)?;
    let g = c.to_device(&GPU)?;
    Ok((c, g))
}

#[test]
fn flash_attention_matches_cpu() -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(101);
    for (b, lq, lk, h) in [
        (2, 200, 333, 3),
        (1, 130, 64, 2),
        (1, 1, 1, 1),
        (1, 129, 512, 4),
    ] {
        let (qc, qg) = both(&mut rng, &[b, lq, h, 128], 1.0, DType::BF16)?;
        let (kc, kg) = both(&mut rng, &[b, lk, h, 128], 1.0, DType::BF16)?;
        let (vc, vg) = both(&mut rng, &[b, lk, h, 128], 1.0, DType::BF16)?;
        let scale = 1.0 / 128f32.sqrt();
        let want = qc
            .attention(&kc, &vc, None, scale, DType::BF16)?
            .to_vec_f32()?;
        let got = qg.attention(&kg, &vg, None, scale, DType::BF16)?;
        assert_close(
            &format!("flash attention b {b} lq {lq} lk {lk} h {h}"),
            &got,
            &want,
            tolerance(DType::BF16),
        )?;
    }
    Ok(())
}

#[test]
fn linear_epilogues_match_cpu() -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(102);
    let (m, k, n) = (100, 256, 320);
    let (xc, xg) = both(&mut rng, &[m, k], 1.0, DType::BF16)?;
    let (wc, wg) = both(&mut rng, &[n, k], 0.05, DType::BF16)?;
    for bias_dt in [DType::BF16, DType::F32] {
        let (bc, bg) = both(&mut rng, &[n], 0.5, bias_dt)?;
        for epi in [Epilogue::None, Epilogue::GeluTanh, Epilogue::Silu] {
            for out in [DType::BF16, DType::F32] {
                let want = xc.linear_ex(&wc, Some(&bc), epi, out)?.to_vec_f32()?;
                let got = xg.linear_ex(&wg, Some(&bg), epi, out)?;
                let tol = if out == DType::F32 {
                    1e-4
                } else {
                    tolerance(DType::BF16)
                };
                assert_close(
                    &format!("linear {epi:?} bias {bias_dt:?} -> {out:?}"),
                    &got,
                    &want,
                    tol,
                )?;
            }
        }
    }
    // A batched product with a shared right-hand side ([2, m, k] · [k, n]).
    let (ac, ag) = both(&mut rng, &[2, m, k], 1.0, DType::F32)?;
    let (rc, rg) = both(&mut rng, &[k, n], 0.1, DType::F32)?;
    let want = ac.matmul(&rc)?.to_vec_f32()?;
    assert_close("batched f32 matmul", &ag.matmul(&rg)?, &want, 1e-5)?;
    Ok(())
}

#[test]
fn fp8_gemm_through_cublaslt_matches_cpu() -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(103);
    let (m, k, n) = (64, 128, 96);
    let (xc, xg) = both(&mut rng, &[m, k], 1.0, DType::BF16)?;
    let (wc, wg) = both(&mut rng, &[n, k], 0.05, DType::BF16)?;
    let (bc, bg) = both(&mut rng, &[n], 0.1, DType::BF16)?;
    let want = xc
        .fp8_linear(&wc.quantize_fp8()?, Some(&bc), DType::BF16)?
        .to_vec_f32()?;
    let got = xg.fp8_linear(&wg.quantize_fp8()?, Some(&bg), DType::BF16)?;
    assert_close("fp8 linear", &got, &want, tolerance(DType::BF16))?;
    Ok(())
}

#[test]
fn wide_rows_match_cpu() -> Result<()> {
    // DiT widths: RMSNorm and LayerNorm over 5120, softmax over 15,312 keys.
    set_poison_outputs(true);
    let mut rng = Rng::new(104);
    let (xc, xg) = both(&mut rng, &[7, 5120], 3.0, DType::BF16)?;
    let (wc, wg) = both(&mut rng, &[5120], 1.0, DType::BF16)?;
    let want = xc.rms_norm(Some(&wc), 1e-6)?.to_vec_f32()?;
    assert_close(
        "rms_norm 5120",
        &xg.rms_norm(Some(&wg), 1e-6)?,
        &want,
        tolerance(DType::BF16),
    )?;
    // Against f64 (the f32 CPU reference's own summation error over 15,312 terms is ~1e-5).
    let (_, sg) = both(&mut rng, &[3, 15312], 4.0, DType::F32)?;
    let v = sg.to_vec_f32()?;
    let mut want = Vec::with_capacity(v.len());
    for row in v.chunks(15312) {
        let mx = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
        let z: f64 = row.iter().map(|&x| (x as f64 - mx).exp()).sum();
        want.extend(row.iter().map(|&x| ((x as f64 - mx).exp() / z) as f32));
    }
    assert_close("softmax 15312", &sg.softmax_last()?, &want, 1e-5)?;
    Ok(())
}
