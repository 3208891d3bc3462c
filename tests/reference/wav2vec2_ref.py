"""Reference of the wav2vec2 network (model-spec §1.4), written from the spec and the
checkpoint's HF config fields: layer-norm conv feature extractor, feature projection, weight-
normed grouped positional conv, 24 stable-layer-norm (pre-LN) layers; all hidden states.

Parameter names follow the HF checkpoint (without the `wav2vec2.` prefix of the CTC model):
feature_extractor.conv_layers.{i}.{conv, layer_norm}, feature_projection.{layer_norm, projection},
encoder.pos_conv_embed.conv.{weight_g, weight_v, bias}, encoder.layer_norm,
encoder.layers.{i}.{layer_norm, attention.{q,k,v,out}_proj, final_layer_norm,
feed_forward.{intermediate_dense, output_dense}}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class W2vConfig:
    conv_dim: int = 512
    conv_kernel: list = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    hidden: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    eps: float = 1e-5

    def hf_config(self) -> dict:
        """The checkpoint's config.json fields (HF Wav2Vec2Config names)."""
        n = len(self.conv_kernel)
        return {
            "architectures": ["Wav2Vec2ForCTC"], "model_type": "wav2vec2",
            "conv_dim": [self.conv_dim] * n, "conv_kernel": self.conv_kernel,
            "conv_stride": self.conv_stride, "conv_bias": True, "feat_extract_norm": "layer",
            "feat_extract_activation": "gelu", "hidden_act": "gelu", "do_stable_layer_norm": True,
            "hidden_size": self.hidden, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "intermediate_size": self.ffn_dim,
            "num_conv_pos_embeddings": self.pos_conv_kernel,
            "num_conv_pos_embedding_groups": self.pos_conv_groups, "layer_norm_eps": self.eps,
            "num_feat_extract_layers": n, "vocab_size": 32,
        }


class ConvLayer(nn.Module):
    def __init__(self, cin, cout, k, s, eps):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride=s, bias=True)
        self.layer_norm = nn.LayerNorm(cout, eps=eps)

    def forward(self, x):  # [B, C, T]
        x = self.conv(x)
        x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class PosConv(nn.Module):
    """Grouped conv, kernel K, padding K/2, weight = g·v/‖v‖ (norm over all dims but the
    kernel axis), the extra last frame of an even kernel dropped, then GELU."""

    def __init__(self, c: W2vConfig):
        super().__init__()
        k, g = c.pos_conv_kernel, c.pos_conv_groups
        self.k = k
        self.groups = g
        self.weight_g = nn.Parameter(torch.ones(1, 1, k))
        self.weight_v = nn.Parameter(torch.randn(c.hidden, c.hidden // g, k))
        self.bias = nn.Parameter(torch.zeros(c.hidden))

    def forward(self, x):  # [B, C, T]
        v = self.weight_v
        w = self.weight_g * v / v.norm(dim=(0, 1), keepdim=True)
        y = F.conv1d(x, w, self.bias, padding=self.k // 2, groups=self.groups)
        if self.k % 2 == 0:
            y = y[:, :, :-1]
        return F.gelu(y)


class Attention(nn.Module):
    def __init__(self, c: W2vConfig):
        super().__init__()
        self.h = c.num_heads
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, n, nn.Linear(c.hidden, c.hidden))

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.h
        q = (self.q_proj(x) * hd ** -0.5).view(b, t, self.h, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.h, hd).transpose(1, 2)
        p = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.out_proj((p @ v).transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, c: W2vConfig):
        super().__init__()
        self.intermediate_dense = nn.Linear(c.hidden, c.ffn_dim)
        self.output_dense = nn.Linear(c.ffn_dim, c.hidden)

    def forward(self, x):
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class Layer(nn.Module):
    def __init__(self, c: W2vConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.attention = Attention(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x):
        x = x + self.attention(self.layer_norm(x))
        return x + self.feed_forward(self.final_layer_norm(x))


class Wav2Vec2(nn.Module):
    def __init__(self, c: W2vConfig):
        super().__init__()
        fe = nn.Module()
        dims = [1] + [c.conv_dim] * len(c.conv_kernel)
        fe.conv_layers = nn.ModuleList([ConvLayer(dims[i], dims[i + 1], k, s, c.eps)
                                        for i, (k, s) in enumerate(zip(c.conv_kernel,
                                                                       c.conv_stride))])
        self.feature_extractor = fe
        fp = nn.Module()
        fp.layer_norm = nn.LayerNorm(c.conv_dim, eps=c.eps)
        fp.projection = nn.Linear(c.conv_dim, c.hidden)
        self.feature_projection = fp
        enc = nn.Module()
        pce = nn.Module()
        pce.conv = PosConv(c)
        enc.pos_conv_embed = pce
        enc.layers = nn.ModuleList([Layer(c) for _ in range(c.num_layers)])
        enc.layer_norm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.encoder = enc

    def forward(self, wav):
        """wav [B, N] → hidden states [num_layers + 1, B, T50, hidden] (§1.4)."""
        x = wav[:, None]
        for layer in self.feature_extractor.conv_layers:
            x = layer(x)
        x = x.transpose(1, 2)  # [B, T, C]
        x = self.feature_projection.projection(self.feature_projection.layer_norm(x))
        x = x + self.encoder.pos_conv_embed.conv(x.transpose(1, 2)).transpose(1, 2)
        states = []
        for layer in self.encoder.layers:
            states.append(x)
            x = layer(x)
        states.append(self.encoder.layer_norm(x))
        return torch.stack(states)
