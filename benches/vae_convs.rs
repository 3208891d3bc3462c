//! `vae-bench --convs`: every convolution shape of one steady-state decoder step (one latent
//! → 4 frames at 704×384, with the 2 cached frames in front), timed through cuDNN directly in
//! four set-ups: NCDHW (the runtime's layout) and NDHWC (channels last), each with cuDNN's
//! heuristic engine and with every engine timed (autotune). The per-block estimate is
//! 3 × Σ count × ms. Random bf16 data (never zeros), device synchronised around each repeat.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use half::bf16;
use kernels::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use kernels::cudnn_conv::{ConvShape, CudnnConv};
use kernels::{DType, In, Out};

/// (count per latent, c_in, input t/h/w, c_out, kernel, pad).
type ConvCase = (
    usize,
    usize,
    [usize; 3],
    usize,
    [usize; 3],
    [(usize, usize); 3],
);

const K3: [usize; 3] = [3, 3, 3];
const P3: [(usize, usize); 3] = [(0, 0), (1, 1), (1, 1)];
const K2D: [usize; 3] = [1, 3, 3];
const KT: [usize; 3] = [3, 1, 1];
const P0: [(usize, usize); 3] = [(0, 0); 3];

/// The decoder's convolutions for one latent after the first (model-spec §1.5): inputs
/// include the 2 cached frames of each causal conv.
const CASES: &[ConvCase] = &[
    (1, 16, [3, 48, 88], 384, K3, P3),       // conv1
    (10, 384, [3, 48, 88], 384, K3, P3),     // middle (4) + stage 0 (6)
    (1, 384, [3, 48, 88], 768, KT, P0),      // stage 0 time_conv
    (1, 384, [2, 96, 176], 192, K2D, P3),    // stage 0 upsample conv
    (1, 192, [4, 96, 176], 384, K3, P3),     // stage 1 res 0 conv1
    (1, 192, [2, 96, 176], 384, [1; 3], P0), // stage 1 res 0 shortcut
    (5, 384, [4, 96, 176], 384, K3, P3),     // stage 1
    (1, 384, [4, 96, 176], 768, KT, P0),     // stage 1 time_conv
    (1, 384, [4, 192, 352], 192, K2D, P3),   // stage 1 upsample conv
    (6, 192, [6, 192, 352], 192, K3, P3),    // stage 2
    (1, 192, [4, 384, 704], 96, K2D, P3),    // stage 2 upsample conv
    (6, 96, [6, 384, 704], 96, K3, P3),      // stage 3
    (1, 96, [6, 384, 704], 3, K3, P3),       // head
];

fn random_bf16(stream: &Arc<CudaStream>, n: usize, seed: u64) -> Result<CudaSlice<u8>> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<bf16> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect();
    let bytes: &[u8] = bytemuck_bytes(&v);
    Ok(stream.clone_htod(bytes)?)
}

fn bytemuck_bytes(v: &[bf16]) -> &[u8] {
    // SAFETY: bf16 is plain 2-byte data; the byte view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Time every case in the four set-ups; prints one line per case and the block estimates.
pub fn run(iters: usize) -> Result<()> {
    let ctx = CudaContext::new(0).context("CUDA context")?;
    let stream = ctx.new_stream()?;
    let max_in = CASES
        .iter()
        .map(|c| c.1 * c.2.iter().product::<usize>())
        .max()
        .unwrap_or(0);
    let x = random_bf16(&stream, max_in, 1)?;
    let mut totals = [0f64; 4];
    let setups = [(false, false), (false, true), (true, false), (true, true)];
    let convs: Vec<CudnnConv> = [false, true]
        .iter()
        .map(|&tune| CudnnConv::new(Arc::clone(&stream), tune))
        .collect::<kernels::Result<_>>()?;
    println!(
        "CONVS case | count | GFLOP | NCDHW heur ms | NCDHW tuned ms | NDHWC heur ms | NDHWC tuned ms"
    );
    for (i, &(count, ci, input, co, kernel, pad)) in CASES.iter().enumerate() {
        let w = random_bf16(
            &stream,
            co * ci * kernel.iter().product::<usize>(),
            2 + i as u64,
        )?;
        let b = random_bf16(&stream, co, 100 + i as u64)?;
        let mut line = Vec::new();
        let mut flops = 0.0;
        for (k, &(cl, tune)) in setups.iter().enumerate() {
            let g = ConvShape {
                batch: 1,
                c_in: ci,
                c_out: co,
                input,
                kernel,
                stride: [1; 3],
                pad,
                channels_last: cl,
            };
            let od = g.out_dims();
            let p: usize = od.iter().product();
            flops = 2.0 * (ci * co * kernel.iter().product::<usize>() * p) as f64;
            // SAFETY: fully written by the convolution before it is read.
            let mut y = unsafe { stream.alloc::<u8>(co * p * 2) }?;
            let conv = &convs[tune as usize];
            let mut call = || -> Result<()> {
                conv.forward(
                    In {
                        buf: &x,
                        dtype: DType::BF16,
                    },
                    In {
                        buf: &w,
                        dtype: DType::BF16,
                    },
                    Some(In {
                        buf: &b,
                        dtype: DType::BF16,
                    }),
                    Out {
                        buf: &mut y,
                        dtype: DType::BF16,
                    },
                    &g,
                )?;
                Ok(())
            };
            let r = (|| -> Result<f64> {
                call()?;
                call()?;
                stream.synchronize()?;
                let mut t = Vec::new();
                for _ in 0..iters {
                    let t0 = Instant::now();
                    call()?;
                    stream.synchronize()?;
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                t.sort_by(f64::total_cmp);
                Ok(t[t.len() / 2])
            })();
            match r {
                Ok(ms) => {
                    totals[k] += 3.0 * count as f64 * ms;
                    line.push(format!("{ms:.3} ({:.0} TF/s)", flops / ms / 1e9));
                }
                Err(e) => {
                    totals[k] = f64::NAN;
                    line.push(format!("error: {e}"));
                }
            }
        }
        println!(
            "CONVS {ci}x{input:?} k{kernel:?} -> {co} | {count} | {:.1} | {}",
            flops / 1e9,
            line.join(" | ")
        );
    }
    println!(
        "RESULT conv_block_estimate_ms ncdhw_heur {:.1} ncdhw_tuned {:.1} ndhwc_heur {:.1} ndhwc_tuned {:.1}",
        totals[0], totals[1], totals[2], totals[3]
    );
    for (name, c) in ["heuristic", "tuned"].iter().zip(&convs) {
        for p in c.plans() {
            println!("PLAN {name} {p}");
        }
    }
    Ok(())
}
