//! `gpu-bench`: our cuBLASLt GEMMs and attention kernel at the Wan DiT's shapes (model-spec
//! §3.5: M = 3168 tokens; 5120×5120, 5120×13824, 13824×5120; attention of 3168 queries over
//! 15,312 and 512 keys, 40 heads × 128, bf16). Each case is checked on sampled outputs
//! against an f64 CPU reference before it is timed (CUDA events, warm-up, median of 7
//! repetitions of 10 launches). Prints `RESULT <case> <ms> <TFLOP/s>` lines that
//! `benches/gpu_torch.py` pairs with PyTorch's numbers from the same run.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use half::bf16;
use kernels::cudarc::driver::{CudaContext, CudaSlice, CudaStream, sys};
use kernels::gemm::{GemmDesc, Lt, LtEpilogue};
use kernels::{AttnArgs, DType, In, Kernels, Out};

const M: usize = 3168;
const HEADS: usize = 40;
const HD: usize = 128;

/// Deterministic N(0, 1)-ish values (sum of uniforms), scaled.
fn randn(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| {
            let u: f32 = (0..4).map(|_| next()).sum::<f32>() - 2.0;
            bf16::from_f32(u * 1.732 * scale)
        })
        .collect()
}

fn upload(s: &Arc<CudaStream>, v: &[bf16]) -> Result<CudaSlice<u8>> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    Ok(s.clone_htod(&bytes)?)
}

fn download(s: &Arc<CudaStream>, b: &CudaSlice<u8>) -> Result<Vec<f32>> {
    let bytes = s.clone_dtoh(b)?;
    Ok(bytes
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect())
}

/// Median milliseconds per launch of `f` (7 repetitions × 10 launches after 3 warm-ups).
fn time(
    ctx: &Arc<CudaContext>,
    s: &Arc<CudaStream>,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (e0, e1) = (ctx.new_event(flags)?, ctx.new_event(flags)?);
    let mut reps = Vec::new();
    for _ in 0..7 {
        e0.record(s)?;
        for _ in 0..10 {
            f()?;
        }
        e1.record(s)?;
        reps.push(e0.elapsed_ms(&e1)? as f64 / 10.0);
    }
    reps.sort_by(f64::total_cmp);
    Ok(reps[reps.len() / 2])
}

fn check(name: &str, worst: f64, tol: f64) -> Result<()> {
    println!("CHECK {name} max_rel_err {worst:.2e} (tol {tol:.0e})");
    if worst.is_nan() || worst > tol {
        bail!("{name}: sampled outputs differ from the f64 reference by {worst:.3e}");
    }
    Ok(())
}

fn gemms(ctx: &Arc<CudaContext>, s: &Arc<CudaStream>, lt: &Lt) -> Result<()> {
    for (k, n) in [(5120, 5120), (5120, 13824), (13824, 5120)] {
        let (ha, hw) = (
            randn(M * k, 1 + k as u64, 1.0),
            randn(n * k, 2 + n as u64, 0.02),
        );
        let hb = randn(n, 3, 0.1);
        let (a, w, bias) = (upload(s, &ha)?, upload(s, &hw)?, upload(s, &hb)?);
        let mut out = unsafe { s.alloc::<u8>(M * n * 2) }?;
        for epi in ["plain", "bias_gelu"] {
            let mut d = GemmDesc::new(DType::BF16, DType::BF16, M, n, k, true);
            if epi == "bias_gelu" {
                d.bias = Some(DType::BF16);
                d.epilogue = LtEpilogue::GeluTanh;
            }
            let bi = (epi == "bias_gelu").then_some(In {
                buf: &bias,
                dtype: DType::BF16,
            });
            let run = |out: &mut CudaSlice<u8>| {
                lt.matmul(
                    &d,
                    1.0,
                    In {
                        buf: &a,
                        dtype: DType::BF16,
                    },
                    In {
                        buf: &w,
                        dtype: DType::BF16,
                    },
                    bi,
                    Out {
                        buf: out,
                        dtype: DType::BF16,
                    },
                )
                .context("gemm")
            };
            run(&mut out)?;
            let got = download(s, &out)?;
            let mut worst = 0f64;
            for t in 0..64 {
                let (i, j) = ((t * 2671) % M, (t * 7919) % n);
                let mut acc = 0f64;
                for kk in 0..k {
                    acc += ha[i * k + kk].to_f32() as f64 * hw[j * k + kk].to_f32() as f64;
                }
                if epi == "bias_gelu" {
                    acc += hb[j].to_f32() as f64;
                    acc = 0.5
                        * acc
                        * (1.0
                            + ((2.0 / std::f64::consts::PI).sqrt()
                                * (acc + 0.044715 * acc.powi(3)))
                            .tanh());
                }
                let e = (got[i * n + j] as f64 - acc).abs() / (acc.abs() + 0.05);
                worst = worst.max(e);
            }
            check(&format!("gemm_{M}x{k}x{n}_{epi}"), worst, 2e-2)?;
            let ms = time(ctx, s, || run(&mut out))?;
            let tflops = 2.0 * (M * n * k) as f64 / (ms * 1e-3) / 1e12;
            println!("RESULT gemm_{M}x{k}x{n}_{epi} {ms:.4} {tflops:.1}");
        }
    }
    Ok(())
}

