#!/usr/bin/env bash
# Issue #6 on one host with 4 GPUs (H200): the full-size s2v-14b DiT in bf16 with seeded random
# weights at 704×384, 2 clips (8 blocks), through tpp-bench: one GPU running every step (the
# reference), 4 TPP stages × 1 step with the VAE co-located on the last stage, and tensor
# parallel 4 in one stage with the VAE on GPU 0; then tpp4 and tp4 latents against the
# one-GPU run (bf16, rel L2 ≤ 1e-2), and a short table. Each step runs whatever the previous
# did (set +e); logs and latents go to $OUT/multi/.
# Build (CPU machine): `cargo build --release -p benches --features cudnn --bin tpp-bench`
# (NVCC, CUDNN_FRONTEND_INCLUDE, CUDNN_INCLUDE as in .ci/run), strip, copy into BIN.
#   usage: benches/generate_gpu.sh BIN OUT
set -uo pipefail
BIN=${1:?binary folder}
OUT=${2:?output folder}
LOG="$OUT/multi"
mkdir -p "$LOG"
source "$(dirname "$0")/device_env.sh"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  nproc
  python3 -m pip list 2>/dev/null | grep -Ei '^(torch|nvidia-(nccl|cudnn))' || true
} 2>&1 | tee "$LOG/env.txt"

common=(--model s2v-14b --size '704*384' --clips 2 --seed 0 --gpu H200 --out "$LOG")
step() { # name, wall limit (s), tpp-bench arguments…
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: tpp-bench $*" | tee "$LOG/$name.txt"
  timeout -k 10 $((limit + 20)) "$BIN/tpp-bench" "$@" "${common[@]}" --timeout "$limit" 2>&1 | tee -a "$LOG/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG/$name.txt" "$LOG/steps.txt"
}
step single 150 --layout single
step tpp4 170 --layout tpp4
step tp4 170 --layout tp4

echo "== latents against the one-GPU run" | tee "$LOG/compare.txt"
for l in tpp4 tp4; do
  "$BIN/tpp-bench" compare "$LOG/single.latents.f32" "$LOG/$l.latents.f32" --blocks 8 --tol 1e-2 2>&1 | tee -a "$LOG/compare.txt"
done

echo "== summary"
cat "$LOG/steps.txt"
grep -h '^SUMMARY' "$LOG/single.txt" "$LOG/tpp4.txt" "$LOG/tp4.txt" | sed 's/^SUMMARY //'
grep -h '^COMPARE' "$LOG/compare.txt"
