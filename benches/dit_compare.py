"""Set lava's `dit-bench` beside the PyTorch reference run on the same seed, and the tracker's
peak memory beside the planner's prediction. Prints a short table last.

  python3 benches/dit_compare.py BENCH_LOG TORCH_LOG PLAN_JSON LAVA_F32 TORCH_F32
BENCH_LOG: dit-bench's output; TORCH_LOG: bench_ref.py's (its last JSON line); PLAN_JSON:
`lava plan --gpus H200 --size '704*384' --num_gpus_dit 1 --json`; *_F32: the dumped outputs.
"""

from __future__ import annotations

import json
import sys

import numpy as np

# Tracker category of each planner component (runtime::memory::category_of), DiT part only:
# the bench builds the DiT alone, not T5, wav2vec2 or the VAE of the single-GPU rank.
DIT_PLAN = {
    "Weights": ["dit_weights"],
    "KvCache": ["kv_noisy", "kv_sink", "text_kv"],
    "Activations": ["dit_activations"],
}


def main() -> None:
    bench_log, torch_log, plan_json, lava_f32, torch_f32 = sys.argv[1:6]
    res, mem = {}, {}
    for line in open(bench_log):
        f = line.split()
        if f[:2] == ["RESULT", "dit_call"]:
            res = {f[i]: float(f[i + 1]) for i in range(2, len(f) - 1, 2)}
        elif f[:1] == ["MEM"] and len(f) >= 3 and f[2] == "peak_bytes":
            mem[f[1]] = int(f[3])
    ref = [json.loads(l) for l in open(torch_log) if l.startswith("{")][-1]
    plan = json.load(open(plan_json))["plan"]["ranks"][0]["items"]
    planned = {c: sum(i["bytes"] for i in plan if i["component"] in comps)
               for c, comps in DIT_PLAN.items()}

    a = np.fromfile(lava_f32, dtype="<f4").astype(np.float64)
    b = np.fromfile(torch_f32, dtype="<f4").astype(np.float64)
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b)) if a.shape == b.shape else float("nan")

    ms, ms_ref = res["ms_median"], ref["ms_median"]
    rows = [
        ("lava ms/call (median)", f"{ms:.1f}"),
        ("lava ms/call min..max", f"{res['ms_min']:.1f}..{res['ms_max']:.1f}"),
        ("lava TFLOP/s (123.0 T)", f"{123.0 / ms * 1e3:.0f}"),
        ("lava TFLOP/s (120.8 T, text K/V cached)", f"{120.8 / ms * 1e3:.0f}"),
        ("PyTorch ms/call (median)", f"{ms_ref:.1f}"),
        ("PyTorch TFLOP/s (123.0 T)", f"{123.0 / ms_ref * 1e3:.0f}"),
        ("speed-up vs PyTorch", f"{ms_ref / ms:.2f}x"),
        ("keys lava / PyTorch", f"{int(res['keys'])} / {ref['keys']}"),
        ("rel L2 lava vs PyTorch (bf16)", f"{rel:.2e}"),
        ("<= 250 ms", "yes" if ms <= 250 else "NO"),
        ("faster than PyTorch", "yes" if ms < ms_ref else "NO"),
        ("rel L2 <= 1e-2", "yes" if rel <= 1e-2 else "NO"),
    ]
    steps = 4
    for c in ["Weights", "KvCache", "Activations", "Workspace", "Communication", "total"]:
        p = planned.get(c)
        got = mem.get(c, 0)
        rows.append((f"peak {c} GiB (tracker / plan)",
                     f"{got / 2**30:.2f} / {p / 2**30:.2f}" if p else f"{got / 2**30:.2f} / -"))
    rows.append(("PyTorch peak GiB (1 step cache)", f"{ref.get('peak_gib', float('nan')):.2f}"))
    print(f"(plan: DiT lines of the single-H200 rank, {steps} step caches; tracker: {steps} "
          "step caches, peak over load + calls)")
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
