#!/usr/bin/env bash
# One GPU session for the VAE and encoder speed work (issue 5 item 7), on one H200:
#   1. CUDA tests of the VAE paths against the CPU reference (cuda_vae, the VAE golden tests'
#      *_cuda cases, ops_linalg's conv3d_cuda);
#   2. `vae-bench --convs`: the decoder's conv shapes through cuDNN alone (NCDHW / NDHWC,
#      heuristic / autotuned engines);
#   3. `vae-bench` (cuDNN heuristic engines), then with LAVA_CONV=tune / cl / tune-cl
#      (autotuned engines; channels-last convs with transposes around them), once more
#      with per-op device times (LAVA_PROFILE=1), then
#      `benches/vae_torch.py` (PyTorch eager, same shapes) in the same session;
#   4. `encoders-bench` (umT5-XXL 512 tokens, wav2vec2-large 10 s) and
#      `benches/encoders_torch.py`.
# Every step runs even when an earlier one fails; logs under OUT/vae/; a table at the end.
# Binaries are built on the CPU machine (see docs/benchmarks.md) and copied into BIN:
#   BIN/vae-bench, BIN/encoders-bench, BIN/tests/{cuda_vae,vae_golden,ops_linalg} (each may
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
site=$(python3 -c 'import site;print(site.getsitepackages()[0])')
shim=/tmp/lava-cuda-shim
mkdir -p "$shim"
ln -sf "$(ls "$site"/nvidia/nccl/lib/libnccl.so.2)" "$shim/libnccl.so"
ln -sf "$(ls "$site"/nvidia/cu*/lib/libcublas.so.* "$site"/nvidia/cublas/lib/libcublas.so.* 2>/dev/null | head -1)" "$shim/libcublas.so"
# cuDNN first: PyTorch's cudnn 9.19 wheel, before any older copy on the path.
export LD_LIBRARY_PATH=$shim:$site/nvidia/cudnn/lib:$(ls -d "$site"/nvidia/*/lib | tr '\n' :)${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
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

step test_cuda_vae 60 "$BIN/tests/cuda_vae" --test-threads 1
step test_cuda_vae_cl 60 env LAVA_CONV=cl "$BIN/tests/cuda_vae" --test-threads 1
step test_vae_golden 90 "$BIN/tests/vae_golden" --test-threads 1 cuda
step test_conv3d 40 "$BIN/tests/ops_linalg" --test-threads 1 conv3d_cuda
step convs 90 "$BIN/vae-bench" --convs --iters 5
step vae_bench 60 "$BIN/vae-bench" --warmup 2 --iters 5
step vae_bench_tune 90 env LAVA_CONV=tune "$BIN/vae-bench" --warmup 1 --iters 3
step vae_bench_cl 60 env LAVA_CONV=cl "$BIN/vae-bench" --warmup 1 --iters 3
step vae_bench_tune_cl 90 env LAVA_CONV=tune-cl "$BIN/vae-bench" --warmup 1 --iters 3
step vae_profile 45 env LAVA_PROFILE=1 "$BIN/vae-bench" --warmup 1 --iters 1
step vae_torch 90 env PYTHONUNBUFFERED=1 python3 benches/vae_torch.py --warmup 2 --iters 5
step encoders 120 "$BIN/encoders-bench" --warmup 2 --iters 5
step encoders_torch 120 env PYTHONUNBUFFERED=1 python3 benches/encoders_torch.py --warmup 2 --iters 5

echo "== summary"
{
  printf '%s\n' "${status[@]}"
  for f in "$LOG"/vae_bench*.txt; do echo "$(basename "$f"): $(grep -o 'conv3d: .*' "$f")"; done
  grep -h "^test result\|FAILED\|panicked" "$LOG"/test_*.txt
  grep "^RESULT" "$LOG"/*.txt | sed "s|^$LOG/||"
  grep -h "^PROFILE" "$LOG"/vae_profile.txt | head -14
} 2>&1 | tee "$LOG/summary.txt"
