#!/usr/bin/env bash
# One GPU session for the full-size DiT performance work (issue #4 item 6), every step run
# even when an earlier one fails; logs under OUT/dit/, a short table last.
#   1. the CUDA op tests of the executables present in BIN (ops_fused, ops_layout, ops; built
#      here with `cargo test --release -p runtime --features cudnn --test ops_fused --no-run`);
#      when ops_fused fails with the vectorised row paths, the benches run with LAVA_ROWWISE=0
#      (the scalar kernels, tested in the same run);
#   2. (DIT_PROFILE_RUN=1 only) dit-bench with LAVA_PROFILE=1 on every call;
#   3. dit-bench timed, output dumped, then 2 extra calls profiled (`--profile 2`: device time
#      per op kind and shape from CUDA events);
#   4. the PyTorch reference on the same seeded weights and inputs (tests/reference/bench_ref.py;
#      DIT_REF=reuse compares with BIN/torch_out.f32 and BIN/torch.txt of an earlier run instead);
#   5. benches/dit_compare.py (ms, TFLOP/s, speed-up, rel L2, memory vs plan).
# BIN holds dit-bench, plan.json (`lava plan --gpus H200 --size '704*384' --num_gpus_dit 1
# --json`) and the test executables, each possibly gzipped (NAME.gz, unpacked to a temp folder).
#   usage: benches/dit_gpu.sh BIN OUT
set -u
BIN=${1:?binary folder}
OUT=${2:?output folder}/dit
mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
unpack=$(mktemp -d)
for f in "$BIN"/*.gz; do
  [ -e "$f" ] || continue
  n=$(basename "${f%.gz}")
  gunzip -c "$f" > "$unpack/$n" && chmod +x "$unpack/$n"
done
exe() { if [ -x "$unpack/$1" ]; then echo "$unpack/$1"; else echo "$BIN/$1"; fi; }
declare -A rc
step() { # name, command...: run with a log, remember the exit status
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name"
  "$@" > "$OUT/$name.txt" 2>&1
  rc[$name]=$?
  tail -n 25 "$OUT/$name.txt"
  echo "-- $name: exit ${rc[$name]}, $((SECONDS - t0)) s"
}
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -m pip list 2>/dev/null | grep -Ei '^(torch|nvidia-cudnn)' || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for t in ops_fused ops_layout ops; do
  [ -x "$(exe $t)" ] && step "test_$t" "$(exe $t)" --test-threads 1 cuda
done
if [ -n "${rc[test_ops_fused]:-}" ] && [ "${rc[test_ops_fused]}" != 0 ]; then
  export LAVA_ROWWISE=0
  step test_ops_fused_scalar "$(exe ops_fused)" --test-threads 1 cuda
  echo "ops_fused failed with the vectorised row paths: benches run with LAVA_ROWWISE=0"
fi
if [ "${DIT_PROFILE_RUN:-0}" = 1 ]; then
  step profile env LAVA_PROFILE=1 "$(exe dit-bench)" --seed 0 --warmup 1 --iters 3
fi
step bench "$(exe dit-bench)" --seed 0 --warmup 3 --iters 10 --dump "$OUT/lava_out.f32" --profile 2
if [ "${DIT_REF:-run}" = reuse ]; then
  cp "$BIN/torch.txt" "$OUT/torch.txt"; cp "$BIN/torch_out.f32" "$OUT/torch_out.f32"
  rc[torch]=reused
else
  step torch env PYTHONUNBUFFERED=1 python3 tests/reference/bench_ref.py --hash-seed 0 --fill-ring \
    --warmup 3 --iters 10 --dump "$OUT/torch_out.f32"
fi
step compare python3 benches/dit_compare.py "$OUT/bench.txt" "$OUT/torch.txt" "$BIN/plan.json" \
  "$OUT/lava_out.f32" "$OUT/torch_out.f32"

echo "== profile (per call, top rows; the 2 calls after the timed ones)"
grep '^PROFILE' "$OUT/bench.txt" | head -n 45
echo "LAVA_ROWWISE=${LAVA_ROWWISE:-1}"
echo "== steps"
for k in "${!rc[@]}"; do echo "$k: ${rc[$k]}"; done | sort
grep -h 'test result' "$OUT"/test_*.txt 2>/dev/null
grep -E '^(RESULT|MEM total)' "$OUT/bench.txt"
tail -n 16 "$OUT/compare.txt"
