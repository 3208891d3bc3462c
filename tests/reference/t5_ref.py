"""Reference of the umT5-XXL encoder (model-spec §1.3), written from the spec.

Names as in `models_t5_umt5-xxl-enc-bf16.pth` (§2.3): token_embedding, blocks.{i}.{norm1, attn.{q,k,v,o},
norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}, norm. T5 RMS norm (no mean subtraction,
eps 1e-6), relative position buckets per layer (32, bidirectional, max distance 128), no 1/sqrt(d)
scaling, additive key-padding mask, softmax in fp32, gated GELU-tanh FFN, no biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class T5Config:
    vocab: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


def relative_buckets(lq: int, lk: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of (key − query): half the buckets per sign; below
    max_exact = buckets/4 exact, above log-spaced up to max_distance."""
    rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = torch.clamp(large, max=half - 1)
    return out + torch.where(rel < max_exact, rel, large)


class RmsNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        n = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * n.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.n = cfg.num_heads
        for name in "qkvo":
            setattr(self, name, nn.Linear(cfg.dim, cfg.dim, bias=False))

    def forward(self, x, bias):
        b, l, d = x.shape
        h = self.n
        q, k, v = (m(x).view(b, l, h, d // h) for m in (self.q, self.k, self.v))
        s = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(d)
        p = F.softmax(s.float(), dim=-1).type_as(s)
        o = torch.einsum("bnij,bjnc->binc", p, v).reshape(b, l, d)
        return self.o(o)


class FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gate = nn.ModuleList([nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)])
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * F.gelu(self.gate[0](x), approximate="tanh"))


class RelativeEmbedding(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, l):
        idx = relative_buckets(l, l, self.cfg.num_buckets, self.cfg.max_distance)
        return self.embedding(idx).permute(2, 0, 1).unsqueeze(0)  # [1, heads, l, l]


class Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RmsNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RmsNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativeEmbedding(cfg)

    def forward(self, x, mask_bias):
        bias = self.pos_embedding(x.shape[1]) + mask_bias
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = RmsNorm(cfg.dim, cfg.eps)

    def forward(self, ids, mask):
        """ids, mask [B, L] → [B, L, dim]; callers keep the first mask.sum() rows (§1.3)."""
        x = self.token_embedding(ids)
        mask_bias = torch.zeros(mask.shape, dtype=x.dtype)
        mask_bias = mask_bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for b in self.blocks:
            x = b(x, mask_bias)
        return self.norm(x)


if __name__ == "__main__":
    with torch.device("meta"):
        n = sum(p.numel() for p in T5Encoder(T5Config()).parameters())
    print("umT5-XXL encoder parameters:", n)
    assert n == 5_680_910_336, n
