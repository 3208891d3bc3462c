"""Our PyTorch reference of the Live Avatar causal streaming S2V DiT (CausalWanModel_S2V).

Written from /work/shared/docs/model-spec.md (sections cited as §N); no code was taken from the
LiveAvatar or Wan repositories. Module and parameter names equal the checkpoint names of §2.3.

Precision: the activation dtype is the dtype of the weights. With float32 weights every bf16
rounding of the §3.3.1 dtype flow is a no-op (this is how the golden fixtures are made); with
bfloat16 weights the flow of §3.3.1 is followed (fp32 residual inside a block, bf16 between
blocks, fp32 time embedding, head and audio encoder). Where the spec is silent about a dtype
(audio injector internals) the activation dtype is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DitConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int
    text_len: int
    freq_dim: int
    eps: float
    cond_dim: int
    audio_dim: int
    num_audio_token: int
    audio_inject_layers: tuple
    motion_frames: int = 73
    num_audio_layers: int = 25
    rope_max_positions: int = 45000
    rope_theta: float = 10000.0
    patch_size: tuple = (1, 2, 2)

    @classmethod
    def from_dict(cls, d: dict) -> "DitConfig":
        keys = cls.__dataclass_fields__.keys()
        kw = {k: d[k] for k in keys if k in d}
        kw["audio_inject_layers"] = tuple(kw["audio_inject_layers"])
        kw["patch_size"] = tuple(kw.get("patch_size", (1, 2, 2)))
        if tuple(kw["patch_size"]) != (1, 2, 2):
            raise ValueError("only patch_size (1, 2, 2) is specified (§1.1)")
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# Full-size Wan2.2-S2V-14B (§1.1), for benchmarks with random weights.
S2V_14B = DitConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16,
                    text_dim=4096, text_len=512, freq_dim=256, eps=1e-6, cond_dim=16,
                    audio_dim=1024, num_audio_token=4,
                    audio_inject_layers=(0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39))

# The "fp32" of the §3.3.1 dtype flow. check_reference.py switches it to float64 (with float64
# weights) to measure the float32 round-off of the golden run.
ACC = torch.float32
REF_TIME = 30  # reference frame's temporal RoPE index in the prefill (§3.4)
ADAIN_EPS = 1e-5  # diffusers AdaLayerNorm default (§3.3.2)
AUDIO_LN_EPS = 1e-6
FRAMEPACK_TIMES_4X = (-19, -14, -9, -4)  # §3.4
FRAMEPACK_LATENTS = (16, 2, 1)  # oldest first (§4.2)


# ----------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    """q/k/v/o projections with full-width q/k RMSNorm (self_attn, cross_attn, injectors)."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)


class Block(nn.Module):
    def __init__(self, c: DitConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 6, c.dim))
        self.self_attn = Attention(c.dim)
        self.cross_attn = Attention(c.dim)
        self.norm3 = nn.LayerNorm(c.dim, eps=c.eps, elementwise_affine=True)
        self.ffn = nn.Sequential(nn.Linear(c.dim, c.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(c.ffn_dim, c.dim))


class Head(nn.Module):
    def __init__(self, c: DitConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 2, c.dim))
        self.head = nn.Linear(c.dim, c.out_dim * 4)


class AdaLN(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)


class AudioInjector(nn.Module):
    def __init__(self, c: DitConfig):
        super().__init__()
        n = len(c.audio_inject_layers)
        self.injector = nn.ModuleList(Attention(c.dim) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaLN(c.dim) for _ in range(n))


class CausalConv1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 3, stride=stride)


class AudioConvStack(nn.Module):
    def __init__(self, c: DitConfig):
        super().__init__()
        q = c.dim // 4
        self.conv1_local = CausalConv1d(c.audio_dim, q * c.num_audio_token, 1)
        self.conv1_global = CausalConv1d(c.audio_dim, q, 1)
        self.conv2 = CausalConv1d(q, c.dim // 2, 2)
        self.conv3 = CausalConv1d(c.dim // 2, c.dim, 2)
        self.final_linear = nn.Linear(c.dim, c.dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, c.dim))


class CausalAudioEncoder(nn.Module):
    def __init__(self, c: DitConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, c.num_audio_layers, 1, 1))
        self.encoder = AudioConvStack(c)


