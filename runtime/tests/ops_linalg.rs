//! GEMM, FP8 GEMM, convolutions and attention against naive f64 loops, on every device.

#![allow(
    clippy::unwrap_used,
    clippy::type_complexity,
    clippy::too_many_arguments
)]

use runtime::device::{Epilogue, PadMode, set_poison_outputs};
use runtime::testing::{Rng, assert_close, tolerance};
use runtime::{Conv1dOpts, Conv3dOpts, DType, Device, F8E4M3, Result, test_device};

fn setup(seed: u64) -> Rng {
    set_poison_outputs(true);
    Rng::new(seed)
}

fn tol(dt: DType) -> f32 {
    tolerance(dt)
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// out[b][i][j] = Σ_k a[b][i][k]·b[b][k][j]; `bt` gives B as [n, k].
fn naive_mm(
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    shared_b: bool,
    bt: bool,
) -> Vec<f64> {
    let mut out = vec![0f64; batch * m * n];
    for bi in 0..batch {
        let bo = if shared_b { 0 } else { bi * k * n };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    let bv = if bt {
                        b[bo + j * k + kk]
                    } else {
                        b[bo + kk * n + j]
                    };
                    s += a[(bi * m + i) * k + kk] as f64 * bv as f64;
                }
                out[(bi * m + i) * n + j] = s;
            }
        }
    }
    out
}

fn matmul(dev: &Device) -> Result<()> {
    let mut rng = setup(21);
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let (batch, m, k, n) = (3, 17, 45, 11);
        let (a, av) = rng.randn((batch, m, k), 1.0, dt, dev)?;
        let (b, bv) = rng.randn((batch, k, n), 1.0, dt, dev)?;
        let (w, wv) = rng.randn((k, n), 1.0, dt, dev)?;
        let want: Vec<f32> = naive_mm(&av, &bv, batch, m, k, n, false, false)
            .iter()
            .map(|&x| x as f32)
            .collect();
        let got = a.matmul(&b)?;
        assert_eq!((got.dims(), got.dtype()), (&[batch, m, n][..], dt));
        assert_close(
            "batched matmul",
            &got,
            &want,
            if dt == DType::F32 { 1e-5 } else { tol(dt) },
        )?;
        let want: Vec<f32> = naive_mm(&av, &wv, batch, m, k, n, true, false)
            .iter()
            .map(|&x| x as f32 * 0.5)
            .collect();
        let got = a.matmul_to(&w, 0.5, DType::F32)?;
        assert_close("shared-rhs matmul f32 out", &got, &want, 1e-5)?;
    }
    Ok(())
}
test_device!(matmul, matmul_cpu, matmul_cuda);

fn linear_epilogues(dev: &Device) -> Result<()> {
    let mut rng = setup(22);
    for dt in [DType::F32, DType::BF16] {
        let (m, k, n) = (2 * 19, 70, 33);
        let (x, xv) = rng.randn((2, 19, k), 1.0, dt, dev)?;
        let (w, wv) = rng.randn((n, k), 0.2, dt, dev)?;
        let (b, bv) = rng.randn((n,), 0.5, DType::F32, dev)?;
        let acc = naive_mm(&xv, &wv, 1, m, k, n, true, true);
        let with_bias = |j: usize, a: f64| a + bv[j] as f64;
        let t = if dt == DType::F32 { 1e-5 } else { tol(dt) };
        let cases: [(Epilogue, fn(f64) -> f64); 3] = [
            (Epilogue::None, |a| a),
            (Epilogue::GeluTanh, gelu),
            (Epilogue::Silu, |a| a / (1.0 + (-a).exp())),
        ];
        for (e, f) in cases {
            let got = x.linear_ex(&w, Some(&b), e, dt)?;
            assert_eq!((got.dims(), got.dtype()), (&[2, 19, n][..], dt));
            let want: Vec<f32> = acc
                .iter()
                .enumerate()
                .map(|(i, &a)| f(with_bias(i % n, a)) as f32)
                .collect();
            assert_close(&format!("linear {e:?}"), &got, &want, t)?;
        }
        let want: Vec<f32> = acc.iter().map(|&a| a as f32).collect();
        assert_close("linear no bias", &x.linear(&w, None)?, &want, t)?;
    }
    Ok(())
}
test_device!(
    linear_epilogues,
    linear_epilogues_cpu,
    linear_epilogues_cuda
);

