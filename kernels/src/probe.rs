//! What CUDA this process can use, found without panicking: cudarc panics when a library
//! is missing, so every probe checks `is_culib_present()` before the first call.

use std::fmt;

/// How to make the pip-installed CUDA libraries loadable.
pub const LIB_HINT: &str = "put the CUDA 13 libraries on LD_LIBRARY_PATH, e.g. \
    export LD_LIBRARY_PATH=$(ls -d $(python3 -c 'import site;print(site.getsitepackages()[0])')/nvidia/*/lib | tr '\\n' :)$LD_LIBRARY_PATH \
    plus a folder with libnccl.so -> libnccl.so.2 (the pip NCCL wheel ships only the .so.2 name); \
    the wheels: nvidia-cublas, nvidia-cuda-nvrtc, nvidia-cuda-runtime, nvidia-nccl-cu13, nvidia-cudnn-cu13";

/// One library's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Loaded; the version string when the library reports one.
    Yes(Option<String>),
    No,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
}

/// Everything `doctor` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// libcuda (the driver) and its CUDA version.
    pub driver: Found,
    pub cudart: Found,
    pub nvrtc: Found,
    pub cublas: Found,
    pub cublaslt: Found,
    pub nccl: Found,
    pub cudnn: Found,
    pub gpus: Vec<Gpu>,
    /// Errors met while querying present libraries or GPUs.
    pub errors: Vec<String>,
}

impl Report {
    /// True when everything the runtime needs was found and at least one GPU answered.
    pub fn ok(&self) -> bool {
        [
            &self.driver,
            &self.cudart,
            &self.nvrtc,
            &self.cublas,
            &self.cublaslt,
            &self.nccl,
            &self.cudnn,
        ]
        .iter()
        .all(|f| matches!(f, Found::Yes(_)))
            && !self.gpus.is_empty()
            && self.errors.is_empty()
    }

