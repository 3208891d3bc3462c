//! Launcher for `cuda/attention.cu`: FlashAttention-2-style bf16 forward, head dim 128.

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, sys};

use crate::error::{DriverExt, Error, Result};
use crate::module::{DType, In, Kernels, Out, check_len, rptr, wptr};

const HEAD_DIM: usize = 128;
const BC: usize = 64;

/// Geometry of one attention call. Tensors are `[batch, len, heads, 128]` bf16 with the
/// given element strides (batch, token, head); the head dim is contiguous.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnArgs {
    pub q_bs: i64,
    pub q_ls: i64,
    pub q_hs: i64,
    pub k_bs: i64,
    pub k_ls: i64,
    pub k_hs: i64,
    pub v_bs: i64,
    pub v_ls: i64,
    pub v_hs: i64,
    pub o_bs: i64,
    pub o_ls: i64,
    pub o_hs: i64,
    pub lq: i32,
    pub lk: i32,
    scale_log2: f32,
    pad: i32,
}
// SAFETY: plain-old-data matching `AttnArgs` in attention.cu.
unsafe impl DeviceRepr for AttnArgs {}

impl AttnArgs {
    /// Contiguous `[batch, lq|lk, heads, 128]` q, k, v and out.
    pub fn contiguous(lq: usize, lk: usize, heads: usize) -> Self {
        Self::contiguous_hd(lq, lk, heads, HEAD_DIM)
    }

    /// Contiguous `[batch, lq|lk, heads, head_dim]` (the own kernel needs head_dim 128;
    /// cuDNN takes others).
    pub fn contiguous_hd(lq: usize, lk: usize, heads: usize, head_dim: usize) -> Self {
        let (hs, ls) = (head_dim as i64, (heads * head_dim) as i64);
        Self {
            q_bs: lq as i64 * ls,
            q_ls: ls,
            q_hs: hs,
            k_bs: lk as i64 * ls,
            k_ls: ls,
            k_hs: hs,
            v_bs: lk as i64 * ls,
            v_ls: ls,
            v_hs: hs,
            o_bs: lq as i64 * ls,
            o_ls: ls,
            o_hs: hs,
            lq: lq as i32,
            lk: lk as i32,
            ..Default::default()
        }
    }
}

/// Query rows per block; both variants are compiled, 64 measured faster on an H100 (see
/// docs/benchmarks.md).
pub const DEFAULT_BLOCK_ROWS: usize = 64;

fn smem_bytes(br: usize) -> usize {
    (br + 2 * BC) * HEAD_DIM * 2
}

fn kernel_name(br: usize) -> Result<&'static str> {
    match br {
        64 => Ok("lava_attn_fwd_bf16_d128_br64"),
        128 => Ok("lava_attn_fwd_bf16_d128_br128"),
        _ => Err(Error::Unsupported {
            op: "attention",
            msg: format!("block rows {br} (64 or 128)"),
        }),
    }
}

impl Kernels {
    pub(crate) fn attention_init(&self) -> Result<()> {
        for br in [64, 128] {
            self.func(kernel_name(br)?)?
                .set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes(br) as i32,
                )
                .w("cuFuncSetAttribute(max dynamic smem)")?;
        }
        Ok(())
    }

    /// `o = softmax(q·kᵀ·scale)·v` per (batch, head), non-causal, bf16, head dim 128.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        s: &CudaStream,
        q: In<'_>,
        k: In<'_>,
        v: In<'_>,
        o: Out<'_>,
        args: AttnArgs,
        batch: usize,
        heads: usize,
        scale: f32,
    ) -> Result<()> {
        self.attention_with(s, q, k, v, o, args, batch, heads, scale, DEFAULT_BLOCK_ROWS)
    }

    /// [`Kernels::attention`] with an explicit block-row variant (64 or 128), for benchmarks.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with(
        &self,
        s: &CudaStream,
        q: In<'_>,
        k: In<'_>,
        v: In<'_>,
        o: Out<'_>,
        mut args: AttnArgs,
        batch: usize,
        heads: usize,
        scale: f32,
        block_rows: usize,
    ) -> Result<()> {
        for (name, dt) in [
            ("q", q.dtype),
            ("k", k.dtype),
            ("v", v.dtype),
            ("o", o.dtype),
        ] {
            if dt != DType::BF16 {
                return Err(Error::Unsupported {
                    op: "attention",
                    msg: format!("{name} is {dt:?}; the kernel is bf16 only"),
                });
            }
        }
        if args.lq <= 0 || args.lk <= 0 || batch == 0 || heads == 0 {
            return Ok(());
        }
        let span = |bs: i64, ls: i64, hs: i64, l: i32| -> usize {
            ((batch as i64 - 1) * bs + (l as i64 - 1) * ls + (heads as i64 - 1) * hs) as usize
                + HEAD_DIM
        };
        for (name, buf, (bs, ls, hs, l)) in [
            ("q", q.buf.len(), (args.q_bs, args.q_ls, args.q_hs, args.lq)),
            ("k", k.buf.len(), (args.k_bs, args.k_ls, args.k_hs, args.lk)),
            ("v", v.buf.len(), (args.v_bs, args.v_ls, args.v_hs, args.lk)),
            ("o", o.buf.len(), (args.o_bs, args.o_ls, args.o_hs, args.lq)),
        ] {
            if [bs, ls, hs].iter().any(|&x| x < 0) {
                return Err(Error::Unsupported {
                    op: "attention",
                    msg: format!("negative stride for {name}"),
                });
            }
            check_len("attention", name, span(bs, ls, hs, l), DType::BF16, buf)?;
        }
        if heads > 65535 || batch > 65535 {
            return Err(Error::Unsupported {
                op: "attention",
                msg: format!("grid {batch}×{heads}"),
            });
        }
        args.scale_log2 = scale * std::f32::consts::LOG2_E;
        let name = kernel_name(block_rows)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (args.lq as usize).div_ceil(block_rows) as u32,
                heads as u32,
                batch as u32,
            ),
            block_dim: ((block_rows * 2) as u32, 1, 1),
            shared_mem_bytes: smem_bytes(block_rows) as u32,
        };
        let (qp, _gq) = rptr(q.buf, s);
        let (kp, _gk) = rptr(k.buf, s);
        let (vp, _gv) = rptr(v.buf, s);
        let (op_, _go) = wptr(o.buf, s);
        let f = self.func(name)?;
        let mut l = s.launch_builder(f);
        l.arg(&args).arg(&qp).arg(&kp).arg(&vp).arg(&op_);
        // SAFETY: arguments match the attention kernels; every operand's span was checked.
        unsafe { l.launch(cfg) }.w("launch attention")?;
        Ok(())
    }
}
