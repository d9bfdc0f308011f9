"""PyTorch's counterparts of benches/cpu_ops.rs (same shapes, same timing rule)."""
import os
import sys
import time

import torch


def timed(f):
    best = float("inf")
    for _ in range(3):
        for _ in range(5):
            f()
        ts = []
        for _ in range(30):
            t = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t) * 1e3)
        ts.sort()
        best = min(best, ts[15])
    return best


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
    torch.set_num_threads(threads)
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"PyTorch {torch.__version__} CPU ops, {threads} threads, load average {load}")
    for m, k, n in [(384, 768, 2304), (256, 768, 768), (384, 768, 9216), (384, 3072, 768),
                    (128, 1536, 768), (384, 5376, 768)]:
        x, w = torch.randn(1, m, k), torch.randn(n, k)
        ms = timed(lambda: torch.nn.functional.linear(x, w))
        print(f"gemm {m}x{k}x{n}: {ms:.3f} ms ({2 * m * k * n / ms / 1e6:.0f} GFLOP/s)")
    q, k = torch.randn(1, 6, 384, 128), torch.randn(1, 6, 384, 128)
    s = q @ k.transpose(-1, -2)
    print(f"attention q·kᵀ 6x384x384x128: {timed(lambda: q @ k.transpose(-1, -2)):.3f} ms")
    print(f"attention p·v 6x384x384x128: {timed(lambda: s @ k):.3f} ms")
    print(f"softmax 6x384x384: {timed(lambda: torch.softmax(s, -1)):.3f} ms")


if __name__ == "__main__":
    main()