    fn rows(&self) -> [(&'static str, &Found); 7] {
        [
            ("driver (libcuda)", &self.driver),
            ("CUDA runtime (libcudart)", &self.cudart),
            ("NVRTC (libnvrtc)", &self.nvrtc),
            ("cuBLAS (libcublas)", &self.cublas),
            ("cuBLASLt (libcublasLt)", &self.cublaslt),
            ("NCCL (libnccl)", &self.nccl),
            ("cuDNN (libcudnn)", &self.cudnn),
        ]
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, found) in self.rows() {
            match found {
                Found::Yes(Some(v)) => writeln!(f, "  ok       {name:<26} {v}")?,
                Found::Yes(None) => writeln!(f, "  ok       {name:<26}")?,
                Found::No => writeln!(f, "  MISSING  {name:<26} not loadable")?,
            }
        }
        if self.gpus.is_empty() {
            writeln!(f, "  MISSING  GPUs                       none visible")?;
        }
        for g in &self.gpus {
            writeln!(
                f,
                "  ok       GPU {}: {} (sm_{}{}), {:.1} GiB total, {:.1} GiB free",
                g.ordinal,
                g.name,
                g.compute_capability.0,
                g.compute_capability.1,
                g.total_bytes as f64 / (1u64 << 30) as f64,
                g.free_bytes as f64 / (1u64 << 30) as f64
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  ERROR    {e}")?;
        }
        let missing: Vec<_> = self
            .rows()
            .iter()
            .filter(|(_, x)| **x == Found::No)
            .map(|(n, _)| *n)
            .collect();
        if self.driver == Found::No {
            writeln!(
                f,
                "fix: no NVIDIA driver here; run on a machine with a GPU and driver 580+ (CUDA 13.0)"
            )?;
        }
        if missing.iter().any(|n| !n.starts_with("driver")) {
            writeln!(f, "fix: {LIB_HINT}")?;
        }
        Ok(())
    }
}

fn version3(v: i32, major_div: i32, minor_div: i32) -> String {
    format!(
        "{}.{}.{}",
        v / major_div,
        (v % major_div) / minor_div,
        v % minor_div
    )
}

/// Probe every library and GPU. Never panics on a missing library.
pub fn probe() -> Report {
    use cudarc::{cublas, cublaslt, cudnn, driver, nccl, nvrtc, runtime};
    let mut errors = Vec::new();
    // SAFETY (all `is_culib_present`): they only try to dlopen candidate names.
    let driver_found = if unsafe { driver::sys::is_culib_present() } {
        let mut v = 0i32;
        // SAFETY: libcuda is loadable; cuDriverGetVersion writes one int.
        match unsafe { driver::sys::cuDriverGetVersion(&mut v) }.result() {
            Ok(()) => Found::Yes(Some(format!("CUDA {}.{}", v / 1000, (v % 1000) / 10))),
            Err(e) => {
                errors.push(format!("cuDriverGetVersion: {e}"));
                Found::Yes(None)
            }
        }
    } else {
        Found::No
    };
    let cudart = if unsafe { runtime::sys::is_culib_present() } {
        let mut v = 0i32;
        // SAFETY: libcudart is loadable; writes one int.
        let r = unsafe { runtime::sys::cudaRuntimeGetVersion(&mut v) };
        if r == runtime::sys::cudaError_t::cudaSuccess {
            Found::Yes(Some(format!("{}.{}", v / 1000, (v % 1000) / 10)))
        } else {
            Found::Yes(None)
        }
    } else {
        Found::No
    };
    let nvrtc_found = if unsafe { nvrtc::sys::is_culib_present() } {
        let (mut a, mut b) = (0i32, 0i32);
        // SAFETY: libnvrtc is loadable; writes two ints.
        let r = unsafe { nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
        if r == nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            Found::Yes(Some(format!("{a}.{b}")))
        } else {
            Found::Yes(None)
        }
    } else {
        Found::No
    };
    let cublas_found = if unsafe { cublas::sys::is_culib_present() } {
        Found::Yes(None)
    } else {
        Found::No
    };
    let cublaslt_found = if unsafe { cublaslt::sys::is_culib_present() } {
        // SAFETY: libcublasLt is loadable; returns a plain number like 130100.
        let v = unsafe { cublaslt::sys::cublasLtGetVersion() } as i32;
        Found::Yes(Some(version3(v, 10000, 100)))
    } else {
        Found::No
    };
    let nccl_found = if unsafe { nccl::sys::is_culib_present() } {
        let mut v = 0i32;
        // SAFETY: libnccl is loadable; writes one int (e.g. 22809).
        let r = unsafe { nccl::sys::ncclGetVersion(&mut v) };
        if r == nccl::sys::ncclResult_t::ncclSuccess {
            Found::Yes(Some(version3(v, 10000, 100)))
        } else {
            Found::Yes(None)
        }
    } else {
        Found::No
    };
    let cudnn_found = if unsafe { cudnn::sys::is_culib_present() } {
        // SAFETY: libcudnn is loadable; returns e.g. 91900.
        let v = unsafe { cudnn::sys::cudnnGetVersion() } as i32;
        Found::Yes(Some(version3(v, 10000, 100)))
    } else {
        Found::No
    };
    let mut gpus = Vec::new();
    if driver_found != Found::No {
        match driver::CudaContext::device_count() {
            Ok(n) => {
                for i in 0..n.max(0) as usize {
                    match gpu(i) {
                        Ok(g) => gpus.push(g),
                        Err(e) => errors.push(format!("GPU {i}: {e}")),
                    }
                }
            }
            Err(e) => errors.push(format!("cuDeviceGetCount: {e}")),
        }
    }
    Report {
        driver: driver_found,
        cudart,
        nvrtc: nvrtc_found,
        cublas: cublas_found,
        cublaslt: cublaslt_found,
        nccl: nccl_found,
        cudnn: cudnn_found,
        gpus,
        errors,
    }
}

fn gpu(ordinal: usize) -> Result<Gpu, cudarc::driver::DriverError> {
    let ctx = cudarc::driver::CudaContext::new(ordinal)?;
    let (free, total) = ctx.mem_get_info()?;
    Ok(Gpu {
        ordinal,
        name: ctx.name()?,
        compute_capability: ctx.compute_capability()?,
        total_bytes: total,
        free_bytes: free,
    })
}
