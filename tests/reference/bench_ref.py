"""Time one steady-state streaming call of our PyTorch reference (random weights).

  python3 tests/reference/bench_ref.py                 # 14B shape, bf16, CUDA, latent 48x88
  python3 tests/reference/bench_ref.py --tiny --device cpu --dtype f32   # smoke test

Steady state (§3.1): the call sits at clip 1 so the whole 12*fsl ring plus the Lc sink tokens
are attended (15 312 keys at 48x88). Prints one JSON line: ms per call (mean, min, median),
keys, peak device memory, and TFLOP/s against the 123.0 TFLOP of §3.6 (14B shape only).

Against lava's `dit-bench` (benches/dit_bench.rs), same seed:
  python3 tests/reference/bench_ref.py --hash-seed 0 --fill-ring --dump out.f32
--hash-seed draws weights and inputs with hash_init.py (bit-identical to
runtime::weights::RandomWeights); --fill-ring runs clip 0's four calls first; --dump writes
the last call's output as little-endian f32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoint_io import random_init_  # noqa: E402
from hash_init import hash_init_, values  # noqa: E402
from liveavatar_ref import S2V_14B, DitConfig, LiveAvatarDiT, StepCache  # noqa: E402

STEADY_TFLOP_48x88 = 123.0  # §3.6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--lat", default="48x88", help="latent h x w")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hash-seed", type=int, default=None,
                    help="weights and inputs from hash_init.py (as lava's dit-bench)")
    ap.add_argument("--fill-ring", action="store_true", help="run clip 0's calls first")
    ap.add_argument("--dump", default=None, help="write the last output (f32 LE) here")
    args = ap.parse_args()
    if args.tiny:
        cfg = DitConfig.from_dict(json.loads((HERE / "tiny_config.json").read_text())["model"])
    else:
        cfg = S2V_14B
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = torch.device(args.device)
    h, w = (int(v) for v in args.lat.split("x"))
    fsl = (h // 2) * (w // 2)

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with dev:
        model = LiveAvatarDiT(cfg)
    torch.set_default_dtype(prev)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    if args.hash_seed is None:
        random_init_(model, gen)
    else:
        hash_init_(model, args.hash_seed)
    model.eval()

    def rn(name: str, *shape: int) -> torch.Tensor:
        if args.hash_seed is not None:
            return values(args.hash_seed, f"input.{name}", shape, 1.0, 0.0, dev).to(dtype)
        return torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    with torch.no_grad():
        text = model.embed_text(rn("context", 77, cfg.text_dim))
        cache = StepCache(model, fsl)
        model.prefill(cache, rn("ref_latent", 16, 1, h, w), rn("motion", 16, 19, h, w), text)
        x, cond = rn("x", 16, 3, h, w), torch.zeros(16, 3, h, w, device=dev, dtype=dtype)
        audio = rn("audio", 1, cfg.num_audio_layers, cfg.audio_dim, 12)
        if args.fill_ring:
            for b in range(4):
                model.forward_stream(cache, x, 857.6923, text, cond, audio, 3 * b * fsl, 30, {})
        start = 12 * fsl  # clip 1, block 0: full ring
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times, rec = [], {}
        for it in range(args.warmup + args.iters):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out = model.forward_stream(cache, x, 857.6923, text, cond, audio, start, 30, rec)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if it >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    res = {
        "config": "tiny" if args.tiny else "s2v-14b", "dtype": args.dtype, "latent": [h, w],
        "query_tokens": 3 * fsl, "keys": int(rec["key_len"]),
        "ms_mean": sum(times) / len(times), "ms_min": min(times),
        "ms_median": sorted(times)[len(times) // 2],
        "out_rms": float(out.float().pow(2).mean().sqrt()),
    }
    if args.dump:
        out.float().cpu().contiguous().numpy().astype("<f4").tofile(args.dump)
    if dev.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        res["device"] = torch.cuda.get_device_name(dev)
    if not args.tiny and (h, w) in ((48, 88), (88, 48)):
        res["tflops_per_s"] = STEADY_TFLOP_48x88 / (res["ms_min"] / 1e3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