/// One way of running the attention case into the given output buffer.
type Runner<'a> = Box<dyn Fn(&mut CudaSlice<u8>) -> Result<()> + 'a>;

/// Worst relative L2 error over 24 sampled (query, head) rows against an f64 reference.
fn attn_error(got: &[f32], hq: &[bf16], hk: &[bf16], hv: &[bf16], lk: usize, scale: f32) -> f64 {
    let mut worst = 0f64;
    for t in 0..24 {
        let (i, h) = ((t * 131 + 7) % M, (t * 17) % HEADS);
        let at = |b: &[bf16], r: usize, d: usize| b[(r * HEADS + h) * HD + d].to_f32() as f64;
        let sc: Vec<f64> = (0..lk)
            .map(|j| (0..HD).map(|d| at(hk, j, d) * at(hq, i, d)).sum::<f64>() * scale as f64)
            .collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
        let z: f64 = p.iter().sum();
        let (mut num, mut den) = (0f64, 0f64);
        for d in 0..HD {
            let r: f64 = (0..lk).map(|j| p[j] * at(hv, j, d)).sum::<f64>() / z;
            let g = got[(i * HEADS + h) * HD + d] as f64;
            num += (g - r) * (g - r);
            den += r * r;
        }
        worst = worst.max((num / den.max(1e-30)).sqrt());
    }
    worst
}

fn attention(ctx: &Arc<CudaContext>, s: &Arc<CudaStream>, k: &Kernels) -> Result<()> {
    let scale = 1.0 / (HD as f32).sqrt();
    #[cfg(feature = "cudnn")]
    let cudnn = kernels::cudnn::CudnnSdpa::new(Arc::clone(s)).context("cuDNN SDPA")?;
    for lk in [15312usize, 512] {
        let hq = randn(M * HEADS * HD, 11, 1.0);
        let hk = randn(lk * HEADS * HD, 12 + lk as u64, 1.0);
        let hv = randn(lk * HEADS * HD, 13 + lk as u64, 1.0);
        let (q, kk, v) = (upload(s, &hq)?, upload(s, &hk)?, upload(s, &hv)?);
        let mut o = unsafe { s.alloc::<u8>(M * HEADS * HD * 2) }?;
        let args = AttnArgs::contiguous(M, lk, HEADS);
        let bf = |b| In {
            buf: b,
            dtype: DType::BF16,
        };
        let mut variants: Vec<(&str, Runner<'_>)> = Vec::new();
        for (name, br) in [("br64", 64usize), ("br128", 128)] {
            let (q, kk, v) = (&q, &kk, &v);
            variants.push((
                name,
                Box::new(move |o: &mut CudaSlice<u8>| {
                    k.attention_with(
                        s,
                        bf(q),
                        bf(kk),
                        bf(v),
                        Out {
                            buf: o,
                            dtype: DType::BF16,
                        },
                        args,
                        1,
                        HEADS,
                        scale,
                        br,
                    )
                    .context("attention")
                }),
            ));
        }
        #[cfg(feature = "cudnn")]
        {
            let (q, kk, v, cudnn) = (&q, &kk, &v, &cudnn);
            variants.push((
                "cudnn",
                Box::new(move |o: &mut CudaSlice<u8>| {
                    cudnn
                        .attention(
                            bf(q),
                            bf(kk),
                            bf(v),
                            Out {
                                buf: o,
                                dtype: DType::BF16,
                            },
                            &args,
                            1,
                            HEADS,
                            HD,
                            scale,
                        )
                        .context("cuDNN attention")
                }),
            ));
        }
        for (name, run) in &variants {
            run(&mut o)?;
            let got = download(s, &o)?;
            check(
                &format!("attn_{M}x{lk}_{name}"),
                attn_error(&got, &hq, &hk, &hv, lk, scale),
                2e-2,
            )?;
            let ms = time(ctx, s, || run(&mut o))?;
            let tflops = 4.0 * (M * lk * HEADS * HD) as f64 / (ms * 1e-3) / 1e12;
            println!("RESULT attn_{M}x{lk}_{name} {ms:.4} {tflops:.1}");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let ctx = CudaContext::new(0)?;
    // SAFETY: one stream; no cross-stream dependencies to track.
    unsafe { ctx.disable_event_tracking() };
    let s = ctx.new_stream()?;
    println!("DEVICE {}", ctx.name()?);
    let k = Kernels::load(&ctx)?;
    let lt = Lt::new(Arc::clone(&s), true)?;
    gemms(&ctx, &s, &lt)?;
    attention(&ctx, &s, &k)?;
    Ok(())
}
