"""Checkpoint folder and LiveAvatar LoRA I/O for the reference (model-spec.md §2.3, §2.4).

Folder layout (diffusers style, as the released Wan2.2-S2V-14B):
  config.json
  diffusion_pytorch_model-0000{k}-of-0000{n}.safetensors
  diffusion_pytorch_model.safetensors.index.json   {"metadata": {"total_size": ...},
                                                     "weight_map": {name: shard file}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liveavatar_ref import DitConfig, LiveAvatarDiT

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LORA_TARGET_SUFFIXES = (".q", ".k", ".v", ".o", ".ffn.0", ".ffn.2")


def lora_targets(model: LiveAvatarDiT) -> list[str]:
    """Adapted linears (§2.4): names ending in q/k/v/o/ffn.0/ffn.2 (PEFT suffix match)."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(LORA_TARGET_SUFFIXES):
            names.append(name)
    return names


def random_init_(model: LiveAvatarDiT, gen: torch.Generator) -> None:
    """Random, non-zero values for every parameter, rounded to bf16 (the checkpoint dtype).

    Linear/conv weights ~ N(0, 1/fan_in); biases ~ 0.1 N; norm3 weight ~ 1 + 0.1 N; q/k RMSNorm
    weights ~ 2 (1 + 0.1 N) (sharper attention, so the fixtures resolve RoPE details); modulation,
    cond mask, padding token ~ 0.5 N; audio layer weights ~ 0.5 + 0.5 N (SiLU'd, summed: no
    tiny denominator). Zero-initialised modules of the real model (§1.1) are random here too.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=gen.device)
            if name.endswith(".bias") and "norm" not in name:
                v = 0.1 * n
            elif name.endswith("norm3.bias"):
                v = 0.1 * n
            elif ".norm_q." in name or ".norm_k." in name:
                v = 2.0 * (1.0 + 0.1 * n)
            elif "norm" in name:  # norm3 weight
                v = 1.0 + 0.1 * n
            elif name == "casual_audio_encoder.weights":
                v = 0.5 + 0.5 * n
            elif p.dim() >= 2 and "modulation" not in name and "trainable_cond_mask" not in name \
                    and "padding_tokens" not in name:
                fan_in = math.prod(p.shape[1:])
                v = n / math.sqrt(fan_in)
            else:
                v = 0.5 * n
            p.copy_(v.to(torch.bfloat16).to(p.dtype).to(p.device))


def save_sharded(state: dict[str, torch.Tensor], folder: Path, config: dict,
                 shards: int = 2) -> None:
    """Write config.json, `shards` safetensors files (names in state order) and the index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = list(state)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(folder / fname),
                  metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def load_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read config.json and every shard named by the index."""
    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / INDEX_NAME).read_text())
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        part = load_file(str(folder / fname))
        for k, v in part.items():
            if index["weight_map"].get(k) != fname:
                raise ValueError(f"tensor {k} found in {fname} but the index says "
                                 f"{index['weight_map'].get(k)}")
            state[k] = v
    return config, state


def merge_lora(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float,
               rank: int) -> dict[str, torch.Tensor]:
    """W <- bf16(W + (alpha/rank) * B @ A), delta in fp32, one rounding (§2.4)."""
    out = dict(state)
    prefix = "base_model.model."
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in lora.items():
        k = key[len(prefix):] if key.startswith(prefix) else key
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.default.weight"
            if k.endswith(tail):
                pairs.setdefault(k[: -len(tail)], {})[part] = val
                break
        else:
            raise ValueError(f"unexpected LoRA key {key}")
    for module, ab in pairs.items():
        wname = module + ".weight"
        if wname not in state or set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA module {module} has no base weight or lacks A/B")
        a, b, w = ab["lora_A"].float(), ab["lora_B"].float(), state[wname]
        if a.shape != (rank, w.shape[1]) or b.shape != (w.shape[0], rank):
            raise ValueError(f"LoRA {module}: A {tuple(a.shape)}, B {tuple(b.shape)} do not "
                             f"fit weight {tuple(w.shape)} at rank {rank}")
        out[wname] = (w.float() + (alpha / rank) * (b @ a)).to(torch.bfloat16)
    return out


def load_model(folder: Path, lora_path: Path | None = None, lora_alpha: float = 64.0,
               lora_rank: int = 128, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> LiveAvatarDiT:
    """Build the model from a checkpoint folder (strict names and shapes), merge the LoRA."""
    config, state = load_folder(folder)
    model = LiveAvatarDiT(DitConfig.from_dict(config))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint mismatch: missing {missing[:5]}, extra {extra[:5]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}")
    if lora_path is not None:
        state = merge_lora(state, load_file(str(lora_path)), lora_alpha, lora_rank)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()
