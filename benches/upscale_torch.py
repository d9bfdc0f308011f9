#!/usr/bin/env python3
"""PyTorch baseline for benches/upscale.rs: RealESRGAN_x4plus (BasicSR RRDBNet, random weights)
forward on CPU in float32, same input size (UPSCALE_BENCH_SIZE, default 256) and thread count
as candle (RAYON_NUM_THREADS, else all cores). Prints the median of a few timed passes."""
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RDB(nn.Module):
    def __init__(self, nf=64, gc=32):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1) for i in range(5))

    def forward(self, x):
        feats = [x]
        for conv in self.convs[:4]:
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.convs[4](torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self):
        super().__init__()
        self.rdbs = nn.Sequential(RDB(), RDB(), RDB())

    def forward(self, x):
        return self.rdbs(x) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, nb=23, nf=64):
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB() for _ in range(nb)])
        self.conv_body, self.conv_up1, self.conv_up2, self.conv_hr = (nn.Conv2d(nf, nf, 3, 1, 1) for _ in range(4))
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        lr = lambda t: F.leaky_relu(t, 0.2)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = lr(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = lr(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(lr(self.conv_hr(feat)))


def main():
    size = int(os.environ.get("UPSCALE_BENCH_SIZE", "256"))
    threads = int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    net = RRDBNet().eval()
    x = torch.rand(1, 3, size, size)
    runs = int(os.environ.get("UPSCALE_BENCH_RUNS", "3"))
    with torch.inference_mode():
        net(x)  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
    print(f"torch {torch.__version__} x4plus forward cpu f32 {size}x{size}, {threads} threads: "
          f"median {statistics.median(times):.3f} s over {runs} runs ({', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
