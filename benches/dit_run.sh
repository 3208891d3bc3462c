#!/usr/bin/env bash
# One GPU session for the full-size DiT: lava's dit-bench, then the PyTorch reference on the
# same seeded weights and inputs, then the comparison table (benches/dit_compare.py).
# dit-bench is built on the CPU machine (`cargo build --release -p benches --features cuda
# --bins`) and copied with the plan (`lava plan --gpus H200 --size '704*384'
# --num_gpus_dit 1 --json`) into BIN.
#   usage: benches/dit_run.sh BIN LOG_DIR
set -uo pipefail
BIN=${1:?binary folder}
LOG_DIR=${2:?log folder}
mkdir -p "$LOG_DIR"
source "$(dirname "$0")/device_env.sh"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -m pip list 2>/dev/null | grep -Ei '^(torch|nvidia-cudnn)' || true
} 2>&1 | tee "$LOG_DIR/env.txt"
seed=0
echo "== dit-bench"
"$BIN/dit-bench" --seed $seed --warmup 3 --iters 10 --dump "$LOG_DIR/lava_out.f32" 2>&1 | tee "$LOG_DIR/dit_bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
echo "== PyTorch reference"
PYTHONUNBUFFERED=1 python3 tests/reference/bench_ref.py --hash-seed $seed --fill-ring --warmup 3 --iters 10 \
  --dump "$LOG_DIR/torch_out.f32" 2>&1 | tee "$LOG_DIR/torch.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
echo "== summary"
python3 benches/dit_compare.py "$LOG_DIR/dit_bench.txt" "$LOG_DIR/torch.txt" "$BIN/plan.json" \
  "$LOG_DIR/lava_out.f32" "$LOG_DIR/torch_out.f32" 2>&1 | tee "$LOG_DIR/summary.txt"
