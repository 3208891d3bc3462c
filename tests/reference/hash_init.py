"""Seeded random weights that the Rust runtime reproduces bit for bit
(runtime/src/weights/random.rs documents the generator): a pure function of
(seed, tensor name, element index), computed here with int64 torch ops on any device.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF


def init_of(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(std, offset) of a tensor, as `runtime::weights::random_init_of`."""
    if name.endswith(".bias"):
        return 0.1, 0.0
    if "norm" in name:
        return 0.0, 1.0
    if name == "casual_audio_encoder.weights":
        return 0.5, 0.5
    if len(shape) >= 2 and not any(s in name for s in ("modulation", "trainable_cond_mask",
                                                        "padding_tokens")):
        return 1.0 / math.sqrt(math.prod(shape[1:])), 0.0
    return 0.5, 0.0


def fnv1a32(s: str) -> int:
    h = 0x811C9DC5
    for b in s.encode():
        h = ((h ^ b) * 0x01000193) & M32
    return h


def uniform(key: int, n: int, device: torch.device | str) -> torch.Tensor:
    """f32 draws in [-1, 1) for indices 0..n (chunked: int64 temporaries)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    step = 1 << 26
    for a in range(0, n, step):
        i = torch.arange(a, min(n, a + step), dtype=torch.int64, device=device)
        h = (i * 0x9E3779B1 + key) & M32
        h = (((h >> 16) ^ h) * 0x045D9F3B) & M32
        h = (((h >> 16) ^ h) * 0x045D9F3B) & M32
        h = h ^ (h >> 16)
        out[a:a + len(i)] = (h >> 8).to(torch.float32) * 2.0**-23 - 1.0
    return out


def values(seed: int, name: str, shape: tuple[int, ...], std: float, offset: float,
           device: torch.device | str) -> torch.Tensor:
    """bf16 tensor of `shape`: bf16(u * f32(std*sqrt(3)) + f32(offset)) in f32 arithmetic."""
    u = uniform(fnv1a32(f"{seed}:{name}"), math.prod(shape), device)
    s = torch.tensor(std * math.sqrt(3.0), dtype=torch.float32, device=device)
    o = torch.tensor(offset, dtype=torch.float32, device=device)
    return (u * s + o).to(torch.bfloat16).reshape(shape)


def hash_init_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with the seeded values of its name."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            std, off = init_of(name, tuple(p.shape))
            p.copy_(values(seed, name, tuple(p.shape), std, off, p.device).to(p.dtype))


if __name__ == "__main__":
    k = fnv1a32("0:x")
    print(hex(k), repr(float(uniform(k, 12346, "cpu")[12345])))
