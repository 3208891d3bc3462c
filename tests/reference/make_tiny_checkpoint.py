"""Write the tiny checkpoint folder, the tiny LiveAvatar LoRA and the merged-weight fixture.

  python3 tests/reference/make_tiny_checkpoint.py [--out tests/fixtures/dit_tiny]

Outputs (under --out):
  checkpoint/config.json, checkpoint/diffusion_pytorch_model-0000{1,2}-of-00002.safetensors,
  checkpoint/diffusion_pytorch_model.safetensors.index.json   (bf16, real tensor names)
  lora/liveavatar.safetensors        <module>.lora_A.default.weight [r, in],
                                     <module>.lora_B.default.weight [out, r]   (bf16)
  lora_merged.safetensors            bf16(W + (alpha/r) B A) for every adapted linear
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoint_io import (  # noqa: E402
    load_folder, lora_targets, merge_lora, random_init_, save_sharded)
from liveavatar_ref import DitConfig, LiveAvatarDiT  # noqa: E402

WEIGHT_SEED = 20260101
LORA_SEED = 20260102


def lora_values(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """k * 2^-9 with integer k in [-127, 127]: exact in bf16, and every B @ A of rank <= 4 is
    exact in fp32 (|sum| < 2^16 units of 2^-18), so the merged bits do not depend on the
    summation order of the delta."""
    k = torch.randint(-127, 128, shape, generator=gen).to(torch.float32)
    return (k * 2.0 ** -9).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE.parent / "fixtures" / "dit_tiny")
    ap.add_argument("--config", type=Path, default=HERE / "tiny_config.json")
    args = ap.parse_args()
    full = json.loads(args.config.read_text())
    cfg = DitConfig.from_dict(full["model"])
    rank, alpha = full["lora"]["rank"], full["lora"]["alpha"]
    if rank > 4:
        raise SystemExit("lora_values is exact only up to rank 4")

    model = LiveAvatarDiT(cfg)
    random_init_(model, torch.Generator().manual_seed(WEIGHT_SEED))
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    ckpt = args.out / "checkpoint"
    save_sharded(state, ckpt, full["model"], shards=2)

    gen = torch.Generator().manual_seed(LORA_SEED)
    lora = {}
    for name in lora_targets(model):
        w = state[name + ".weight"]
        lora[f"{name}.lora_A.default.weight"] = lora_values((rank, w.shape[1]), gen)
        lora[f"{name}.lora_B.default.weight"] = lora_values((w.shape[0], rank), gen)
    (args.out / "lora").mkdir(parents=True, exist_ok=True)
    save_file(lora, str(args.out / "lora" / "liveavatar.safetensors"))

    _, reread = load_folder(ckpt)
    merged = merge_lora(reread, lora, alpha, rank)
    out = {n + ".weight": merged[n + ".weight"] for n in lora_targets(model)}
    save_file(out, str(args.out / "lora_merged.safetensors"))
    n_params = sum(v.numel() for v in state.values())
    print(f"checkpoint: {len(state)} tensors, {n_params} parameters; "
          f"LoRA: {len(lora)} tensors over {len(out)} linears (rank {rank}, alpha {alpha})")


if __name__ == "__main__":
    main()
