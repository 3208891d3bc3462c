"""PyTorch side of `vae-bench`: the reference Wan2.1 VAE (tests/reference/vae_ref.py) at full
size with its own random weights, streaming decode on one GPU at 704×384 (latent 48×88): prime
with 7 latents, then 3-latent blocks timed one by one (synchronised, warm-up, median).

Two dtype set-ups, both with the bf16 autocast dtype flow of model-spec §1.5:
  fp32-weights: weights kept fp32 and cast to bf16 at every conv, as autocast does eagerly
                (the official code);
  bf16-weights: weights stored bf16 (the cast is a no-op), as lava holds them.
Eager only (no torch.compile). Prints `RESULT torch_vae_block <setup> ms_median …` lines.

  usage: python3 benches/vae_torch.py [--warmup 2] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "reference"))
from vae_ref import StreamDecoder, VaeConfig, WanVAE  # noqa: E402

LAT = (48, 88)
PRIME, BLOCK = 7, 3


def bench(vae: WanVAE, label: str, warmup: int, iters: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    z = vae.cfg.z_dim
    prime = torch.randn(1, z, PRIME, *LAT, device="cuda", generator=g)
    block = torch.randn(1, z, BLOCK, *LAT, device="cuda", generator=g)
    dec = StreamDecoder(vae, act=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.decode(prime)
    torch.cuda.synchronize()
    print(f"{label}: prime with {PRIME} latents {1e3 * (time.perf_counter() - t0):.1f} ms")
    cache_bytes = sum(s.numel() * s.element_size() for s in dec.caches.slots
                      if isinstance(s, torch.Tensor))
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        y = dec.decode(block)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t))
    assert torch.isfinite(y).all(), "non-finite frames"
    print(f"RESULT torch_vae_block {label} ms_median {statistics.median(times):.2f} "
          f"ms_min {min(times):.2f} ms_max {max(times):.2f} iters {iters} warmup {warmup}")
    print(f"MEM torch {label} decoder_cache_bytes {cache_bytes} ({cache_bytes / 1e9:.3f} GB) "
          f"peak_allocated {torch.cuda.max_memory_allocated() / 1e9:.3f} GB, "
          f"output {tuple(y.shape)} rms {y.float().pow(2).mean().sqrt().item():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    with torch.no_grad():
        vae = WanVAE(VaeConfig()).cuda().eval()
        for m in vae.modules():
            if hasattr(m, "gamma"):
                # Random, not all-ones, like the Rust side's random weights.
                m.gamma.data.uniform_(0.5, 1.5)
        bench(vae, "fp32-weights", a.warmup, a.iters)
        bench(vae.to(torch.bfloat16), "bf16-weights", a.warmup, a.iters)


if __name__ == "__main__":
    main()
