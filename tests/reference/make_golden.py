"""Generate the golden fixtures of the tiny DiT (float32 run of our reference).

  python3 tests/reference/make_tiny_checkpoint.py
  python3 tests/reference/make_golden.py
  python3 tests/reference/check_reference.py

Reads tests/fixtures/dit_tiny/{checkpoint,lora}, writes tests/fixtures/dit_tiny/{inputs,prefill,
calls,intermediates,schedule}.safetensors. README.md beside this file describes every tensor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file as _save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoint_io import load_model  # noqa: E402
from pipeline import StreamInputs, euler_step, flow_match_schedule, generate  # noqa: E402

INPUT_SEED = 20260103
BLOCKS_RUN = [4, 2]  # clip 0 complete (ring full), clip 1: re-prefill, ring wraps twice
RECORD = [(0, 0, 0), (1, 1, 3)]  # first call; a steady-state call after the wrap
SCHEDULE_STEPS = (1, 2, 3, 4, 8, 40)
TEXT_TOKENS = 11  # of text_len 16: 5 zero-padded rows


def save_file(tensors: dict, path: str) -> None:
    _save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path)


def make_inputs(full: dict) -> StreamInputs:
    m, s = full["model"], full["stream"]
    h, w = s["lat_h"], s["lat_w"]
    lat = s["frames_per_block"] * s["blocks_per_clip"]
    clips, steps = len(BLOCKS_RUN), full["sampler"]["sample_steps"]
    g = torch.Generator().manual_seed(INPUT_SEED)

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32)

    return StreamInputs(
        context=rn(TEXT_TOKENS, m["text_dim"]),
        ref_latent=rn(m["in_dim"], 1, h, w),
        motion_latents=rn(m["in_dim"], s["motion_latents"], h, w),
        audio=rn(1, m["num_audio_layers"], m["audio_dim"], 4 * lat * clips),
        cond_states=rn(m["cond_dim"], lat * clips, h, w),
        noise=[rn(m["in_dim"], lat, h, w) for _ in range(clips)],
        relative_dist=torch.randint(s["relative_dist_min"], s["relative_dist_max"] + 1,
                                    (clips, s["blocks_per_clip"], steps), generator=g),
        blocks=BLOCKS_RUN,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", type=Path, default=HERE.parent / "fixtures" / "dit_tiny")
    args = ap.parse_args()
    out = args.fixtures
    full = json.loads((HERE / "tiny_config.json").read_text())
    s, lo, sm = full["stream"], full["lora"], full["sampler"]
    torch.manual_seed(0)
    model = load_model(out / "checkpoint", out / "lora" / "liveavatar.safetensors",
                       lo["alpha"], lo["rank"], torch.float32)
    inp = make_inputs(full)
    with torch.no_grad():
        res = generate(model, inp, sm["sample_steps"], sm["shift"], s["frames_per_block"],
                       s["blocks_per_clip"], s["ring_frames"], record=set(RECORD))
        text_emb = model.embed_text(inp.context)
    timesteps, sigmas = flow_match_schedule(sm["sample_steps"], sm["shift"])

    clips = len(BLOCKS_RUN)
    save_file({
        "context": inp.context, "ref_latent": inp.ref_latent,
        "motion_latents": inp.motion_latents, "audio": inp.audio,
        "cond_states": inp.cond_states,
        **{f"noise.r{r}": inp.noise[r] for r in range(clips)},
        "relative_dist": inp.relative_dist.to(torch.int64),
        "blocks_run": torch.tensor(BLOCKS_RUN, dtype=torch.int64),
        "timesteps": timesteps, "sigmas": sigmas,
    }, str(out / "inputs.safetensors"))

    pre = {}
    for r, (ks, vs) in res.prefill_kv.items():
        pre[f"r{r}.sink_ref"] = res.sink_ref[r]
        for i, (k, v) in enumerate(zip(ks, vs)):
            pre[f"r{r}.blocks.{i}.cond_k"] = k
            pre[f"r{r}.blocks.{i}.cond_v"] = v
    # Prefill intermediates, from a fresh cache (same inputs as the clip-0 prefill).
    from liveavatar_ref import StepCache  # noqa: E402
    rec: dict = {}
    fsl = (s["lat_h"] // 2) * (s["lat_w"] // 2)
    with torch.no_grad():
        model.prefill(StepCache(model, fsl, s["ring_frames"]), inp.ref_latent,
                      inp.motion_latents, text_emb, rec)
    pre["r0.patch_embed"], pre["r0.block0_out"] = rec["patch_embed"], rec["block0_out"]
    save_file(pre, str(out / "prefill.safetensors"))

    calls = {}
    for (r, b), c in res.calls.items():
        calls[f"r{r}.b{b}.x"], calls[f"r{r}.b{b}.v"] = c["x"], c["v"]
        steps = range(sm["sample_steps"])
        calls[f"r{r}.b{b}.key_len"] = torch.tensor([res.key_len[(r, b, i)] for i in steps])
        calls[f"r{r}.b{b}.ref_time"] = torch.tensor([res.ref_time[(r, b, i)] for i in steps])
    for r, lat in enumerate(res.latents):
        calls[f"r{r}.latents"] = lat
    save_file(calls, str(out / "calls.safetensors"))

    inter = {"text_emb": text_emb}
    for (r, b, i), rec in res.records.items():
        for k, v in rec.items():
            t = v if torch.is_tensor(v) else torch.tensor([v], dtype=torch.int64)
            inter[f"r{r}.b{b}.s{i}.{k}"] = t.float() if t.dtype == torch.float16 else t
    save_file(inter, str(out / "intermediates.safetensors"))

    sched = {}
    for n in SCHEDULE_STEPS:
        t, sg = flow_match_schedule(n, sm["shift"])
        sched[f"steps{n}.timesteps"], sched[f"steps{n}.sigmas"] = t, sg
    # The bf16 Euler rule (§5) on the first call's real tensors, rounded to bf16.
    c0 = res.calls[(0, 0)]
    xb, vb = c0["x"][0].to(torch.bfloat16), c0["v"][0].to(torch.bfloat16)
    sched["euler_bf16.x"], sched["euler_bf16.v"] = xb, vb
    sched["euler_bf16.out"] = euler_step(xb, vb, sigmas[0], sigmas[1])
    save_file(sched, str(out / "schedule.safetensors"))

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote fixtures to {out} ({total / 1e6:.2f} MB in total)")
    for r, lat in enumerate(res.latents):
        print(f"clip {r}: latents {tuple(lat.shape)}, rms {lat.pow(2).mean().sqrt():.4f}")


if __name__ == "__main__":
    main()
