//! Elementwise, cast, reduction, norm, RoPE and layout ops, each checked against an
//! independent naive formula on fresh seeded random inputs, on every device.
//! GEMM, convolution and attention live in `ops_linalg.rs`, layout ops in `ops_layout.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::type_complexity,
    clippy::too_many_arguments
)]

use half::{bf16, f16};
use runtime::device::{ReduceOp, set_poison_outputs};
use runtime::testing::{Rng, assert_close, tolerance};
use runtime::{DType, Device, F8E4M3, Result, Tensor, test_device};

/// `cpu_tol` on the CPU reference (whose rounding the naive formula mirrors exactly); on
/// other devices at least the dtype tolerance, since fused multiply-adds may move a value
/// across a rounding boundary.
fn dev_tol(dev: &Device, out: DType, cpu_tol: f32) -> f32 {
    if dev.is_cpu() {
        cpu_tol
    } else {
        cpu_tol.max(tolerance(out))
    }
}

fn setup(seed: u64) -> Rng {
    set_poison_outputs(true);
    Rng::new(seed)
}

/// Index into a row-major tensor of `dims` with broadcasting of a smaller operand `odims`.
fn bcast_index(i: usize, dims: &[usize], odims: &[usize]) -> usize {
    let off = dims.len() - odims.len();
    let (mut rem, mut idx, mut stride) = (i, 0, 1);
    for d in (0..dims.len()).rev() {
        let c = rem % dims[d];
        rem /= dims[d];
        if d >= off {
            let od = odims[d - off];
            if od != 1 {
                idx += c * stride;
            }
            stride *= od;
        }
    }
    idx
}

fn casts(dev: &Device) -> Result<()> {
    let mut rng = setup(1);
    let v: Vec<f32> = rng.normal_vec(1000, 40.0);
    let x = Tensor::from_f32(&v, (10, 100), DType::F32, dev)?;
    let b = x.to_dtype(DType::BF16)?.to_vec::<bf16>()?;
    let h = x.to_dtype(DType::F16)?.to_vec::<f16>()?;
    let f8 = x.to_dtype(DType::F8E4M3)?.to_vec::<F8E4M3>()?;
    for i in 0..v.len() {
        assert_eq!(b[i], bf16::from_f32(v[i]), "bf16 at {i}");
        assert_eq!(h[i], f16::from_f32(v[i]), "f16 at {i}");
        assert_eq!(f8[i], F8E4M3::from_f32(v[i]), "f8 at {i}");
        assert!(f8[i].to_f32().abs() <= 448.0);
    }
    // bf16 -> f16 goes through f32 exactly: compare with the host double conversion.
    let bh = x
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F16)?
        .to_vec::<f16>()?;
    for i in 0..v.len() {
        assert_eq!(bh[i], f16::from_f32(b[i].to_f32()));
    }
    // fp8 -> f32 applies the dequantisation scale.
    let q = x.to_dtype(DType::F8E4M3)?.with_fp8_scale(0.25)?;
    let back = q.to_dtype(DType::F32)?.to_vec::<f32>()?;
    for i in 0..v.len() {
        assert_eq!(back[i], f8[i].to_f32() * 0.25);
    }
    Ok(())
}
test_device!(casts, casts_cpu, casts_cuda);

fn quantize_fp8(dev: &Device) -> Result<()> {
    let mut rng = setup(2);
    for (std, n) in [(3.0f32, 777usize), (0.01, 500)] {
        let (x, v) = rng.randn((n,), std, DType::BF16, dev)?;
        let q = x.quantize_fp8()?;
        let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
        let s = (448.0 / amax.max(1e-12)).min(448.0);
        assert_eq!(q.dtype(), DType::F8E4M3);
        assert_eq!(q.fp8_scale(), 1.0 / s);
        let stored = q.to_vec::<F8E4M3>()?;
        for i in 0..n {
            assert_eq!(stored[i], F8E4M3::from_f32(v[i] * s), "at {i}");
        }
        let deq: Vec<f32> = stored.iter().map(|e| e.to_f32() / s).collect();
        assert_close("fp8 dequant", &q, &deq, 1e-6)?;
        assert_close("fp8 vs input", &q, &v, tolerance(DType::F8E4M3))?;
    }
    Ok(())
}
test_device!(quantize_fp8, quantize_fp8_cpu, quantize_fp8_cuda);

