"""Flow-matching Euler sampler (model-spec.md §5) and the TPP-style streaming loop (§4.6, §4.7).

The loop keeps one StepCache per denoising step, exactly as the 4 TPP DiT ranks do; it is run
sequentially here, which gives the same numbers (each step-cache sees only its own step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from liveavatar_ref import LiveAvatarDiT, StepCache, ref_time_for_call


def flow_match_schedule(steps: int, shift: float = 3.0,
                        num_train: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps], sigmas [steps + 1]) float32, emulating diffusers'
    FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(steps):
    the constructor shifts the float32 training sigmas (so sigma_min = s(1/num_train)), then
    a float64 linspace from num_train*sigma_max to num_train*sigma_min, divided by num_train,
    shifted again (double shift, float64), cast to float32; timesteps = sigmas * num_train in
    float32; a terminal sigma 0 is appended. s(x) = shift*x / (1 + (shift-1)*x)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    train_t = torch.from_numpy(np.linspace(1, num_train, num_train, dtype=np.float32)[::-1].copy())
    train_s = train_t / num_train
    train_s = shift * train_s / (1 + (shift - 1) * train_s)
    s_max, s_min = train_s[0].item(), train_s[-1].item()
    t = np.linspace(s_max * num_train, s_min * num_train, steps)
    s = t / num_train
    s = shift * s / (1 + (shift - 1) * s)
    sig = torch.from_numpy(s).to(torch.float32)
    timesteps = sig * num_train
    return timesteps, torch.cat([sig, torch.zeros(1)])


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v.

    dt is a float32 difference. In float32 this is plain float32 arithmetic. With bf16 v the
    reference's type promotion applies (§5): dt rounded to bf16, dt*v a bf16 product, added to
    x upcast to fp32, the sum stored in v's dtype."""
    dt = (sigma_next.float() - sigma.float()).reshape(())
    prod = dt.to(v.dtype) * v
    return (x.float() + prod.float()).to(v.dtype)


@dataclass
class StreamInputs:
    context: torch.Tensor  # [L_txt, text_dim]
    ref_latent: torch.Tensor  # [16, 1, h, w]
    motion_latents: torch.Tensor  # [16, T, h, w], last 19 used
    audio: torch.Tensor  # [1, 25, audio_dim, 4 * 12 * clips] per video frame
    cond_states: torch.Tensor  # [16, 12 * clips, h, w] pose latents
    noise: list  # per clip [16, 12, h, w]
    relative_dist: torch.Tensor  # int [clips, blocks_per_clip, steps]
    blocks: list  # blocks to run per clip, e.g. [4, 2]


@dataclass
class StreamResult:
    latents: list = field(default_factory=list)  # per clip [16, 3 * blocks_run, h, w]
    calls: dict = field(default_factory=dict)  # (r, b) -> {"x": [steps+1,...], "v": [steps,...]}
    key_len: dict = field(default_factory=dict)  # (r, b, i) -> keys attended
    ref_time: dict = field(default_factory=dict)  # (r, b, i) -> reference temporal position
    prefill_kv: dict = field(default_factory=dict)  # r -> (cond_k list, cond_v list), step 0
    records: dict = field(default_factory=dict)  # (r, b, i) -> intermediates, when asked
    sink_ref: list = field(default_factory=list)  # reference latent used by each prefill


def generate(model: LiveAvatarDiT, inp: StreamInputs, steps: int = 4, shift: float = 3.0,
             frames_per_block: int = 3, blocks_per_clip: int = 4, ring_frames: int = 12,
             record: set | None = None, reprefill: bool = True) -> StreamResult:
    """TPP streaming generation: prefill at clip 0, re-prefill at clip 1 with the first latent
    frame of clip 0 block 0's denoised output (§4.6), 4 step-caches, Euler per block.
    reprefill=False keeps the clip-0 sink (single-GPU default path, §6.8)."""
    timesteps, sigmas = flow_match_schedule(steps, shift)
    _, _, h, w = inp.ref_latent.shape
    fsl = (h // 2) * (w // 2)
    lat_per_clip = frames_per_block * blocks_per_clip
    text = model.embed_text(inp.context)  # once per generation
    caches = [StepCache(model, fsl, ring_frames) for _ in range(steps)]
    res = StreamResult()
    sink_ref = inp.ref_latent
    for r, nblocks in enumerate(inp.blocks):
        if r == 0 or (r == 1 and reprefill):
            if r == 1:
                sink_ref = res.latents[0][:, :1]
            for cache in caches:
                model.prefill(cache, sink_ref, inp.motion_latents, text)
            res.prefill_kv[r] = ([k.clone() for k in caches[0].cond_k],
                                 [v.clone() for v in caches[0].cond_v])
            res.sink_ref.append(sink_ref.clone())
        outs = []
        for b in range(nblocks):
            f0 = frames_per_block * b
            x = inp.noise[r][:, f0:f0 + frames_per_block].to(model.act)
            a0 = 4 * (lat_per_clip * r + f0)
            audio = inp.audio[..., a0:a0 + 4 * frames_per_block]
            c0 = lat_per_clip * r + f0
            cond = inp.cond_states[:, c0:c0 + frames_per_block]
            start = (lat_per_clip * r + f0) * fsl
            xs, vs = [x], []
            for i in range(steps):
                rec = {} if record is not None and (r, b, i) in record else None
                rd = int(inp.relative_dist[r, b, i])
                v = model.forward_stream(caches[i], x, float(timesteps[i]), text, cond, audio,
                                         start, rd, rec)
                res.key_len[(r, b, i)] = _key_len(caches[i], start, fsl * frames_per_block)
                res.ref_time[(r, b, i)] = ref_time_for_call(start // fsl, rd)
                if rec is not None:
                    res.records[(r, b, i)] = rec
                x = euler_step(x, v, sigmas[i], sigmas[i + 1])
                xs.append(x)
                vs.append(v)
            res.calls[(r, b)] = {"x": torch.stack(xs), "v": torch.stack(vs)}
            outs.append(x)
        res.latents.append(torch.cat(outs, 1))
    return res


def _key_len(cache: StepCache, start: int, lq: int) -> int:
    window = start + lq if start < cache.ring_len else cache.ring_len
    return window + cache.cond_k[0].shape[0]
