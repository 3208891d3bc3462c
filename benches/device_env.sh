# Sourced by the GPU scripts in benches/: the GPU machine's CUDA libraries (cuBLAS, NCCL,
# cuDNN, NVRTC) come from PyTorch's pip wheels, not from a system install, so put their lib
# folders on LD_LIBRARY_PATH. pip's NCCL ships only libnccl.so.2 and cuBLAS only
# libcublas.so.N, while cudarc opens libnccl.so and libcublas.so: a shim folder of symlinks
# gives it those names. NVLink SHARP (NVLS) stays off on the lent machines.
site=$(python3 -c 'import site;print(site.getsitepackages()[0])')
shim=/tmp/lava-cuda-shim
mkdir -p "$shim"
ln -sf "$(ls "$site"/nvidia/nccl/lib/libnccl.so.2)" "$shim/libnccl.so"
ln -sf "$(ls "$site"/nvidia/cu*/lib/libcublas.so.* "$site"/nvidia/cublas/lib/libcublas.so.* 2>/dev/null | head -1)" "$shim/libcublas.so"
export LD_LIBRARY_PATH=$shim:$(ls -d "$site"/nvidia/*/lib | tr '\n' :)${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