fn binary_broadcast(dev: &Device) -> Result<()> {
    let mut rng = setup(3);
    let (ad, bd) = ([2usize, 3, 5, 9], [3usize, 1, 9]);
    for (da, db) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
    ] {
        let (a, av) = rng.randn(ad, 1.0, da, dev)?;
        // Divisors kept away from zero.
        let bv: Vec<f32> = rng
            .normal_vec(27, 1.0)
            .iter()
            .map(|x| db.round_f32(x.signum() * (x.abs() + 0.5)))
            .collect();
        let b = Tensor::from_f32(&bv, bd, db, dev)?;
        let out_dt = da.promote(db);
        let n: usize = ad.iter().product();
        type F = fn(f32, f32) -> f32;
        let cases: [(&str, F, fn(&Tensor, &Tensor) -> Result<Tensor>); 6] = [
            ("add", |x, y| x + y, |a, b| a.add(b)),
            ("sub", |x, y| x - y, |a, b| a.sub(b)),
            ("mul", |x, y| x * y, |a, b| a.mul(b)),
            ("div", |x, y| x / y, |a, b| a.div(b)),
            ("maximum", f32::max, |a, b| a.maximum(b)),
            ("minimum", f32::min, |a, b| a.minimum(b)),
        ];
        for (name, f, op) in cases {
            let out = op(&a, &b)?;
            assert_eq!(out.dims(), &ad);
            assert_eq!(out.dtype(), out_dt);
            let want: Vec<f32> = (0..n)
                .map(|i| out_dt.round_f32(f(av[i], bv[bcast_index(i, &ad, &bd)])))
                .collect();
            assert_close(name, &out, &want, dev_tol(dev, out_dt, 1e-6))?;
        }
    }
    Ok(())
}
test_device!(
    binary_broadcast,
    binary_broadcast_cpu,
    binary_broadcast_cuda
);