class FramePacker(nn.Module):
    def __init__(self, c: DitConfig):
        super().__init__()
        self.proj = nn.Conv3d(c.in_dim, c.dim, (1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(c.in_dim, c.dim, (2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(c.in_dim, c.dim, (4, 8, 8), stride=(4, 8, 8))


# ----------------------------------------------------------------------------- RoPE (§3.4)
def trunc_linspace(end: int, n: int) -> list[int]:
    """Integer truncation of linspace(0, end, n), computed exactly in integers."""
    if n == 1:
        return [0]
    return [(k * end) // (n - 1) for k in range(n)]


def noisy_positions(cur: int, frames: int, hp: int, wp: int) -> torch.Tensor:
    t, r, c = torch.meshgrid(torch.arange(cur, cur + frames), torch.arange(hp), torch.arange(wp),
                             indexing="ij")
    return torch.stack([t, r, c], -1).reshape(-1, 3)


def _grid(times: list[int], rows: list[int], cols: list[int]) -> torch.Tensor:
    t, r, c = torch.meshgrid(torch.tensor(times), torch.tensor(rows), torch.tensor(cols),
                             indexing="ij")
    return torch.stack([t, r, c], -1).reshape(-1, 3)


def cond_positions(ref_time: int, h: int, w: int) -> torch.Tensor:
    """Positions of the sink tokens: ref, frame-pack post, 2x, 4x (in sequence order)."""
    hp, wp = h // 2, w // 2
    full_r, full_c = list(range(hp)), list(range(wp))
    return torch.cat([
        _grid([ref_time], full_r, full_c),
        _grid([-1], full_r, full_c),
        _grid([-3], trunc_linspace(hp - 1, h // 4), trunc_linspace(wp - 1, w // 4)),
        _grid(list(FRAMEPACK_TIMES_4X), trunc_linspace(hp - 1, h // 8),
              trunc_linspace(wp - 1, w // 8)),
    ])


def rope_factors(pos: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 max_positions: int = 45000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rotation factors, [L, head_dim/2] cos and sin rounded to fp16 (complex-half).

    Pairs: time c-2*floor(c/3), height and width floor(c/3) each, c = head_dim/2. Angle of pair k
    of a part with n pairs: |p| * (1 / theta^(2k / 2n)) in float64; negative p = conjugate.
    """
    c = head_dim // 2
    sizes = (c - 2 * (c // 3), c // 3, c // 3)
    if int(pos.abs().max()) >= max_positions:
        raise ValueError(f"RoPE position {int(pos.abs().max())} outside the {max_positions} table")
    cos, sin = [], []
    for axis, n in enumerate(sizes):
        inv = 1.0 / torch.pow(theta, torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n))
        p = pos[:, axis]
        ang = p.abs().to(torch.float64)[:, None] * inv[None, :]
        sign = torch.where(p < 0, -1.0, 1.0).to(torch.float64)[:, None]
        cos.append(torch.cos(ang))
        sin.append(torch.sin(ang) * sign)
    return torch.cat(cos, 1).to(torch.float16), torch.cat(sin, 1).to(torch.float16)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, d], interleaved pairs (2i real, 2i+1 imag); float64 product, fp32, x.dtype."""
    xd = x.to(torch.float64).unflatten(-1, (-1, 2))
    re, im = xd[..., 0], xd[..., 1]
    cc = cos.to(x.device, torch.float64)[None, :, None, :]
    ss = sin.to(x.device, torch.float64)[None, :, None, :]
    out = torch.stack([re * cc - im * ss, re * ss + im * cc], -1).flatten(-2)
    return out.to(ACC).to(x.dtype)


# ----------------------------------------------------------------------------- stream state
class StepCache:
    """One denoising step's KV state (§4.3): a ring of ring_frames*fsl noisy tokens per layer
    plus the un-roped sink K/V, sized exactly Lc rows by the prefill."""

    def __init__(self, model: "LiveAvatarDiT", fsl: int, ring_frames: int = 12):
        c = model.cfg
        dev, dt = model.patch_embedding.weight.device, model.act
        self.fsl, self.ring_len = fsl, ring_frames * fsl
        shape = (self.ring_len, c.num_heads, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(c.num_layers)]
        self.v = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(c.num_layers)]
        self.cond_k: list = [None] * c.num_layers
        self.cond_v: list = [None] * c.num_layers


# ----------------------------------------------------------------------------- the model
class LiveAvatarDiT(nn.Module):
    def __init__(self, cfg: DitConfig):
        super().__init__()
        c = self.cfg = cfg
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, (1, 2, 2), stride=(1, 2, 2))
        self.cond_encoder = nn.Conv3d(c.cond_dim, c.dim, (1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim),
                                            nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(),
                                            nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.trainable_cond_mask = nn.Embedding(3, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.head = Head(c)
        self.audio_injector = AudioInjector(c)
        self.casual_audio_encoder = CausalAudioEncoder(c)  # sic, checkpoint spelling
        self.frame_packer = FramePacker(c)

    @property
    def act(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # -- primitives ---------------------------------------------------------------------
    def _lin(self, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.act), m.weight, m.bias)

    @staticmethod
    def _lin32(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(ACC), m.weight.to(ACC), m.bias.to(ACC))

    def _rms(self, n: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(ACC)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return y.to(x.dtype) * n.weight

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.cfg.num_heads, self.cfg.head_dim))

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, L, H, d] layout, scale 1/sqrt(d), no mask."""
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).flatten(2)

    def _patch(self, conv: nn.Conv3d, lat: torch.Tensor) -> torch.Tensor:
        y = F.conv3d(lat.unsqueeze(0).to(self.act), conv.weight, conv.bias, stride=conv.stride)
        return y.flatten(2).transpose(1, 2)

    # -- embeddings ---------------------------------------------------------------------
    def time_embed(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [n] float32 -> e [n, dim], e0 [n, 6, dim], both float32 (§3.3 step 4)."""
        half = self.cfg.freq_dim // 2
        pos = t.to(torch.float64)
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
        s = torch.outer(pos, freqs)
        emb = torch.cat([torch.cos(s), torch.sin(s)], 1).to(ACC)
        e = self._lin32(self.time_embedding[2], F.silu(self._lin32(self.time_embedding[0], emb)))
        e0 = self._lin32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """context [L_txt, text_dim] (real tokens only) -> [1, text_len, dim] (§3.3 step 5)."""
        c = self.cfg
        if context.shape[0] > c.text_len or context.shape[1] != c.text_dim:
            raise ValueError(f"text context {tuple(context.shape)} does not fit "
                             f"[<= {c.text_len}, {c.text_dim}]")
        padded = context.new_zeros(c.text_len, c.text_dim)
        padded[: context.shape[0]] = context
        h = F.gelu(self._lin(self.text_embedding[0], padded), approximate="tanh")
        return self._lin(self.text_embedding[2], h).unsqueeze(0)

    def encode_audio(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [1, 25, audio_dim, T] -> tokens [1, T/4, 5, dim], global [T/4, dim] (§3.3 1)."""
        c, enc = self.cfg, self.casual_audio_encoder.encoder
        frames = audio.shape[-1] // 4
        x = audio.to(ACC)
        x = torch.cat([x[..., :1].expand(*x.shape[:-1], c.motion_frames), x], -1)
        w = F.silu(self.casual_audio_encoder.weights.to(ACC))
        feat = (x * w).sum(1) / w.sum(1)  # [1, audio_dim, T + 73]

        def cconv(m: CausalConv1d, y: torch.Tensor) -> torch.Tensor:
            y = F.pad(y, (2, 0), mode="replicate")
            return F.conv1d(y, m.conv.weight.to(ACC), m.conv.bias.to(ACC), stride=m.conv.stride)

        def norm_act(y: torch.Tensor) -> torch.Tensor:  # channels-first [B, C, T]
            y = F.layer_norm(y.transpose(1, 2), (y.shape[1],), eps=AUDIO_LN_EPS)
            return F.silu(y).transpose(1, 2)

        loc = cconv(enc.conv1_local, feat)  # [1, n*dim/4, T']: n contiguous channel groups
        loc = loc.unflatten(1, (c.num_audio_token, c.dim // 4)).flatten(0, 1)
        loc = norm_act(cconv(enc.conv3, norm_act(cconv(enc.conv2, norm_act(loc)))))
        loc = loc.permute(2, 0, 1).unsqueeze(0)  # [1, T3, n, dim]
        pad = enc.padding_tokens.to(ACC).expand(1, loc.shape[1], 1, c.dim)
        loc = torch.cat([loc, pad], 2)
        g = norm_act(cconv(enc.conv1_global, feat))
        g = norm_act(cconv(enc.conv3, norm_act(cconv(enc.conv2, g))))
        g = self._lin32(enc.final_linear, g.transpose(1, 2))[0]  # [T3, dim]
        return loc[:, -frames:].to(self.act), g[-frames:].to(self.act)

    def frame_pack(self, motion: torch.Tensor) -> torch.Tensor:
        """motion latents [16, T, h, w] -> post, 2x, 4x tokens [1, Lc - fsl, dim] (§4.2)."""
        n = sum(FRAMEPACK_LATENTS)
        m = motion[:, -n:]
        if m.shape[1] < n:
            m = torch.cat([m.new_zeros(m.shape[0], n - m.shape[1], *m.shape[2:]), m], 1)
        m4, m2, m1 = m.split(FRAMEPACK_LATENTS, dim=1)
        fp = self.frame_packer
        return torch.cat([self._patch(fp.proj, m1), self._patch(fp.proj_2x, m2),
                          self._patch(fp.proj_4x, m4)], 1)

    # -- one transformer block (§3.3.1) ------------------------------------------------
    def block(self, blk: Block, x: torch.Tensor, mod: torch.Tensor, attn_fn,
              text: torch.Tensor) -> torch.Tensor:
        """x [1, L, dim] act; mod [G, 6, dim] fp32 for G equal token groups (latent frames)."""
        act, d, eps = self.act, self.cfg.dim, self.cfg.eps
        g_count, seq = mod.shape[0], x.shape[1]
        m = blk.modulation.to(ACC) + mod
        sh_sa, sc_sa, g_sa, sh_ff, sc_ff, g_ff = (m[:, j].unsqueeze(1) for j in range(6))

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(g_count, seq // g_count, d)

        a = F.layer_norm(x.to(ACC), (d,), eps=eps).to(act).to(ACC)
        a = (grouped(a) * (1 + sc_sa) + sh_sa).reshape(1, seq, d).to(act)
        sa = blk.self_attn
        q = self._heads(self._rms(sa.norm_q, self._lin(sa.q, a)))
        k = self._heads(self._rms(sa.norm_k, self._lin(sa.k, a)))
        v = self._heads(self._lin(sa.v, a))
        y = self._lin(sa.o, attn_fn(q, k, v))
        x1 = x.to(ACC) + (grouped(y.to(ACC)) * g_sa).reshape(1, seq, d)

        u = F.layer_norm(x1.to(act).to(ACC), (d,), blk.norm3.weight.to(ACC),
                         blk.norm3.bias.to(ACC), eps).to(act)
        ca = blk.cross_attn
        q = self._heads(self._rms(ca.norm_q, self._lin(ca.q, u)))
        k = self._heads(self._rms(ca.norm_k, self._lin(ca.k, text)))
        v = self._heads(self._lin(ca.v, text))
        x2 = x1 + self._lin(ca.o, self._sdpa(q, k, v)).to(ACC)

        b = F.layer_norm(x2, (d,), eps=eps)
        b = (grouped(b) * (1 + sc_ff) + sh_ff).reshape(1, seq, d).to(act)
        y2 = self._lin(blk.ffn[2], F.gelu(self._lin(blk.ffn[0], b), approximate="tanh"))
        x3 = x2 + (grouped(y2.to(ACC)) * g_ff).reshape(1, seq, d)
        return x3.to(act)

    def inject_audio(self, j: int, x: torch.Tensor, tok: torch.Tensor,
                     glob: torch.Tensor) -> torch.Tensor:
        """Audio injector j on x [1, Lq, dim]; tok [1, F, 5, dim], glob [F, dim] (§3.3.2)."""
        d, frames = self.cfg.dim, glob.shape[0]
        h = x.reshape(frames, -1, d)
        ada = self._lin(self.audio_injector.injector_adain_layers[j].linear, F.silu(glob))
        shift, scale = ada[:, :d].unsqueeze(1), ada[:, d:].unsqueeze(1)
        u = F.layer_norm(h.to(ACC), (d,), eps=ADAIN_EPS).to(self.act)
        u = u * (1 + scale) + shift
        att = self.audio_injector.injector[j]
        q = self._heads(self._rms(att.norm_q, self._lin(att.q, u)))
        k = self._heads(self._rms(att.norm_k, self._lin(att.k, tok[0])))
        v = self._heads(self._lin(att.v, tok[0]))
        out = self._lin(att.o, self._sdpa(q, k, v))
        return (h + out).reshape(x.shape)

    def head_out(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [1, Lq, dim], e [F, dim] fp32 -> [1, Lq, 4*out_dim] (§3.3 step 7)."""
        d, frames = self.cfg.dim, e.shape[0]
        a = F.layer_norm(x.to(ACC), (d,), eps=self.cfg.eps).to(self.act).to(ACC)
        m = self.head.modulation.to(ACC) + e[:, None, :]
        a = a.reshape(frames, -1, d) * (1 + m[:, 1:2]) + m[:, 0:1]
        return self._lin32(self.head.head, a).to(self.act).reshape(1, x.shape[1], -1)

    def unpatchify(self, y: torch.Tensor, frames: int, hp: int, wp: int) -> torch.Tensor:
        """[1, F*hp*wp, 64] with (pt, ph, pw, c) c fastest -> [out_dim, F, 2hp, 2wp]."""
        y = y.reshape(frames, hp, wp, 1, 2, 2, self.cfg.out_dim)
        return y.permute(6, 0, 3, 1, 4, 2, 5).reshape(self.cfg.out_dim, frames, 2 * hp, 2 * wp)

    # -- prefill (§4.2) ----------------------------------------------------------------
    def prefill(self, cache: StepCache, ref_latent: torch.Tensor, motion: torch.Tensor,
                text: torch.Tensor, rec: dict | None = None) -> None:
        """Sink pass over Lc cond tokens; stores un-roped keys and values per layer."""
        _, _, h, w = ref_latent.shape
        self._check_geometry(h, w)
        mask = self.trainable_cond_mask.weight
        x = torch.cat([self._patch(self.patch_embedding, ref_latent) + mask[1],
                       self.frame_pack(motion) + mask[2]], 1)
        _, e0 = self.time_embed(torch.zeros(1, device=x.device))
        cos, sin = rope_factors(cond_positions(REF_TIME, h, w), self.cfg.head_dim,
                                self.cfg.rope_theta, self.cfg.rope_max_positions)
        if rec is not None:
            rec["patch_embed"] = x
        for i, blk in enumerate(self.blocks):
            def attn(q, k, v, i=i):
                cache.cond_k[i], cache.cond_v[i] = k[0].clone(), v[0].clone()
                return self._sdpa(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

            x = self.block(blk, x, e0, attn, text)
            if rec is not None and i == 0:
                rec["block0_out"] = x

    # -- one streaming call (§3.3, §4.4, §4.5) -----------------------------------------
    def forward_stream(self, cache: StepCache, x: torch.Tensor, t: float, text: torch.Tensor,
                       cond_states: torch.Tensor, audio: torch.Tensor, current_start: int,
                       relative_dist: int, rec: dict | None = None) -> torch.Tensor:
        """x, cond_states [16, F, h, w]; audio [1, 25, audio_dim, 4F]; returns [16, F, h, w]."""
        cfg = self.cfg
        _, frames, h, w = x.shape
        self._check_geometry(h, w)
        hp, wp = h // 2, w // 2
        fsl, lq = hp * wp, frames * hp * wp
        if fsl != cache.fsl or current_start % fsl or cache.ring_len % lq:
            raise ValueError("geometry does not match the step cache")
        if cache.cond_k[0] is None:
            raise ValueError("streaming call before the prefill")
        cur = current_start // fsl

        tok, glob = self.encode_audio(audio)
        xt = (self._patch(self.patch_embedding, x) + self._patch(self.cond_encoder, cond_states)
              + self.trainable_cond_mask.weight[0])
        tt = torch.tensor([t] * frames + [0.0] * frames, dtype=torch.float32, device=x.device)
        e, e0 = self.time_embed(tt)
        e, mod = e[:frames], e0[:frames]  # noisy tokens use the real-t rows (slot 0)

        ncos, nsin = rope_factors(noisy_positions(cur, frames, hp, wp), cfg.head_dim,
                                  cfg.rope_theta, cfg.rope_max_positions)
        ref_t = ref_time_for_call(cur, relative_dist)
        ccos, csin = rope_factors(cond_positions(ref_t, h, w), cfg.head_dim, cfg.rope_theta,
                                  cfg.rope_max_positions)
        write = current_start % cache.ring_len
        window = current_start + lq if current_start < cache.ring_len else cache.ring_len
        if rec is not None:
            rec.update(audio_tokens=tok, audio_global=glob, time_e=e, time_e0=mod,
                       patch_embed=xt, key_len=window + cache.cond_k[0].shape[0], ref_time=ref_t,
                       rope_noisy_cos=ncos, rope_noisy_sin=nsin, rope_cond_cos=ccos,
                       rope_cond_sin=csin)

        for i, blk in enumerate(self.blocks):
            def attn(q, k, v, i=i):
                q, k = apply_rope(q, ncos, nsin), apply_rope(k, ncos, nsin)
                cache.k[i][write:write + lq] = k[0]
                cache.v[i][write:write + lq] = v[0]
                ck = apply_rope(cache.cond_k[i][None], ccos, csin)[0]
                keys = torch.cat([cache.k[i][:window], ck])[None]
                vals = torch.cat([cache.v[i][:window], cache.cond_v[i]])[None]
                return self._sdpa(q, keys, vals)

            xt = self.block(blk, xt, mod, attn, text)
            if rec is not None and i == 0:
                rec["block0_out"] = xt
            if i in cfg.audio_inject_layers:
                j = cfg.audio_inject_layers.index(i)
                xt = self.inject_audio(j, xt, tok, glob)
                if rec is not None and j == 0:
                    rec["inject0_out"] = xt
        if rec is not None:
            rec["head_in"] = xt
        y = self.head_out(xt, e)
        if rec is not None:
            rec["head_out"] = y
        return self.unpatchify(y, frames, hp, wp)

    def _check_geometry(self, h: int, w: int) -> None:
        if h % 8 or w % 8:
            raise ValueError(f"latent {h}x{w}: height and width must be multiples of 8 (§10.1)")


def ref_time_for_call(cur: int, relative_dist: int) -> int:
    """§4.5: start_idx = 30 - relative_dist; ref time = 30 + max(0, cur - start_idx)."""
    return REF_TIME + max(0, cur - (REF_TIME - relative_dist))
