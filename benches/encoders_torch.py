"""PyTorch side of `encoders-bench`: the reference umT5-XXL encoder (tests/reference/t5_ref.py)
on 512 tokens and the reference wav2vec2-large (tests/reference/wav2vec2_ref.py) on 10 s of
16 kHz audio, full size, random weights, bf16 on one GPU, eager; each forward synchronised,
warm-up, median. Prints `RESULT torch_t5_forward …` and `RESULT torch_w2v_forward …` lines.

  usage: python3 benches/encoders_torch.py [--warmup 2] [--iters 5] [--tokens 512] [--seconds 10]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from t5_ref import T5Config, T5Encoder  # noqa: E402
from wav2vec2_ref import W2vConfig, Wav2Vec2  # noqa: E402


def timed(f, warmup: int, iters: int):
    times, y = [], None
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        y = f()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times), min(times), max(times), y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--only", choices=["t5", "w2v"], default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    # The references build index and mask tensors with default-device factories.
    torch.set_default_device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    with torch.no_grad():
        if a.only in (None, "t5"):
            bench_t5(a)
        if a.only in (None, "w2v"):
            bench_w2v(a)


def bench_t5(a) -> None:
    t0 = time.perf_counter()
    t5 = T5Encoder(T5Config()).to(torch.bfloat16).eval()
    print(f"t5 init {time.perf_counter() - t0:.1f} s")
    ids = torch.randint(0, T5Config().vocab, (1, a.tokens))
    mask = torch.ones(1, a.tokens, dtype=torch.long)
    med, lo, hi, y = timed(lambda: t5(ids, mask), a.warmup, a.iters)
    print(f"RESULT torch_t5_forward tokens {a.tokens} ms_median {med:.2f} ms_min {lo:.2f} "
          f"ms_max {hi:.2f} iters {a.iters} warmup {a.warmup} out {tuple(y.shape)} "
          f"finite {bool(torch.isfinite(y).all())}")
    del t5, y
    torch.cuda.empty_cache()


def bench_w2v(a) -> None:
    w2v = Wav2Vec2(W2vConfig()).to(torch.bfloat16).eval()
    n = int(a.seconds * 16000)
    tt = torch.arange(n, dtype=torch.float32) / 16000
    wav = (torch.sin(2 * math.pi * 220 * tt) + 0.1 * torch.randn(n)).to(torch.bfloat16)[None]
    med, lo, hi, y = timed(lambda: w2v(wav), a.warmup, a.iters)
    print(f"RESULT torch_w2v_forward seconds {a.seconds} ms_median {med:.2f} ms_min {lo:.2f} "
          f"ms_max {hi:.2f} iters {a.iters} warmup {a.warmup} out {tuple(y.shape)} "
          f"finite {bool(torch.isfinite(y).all())}")


if __name__ == "__main__":
    main()
