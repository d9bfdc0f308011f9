#!/usr/bin/env python3
"""PyTorch baseline for benches/text_encoder.rs: transformers Qwen3Model at the same mid-size
config (hidden 1024, 16/8 heads x 64, MLP 3072, TE_BENCH_LAYERS layers, default 6), float32 on
CPU, 1 x 512 tokens (40 real + pads, attention mask), output_hidden_states as the klein pipeline
asks. Threads: RAYON_NUM_THREADS if set, else all cores (as candle). Prints the median time."""
import os
import statistics
import time

import torch
from transformers import Qwen3Config, Qwen3Model


def main():
    threads = int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    layers = int(os.environ.get("TE_BENCH_LAYERS", "6"))
    cfg = Qwen3Config(
        vocab_size=4096, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=1024,
    )
    model = Qwen3Model(cfg).float().eval()
    seq = 512
    ids = (torch.arange(seq) % 4096).unsqueeze(0)
    mask = (torch.arange(seq) < 40).long().unsqueeze(0)
    times = []
    with torch.no_grad():
        for i in range(12):
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            if i >= 2:
                times.append(time.perf_counter() - t)
    print(f"torch Qwen3 encoder: hidden 1024, {layers} layers, {seq} tokens, {threads} threads: "
          f"median {statistics.median(times) * 1e3:.1f} ms over {len(times)} runs")


if __name__ == "__main__":
    main()