fn fp8_linear(dev: &Device) -> Result<()> {
    let mut rng = setup(23);
    let (m, k, n) = (21, 64, 40);
    let (x, xv) = rng.randn((m, k), 2.0, DType::BF16, dev)?;
    let (w, wv) = rng.randn((n, k), 0.05, DType::BF16, dev)?;
    let (b, bv) = rng.randn((n,), 0.1, DType::BF16, dev)?;
    // The reference recipe (model-spec §8.1), written out on the host.
    let quant = |v: &[f32]| {
        let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
        let s = (448.0 / amax.max(1e-12)).min(448.0);
        (
            v.iter()
                .map(|x| F8E4M3::from_f32(x * s).to_f32())
                .collect::<Vec<f32>>(),
            s,
        )
    };
    let (xq, sx) = quant(&xv);
    let (wq, sw) = quant(&wv);
    let acc = naive_mm(&xq, &wq, 1, m, k, n, true, true);
    let want: Vec<f32> = acc
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            DType::BF16.round_f32((a / (sx as f64 * sw as f64) + bv[i % n] as f64) as f32)
        })
        .collect();
    let wf8 = w.quantize_fp8()?;
    assert_eq!(wf8.fp8_scale(), 1.0 / sw);
    let got = x.fp8_linear(&wf8, Some(&b), DType::BF16)?;
    assert_eq!(got.dtype(), DType::BF16);
    // Same quantised operands: only accumulation order and one bf16 rounding differ.
    assert_close("fp8_linear vs emulation", &got, &want, 1e-2)?;
    // And close to the unquantised product, within fp8 error.
    let exact: Vec<f32> = naive_mm(&xv, &wv, 1, m, k, n, true, true)
        .iter()
        .enumerate()
        .map(|(i, &a)| (a + bv[i % n] as f64) as f32)
        .collect();
    assert_close("fp8_linear vs bf16", &got, &exact, tolerance(DType::F8E4M3))?;
    // fp8 output of f32 x stays f32 when asked.
    assert_eq!(
        x.to_dtype(DType::F32)?
            .fp8_linear(&wf8, None, DType::F32)?
            .dtype(),
        DType::F32
    );
    Ok(())
}
test_device!(fp8_linear, fp8_linear_cpu, fp8_linear_cuda);

#[allow(clippy::too_many_arguments)]
fn naive_conv1d(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    b: usize,
    ci: usize,
    co: usize,
    l: usize,
    kn: usize,
    o: Conv1dOpts,
) -> Vec<f32> {
    let lo = (l + o.pad.0 + o.pad.1 - kn) / o.stride + 1;
    let (cig, cog) = (ci / o.groups, co / o.groups);
    let mut out = vec![0f32; b * co * lo];
    for bi in 0..b {
        for c in 0..co {
            let g = c / cog;
            for t in 0..lo {
                let mut s = bias[c] as f64;
                for cc in 0..cig {
                    for kk in 0..kn {
                        let p = (t * o.stride + kk) as isize - o.pad.0 as isize;
                        let xv = if p >= 0 && (p as usize) < l {
                            x[(bi * ci + g * cig + cc) * l + p as usize]
                        } else if o.pad_mode == PadMode::Replicate {
                            x[(bi * ci + g * cig + cc) * l + p.clamp(0, l as isize - 1) as usize]
                        } else {
                            0.0
                        };
                        s += xv as f64 * w[(c * cig + cc) * kn + kk] as f64;
                    }
                }
                out[(bi * co + c) * lo + t] = s as f32;
            }
        }
    }
    out
}

