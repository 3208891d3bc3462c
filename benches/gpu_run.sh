#!/usr/bin/env bash
# One GPU session: environment, `lava-worker doctor`, every CUDA op test, then the GEMM and
# attention benchmarks next to PyTorch. Binaries are built on the CPU machine
# (`cargo build --release --features cuda`, test binaries with `cargo test --no-run`) and
# copied into $BIN (bin/ and tests/). Logs go to $LOG_DIR.
#   usage: benches/gpu_run.sh BIN LOG_DIR
set -uo pipefail
BIN=${1:?binary folder}
LOG_DIR=${2:?log folder}
mkdir -p "$LOG_DIR"
export NCCL_NVLS_ENABLE=0
site=$(python3 -c 'import site;print(site.getsitepackages()[0])')
shim=/tmp/lava-cuda-shim
mkdir -p "$shim"
# pip's NCCL ships only libnccl.so.2 and cudarc looks for libnccl.so (and libcublas.so).
ln -sf "$(ls "$site"/nvidia/nccl/lib/libnccl.so.2)" "$shim/libnccl.so"
ln -sf "$(ls "$site"/nvidia/cu*/lib/libcublas.so.* "$site"/nvidia/cublas/lib/libcublas.so.* 2>/dev/null | head -1)" "$shim/libcublas.so"
export LD_LIBRARY_PATH=$shim:$(ls -d "$site"/nvidia/*/lib | tr '\n' :)${LD_LIBRARY_PATH:-}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -m pip list 2>/dev/null | grep -Ei '^(torch|nvidia-(nccl|cudnn|cublas|cuda-nvrtc|cuda-runtime))' || true
} 2>&1 | tee "$LOG_DIR/env.txt"

echo "== lava-worker doctor" | tee "$LOG_DIR/doctor.txt"
"$BIN/bin/lava-worker" doctor 2>&1 | tee -a "$LOG_DIR/doctor.txt"
echo "doctor exit: ${PIPESTATUS[0]}" | tee -a "$LOG_DIR/doctor.txt"

status=0
: > "$LOG_DIR/tests.txt"
for t in "$BIN"/tests/*; do
  echo "== $(basename "$t") --test-threads 1" | tee -a "$LOG_DIR/tests.txt"
  "$t" --test-threads 1 2>&1 | tee -a "$LOG_DIR/tests.txt"
  rc=${PIPESTATUS[0]}
  echo "exit: $rc" | tee -a "$LOG_DIR/tests.txt"
  [ "$rc" = 0 ] || status=1
done

# With the `cudnn` feature the attention tests above ran cuDNN's SDPA; run them again on the
# project's own kernel.
for t in ops_linalg cuda_vs_cpu; do
  [ -x "$BIN/tests/$t" ] || continue
  echo "== LAVA_ATTENTION=own $t --test-threads 1" | tee -a "$LOG_DIR/tests.txt"
  LAVA_ATTENTION=own "$BIN/tests/$t" --test-threads 1 2>&1 | tee -a "$LOG_DIR/tests.txt"
  rc=${PIPESTATUS[0]}
  echo "exit: $rc" | tee -a "$LOG_DIR/tests.txt"
  [ "$rc" = 0 ] || status=1
done

echo "== gpu-bench" | tee "$LOG_DIR/bench.txt"
"$BIN/bin/gpu-bench" 2>&1 | tee -a "$LOG_DIR/bench.txt"
echo "== torch" | tee -a "$LOG_DIR/bench.txt"
python3 benches/gpu_torch.py "$LOG_DIR/bench.txt" 2>&1 | tee -a "$LOG_DIR/bench.txt"
exit $status
