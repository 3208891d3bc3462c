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
source "$(dirname "$0")/device_env.sh"

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
