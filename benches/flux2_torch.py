#!/usr/bin/env python3
"""PyTorch baseline for benches/flux2_cpu.rs: diffusers Flux2Transformer2DModel forward and
AutoencoderKLFlux2 decode on CPU in float32, random weights, the same mid-size shapes and thread
count as candle (RAYON_NUM_THREADS, else all cores). Prints the median of timed passes."""
import os
import statistics
import time

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

threads = int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count()))
torch.set_num_threads(threads)
torch.set_grad_enabled(False)
torch.manual_seed(0)

HEADS, DOUBLE, SINGLE, JOINT, GRID, TEXT = 6, 2, 4, 1536, 16, 128
model = Flux2Transformer2DModel(num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=128,
                                num_attention_heads=HEADS, joint_attention_dim=JOINT,
                                axes_dims_rope=(32, 32, 32, 32)).eval()
n = GRID * GRID
x = torch.randn(1, n, 128)
ctx = torch.randn(1, TEXT, JOINT)
t = torch.tensor([0.5])
img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(GRID), torch.arange(GRID), torch.arange(1)).float()
txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TEXT)).float()
vae = AutoencoderKLFlux2(block_out_channels=(64, 128, 256, 256)).eval()
z = torch.randn(1, 32, 16, 16)


def median_s(fn, reps=10):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


tf = median_s(lambda: model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids,
                             txt_ids=txt_ids, guidance=None, return_dict=False))
vd = median_s(lambda: vae.decode(z, return_dict=False))
print(f"torch {torch.__version__}, {threads} threads: transformer_forward_f32 {tf * 1e3:.1f} ms, "
      f"vae_decode_f32 {vd * 1e3:.1f} ms")
