"""Reference of the Wan2.1 VAE (model-spec.md §1.5, §6.4), written from the spec.

Modules are named like the checkpoint `Wan2.1_VAE.pth` (encoder.*, conv1, conv2, decoder.*).
Causal caching (CACHE_T = 2) is explicit: every cached conv owns one slot of a `Caches` list
in execution order. A slot holds the last (up to) 2 input frames of the conv's stream, so a
cached causal conv computes exactly what the conv would on the whole stream with 2 zero frames
in front. The temporal-upsample conv of the decoder is not applied to the first chunk (the
slot is marked "Rep"); the next chunk uses zero padding, later chunks the cache.

`dtype=torch.bfloat16` reproduces the autocast dtype flow of §1.5: norm and SiLU in fp32, every
conv input rounded to bf16 and its output bf16, residual adds in bf16, caches stored in the
dtype of the conv input before rounding. With float32 every rounding is a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2

# §1.5 latent normalisation constants.
LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


@dataclass
class VaeConfig:
    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple = (False, True, True)


@dataclass
class Caches:
    """One slot per cached conv, in execution order; `idx` walks them during one chunk."""
    slots: list = field(default_factory=list)
    idx: int = 0

    def take(self):
        if self.idx >= len(self.slots):
            self.slots.append(None)
        v = self.slots[self.idx]
        return v

    def put(self, v):
        self.slots[self.idx] = v
        self.idx += 1


class Ctx:
    """Dtype flow: `act` is the conv/residual dtype (bf16 under autocast, or f32)."""

    def __init__(self, act: torch.dtype):
        self.act = act


def next_cache(x: torch.Tensor, old) -> torch.Tensor:
    """The last CACHE_T frames of the stream after appending x."""
    c = x[:, :, -CACHE_T:].clone()
    if c.shape[2] < CACHE_T and isinstance(old, torch.Tensor):
        c = torch.cat([old[:, :, -1:].to(c.dtype), c], 2)
    return c


class CausalConv3d(nn.Conv3d):
    """Conv3d with `kt - 1` past frames of temporal padding (cached frames first, then zeros)
    and symmetric spatial zero padding."""

    def __init__(self, cin, cout, kernel, stride=1):
        k = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(cin, cout, k, stride=stride, padding=0)
        self.tpad = k[0] - 1 if self.stride[0] == 1 else 0
        self.spad = (k[1] // 2, k[2] // 2)

    def run(self, x, ctx: Ctx, cache=None):
        if cache is not None and self.tpad > 0:
            x = torch.cat([cache.to(x.dtype), x], 2)
            tpad = self.tpad - cache.shape[2]
        else:
            tpad = self.tpad
        x = F.pad(x, (self.spad[1], self.spad[1], self.spad[0], self.spad[0], tpad, 0))
        w = self.weight.to(ctx.act)
        b = self.bias.to(ctx.act)
        return F.conv3d(x.to(ctx.act), w, b, self.stride)


class RmsNorm(nn.Module):
    """Channel RMS norm: L2-normalise over channels × sqrt(C) × gamma, in fp32."""

    def __init__(self, dim, images: bool):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.scale = dim ** 0.5

    def forward(self, x):
        return F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()


def conv2d(conv: nn.Conv2d, x, ctx: Ctx, pad=None, stride=1):
    x = x.to(ctx.act)
    if pad is not None:
        x = F.pad(x, pad)
    return F.conv2d(x, conv.weight.to(ctx.act), conv.bias.to(ctx.act), stride, conv.padding)


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        # Indices as in the checkpoint: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
        self.residual = nn.ModuleList([RmsNorm(cin, False), nn.SiLU(), CausalConv3d(cin, cout, 3),
                                       RmsNorm(cout, False), nn.SiLU(), nn.Identity(),
                                       CausalConv3d(cout, cout, 3)])
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, ctx: Ctx, caches: Caches):
        h = self.shortcut.run(x, ctx) if self.shortcut is not None else x
        r = self.residual
        for norm, conv in ((r[0], r[2]), (r[3], r[6])):
            x = F.silu(norm(x))
            old = caches.take()
            y = conv.run(x, ctx, old)
            caches.put(next_cache(x, old))
            x = y
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RmsNorm(dim, True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, ctx: Ctx):
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = conv2d(self.to_qkv, self.norm(y), ctx)  # [bt, 3c, h, w]
        qkv = qkv.reshape(b * t, 3 * c, h * w).transpose(1, 2)  # [bt, hw, 3c]
        q, k, v = qkv.split(c, dim=-1)
        s = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(c)
        o = (s.softmax(-1) @ v.float()).to(ctx.act)  # [bt, hw, c]
        o = o.transpose(1, 2).reshape(b * t, c, h, w)
        o = conv2d(self.proj, o, ctx)
        o = o.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return o + x


class Resample(nn.Module):
    """Spatial 2× down/up sampling per frame, with an optional causal temporal 2× conv."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # index 0 is the (parameter-free) nearest upsample
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1)])
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        else:
            # index 0 is the (0, 1, 0, 1) zero pad
            self.resample = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2)])
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def per_frame(self, x, ctx: Ctx):
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        conv = self.resample[1]
        if self.mode.startswith("upsample"):
            y = F.interpolate(y.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)
            y = conv2d(conv, y, ctx)
        else:
            y = conv2d(conv, y, ctx, pad=(0, 1, 0, 1), stride=2)
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    def forward(self, x, ctx: Ctx, caches: Caches):
        if self.mode == "upsample3d":
            old = caches.take()
            if old is None:
                caches.put("Rep")  # first chunk: no temporal upsampling
            else:
                new = next_cache(x, old)
                if new.shape[2] < CACHE_T and isinstance(old, str):
                    new = torch.cat([torch.zeros_like(new), new], 2)
                y = self.time_conv.run(x, ctx, None if isinstance(old, str) else old)
                caches.put(new)
                b, c2, t, h, w = y.shape
                c = c2 // 2
                # channels [0, c) are frame 2i, [c, 2c) frame 2i + 1
                x = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = self.per_frame(x, ctx)
        if self.mode == "downsample3d":
            old = caches.take()
            if old is None:
                caches.put(x.clone())  # first chunk: no temporal downsampling
            else:
                new = x[:, :, -1:].clone()
                x = self.time_conv.run(torch.cat([old[:, :, -1:].to(x.dtype), x], 2), ctx)
                caches.put(new)
        return x