fn naive_gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// erf by Simpson's rule on 2/√π·e^(−t²) (independent of the backend's series).
fn erf_simpson(x: f64) -> f64 {
    let n = 2000;
    let h = x / n as f64;
    let f = |t: f64| (-t * t).exp();
    let mut s = f(0.0) + f(x);
    for i in 1..n {
        s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0 * std::f64::consts::FRAC_2_SQRT_PI
}

fn unary(dev: &Device) -> Result<()> {
    let mut rng = setup(4);
    for dt in [DType::F32, DType::BF16] {
        let (x, v) = rng.randn((7, 33), 2.0, dt, dev)?;
        let tol = if dt == DType::F32 {
            1e-5
        } else {
            tolerance(dt)
        };
        let check = |name: &str, t: Tensor, f: &dyn Fn(f64) -> f64| -> Result<()> {
            assert_eq!(t.dtype(), dt);
            let want: Vec<f32> = v.iter().map(|&a| f(a as f64) as f32).collect();
            assert_close(name, &t, &want, tol).map(|_| ())
        };
        check("gelu_tanh", x.gelu_tanh()?, &naive_gelu_tanh)?;
        check("silu", x.silu()?, &|a| a / (1.0 + (-a).exp()))?;
        check("gelu", x.gelu()?, &|a| {
            0.5 * a * (1.0 + erf_simpson(a / std::f64::consts::SQRT_2))
        })?;
        check("clamp", x.clamp(-1.0, 0.5)?, &|a| a.clamp(-1.0, 0.5))?;
        check("exp", x.exp()?, &f64::exp)?;
        check("neg", x.neg()?, &|a| -a)?;
        check("abs", x.abs()?, &f64::abs)?;
        check("sqr", x.sqr()?, &|a| a * a)?;
        check("sqrt", x.abs()?.sqrt()?, &|a| {
            dt.round_f32(a.abs() as f32).sqrt() as f64
        })?;
        check("tanh", x.tanh()?, &f64::tanh)?;
        check("affine", x.affine(0.5, -1.25)?, &|a| a * 0.5 - 1.25)?;
    }
    Ok(())
}
test_device!(unary, unary_cpu, unary_cuda);

fn modulate_and_gate(dev: &Device) -> Result<()> {
    let mut rng = setup(5);
    // x [1, F, S, C] bf16, per-frame f32 vectors [1, F, 1, C] (model-spec §3.3.1 steps 2, 4).
    let (f, s, c) = (3, 10, 24);
    let (x, xv) = rng.randn((1, f, s, c), 1.0, DType::BF16, dev)?;
    let (sc, scv) = rng.randn((1, f, 1, c), 0.3, DType::F32, dev)?;
    let (sh, shv) = rng.randn((1, f, 1, c), 0.3, DType::F32, dev)?;
    let idx = |i: usize| (i / (s * c)) * c + i % c;
    for out in [DType::F32, DType::BF16] {
        let m = x.modulate(&sc, &sh, out)?;
        let want: Vec<f32> = (0..xv.len())
            .map(|i| out.round_f32(xv[i] * (1.0 + scv[idx(i)]) + shv[idx(i)]))
            .collect();
        assert_close("modulate", &m, &want, dev_tol(dev, out, 0.0))?;
        let g = x.gated_residual(&x, &sc, out)?;
        let want: Vec<f32> = (0..xv.len())
            .map(|i| out.round_f32(xv[i] + xv[i] * scv[idx(i)]))
            .collect();
        assert_close("gated_residual", &g, &want, dev_tol(dev, out, 0.0))?;
    }
    Ok(())
}
test_device!(
    modulate_and_gate,
    modulate_and_gate_cpu,
    modulate_and_gate_cuda
);

fn reductions_and_softmax(dev: &Device) -> Result<()> {
    let mut rng = setup(6);
    let (rows, cols) = (13, 101);
    let (x, v) = rng.randn((rows, cols), 3.0, DType::BF16, dev)?;
    let row = |r: usize| &v[r * cols..(r + 1) * cols];
    let sum: Vec<f32> = (0..rows)
        .map(|r| row(r).iter().map(|&a| a as f64).sum::<f64>() as f32)
        .collect();
    assert_close("sum", &x.sum_last()?, &sum, 1e-5)?;
    let mean: Vec<f32> = sum.iter().map(|s| s / cols as f32).collect();
    assert_close("mean", &x.mean_last()?, &mean, 1e-5)?;
    let max: Vec<f32> = (0..rows)
        .map(|r| row(r).iter().copied().fold(f32::MIN, f32::max))
        .collect();
    assert_close("max", &x.max_last()?, &max, 0.0)?;
    let amax: Vec<f32> = (0..rows)
        .map(|r| row(r).iter().fold(0f32, |m, a| m.max(a.abs())))
        .collect();
    assert_close(
        "abs_max rows",
        &x.reduce_last(ReduceOp::AbsMax)?,
        &amax,
        0.0,
    )?;
    assert_eq!(x.abs_max()?, amax.iter().copied().fold(0.0, f32::max));
    // Over a middle dim: x [a, b, c] summed over b.
    let (y, yv) = rng.randn((3, 5, 4), 1.0, DType::F32, dev)?;
    let want: Vec<f32> = (0..12)
        .map(|i| {
            (0..5)
                .map(|j| yv[(i / 4) * 20 + j * 4 + i % 4] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let got = y.sum_dim(1)?;
    assert_eq!(got.dims(), &[3, 4]);
    assert_close("sum_dim", &got, &want, 1e-5)?;
    let mean: Vec<f32> = want.iter().map(|s| s / 5.0).collect();
    assert_close("mean_dim", &y.mean_dim(1)?, &mean, 1e-5)?;
    let mut sm = Vec::new();
    for r in 0..rows {
        let e: Vec<f64> = row(r).iter().map(|&a| (a as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        sm.extend(e.iter().map(|a| (a / z) as f32));
    }
    assert_close("softmax f32", &x.softmax_last_to(DType::F32)?, &sm, 1e-5)?;
    let s = x.softmax_last()?;
    assert_eq!(s.dtype(), DType::BF16);
    assert_close("softmax bf16", &s, &sm, tolerance(DType::BF16))?;
    Ok(())
}
test_device!(
    reductions_and_softmax,
    reductions_and_softmax_cpu,
    reductions_and_softmax_cuda
);

fn naive_layer_norm(
    v: &[f32],
    cols: usize,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks(cols) {
        let mean = row.iter().map(|&a| a as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        for (j, &a) in row.iter().enumerate() {
            let mut y = (a as f64 - mean) / (var + eps).sqrt();
            if let Some(w) = w {
                y *= w[j] as f64;
            }
            if let Some(b) = b {
                y += b[j] as f64;
            }
            out.push(y as f32);
        }
    }
    out
}

fn layer_norm(dev: &Device) -> Result<()> {
    let mut rng = setup(7);
    let (rows, cols) = (9, 160);
    for (dt, out) in [
        (DType::BF16, DType::BF16),
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
    ] {
        let (x, v) = rng.randn((3, rows / 3, cols), 2.0, dt, dev)?;
        let v: Vec<f32> = v.iter().map(|a| dt.round_f32(a + 0.7)).collect(); // non-zero mean
        let x = Tensor::from_f32(&v, x.dims(), dt, dev)?;
        let (w, wv) = rng.randn((cols,), 1.0, dt, dev)?;
        let (b, bv) = rng.randn((cols,), 1.0, dt, dev)?;
        let tol = if out == DType::F32 {
            1e-5
        } else {
            tolerance(out)
        };
        for eps in [1e-6f32, 1e-5] {
            let y = x.layer_norm(None, None, eps, out)?;
            assert_eq!(y.dtype(), out);
            assert_close(
                "layer_norm",
                &y,
                &naive_layer_norm(&v, cols, None, None, eps as f64),
                tol,
            )?;
            let y = x.layer_norm(Some(&w), Some(&b), eps, out)?;
            let want = naive_layer_norm(&v, cols, Some(&wv), Some(&bv), eps as f64);
            assert_close("layer_norm affine", &y, &want, tol)?;
        }
    }
    Ok(())
}
test_device!(layer_norm, layer_norm_cpu, layer_norm_cuda);

fn rms_norm(dev: &Device) -> Result<()> {
    let mut rng = setup(8);
    let (rows, cols) = (6, 96);
    for dt in [DType::BF16, DType::F32] {
        let (x, v) = rng.randn((rows, cols), 1.5, dt, dev)?;
        let (w, wv) = rng.randn((cols,), 1.0, dt, dev)?;
        let y = x.rms_norm(Some(&w), 1e-6)?;
        assert_eq!(y.dtype(), dt);
        let mut want = Vec::new();
        let mut unweighted = Vec::new();
        for row in v.chunks(cols) {
            let ms = row.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / cols as f64;
            let r = 1.0 / (ms + 1e-6).sqrt();
            for (j, &a) in row.iter().enumerate() {
                // Rounded to the input dtype, then times the weight (model-spec §3.3.1).
                let n = dt.round_f32((a as f64 * r) as f32);
                unweighted.push(n);
                want.push(dt.round_f32(n * wv[j]));
            }
        }
        let tol = if dt == DType::F32 {
            1e-5
        } else {
            tolerance(dt)
        };
        assert_close("rms_norm", &y, &want, tol)?;
        assert_close(
            "rms_norm no weight",
            &x.rms_norm(None, 1e-6)?,
            &unweighted,
            tol,
        )?;
    }
    // bf16 x with an f32 weight promotes to f32 output.
    let (x, _) = rng.randn((2, 8), 1.0, DType::BF16, dev)?;
    let (w, _) = rng.randn((8,), 1.0, DType::F32, dev)?;
    assert_eq!(x.rms_norm(Some(&w), 1e-6)?.dtype(), DType::F32);
    Ok(())
}
test_device!(rms_norm, rms_norm_cpu, rms_norm_cuda);

fn channel_rms_norm(dev: &Device) -> Result<()> {
    let mut rng = setup(9);
    let (n, c, t, h, w) = (2, 12, 3, 5, 7);
    let s = t * h * w;
    let (x, v) = rng.randn((n, c, t, h, w), 1.0, DType::BF16, dev)?;
    let (g, gv) = rng.randn((c,), 1.0, DType::BF16, dev)?;
    let (b, bv) = rng.randn((c,), 0.1, DType::F32, dev)?;
    let y = x.channel_rms_norm(&g, None, DType::F32)?;
    let yb = x.channel_rms_norm(&g, Some(&b), DType::F32)?;
    let (mut want, mut want_b) = (vec![0f32; v.len()], vec![0f32; v.len()]);
    for i in 0..n {
        for p in 0..s {
            let norm = (0..c)
                .map(|ch| (v[(i * c + ch) * s + p] as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            for ch in 0..c {
                let k = (i * c + ch) * s + p;
                let y = v[k] as f64 / norm * (c as f64).sqrt() * gv[ch] as f64;
                want[k] = y as f32;
                want_b[k] = (y + bv[ch] as f64) as f32;
            }
        }
    }
    assert_close("channel_rms_norm", &y, &want, 1e-5)?;
    assert_close("channel_rms_norm bias", &yb, &want_b, 1e-5)?;
    Ok(())
}
test_device!(
    channel_rms_norm,
    channel_rms_norm_cpu,
    channel_rms_norm_cuda
);

fn rope_interleaved(dev: &Device) -> Result<()> {
    let mut rng = setup(10);
    let (b, l, h, d) = (2, 5, 3, 16);
    let (x, v) = rng.randn((b, l, h, d), 1.0, DType::BF16, dev)?;
    // Per-token angles, tables rounded to f16 as the reference stores them (§3.4).
    let ang: Vec<f64> = (0..l * d / 2)
        .map(|i| (i / (d / 2)) as f64 * 10000f64.powf(-2.0 * (i % (d / 2)) as f64 / d as f64))
        .collect();
    let cv: Vec<f32> = ang
        .iter()
        .map(|a| f16::from_f64(a.cos()).to_f32())
        .collect();
    let sv: Vec<f32> = ang
        .iter()
        .map(|a| f16::from_f64(a.sin()).to_f32())
        .collect();
    let cos = Tensor::from_f32(&cv, (l, d / 2), DType::F32, dev)?;
    let sin = Tensor::from_f32(&sv, (l, d / 2), DType::F32, dev)?;
    let mut want = vec![0f32; v.len()];
    for bi in 0..b {
        for t in 0..l {
            for hh in 0..h {
                for i in 0..d / 2 {
                    let o = ((bi * l + t) * h + hh) * d + 2 * i;
                    let (c, s) = (cv[t * d / 2 + i] as f64, sv[t * d / 2 + i] as f64);
                    let (re, im) = (v[o] as f64, v[o + 1] as f64);
                    want[o] = DType::BF16.round_f32((re * c - im * s) as f32);
                    want[o + 1] = DType::BF16.round_f32((re * s + im * c) as f32);
                }
            }
        }
    }
    let y = x.rope_interleaved(&cos, &sin, DType::BF16)?;
    assert_close("rope bf16", &y, &want, tolerance(DType::BF16))?;
    if dev.is_cpu() {
        // The CPU reference follows the reference's rounding exactly.
        assert_close("rope bf16 exact", &y, &want, 0.0)?;
    }
    Ok(())
}
test_device!(
    rope_interleaved,
    rope_interleaved_cpu,
    rope_interleaved_cuda
);

#[test]
fn errors_are_values_not_panics() {
    let dev = Device::Cpu;
    let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
    assert!(a.add(&b).is_err());
    assert!(a.narrow(1, 2, 2).is_err());
    assert!(a.permute(&[0, 0]).is_err());
    assert!(a.to_vec::<bf16>().is_err());
    let f8 = a.to_dtype(DType::F8E4M3).unwrap();
    assert!(f8.add(&f8).is_err(), "fp8 arithmetic must be explicit");
    #[cfg(not(feature = "cuda"))]
    assert!(matches!(
        Tensor::zeros((1,), DType::F32, &Device::Cuda(0)),
        Err(runtime::Error::CudaNotCompiled)
    ));
}