fn conv1d(dev: &Device) -> Result<()> {
    let mut rng = setup(24);
    let cases = [
        // The audio encoder's causal convs (§3.3 step 1): replicate left pad 2, stride 1 and 2.
        (
            2,
            8,
            12,
            17,
            3,
            Conv1dOpts {
                stride: 1,
                groups: 1,
                pad: (2, 0),
                pad_mode: PadMode::Replicate,
            },
        ),
        (
            1,
            6,
            10,
            17,
            3,
            Conv1dOpts {
                stride: 2,
                groups: 1,
                pad: (2, 0),
                pad_mode: PadMode::Replicate,
            },
        ),
        // wav2vec2-style: no padding, kernel 10 stride 5; and a grouped symmetric zero pad.
        (
            1,
            1,
            8,
            53,
            10,
            Conv1dOpts {
                stride: 5,
                ..Default::default()
            },
        ),
        (
            1,
            8,
            8,
            20,
            4,
            Conv1dOpts {
                stride: 1,
                groups: 4,
                pad: (2, 2),
                pad_mode: PadMode::Zeros,
            },
        ),
    ];
    for dt in [DType::F32, DType::BF16] {
        for &(b, ci, co, l, kn, o) in &cases {
            let (x, xv) = rng.randn((b, ci, l), 1.0, dt, dev)?;
            let (w, wv) = rng.randn((co, ci / o.groups, kn), 0.3, dt, dev)?;
            let (bias, bv) = rng.randn((co,), 0.2, dt, dev)?;
            let got = x.conv1d(&w, Some(&bias), o, dt)?;
            let want = naive_conv1d(&xv, &wv, &bv, b, ci, co, l, kn, o);
            assert_eq!(got.elem_count(), want.len());
            assert_close(
                &format!("conv1d {o:?}"),
                &got,
                &want,
                if dt == DType::F32 { 1e-5 } else { tol(dt) },
            )?;
        }
    }
    Ok(())
}
test_device!(conv1d, conv1d_cpu, conv1d_cuda);

fn conv3d(dev: &Device) -> Result<()> {
    let mut rng = setup(25);
    let cases = [
        // CausalConv3d k3: 2 past frames of zero padding, spatial pad 1.
        (
            (1, 4, 3, 6, 5),
            (5, 3, 3, 3),
            Conv3dOpts {
                stride: [1, 1, 1],
                pad: [(2, 0), (1, 1), (1, 1)],
            },
        ),
        // Patch embedding: kernel = stride = (1, 2, 2).
        (
            (1, 3, 2, 6, 8),
            (7, 1, 2, 2),
            Conv3dOpts {
                stride: [1, 2, 2],
                pad: [(0, 0); 3],
            },
        ),
        // VAE spatial downsample: ZeroPad2d((0,1,0,1)) + 3×3 stride 2, per frame.
        (
            (2, 3, 2, 7, 6),
            (4, 1, 3, 3),
            Conv3dOpts {
                stride: [1, 2, 2],
                pad: [(0, 0), (0, 1), (0, 1)],
            },
        ),
        // Temporal downsample: kernel (3,1,1), stride (2,1,1).
        (
            (1, 2, 5, 3, 3),
            (2, 3, 1, 1),
            Conv3dOpts {
                stride: [2, 1, 1],
                pad: [(0, 0); 3],
            },
        ),
    ];
    for dt in [DType::F32, DType::BF16] {
        for &((b, ci, t, h, w), (co, kt, kh, kw), o) in &cases {
            let (x, xv) = rng.randn((b, ci, t, h, w), 1.0, dt, dev)?;
            let (wt, wv) = rng.randn((co, ci, kt, kh, kw), 0.3, dt, dev)?;
            let (bias, bv) = rng.randn((co,), 0.2, DType::F32, dev)?;
            let got = x.conv3d(&wt, Some(&bias), o, dt)?;
            let odim =
                |i: usize, n: usize, k: usize| (n + o.pad[i].0 + o.pad[i].1 - k) / o.stride[i] + 1;
            let (ot, oh, ow) = (odim(0, t, kt), odim(1, h, kh), odim(2, w, kw));
            assert_eq!(got.dims(), &[b, co, ot, oh, ow]);
            let mut want = vec![0f32; b * co * ot * oh * ow];
            let get = |bi: usize, c: usize, ti: isize, yi: isize, xi: isize| -> f64 {
                if ti < 0
                    || yi < 0
                    || xi < 0
                    || ti >= t as isize
                    || yi >= h as isize
                    || xi >= w as isize
                {
                    return 0.0;
                }
                xv[(((bi * ci + c) * t + ti as usize) * h + yi as usize) * w + xi as usize] as f64
            };
            for bi in 0..b {
                for c in 0..co {
                    for a in 0..ot {
                        for y in 0..oh {
                            for z in 0..ow {
                                let mut s = bv[c] as f64;
                                for cc in 0..ci {
                                    for p in 0..kt {
                                        for q in 0..kh {
                                            for r in 0..kw {
                                                let ti = (a * o.stride[0] + p) as isize
                                                    - o.pad[0].0 as isize;
                                                let yi = (y * o.stride[1] + q) as isize
                                                    - o.pad[1].0 as isize;
                                                let xi = (z * o.stride[2] + r) as isize
                                                    - o.pad[2].0 as isize;
                                                s += get(bi, cc, ti, yi, xi)
                                                    * wv[(((c * ci + cc) * kt + p) * kh + q) * kw
                                                        + r]
                                                        as f64;
                                            }
                                        }
                                    }
                                }
                                want[(((bi * co + c) * ot + a) * oh + y) * ow + z] = s as f32;
                            }
                        }
                    }
                }
            }
            assert_close(
                &format!("conv3d {o:?}"),
                &got,
                &want,
                if dt == DType::F32 { 1e-5 } else { tol(dt) },
            )?;
        }
    }
    Ok(())
}
test_device!(conv3d, conv3d_cpu, conv3d_cuda);

