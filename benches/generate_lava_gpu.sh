#!/usr/bin/env bash
# `lava generate` itself on GPUs: the launcher spawns one lava-worker per GPU, the ranks form an
# NCCL communicator from rank 0's id, load the full-size s2v-14b in bf16 from seeded random
# weights, and the decoding rank streams frames to the launcher, which writes the MP4 with the
# audio. MODE `smoke` (one H100): the tiny model on CUDA, then s2v-14b on one GPU for two clips at 480×256.
# MODE `multi` (4 GPUs): s2v-14b on one GPU (the reference), TPP 4 stages with the VAE
# co-located on the last, tensor parallel 4 in one stage, and 2 stages × tp 2, 3 clips each at
# 704×384; then
# the 4-GPU latents against the one-GPU run (bf16, rel L2 ≤ 1e-2) and a short table.
# BIN holds `lava`, `lava-worker` (built with --features cudnn) and ffmpeg.xz (a static
# ffmpeg; the GPU machine has none). Each step runs whatever the previous did (set +e).
# MODE `checks` (4 GPUs): TPP 4 and TP 4 again (planned vs measured memory as printed), a
# SIGKILL of a middle stage mid-generation, and a tiny checkpoint folder read locally by every
# rank vs read by rank 0 only and sent over NCCL (--weights_from_rank0): identical latents.
# MODE `ckpt` (3 GPUs): only that checkpoint comparison. MODE `layouts` (4 GPUs): TPP 2 ×
# Ulysses 2, Ulysses 4 with FSDP, TPP 2 × layer pipeline 2, each against one GPU.
#   usage: benches/generate_lava_gpu.sh BIN OUT smoke|multi|checks|ckpt|layouts
set -uo pipefail
BIN=$(cd "${1:?binary folder}" && pwd)
OUT=${2:?output folder}
MODE=${3:?smoke, multi, checks, ckpt or layouts}
LOG="$OUT/generate"
mkdir -p "$LOG"
source "$(dirname "$0")/device_env.sh"
if [ ! -x /tmp/lava-ffmpeg/ffmpeg ]; then
  mkdir -p /tmp/lava-ffmpeg && xz -dc "$BIN/ffmpeg.xz" > /tmp/lava-ffmpeg/ffmpeg && chmod +x /tmp/lava-ffmpeg/ffmpeg
fi
export PATH=/tmp/lava-ffmpeg:$PATH
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  echo "cores: $(nproc)"
  ffmpeg -version | head -1
} 2>&1 | tee "$LOG/env.txt"

data=media/tests/data
# 2.6 s of speech ×4: enough audio for 3 clips (each clip needs 1.92 s).
ffmpeg -v error -y -stream_loop 3 -i "$data/speech_44k.mp3" -ac 1 -ar 16000 "$LOG/speech.wav"
ngpu=$(nvidia-smi -L | wc -l)

step() { # name, wall limit (s), lava generate arguments…
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: lava generate $*" | tee "$LOG/$name.txt"
  timeout -k 10 "$limit" "$BIN/lava" generate --worker-bin "$BIN/lava-worker" \
    --image "$data/boy.jpg" --audio "$LOG/speech.wav" --prompt "a boy talking" \
    --save_file "$LOG/$name.mp4" --save_latents "$LOG/$name.f32" "$@" >> "$LOG/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG/$name.txt" "$LOG/steps.txt"
  ffmpeg -hide_banner -i "$LOG/$name.mp4" 2>&1 | grep -E 'Duration|Stream' | sed "s/^/$name mp4: /" >> "$LOG/steps.txt"
  pgrep -a lava-worker >> "$LOG/steps.txt" && echo "$name: ORPHAN lava-worker" >> "$LOG/steps.txt"
}

