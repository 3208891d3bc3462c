//! The fused DiT-block ops against the unfused op chains they replace, on fresh seeded
//! random inputs: the CPU reference must equal the chain exactly (same arithmetic, same
//! rounding points); other devices are held to the output dtype's tolerance (their f32 sums
//! run in another order). Outputs are NaN-poisoned first, so unwritten elements fail.

#![allow(clippy::unwrap_used, clippy::too_many_arguments)]

use runtime::device::{BinaryOp, set_poison_outputs};
use runtime::testing::{Rng, assert_close, tolerance};
use runtime::{DType, Device, ResNormMod, Result, Tensor, test_device};

fn tol(dev: &Device, out: DType) -> f32 {
    if dev.is_cpu() { 0.0 } else { tolerance(out) }
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

/// x `[g, l, cols]` bf16, tables `[g, 1, cols]` f32: the three chains of a Wan block.
fn res_norm_case(dev: &Device, g: usize, l: usize, cols: usize, seed: u64) -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(seed);
    let act = DType::BF16;
    let (x, _) = rng.randn((g, l, cols), 1.5, act, dev)?;
    let (y, _) = rng.randn((g, l, cols), 0.7, act, dev)?;
    let (gate, _) = rng.randn((g, 1, cols), 0.5, DType::F32, dev)?;
    let (sc, _) = rng.randn((g, 1, cols), 0.3, DType::F32, dev)?;
    let (sh, _) = rng.randn((g, 1, cols), 0.3, DType::F32, dev)?;
    let (w, _) = rng.randn(cols, 1.0, act, dev)?;
    let (b, _) = rng.randn(cols, 0.2, act, dev)?;
    let (x32, _) = rng.randn((g, l, cols), 2.0, DType::F32, dev)?;
    let eps = 1e-6;
    let c = |t: &Tensor| cpu(t);

    // norm1 + modulate (§3.3.1 step 2): bf16 LN output, then x·(1+scale)+shift in f32.
    let want = c(&x)
        .layer_norm(None, None, eps, act)?
        .modulate(&c(&sc), &c(&sh), act)?;
    let o = ResNormMod {
        add: None,
        gate: None,
        keep_residual: None,
        ln_in: act,
        weight: None,
        bias: None,
        eps,
        norm: act,
        modulate: Some((&sc, &sh)),
        out: act,
    };
    let (r, got) = x.res_norm_mod(&o)?;
    assert!(r.is_none());
    assert_close("norm1+modulate", &got, &want.to_vec_f32()?, tol(dev, act))?;

    // step 4 + 5: x1 = x + y·gate (f32), u = norm3(bf16(x1)) with affine.
    let x1 = c(&x).gated_residual(&c(&y), &c(&gate), DType::F32)?;
    let want_u = x1
        .to_dtype(act)?
        .layer_norm(Some(&c(&w)), Some(&c(&b)), eps, act)?;
    let o = ResNormMod {
        add: Some(&y),
        gate: Some(&gate),
        keep_residual: Some(DType::F32),
        ln_in: act,
        weight: Some(&w),
        bias: Some(&b),
        eps,
        norm: act,
        modulate: None,
        out: act,
    };
    let (r, got) = x.res_norm_mod(&o)?;
    assert_close(
        "gated residual",
        &r.unwrap(),
        &x1.to_vec_f32()?,
        tol(dev, DType::F32),
    )?;
    assert_close("norm3", &got, &want_u.to_vec_f32()?, tol(dev, act))?;

    // step 5 end + 6: x2 = x1 + o (f32), LN in f32, modulate, bf16.
    let x2 = c(&x32).binary_to(&c(&y), BinaryOp::Add, DType::F32)?;
    let want_b = x2
        .layer_norm(None, None, eps, DType::F32)?
        .modulate(&c(&sc), &c(&sh), act)?;
    let o = ResNormMod {
        add: Some(&y),
        gate: None,
        keep_residual: Some(DType::F32),
        ln_in: DType::F32,
        weight: None,
        bias: None,
        eps,
        norm: DType::F32,
        modulate: Some((&sc, &sh)),
        out: act,
    };
    let (r, got) = x32.res_norm_mod(&o)?;
    assert_close(
        "add residual",
        &r.unwrap(),
        &x2.to_vec_f32()?,
        tol(dev, DType::F32),
    )?;
    assert_close("norm2+modulate", &got, &want_b.to_vec_f32()?, tol(dev, act))?;
    set_poison_outputs(false);
    Ok(())
}

fn res_norm_mod(dev: &Device) -> Result<()> {
    // Odd widths, one group, the DiT width, and a row too wide for the shared-memory cache.
    res_norm_case(dev, 3, 5, 77, 1)?;
    res_norm_case(dev, 1, 4, 1000, 2)?;
    res_norm_case(dev, 3, 2, 5120, 3)?;
    res_norm_case(dev, 2, 1, 13_000, 4)
}
test_device!(res_norm_mod, res_norm_mod_cpu, res_norm_mod_cuda);

fn rms_rope_case(dev: &Device, l: usize, h: usize, d: usize, act: DType, seed: u64) -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(seed);
    let (x, _) = rng.randn((1, l, h * d), 1.3, act, dev)?;
    let (w, _) = rng.randn(h * d, 1.0, act, dev)?;
    let ang = rng.uniform_vec(l * d / 2, -6.0, 6.0);
    let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
    let cos = Tensor::from_vec(cos, (l, d / 2), dev)?;
    let sin = Tensor::from_vec(sin, (l, d / 2), dev)?;
    let want = cpu(&x)
        .rms_norm(Some(&cpu(&w)), 1e-6)?
        .reshape((1, l, h, d))?
        .rope_interleaved(&cpu(&cos), &cpu(&sin), act)?;
    let got = x.rms_norm_rope(&w, 1e-6, &cos, &sin, h, act)?;
    assert_eq!(got.dims(), x.dims());
    assert_close("rms_norm_rope", &got, &want.to_vec_f32()?, tol(dev, act))?;
    set_poison_outputs(false);
    Ok(())
}