def cached_conv(conv: CausalConv3d, x, ctx: Ctx, caches: Caches):
    old = caches.take()
    y = conv.run(x, ctx, old)
    caches.put(next_cache(x, old))
    return y


class Encoder3d(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        layers = []
        for i in range(len(cfg.dim_mult)):
            cin, cout = dims[i], dims[i + 1]
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i + 1 < len(cfg.dim_mult):
                layers.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[i]
                                       else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        top = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(top, top), AttentionBlock(top),
                                     ResidualBlock(top, top)])
        self.head = nn.ModuleList([RmsNorm(top, False), nn.SiLU(),
                                   CausalConv3d(top, 2 * cfg.z_dim, 3)])

    def forward(self, x, ctx: Ctx, caches: Caches):
        caches.idx = 0
        x = cached_conv(self.conv1, x, ctx, caches)
        for layer in self.downsamples:
            x = layer(x, ctx, caches)
        x = self.middle[0](x, ctx, caches)
        x = self.middle[1](x, ctx)
        x = self.middle[2](x, ctx, caches)
        x = F.silu(self.head[0](x))
        return cached_conv(self.head[2], x, ctx, caches)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        top = cfg.base_dim * cfg.dim_mult[-1]
        dims = [top] + [cfg.base_dim * m for m in reversed(cfg.dim_mult)]
        tup = list(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, top, 3)
        self.middle = nn.ModuleList([ResidualBlock(top, top), AttentionBlock(top),
                                     ResidualBlock(top, top)])
        layers = []
        for i in range(len(cfg.dim_mult)):
            cin = dims[i] if i == 0 else dims[i] // 2  # the upsample conv halves the width
            cout = dims[i + 1]
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i + 1 < len(cfg.dim_mult):
                layers.append(Resample(cout, "upsample3d" if tup[i] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.ModuleList([RmsNorm(dims[-1], False), nn.SiLU(),
                                   CausalConv3d(dims[-1], 3, 3)])

    def forward(self, x, ctx: Ctx, caches: Caches):
        caches.idx = 0
        x = cached_conv(self.conv1, x, ctx, caches)
        x = self.middle[0](x, ctx, caches)
        x = self.middle[1](x, ctx)
        x = self.middle[2](x, ctx, caches)
        for layer in self.upsamples:
            x = layer(x, ctx, caches)
        x = F.silu(self.head[0](x))
        return cached_conv(self.head[2], x, ctx, caches)


class WanVAE(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.register_buffer("mean", torch.tensor(LATENT_MEAN), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(LATENT_STD), persistent=False)

    def encode(self, video, act=torch.float32):
        """video [1, 3, 1 + 4k, H, W] in [-1, 1] → normalised latent mean [1, z, 1 + k, H/8, W/8]."""
        ctx, caches = Ctx(act), Caches()
        t = video.shape[2]
        assert (t - 1) % 4 == 0, t
        outs = [self.encoder(video[:, :, :1], ctx, caches)]
        for i in range((t - 1) // 4):
            outs.append(self.encoder(video[:, :, 1 + 4 * i:5 + 4 * i], ctx, caches))
        mu = self.conv1.run(torch.cat(outs, 2), ctx)[:, :self.cfg.z_dim]
        return (mu.float() - self.mean.view(1, -1, 1, 1, 1)) * self.inv_std.view(1, -1, 1, 1, 1)


class StreamDecoder:
    """The decoder as a continuous stream: caches persist across calls (§6.4)."""

    def __init__(self, vae: WanVAE, act=torch.float32):
        self.vae, self.ctx, self.caches = vae, Ctx(act), Caches()

    def decode(self, z):
        """z [1, z_dim, n, h, w] normalised latents → frames [1, 3, T, 8h, 8w] f32 in [-1, 1]."""
        vae = self.vae
        z = z.float() / vae.inv_std.view(1, -1, 1, 1, 1) + vae.mean.view(1, -1, 1, 1, 1)
        x = vae.conv2.run(z, self.ctx)
        outs = [vae.decoder(x[:, :, i:i + 1], self.ctx, self.caches) for i in range(z.shape[2])]
        return torch.cat(outs, 2).float().clamp(-1, 1)


def param_count(cfg: VaeConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in WanVAE(cfg).parameters())


if __name__ == "__main__":
    # §1.5 pins the full-size count.
    n = param_count(VaeConfig())
    print("Wan2.1 VAE parameters:", n)
    assert n == 126_892_531, n