ckpt_steps() {
  # A tiny checkpoint folder (the committed fixtures, as tests/generate_ckpt.rs assembles it),
  # read by every rank, then only by rank 0 with the other ranks receiving over NCCL.
  f=tests/fixtures
  ck=/tmp/lava-ckpt/Wan2.2-S2V-14B
  mkdir -p "$ck/google/umt5-xxl" "$ck/wav2vec2-large-xlsr-53-english"
  cp $f/dit_tiny/checkpoint/*.json $f/dit_tiny/checkpoint/*.safetensors "$ck/"
  cp $f/vae_tiny/Wan2.1_VAE.pth $f/t5_tiny/models_t5_umt5-xxl-enc-bf16.pth "$ck/"
  cp $f/t5_tiny/tokenizer/tokenizer.json "$ck/google/umt5-xxl/"
  cp $f/wav2vec2_tiny/config.json $f/wav2vec2_tiny/model.safetensors "$ck/wav2vec2-large-xlsr-53-english/"
  tiny=(--model tiny --backend cuda --size '128*64' --gpus 3xH200 --num_gpus_dit 2 --tp 2 --enable_vae_parallel
        --ckpt_dir "$ck" --lora_path_dmd $f/dit_tiny/lora/liveavatar.safetensors --num_clip 2)
  step ckpt_local 120 "${tiny[@]}"
  step ckpt_rank0 120 "${tiny[@]}" --weights_from_rank0
  grep -h "received its weights\|served\|encoded the prompt" "$LOG/ckpt_rank0.txt" | head -6 | sed 's/^/ckpt_rank0: /' >> "$LOG/steps.txt"
  step ckpt_local2 120 "${tiny[@]}"
  # bf16 on GPUs: the same load twice shows the run-to-run spread to set the transfer against.
  for pair in "ckpt_local ckpt_rank0" "ckpt_local ckpt_local2"; do
    set -- $pair
    python3 - "$LOG/$1.f32" "$LOG/$2.f32" "$2 vs $1" <<'PY' 2>&1 | tee -a "$LOG/steps.txt"
import sys, numpy as np
a = np.fromfile(sys.argv[1], dtype="<f4").astype(np.float64)
b = np.fromfile(sys.argv[2], dtype="<f4").astype(np.float64)
same = a.size == b.size and bool((a == b).all())
rel = np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30) if a.size == b.size else float("nan")
print(f"COMPARE {sys.argv[3]}: {a.size} values, identical {same}, rel L2 {rel:.3e}")
PY
  done
}

against_single() { # layouts whose latents are compared with the one-GPU run's
  echo "== latents against the one-GPU run" | tee -a "$LOG/steps.txt"
  for l in "$@"; do
    python3 - "$LOG/single.f32" "$LOG/$l.f32" "$l" <<'PY' 2>&1 | tee -a "$LOG/steps.txt"
import sys, numpy as np
a = np.fromfile(sys.argv[1], dtype="<f4").astype(np.float64)
b = np.fromfile(sys.argv[2], dtype="<f4").astype(np.float64)
n = min(a.size, b.size)
ok = a.size == b.size and n > 0
rel = np.linalg.norm(b[:n] - a[:n]) / max(np.linalg.norm(a[:n]), 1e-30) if n else float("nan")
print(f"COMPARE {sys.argv[3]} vs single: {n} values, rel L2 {rel:.3e}, sizes equal {ok}, "
      f"finite {np.isfinite(b).all()}, {'PASS' if ok and rel <= 1e-2 else 'FAIL'} (tol 1e-2)")
PY
  done
}

s2v=(--model s2v-14b --backend cuda --size '704*384')
case $MODE in
smoke)
  step tiny1 120 --model tiny --backend cuda --gpus 1xH100 --size '128*64' --num_clip 2
  step s2v1 300 --model s2v-14b --backend cuda --size '480*256' --gpus 1xH100 --num_gpus_dit 1 --enable_vae_parallel false --num_clip 2
  ;;
multi)
  step single 150 "${s2v[@]}" --gpus 1xH200 --num_gpus_dit 1 --enable_vae_parallel false --num_clip 3
  step tpp4 180 "${s2v[@]}" --gpus 4xH200 --num_gpus_dit 4 --enable_vae_parallel false --num_clip 3
  step tp4 180 "${s2v[@]}" --gpus 4xH200 --num_gpus_dit 4 --tp 4 --enable_vae_parallel false --num_clip 3
  step tpp2tp2 150 "${s2v[@]}" --gpus 4xH200 --num_gpus_dit 4 --tp 2 --enable_vae_parallel false --num_clip 3
  against_single tpp4 tp4 tpp2tp2
  ;;
layouts)
  # The other layer types and their compositions through lava generate, against one GPU.
  step single 150 "${s2v[@]}" --gpus 1xH200 --num_gpus_dit 1 --enable_vae_parallel false --num_clip 3
  d4=("${s2v[@]}" --gpus 4xH200 --num_gpus_dit 4 --enable_vae_parallel false --num_clip 3)
  step tpp2sp2 150 "${d4[@]}" --ulysses_size 2
  step sp4fsdp 150 "${d4[@]}" --ulysses_size 4 --fsdp
  step tpp2pp2 150 "${d4[@]}" --pp 2
  against_single tpp2sp2 sp4fsdp tpp2pp2
  ;;
checks)
  # The plan's per-rank peaks as lava generate prints them beside the measured ones.
  step tpp4 180 "${s2v[@]}" --gpus 4xH200 --num_gpus_dit 4 --enable_vae_parallel false --num_clip 3
  step tp4 180 "${s2v[@]}" --gpus 4xH200 --num_gpus_dit 4 --tp 4 --enable_vae_parallel false --num_clip 3
  # SIGKILL of a middle stage (rank 2) of a TPP 4 job after its second block: the whole job
  # must end within 10 s with peer-lost (exit 5) naming rank 2, and leave no worker behind.
  log=$LOG/kill.txt
  "$BIN/lava" generate --worker-bin "$BIN/lava-worker" --image "$data/boy.jpg" --audio "$LOG/speech.wav" \
    --save_file "$LOG/kill.mp4" "${s2v[@]}" --gpus 4xH200 --num_gpus_dit 4 --enable_vae_parallel false \
    --num_clip 3 > "$log" 2>&1 &
  lp=$!
  for _ in $(seq 900); do grep -q "blocks 2/" "$log" && break; sleep 0.2; done
  victim=$(grep -oP "rank 2 registered: \w+, pid \K[0-9]+" "$log" | head -1)
  t0=$(date +%s.%N)
  kill -9 "$victim"
  wait $lp
  rc=$?
  t1=$(date +%s.%N)
  left=$(pgrep -c lava-worker)
  echo "kill: rank 2 (pid $victim) killed; lava exit $rc after $(python3 -c "print(round($t1 - $t0, 2))") s; workers left: $left" | tee -a "$LOG/steps.txt"
  grep -E "lava: error|exit code" "$log" | sed 's/^/kill: /' | tee -a "$LOG/steps.txt"
  ckpt_steps
  ;;
ckpt)
  ckpt_steps
  ;;
esac

echo "== summary"
cat "$LOG/steps.txt"
for f in "$LOG"/*.txt; do
  case $f in */steps.txt|*/env.txt) continue ;; esac
  echo "-- $(basename "$f" .txt)"
  grep -E 'summary|stage [0-9]+:|decode:|slowest|measured|loaded|wrote|error|VAE encode' "$f" | tail -18
done
