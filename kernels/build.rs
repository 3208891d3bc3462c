//! With the `cuda` feature: compile every `cuda/*.cu` with nvcc into an sm_90a cubin and a
//! compute_90 PTX (the JIT fallback for other GPUs), and generate `kernels_gen.rs`, which
//! embeds both with `include_bytes!`. Without the feature: nothing to do.

use std::path::{Path, PathBuf};
use std::process::Command;

const PIP_HINT: &str = "python3 -m pip install \"cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,nvrtc]==13.0.2\" \
     and point NVCC at <site-packages>/nvidia/cu13/bin/nvcc (or put that folder on PATH)";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build() {
        eprintln!("error: kernels (feature `cuda`): {e}");
        std::process::exit(1);
    }
    if std::env::var_os("CARGO_FEATURE_CUDNN").is_some()
        && let Err(e) = build_cudnn_shim()
    {
        eprintln!("error: kernels (feature `cudnn`): {e}");
        std::process::exit(1);
    }
}

const CUDNN_HINT: &str = "set CUDNN_FRONTEND_INCLUDE=<site-packages>/include (pip nvidia-cudnn-frontend==1.32.0) \
     and CUDNN_INCLUDE=<site-packages>/nvidia/cudnn/include (pip nvidia-cudnn-cu13==9.19.0.56; headers only)";

/// The cuDNN shims under `cudnn/`: SDPA (which also owns the dlopen of cuDNN) and convolution.
const CUDNN_SOURCES: [&str; 2] = ["sdpa", "conv"];

/// The cuDNN shims (`cudnn/sdpa.cpp`, `cudnn/conv.cpp`): one g++ call per file, archived as one static library. The
/// frontend loads cuDNN, cudart and libcuda with dlopen, so nothing CUDA is linked.
fn build_cudnn_shim() -> Result<(), String> {
    for v in [
        "CUDNN_FRONTEND_INCLUDE",
        "CUDNN_INCLUDE",
        "CUDA_INCLUDE",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    for name in CUDNN_SOURCES {
        println!("cargo:rerun-if-changed=cudnn/{name}.cpp");
    }
    let env_dir = |v: &str| -> Result<PathBuf, String> {
        let p = PathBuf::from(
            std::env::var_os(v).ok_or_else(|| format!("{v} is not set; {CUDNN_HINT}"))?,
        );
        if p.is_dir() {
            Ok(p)
        } else {
            Err(format!("{v}={} is not a folder; {CUDNN_HINT}", p.display()))
        }
    };
    let fe = env_dir("CUDNN_FRONTEND_INCLUDE")?;
    let cudnn = env_dir("CUDNN_INCLUDE")?;
    let cuda = match std::env::var_os("CUDA_INCLUDE") {
        Some(p) => PathBuf::from(p),
        // The pip toolkit keeps its headers next to bin/: nvidia/cu13/{bin,include}.
        None => find_nvcc()?
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("include"))
            .ok_or("cannot derive CUDA_INCLUDE from nvcc")?,
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    // One g++ per file, in parallel (two cores on CI).
    let jobs: Vec<_> = CUDNN_SOURCES
        .iter()
        .map(|name| {
            let (cxx, fe, cudnn, cuda) = (cxx.clone(), fe.clone(), cudnn.clone(), cuda.clone());
            let obj = out_dir.join(format!("{name}.o"));
            std::thread::spawn(move || -> Result<PathBuf, String> {
                let src = format!("cudnn/{name}.cpp");
                let o = Command::new(&cxx)
                    .args([
                        "-std=c++17",
                        "-O2",
                        "-fPIC",
                        "-c",
                        "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING",
                    ])
                    .arg("-I")
                    .arg(&fe)
                    .arg("-I")
                    .arg(&cudnn)
                    .arg("-I")
                    .arg(&cuda)
                    .arg(&src)
                    .arg("-o")
                    .arg(&obj)
                    .output()
                    .map_err(|e| format!("cannot run {cxx}: {e}"))?;
                if !o.status.success() {
                    return Err(format!(
                        "{cxx} failed on {src}:\n{}",
                        String::from_utf8_lossy(&o.stderr)
                    ));
                }
                Ok(obj)
            })
        })
        .collect();
    let mut objs = Vec::new();
    for j in jobs {
        objs.push(j.join().map_err(|_| "g++ thread panicked".to_string())??);
    }
    let lib = out_dir.join("liblava_cudnn_sdpa.a");
    let _ = std::fs::remove_file(&lib);
    let o = Command::new("ar")
        .arg("rcs")
        .arg(&lib)
        .args(&objs)
        .output()
        .map_err(|e| format!("cannot run ar: {e}"))?;
    if !o.status.success() {
        return Err(format!("ar failed: {}", String::from_utf8_lossy(&o.stderr)));
    }
    println!("cargo:rustc-link-search=native={}", out_dir.display());
    println!("cargo:rustc-link-lib=static=lava_cudnn_sdpa");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rustc-link-lib=dylib=dl");
    Ok(())
}

fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("NVCC") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("NVCC={} does not exist; {PIP_HINT}", p.display()))
        };
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "nvcc not found (NVCC, CUDA_HOME/bin, PATH); {PIP_HINT}"
    ))
}

fn nvcc(nvcc: &Path, args: &[&str], src: &Path, out: &Path) -> Result<(), String> {
    let o = Command::new(nvcc)
        .args(["-std=c++17", "-O3", "-lineinfo"])
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !o.status.success() {
        return Err(format!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

fn build() -> Result<(), String> {
    let nvcc_path = find_nvcc()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let src_dir = Path::new("cuda");
    println!("cargo:rerun-if-changed=cuda");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(src_dir).map_err(|e| format!("kernels/cuda: {e}"))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().is_some_and(|e| e == "cu")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    // Two cores on CI: compile files in parallel, two nvcc jobs per file.
    let jobs: Vec<_> = names
        .iter()
        .map(|name| {
            let (nvcc_path, out_dir) = (nvcc_path.clone(), out_dir.clone());
            let src = src_dir.join(format!("{name}.cu"));
            let name = name.clone();
            std::thread::spawn(move || -> Result<(), String> {
                nvcc(
                    &nvcc_path,
                    &["-cubin", "-gencode", "arch=compute_90a,code=sm_90a"],
                    &src,
                    &out_dir.join(format!("{name}.cubin")),
                )?;
                nvcc(
                    &nvcc_path,
                    &["-ptx", "-arch=compute_90"],
                    &src,
                    &out_dir.join(format!("{name}.ptx")),
                )
            })
        })
        .collect();
    for j in jobs {
        j.join().map_err(|_| "nvcc thread panicked".to_string())??;
    }
    let mut gen_rs = String::from("/// (module name, sm_90a cubin, compute_90 PTX)\n");
    gen_rs.push_str("pub(crate) const MODULES: &[(&str, &[u8], &str)] = &[\n");
    for n in &names {
        gen_rs.push_str(&format!(
            "    (\"{n}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.cubin\")), \
             include_str!(concat!(env!(\"OUT_DIR\"), \"/{n}.ptx\"))),\n"
        ));
    }
    gen_rs.push_str("];\n");
    std::fs::write(out_dir.join("kernels_gen.rs"), gen_rs).map_err(|e| e.to_string())
}
