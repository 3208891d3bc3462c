"""PyTorch side of the GPU benchmark, run right after `gpu-bench` in the same command on the
same GPU: torch.matmul at the DiT GEMM shapes (plain and with bias + GELU-tanh, as
F.linear + F.gelu) and scaled_dot_product_attention with each backend (flash, cuDNN,
efficient), same layout as ours ([B, L, H, D] memory, transposed views), same timing
(CUDA events, 3 warm-ups, median of 7 repetitions of 10 calls).

usage: python3 benches/gpu_torch.py ours.txt   (the output of gpu-bench)
Prints a markdown table: ours vs PyTorch's fastest path, ratio = torch_ms / ours_ms.
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

M, HEADS, HD = 3168, 40, 128


def bench(fn):
    for _ in range(3):
        fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = []
    for _ in range(7):
        e0.record()
        for _ in range(10):
            fn()
        e1.record()
        torch.cuda.synchronize()
        reps.append(e0.elapsed_time(e1) / 10)
    return sorted(reps)[len(reps) // 2]


def main():
    ours = {}
    for line in open(sys.argv[1]):
        if line.startswith("RESULT"):
            _, name, ms, _tf = line.split()
            ours[name] = float(ms)
    torch.manual_seed(0)
    dev = "cuda"
    rows = []
    print("torch", torch.__version__, torch.cuda.get_device_name(0), "cuDNN", torch.backends.cudnn.version())
    for k, n in [(5120, 5120), (5120, 13824), (13824, 5120)]:
        a = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.1
        flops = 2 * M * n * k
        t_plain = bench(lambda: torch.matmul(a, w.t()))
        t_epi = bench(lambda: F.gelu(F.linear(a, w, b), approximate="tanh"))
        for epi, t in [("plain", t_plain), ("bias_gelu", t_epi)]:
            name = f"gemm_{M}x{k}x{n}_{epi}"
            rows.append((name, ours.get(name), t, "torch.matmul" if epi == "plain" else "F.linear+F.gelu", flops))
    for lk in [15312, 512]:
        q = torch.randn(1, M, HEADS, HD, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        k_ = torch.randn(1, lk, HEADS, HD, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, lk, HEADS, HD, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        flops = 4 * M * lk * HEADS * HD
        best = None
        for be, label in [(SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn"),
                          (SDPBackend.EFFICIENT_ATTENTION, "efficient")]:
            try:
                with sdpa_kernel(be):
                    t = bench(lambda: F.scaled_dot_product_attention(q, k_, v))
            except RuntimeError as e:
                print(f"sdpa {label} lk={lk}: unavailable ({str(e).splitlines()[0]})")
                continue
            print(f"sdpa {label} lk={lk}: {t:.4f} ms, {flops / t / 1e9:.1f} TFLOP/s")
            if best is None or t < best[0]:
                best = (t, label)
        for n_, v_ in sorted(ours.items()):
            if n_.startswith(f"attn_{M}x{lk}_"):
                rows.append((n_, v_, best[0], f"sdpa {best[1]}", flops))
    print()
    print("| case | ours ms | ours TFLOP/s | PyTorch ms | PyTorch TFLOP/s | PyTorch path | ratio (torch/ours) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, o, t, path, flops in rows:
        if o is None:
            print(f"| {name} | missing | | {t:.4f} | {flops / t / 1e9:.1f} | {path} | n/a |")
            continue
        print(f"| {name} | {o:.4f} | {flops / o / 1e9:.1f} | {t:.4f} | {flops / t / 1e9:.1f} | {path} | {t / o:.3f} |")


if __name__ == "__main__":
    main()
