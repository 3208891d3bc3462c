#!/usr/bin/env bash
# One GPU session for the VAE and encoder speed work (issue 5 item 7), on one H200:
#   1. CUDA tests of the VAE paths against the CPU reference (cuda_vae, vae_ops, the VAE
#      golden tests' *_cuda cases);
#   2. `vae-bench` with autotuned cuDNN engines (LAVA_CONV=tune), with the heuristic ones,
#      once more with per-op device times (LAVA_PROFILE=1), then
#      `benches/vae_torch.py` (PyTorch eager, same shapes) in the same session;
#   3. `encoders-bench --only t5` (umT5-XXL, 512 tokens) and `benches/encoders_torch.py`.
# (`vae-bench --convs` times the conv shapes alone; `encoders-bench` without --only adds
# wav2vec2-large on 10 s.)
# Every step runs even when an earlier one fails; logs under OUT/vae/; a table at the end.
# Binaries are built on the CPU machine (see docs/benchmarks.md) and copied into BIN:
#   BIN/vae-bench, BIN/encoders-bench, BIN/tests/{cuda_vae,vae_ops,vae_golden} (each may
#   be xz-compressed as NAME.xz; they are then unpacked to /tmp first).
#   usage: bash benches/vae_gpu.sh BIN OUT
set -uo pipefail
BIN=${1:?binary folder}
OUT=${2:?output folder}
LOG=$OUT/vae
mkdir -p "$LOG"
# Binaries may come xz-compressed (the carried folder is size-limited): unpack to /tmp.
if ls "$BIN"/*.xz "$BIN"/tests/*.xz >/dev/null 2>&1; then
  mkdir -p /tmp/lava-vae-bin/tests
  for f in "$BIN"/*.xz "$BIN"/tests/*.xz; do
    rel=${f#"$BIN"/}
    python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$f" "/tmp/lava-vae-bin/${rel%.xz}" && chmod +x "/tmp/lava-vae-bin/${rel%.xz}"
  done
  BIN=/tmp/lava-vae-bin
fi
source "$(dirname "$0")/device_env.sh"
# cuDNN first: PyTorch's cudnn 9.19 wheel, before any older copy on the path.
export LD_LIBRARY_PATH=$site/nvidia/cudnn/lib:$LD_LIBRARY_PATH
# The test binaries find their fixtures through the build machine's path.
if [ ! -e /work/main/tests/fixtures ]; then mkdir -p /work && ln -sfn "$PWD" /work/main; fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -m pip list 2>/dev/null | grep -Ei '^(torch|nvidia-cudnn)' || true
} 2>&1 | tee "$LOG/env.txt"

status=()
step() {  # step NAME SECONDS CMD...: run with a time limit, log to LOG/NAME.txt
  local name=$1 secs=$2
  shift 2
  echo "== $name"
  local t0=$SECONDS
  timeout "$secs" "$@" >"$LOG/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$LOG/$name.txt"
  status+=("$name rc=$rc $((SECONDS - t0))s")
}

# Run 1 (2026-11-21 16:46Z) also ran LAVA_CONV=cl / tune-cl, `vae-bench --convs`, the
# conv3d op test and the wav2vec2 timings (docs/benchmarks.md); run 2 keeps what changed.
step test_cuda_vae 40 "$BIN/tests/cuda_vae" --test-threads 1
step test_vae_ops 20 "$BIN/tests/vae_ops"
step test_vae_golden 60 "$BIN/tests/vae_golden" --test-threads 1 cuda
step vae_bench_tune 90 env LAVA_CONV=tune "$BIN/vae-bench" --warmup 2 --iters 5
step vae_bench 45 "$BIN/vae-bench" --warmup 2 --iters 5
step vae_profile 45 env LAVA_PROFILE=1 "$BIN/vae-bench" --warmup 1 --iters 1
step vae_torch 60 env PYTHONUNBUFFERED=1 python3 benches/vae_torch.py --warmup 2 --iters 5
step encoders 90 "$BIN/encoders-bench" --warmup 2 --iters 5 --only t5
step encoders_torch 60 env PYTHONUNBUFFERED=1 python3 benches/encoders_torch.py --warmup 2 --iters 5 --only t5

echo "== summary"
{
  printf '%s\n' "${status[@]}"
  for f in "$LOG"/vae_bench*.txt; do echo "$(basename "$f"): $(grep -o 'conv3d: .*' "$f")"; done
  grep -h "^test result\|FAILED\|panicked" "$LOG"/test_*.txt
  grep "^RESULT" "$LOG"/*.txt | sed "s|^$LOG/||"
  grep -h "^PROFILE" "$LOG"/vae_profile.txt | head -24
} 2>&1 | tee "$LOG/summary.txt"