fn attention(dev: &Device) -> Result<()> {
    let mut rng = setup(26);
    for (dt, b, lq, lk, h, d, with_bias) in [
        (DType::BF16, 2, 19, 37, 3, 16, false),
        (DType::F32, 1, 8, 5, 2, 32, true),
        (DType::BF16, 2, 7, 512, 2, 8, true),
    ] {
        let (q, qv) = rng.randn((b, lq, h, d), 1.0, dt, dev)?;
        let (k, kv) = rng.randn((b, lk, h, d), 1.0, dt, dev)?;
        let (v, vv) = rng.randn((b, lk, h, d), 1.0, dt, dev)?;
        let bb = if with_bias { b } else { 1 };
        let (bias, biasv) = rng.randn((bb, h, lq, lk), 1.0, DType::F32, dev)?;
        let scale = 1.0 / (d as f32).sqrt();
        let got = q.attention(&k, &v, with_bias.then_some(&bias), scale, dt)?;
        let mut want = vec![0f32; b * lq * h * d];
        for bi in 0..b {
            for i in 0..lq {
                for hh in 0..h {
                    let s: Vec<f64> = (0..lk)
                        .map(|j| {
                            let dotp: f64 = (0..d)
                                .map(|c| {
                                    qv[((bi * lq + i) * h + hh) * d + c] as f64
                                        * kv[((bi * lk + j) * h + hh) * d + c] as f64
                                })
                                .sum();
                            let add = if with_bias {
                                biasv[((bi * h + hh) * lq + i) * lk + j] as f64
                            } else {
                                0.0
                            };
                            dotp * scale as f64 + add
                        })
                        .collect();
                    let mx = s.iter().copied().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let o: f64 = (0..lk)
                            .map(|j| e[j] / z * vv[((bi * lk + j) * h + hh) * d + c] as f64)
                            .sum();
                        want[((bi * lq + i) * h + hh) * d + c] = o as f32;
                    }
                }
            }
        }
        assert_eq!((got.dims(), got.dtype()), (&[b, lq, h, d][..], dt));
        assert_close(
            &format!("attention lq {lq} lk {lk}"),
            &got,
            &want,
            if dt == DType::F32 { 1e-5 } else { tol(dt) },
        )?;
    }
    // A bias shared over the batch (leading dim 1) is accepted with batch 2.
    let (q, _) = rng.randn((2, 3, 1, 4), 1.0, DType::F32, dev)?;
    let (bias, _) = rng.randn((1, 1, 3, 3), 1.0, DType::F32, dev)?;
    q.attention(&q, &q, Some(&bias), 1.0, DType::F32)?;
    Ok(())
}
test_device!(attention, attention_cpu, attention_cuda);
