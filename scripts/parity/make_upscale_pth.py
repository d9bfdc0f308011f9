#!/usr/bin/env python3
"""Writes the tiny upscaler networks as torch.save (zip) checkpoints, wrapped like the official
files (`params_ema` for RRDBNet, `params` for SRVGGNetCompact), and cross-checks the numpy
goldens of make_upscale_fixtures.py against a PyTorch forward of the same weights.

Needs torch + safetensors (the shared parity venv). Run via `make fixtures-upscale`.
"""
import json
from collections import OrderedDict

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

OUT = "tests/fixtures/upscale"


def conv(sd, n, x):
    return F.conv2d(x, sd[n + ".weight"], sd[n + ".bias"], padding=1)


def rrdb(sd, cfg, x):
    lr = lambda t: F.leaky_relu(t, 0.2)
    u = {4: 1, 2: 2, 1: 4}[cfg["scale"]]
    if u > 1:
        x = F.pixel_unshuffle(x, u)
    feat = conv(sd, "conv_first", x)
    body = feat
    for b in range(cfg["num_block"]):
        t = body
        for r in (1, 2, 3):
            p = f"body.{b}.rdb{r}."
            xs = [t]
            for k in range(1, 5):
                xs.append(lr(conv(sd, p + f"conv{k}", torch.cat(xs, 1))))
            t = conv(sd, p + "conv5", torch.cat(xs, 1)) * 0.2 + t
        body = t * 0.2 + body
    feat = feat + conv(sd, "conv_body", body)
    feat = lr(conv(sd, "conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lr(conv(sd, "conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv(sd, "conv_last", lr(conv(sd, "conv_hr", feat)))


def srvgg(sd, cfg, x):
    out = x
    for i in range(cfg["num_conv"] + 1):
        out = F.prelu(conv(sd, f"body.{2*i}", out), sd[f"body.{2*i+1}.weight"])
    out = conv(sd, f"body.{2*cfg['num_conv']+2}", out)
    r = cfg["upscale"]
    return F.pixel_shuffle(out, r) + F.interpolate(x, scale_factor=r, mode="nearest")


def main():
    manifest = json.load(open(f"{OUT}/manifest.json"))
    for name in ("rrdb_x2", "rrdb_x4", "srvgg_x4"):
        sd = {k: v.float() for k, v in load_file(f"{OUT}/{name}.safetensors").items()}
        key = "params" if name.startswith("srvgg") else "params_ema"
        torch.save({key: OrderedDict(sorted(sd.items()))}, f"{OUT}/{name}.pth")
        fw = load_file(f"{OUT}/{name}_forward.safetensors")
        cfg = manifest[name]
        with torch.no_grad():
            y = (rrdb if name.startswith("rrdb") else srvgg)(sd, cfg, fw["input"])
        d = (y - fw["output"]).abs().max().item()
        print(f"{name}: torch vs numpy golden max abs diff {d:.2e}")
        assert d < 1e-4, name


if __name__ == "__main__":
    main()
