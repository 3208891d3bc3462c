//! Loading the embedded modules and the pieces every launcher shares.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    LaunchConfig, sys,
};
use cudarc::nvrtc::Ptx;

use crate::error::{DriverExt, Error, Result};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels_gen.rs"));
}

/// Element types the kernels understand; the discriminant is the code the `.cu` files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    BF16 = 1,
    F16 = 2,
    /// float8_e4m3fn: saturating round-to-nearest-even on store.
    F8E4M3 = 3,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 => 1,
        }
    }
    pub(crate) fn code(self) -> i32 {
        self as i32
    }
}

/// A device buffer read by a kernel, with its element type.
#[derive(Debug, Clone, Copy)]
pub struct In<'a> {
    pub buf: &'a CudaSlice<u8>,
    pub dtype: DType,
}

/// A device buffer written by a kernel, with its element type.
#[derive(Debug)]
pub struct Out<'a> {
    pub buf: &'a mut CudaSlice<u8>,
    pub dtype: DType,
}

impl In<'_> {
    pub fn elems(&self) -> usize {
        self.buf.len() / self.dtype.size()
    }
}

impl Out<'_> {
    pub fn elems(&self) -> usize {
        self.buf.len() / self.dtype.size()
    }
}

/// Fail unless `need_elems` elements of `dtype` fit in `have_bytes`.
pub(crate) fn check_len(
    op: &'static str,
    operand: &'static str,
    need_elems: usize,
    dtype: DType,
    have_bytes: usize,
) -> Result<()> {
    let need = need_elems.saturating_mul(dtype.size());
    if need > have_bytes {
        return Err(Error::OutOfBounds {
            op,
            operand,
            need,
            have: have_bytes,
        });
    }
    Ok(())
}

/// Device address of a read operand; the guard must live until the launch is queued.
pub(crate) fn rptr<'a>(
    b: &'a CudaSlice<u8>,
    s: &'a CudaStream,
) -> (sys::CUdeviceptr, cudarc::driver::SyncOnDrop<'a>) {
    b.device_ptr(s)
}

/// Device address of a written operand.
pub(crate) fn wptr<'a>(
    b: &'a mut CudaSlice<u8>,
    s: &'a CudaStream,
) -> (sys::CUdeviceptr, cudarc::driver::SyncOnDrop<'a>) {
    b.device_ptr_mut(s)
}

/// Every kernel of the embedded modules, loaded into one context.
#[derive(Debug)]
pub struct Kernels {
    ctx: Arc<CudaContext>,
    funcs: HashMap<&'static str, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    pub(crate) sm_count: u32,
    /// Which image each module came from ("cubin" or "ptx"), for `doctor`.
    pub loaded_from: Vec<(&'static str, &'static str)>,
}

const FUNCTIONS: &[(&str, &[&str])] = &[
    (
        "attention",
        &[
            "lava_attn_fwd_bf16_d128_br64",
            "lava_attn_fwd_bf16_d128_br128",
        ],
    ),
    ("conv", &["lava_im2col1d", "lava_im2col3d"]),
    (
        "elementwise",
        &[
            "lava_unary",
            "lava_binary",
            "lava_ternary",
            "lava_copy_raw",
            "lava_index_select",
            "lava_fill",
            "lava_rowwise",
        ],
    ),
    (
        "norm",
        &[
            "lava_layernorm",
            "lava_rmsnorm",
            "lava_softmax",
            "lava_channel_rmsnorm",
            "lava_reduce_rows",
            "lava_bias_act",
            "lava_res_norm_mod",
        ],
    ),
    ("rope", &["lava_rope", "lava_rmsnorm_rope"]),
    ("vae", &["lava_channel_norm_silu", "lava_transpose_tiled"]),
];

impl Kernels {
    /// Load every module into `ctx`: the sm_90a cubin, or the PTX when the cubin does not
    /// fit this GPU.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let mut funcs = HashMap::new();
        let mut modules = Vec::new();
        let mut loaded_from = Vec::new();
        for &(name, cubin, ptx) in generated::MODULES {
            let (module, from) = match ctx.load_module(Ptx::from_binary(cubin.to_vec())) {
                Ok(m) => (m, "cubin"),
                Err(cubin_err) => match ctx.load_module(Ptx::from_src(ptx)) {
                    Ok(m) => (m, "ptx"),
                    Err(ptx_err) => {
                        return Err(Error::ModuleLoad {
                            module: name,
                            cubin: cubin_err,
                            ptx: ptx_err,
                        });
                    }
                },
            };
            let wanted = FUNCTIONS
                .iter()
                .find(|(m, _)| *m == name)
                .map(|(_, f)| *f)
                .unwrap_or(&[]);
            for &f in wanted {
                funcs.insert(f, module.load_function(f).w("cuModuleGetFunction")?);
            }
            loaded_from.push((name, from));
            modules.push(module);
        }
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w("cuDeviceGetAttribute")? as u32;
        let k = Self {
            ctx: Arc::clone(ctx),
            funcs,
            _modules: modules,
            sm_count,
            loaded_from,
        };
        k.attention_init()?;
        Ok(k)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn func(&self, name: &'static str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or(Error::Unsupported {
            op: "kernel lookup",
            msg: format!("{name} is not in the embedded modules"),
        })
    }

    /// A grid-stride launch over `n` items: 256 threads, at most 16 blocks per SM.
    pub(crate) fn grid(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count as usize * 16) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Let the device's stream-ordered memory pool keep freed memory across synchronisations
/// (release threshold = unlimited), as a caching allocator would: without it every
/// synchronisation hands the pool back to the driver and the next call maps it again.
/// Contexts without stream-ordered allocation are left as they are.
pub fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    ctx.bind_to_thread().w("cuCtxSetCurrent")?;
    // SAFETY: the device comes from a live context; the attribute takes a u64 by pointer.
    unsafe {
        let pool = cudarc::driver::result::device::get_mem_pool(ctx.cu_device())
            .w("cuDeviceGetMemPool")?;
        let mut threshold: u64 = u64::MAX;
        cudarc::driver::result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut threshold).cast(),
        )
        .w("cuMemPoolSetAttribute")?;
    }
    Ok(())
}
