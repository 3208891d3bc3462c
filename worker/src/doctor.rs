//! `lava-worker doctor`: what CUDA this machine offers, without panicking.
//!
//! Probes the driver, GPUs (name, compute capability, memory) and the libraries the
//! runtime loads at run time (CUDA runtime, NVRTC, cuBLAS, cuBLASLt, NCCL, cuDNN), then
//! loads lava's embedded kernels and a cuBLASLt handle on every GPU. Prints a report and
//! exits 0 when everything was found, 1 otherwise, with the fix. `lava doctor` runs this
//! binary, so the launcher never links CUDA.

use std::process::ExitCode;

/// Print the report; exit 0 if everything needed was found.
pub fn run() -> ExitCode {
    println!("lava doctor (lava-worker {})", env!("CARGO_PKG_VERSION"));
    if report() {
        println!("result: ok");
        ExitCode::SUCCESS
    } else {
        println!("result: NOT READY (see above)");
        ExitCode::from(1)
    }
}

#[cfg(not(feature = "cuda"))]
fn report() -> bool {
    println!(
        "  MISSING  CUDA support               this lava-worker was built without `--features cuda`"
    );
    println!(
        "fix: cargo build --release --features cuda (needs nvcc: python3 -m pip install \"cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,nvrtc]==13.0.2\")"
    );
    false
}

#[cfg(feature = "cuda")]
fn report() -> bool {
    use runtime::device::cuda;
    let r = cuda::probe();
    print!("{r}");
    if r.nccl == cuda::Found::No
        && let Some(dir) = find_on_ld_path("libnccl.so.2")
    {
        println!(
            "fix: NCCL's pip wheel ships only libnccl.so.2 ({dir}), which cudarc does not look for:\n     \
             mkdir -p /tmp/lava-cuda-shim && ln -sf {dir}/libnccl.so.2 /tmp/lava-cuda-shim/libnccl.so && \
             export LD_LIBRARY_PATH=/tmp/lava-cuda-shim:$LD_LIBRARY_PATH"
        );
    }
    let mut ok = r.ok();
    // Only touch the GPUs when the libraries they need are there (cudarc panics otherwise).
    if r.driver != cuda::Found::No && r.cublaslt != cuda::Found::No {
        for g in &r.gpus {
            match cuda::check_kernels(g.ordinal) {
                Ok(line) => println!("  ok       GPU {}: {line}", g.ordinal),
                Err(e) => {
                    println!("  ERROR    GPU {}: {e}", g.ordinal);
                    ok = false;
                }
            }
        }
    }
    ok
}

/// The first `LD_LIBRARY_PATH` folder holding `name`.
#[cfg(feature = "cuda")]
fn find_on_ld_path(name: &str) -> Option<String> {
    let paths = std::env::var_os("LD_LIBRARY_PATH")?;
    std::env::split_paths(&paths)
        .find(|d| d.join(name).is_file())
        .map(|d| d.display().to_string())
}
