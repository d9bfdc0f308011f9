#!/usr/bin/env python3
"""PyTorch side of benches/cpu_vs_torch.rs, driven over stdin/stdout so the two sides run
interleaved in one command. Each case builds the same architecture and shapes as the Rust side
(random weights: timing only).

Protocol, one line each way:  "setup <case>" -> "ok"  |  "run <case>" -> "<ms>"  |  "quit".
The first line printed is "ready <torch version>".
"""
import argparse
import os
import sys
import time

import torch


def dit():
    from diffusers import Flux2Transformer2DModel
    heads, double, single, joint, grid, text = 6, 2, 4, 1536, 16, 128
    model = Flux2Transformer2DModel(num_layers=double, num_single_layers=single, attention_head_dim=128,
                                    num_attention_heads=heads, joint_attention_dim=joint,
                                    axes_dims_rope=(32, 32, 32, 32)).eval()
    n = grid * grid
    x, ctx, t = torch.randn(1, n, 128), torch.randn(1, text, joint), torch.tensor([0.5])
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(grid), torch.arange(grid), torch.arange(1)).float()
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text)).float()
    return lambda: model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids,
                         txt_ids=txt_ids, guidance=None, return_dict=False)


def vae(blocks, latent):
    from diffusers import AutoencoderKLFlux2
    model = AutoencoderKLFlux2(block_out_channels=blocks).eval()
    z = torch.randn(1, 32, latent, latent)
    return lambda: model.decode(z, return_dict=False)


def text_encoder():
    from transformers import Qwen3Config, Qwen3Model
    cfg = Qwen3Config(vocab_size=4096, hidden_size=1024, intermediate_size=3072, num_hidden_layers=6,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-6,
                      rope_theta=1000000.0, max_position_embeddings=1024)
    model = Qwen3Model(cfg).float().eval()
    seq = 512
    ids = (torch.arange(seq) % 4096).unsqueeze(0)
    mask = (torch.arange(seq) < 40).long().unsqueeze(0)
    return lambda: model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)


def x4plus(size):
    # The same RRDBNet the upscale bench times (benches/upscale_torch.py), not a second copy.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from upscale_torch import RRDBNet

    net = RRDBNet().eval()
    x = torch.rand(1, 3, size, size)
    return lambda: net(x)


CASES = {
    "dit_forward": dit,
    "vae_decode_128": lambda: vae((64, 128, 256, 256), 16),
    "vae_decode_512": lambda: vae((128, 256, 512, 512), 64),
    "text_encoder": text_encoder,
    "x4plus_64": lambda: x4plus(64),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    fns = {}
    print(f"ready {torch.__version__}", flush=True)
    for line in sys.stdin:
        cmd, _, case = line.strip().partition(" ")
        if cmd == "quit":
            break
        if cmd == "setup":
            fns[case] = CASES[case]()
            print("ok", flush=True)
        elif cmd == "run":
            with torch.inference_mode():
                t = time.perf_counter()
                fns[case]()
                print(f"{(time.perf_counter() - t) * 1e3:.3f}", flush=True)
        else:
            print(f"error unknown command {cmd}", flush=True)


if __name__ == "__main__":
    main()
