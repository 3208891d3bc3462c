#!/usr/bin/env bash
# Follow-up to dit_run.sh: the same call through the PyTorch reference in f32 (same bf16-valued
# weights and inputs), to tell lava's bf16 error from the reference's own; and dit-bench on the
# project's own attention kernel (LAVA_ATTENTION=own) for the fallback path's time.
# BIN holds dit-bench and the bf16 outputs of dit_run.sh (lava_out.f32, torch_out.f32).
#   usage: benches/dit_f32_check.sh BIN LOG_DIR
set -uo pipefail
BIN=${1:?binary folder}
LOG_DIR=${2:?log folder}
mkdir -p "$LOG_DIR"
source "$(dirname "$0")/device_env.sh"
echo "== PyTorch reference, f32"
PYTHONUNBUFFERED=1 python3 tests/reference/bench_ref.py --dtype f32 --hash-seed 0 --fill-ring \
  --warmup 0 --iters 1 --dump "$LOG_DIR/torch_f32_out.f32" 2>&1 | tee "$LOG_DIR/torch_f32.txt"
echo "== dit-bench, LAVA_ATTENTION=own"
LAVA_ATTENTION=own "$BIN/dit-bench" --seed 0 --warmup 2 --iters 5 --dump "$LOG_DIR/lava_own_out.f32" 2>&1 \
  | tee "$LOG_DIR/dit_bench_own.txt"
echo "== rel L2 against the f32 reference"
python3 - "$BIN" "$LOG_DIR" <<'PY' 2>&1 | tee "$LOG_DIR/f32_summary.txt"
import sys, numpy as np
b, l = sys.argv[1:3]
ld = lambda p: np.fromfile(p, dtype="<f4").astype(np.float64)
ref = ld(f"{l}/torch_f32_out.f32")
rel = lambda a: np.linalg.norm(a - ref) / np.linalg.norm(ref)
for name, p in [("lava bf16 (cuDNN)", f"{b}/lava_out.f32"), ("PyTorch bf16", f"{b}/torch_out.f32"),
                ("lava bf16 (own attention)", f"{l}/lava_own_out.f32")]:
    print(f"rel L2 vs PyTorch f32: {name:<28} {rel(ld(p)):.2e}")
PY