fn rms_norm_rope(dev: &Device) -> Result<()> {
    rms_rope_case(dev, 7, 4, 16, DType::BF16, 5)?;
    rms_rope_case(dev, 5, 3, 10, DType::F32, 6)?;
    rms_rope_case(dev, 3, 40, 128, DType::BF16, 7)?;
    // Wider than the register cache of the CUDA kernel.
    rms_rope_case(dev, 2, 64, 128, DType::BF16, 8)
}
test_device!(rms_norm_rope, rms_norm_rope_cpu, rms_norm_rope_cuda);

fn prefix_attention_and_row_copy(dev: &Device) -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(9);
    let (h, d, lq, lmax, lk) = (3, 16, 5, 21, 13);
    let act = DType::BF16;
    let (q, _) = rng.randn((1, lq, h, d), 1.0, act, dev)?;
    let (kbuf, _) = rng.randn((lmax, h, d), 1.0, act, dev)?;
    // Buffers of different lengths: only the prefix matters.
    let (vbuf, _) = rng.randn((lmax + 4, h, d), 1.0, act, dev)?;
    // The rows past lk are garbage to the op: it must not read them.
    let k = cpu(&kbuf).narrow(0, 0, lk)?.unsqueeze(0)?;
    let v = cpu(&vbuf).narrow(0, 0, lk)?.unsqueeze(0)?;
    let want = cpu(&q).attention(&k, &v, None, 1.0 / (d as f32).sqrt(), act)?;
    let got = q.attention_prefix(&kbuf, &vbuf, lk)?;
    let t = if dev.is_cpu() { 0.0 } else { tolerance(act) };
    assert_close("attention_prefix", &got, &want.to_vec_f32()?, t)?;
    assert!(q.attention_prefix(&kbuf, &vbuf, lmax + 1).is_err());

    // copy_rows_from: rows [4, 9) of src into rows [2, 7) of dst, the rest untouched.
    let (src, sv) = rng.randn((11, h, d), 1.0, act, dev)?;
    let (dst, dv) = rng.randn((8, h, d), 1.0, act, dev)?;
    dst.copy_rows_from(2, &src, 4, 5)?;
    let row = h * d;
    let mut want = dv.clone();
    want[2 * row..7 * row].copy_from_slice(&sv[4 * row..9 * row]);
    assert_eq!(dst.to_vec_f32()?, want);
    assert!(dst.copy_rows_from(5, &src, 0, 4).is_err());
    assert!(dst.copy_rows_from(0, &src, 9, 3).is_err());
    set_poison_outputs(false);
    Ok(())
}
test_device!(
    prefix_attention_and_row_copy,
    prefix_attention_and_row_copy_cpu,
    prefix_attention_and_row_copy_cuda
);

/// Row layouts of binary / ternary ops (the CUDA backend's vectorised row path): full
/// `[g, l, n]` operands and per-group `[g, 1, n]` ones, mixed dtypes, against the CPU.
fn row_layout_elementwise(dev: &Device) -> Result<()> {
    set_poison_outputs(true);
    let mut rng = Rng::new(10);
    for (g, l, n) in [(3, 5, 8), (1, 7, 64), (2, 3, 6)] {
        let (x, _) = rng.randn((g, l, n), 1.0, DType::BF16, dev)?;
        let (x32, _) = rng.randn((g, l, n), 1.0, DType::F32, dev)?;
        let (y, _) = rng.randn((g, l, n), 1.0, DType::BF16, dev)?;
        let (gate, _) = rng.randn((g, 1, n), 1.0, DType::F32, dev)?;
        let (sh, _) = rng.randn((g, 1, n), 1.0, DType::BF16, dev)?;
        let c = |t: &Tensor| cpu(t);
        let cases: Vec<(&str, Tensor, Tensor)> = vec![
            (
                "gated bf16->f32",
                x.gated_residual(&y, &gate, DType::F32)?,
                c(&x).gated_residual(&c(&y), &c(&gate), DType::F32)?,
            ),
            (
                "gated f32->bf16",
                x32.gated_residual(&y, &gate, DType::BF16)?,
                c(&x32).gated_residual(&c(&y), &c(&gate), DType::BF16)?,
            ),
            (
                "modulate",
                x.modulate(&gate, &sh, DType::BF16)?,
                c(&x).modulate(&c(&gate), &c(&sh), DType::BF16)?,
            ),
            (
                "add f32+bf16",
                x32.binary_to(&y, BinaryOp::Add, DType::F32)?,
                c(&x32).binary_to(&c(&y), BinaryOp::Add, DType::F32)?,
            ),
            ("mul group", x.mul(&sh)?, c(&x).mul(&c(&sh))?),
            ("add group", x.add(&sh)?, c(&x).add(&c(&sh))?),
        ];
        for (what, got, want) in cases {
            // Same f32 arithmetic with the same rounding on every device: exact.
            assert_close(what, &got, &want.to_vec_f32()?, 0.0)?;
        }
    }
    set_poison_outputs(false);
    Ok(())
}
test_device!(
    row_layout_elementwise,
    row_layout_elementwise_cpu,
    row_layout_elementwise_cuda
);
