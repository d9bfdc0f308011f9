#!/usr/bin/env python3
"""diffusers baseline for `imagegen bench`: the same cases through diffusers' Flux2KleinPipeline
with RANDOM weights built from the same configs, on the same device, written in the same JSON
schema (benches/compare.py joins the two).

Random weights: timings and memory only, the images are noise. Weights are created directly on
the device in the compute dtype; nothing is downloaded.

  python3 benches/diffusers_baseline.py --model 4B --json-out out/diffusers.json
  python3 benches/diffusers_baseline.py --model tests/fixtures/flux2/tiny-model --device cpu \
      --dtype f32 --cases t2i-64x64 --runs 1

Method (mirrors `imagegen bench`): per case, `--warmup` untimed runs, then `--runs` timed runs;
the median total is reported with per-stage medians. Stage times come from wrappers around the
text encoder, the transformer (summed over steps = denoise), vae.decode and vae.encode (= encode
refs), each synchronising the device, so the stages add a few syncs per run. Peak memory is
torch.cuda.max_memory_allocated over the timed runs (allocated, not reserved), the counterpart
of the CUDA pool high-water mark `imagegen bench` reports.
"""

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import to_markdown  # noqa: E402  (one table layout for both implementations)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A beautiful sunset over mountains"
REF_SIZE = 768  # default side of the reference images, the same in both implementations

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


# --- cases (same ids and order as src/cli/bench/cases.rs) ---------------------------------------
def all_cases():
    v = ["load"]
    v += [f"t2i-{w}x{h}" for w, h in [(512, 512), (768, 768), (1024, 768), (768, 1024), (1024, 1024), (1280, 1280)]]
    v += [f"refs{n}-{w}x{h}" for w, h in [(1024, 768), (768, 768), (512, 512)] for n in [2, 4, 8, 12, 16]]
    v += ["upscale-x4plus-1024"]
    return v


def parse_case(s):
    def wh(x):
        w, h = x.split("x")
        return int(w), int(h)

    if s == "load":
        return ("load",)
    if s.startswith("t2i-"):
        return ("t2i",) + wh(s[4:])
    if s.startswith("upscale-x4plus-"):
        return ("upscale", int(s[len("upscale-x4plus-"):]))
    if s.startswith("refs"):
        n, rest = s[4:].split("-", 1)
        return ("refs", int(n)) + wh(rest)
    raise ValueError(s)


def select(filt):
    out = []
    for item in [x.strip() for x in filt.split(",") if x.strip()]:
        if item == "all":
            matched = all_cases()
        elif item.endswith("*"):
            matched = [c for c in all_cases() if c.startswith(item[:-1])]
        else:
            try:
                parse_case(item)
            except (ValueError, IndexError):
                sys.exit(f"--cases: unknown case '{item}'")
            matched = [item]
        if not matched:
            sys.exit(f"--cases: '{item}' matches no case")
        out += [c for c in matched if c not in out]
    if not out:
        sys.exit("--cases: no case selected")
    return out


# --- timing helpers -----------------------------------------------------------------------------
class Stages:
    """Wraps pipeline components to accumulate per-stage wall time of one run."""

    def __init__(self, sync):
        self.sync = sync
        self.t = {}

    def wrap(self, obj, attr, key):
        inner = getattr(obj, attr)

        def timed(*a, **kw):
            self.sync()
            t0 = time.perf_counter()
            r = inner(*a, **kw)
            self.sync()
            self.t[key] = self.t.get(key, 0.0) + (time.perf_counter() - t0) * 1e3
            return r

        setattr(obj, attr, timed)

    def take(self):
        t, self.t = self.t, {}
        return t


def median_or_none(xs):
    return statistics.median(xs) if xs else None


def case_result(name, status, error=None, runs=(), stages=None, peak=None, after=None):
    return {
        "case": name,
        "status": status,
        **({"error": error} if error else {}),
        "runs_ms": list(runs),
        "median_ms": median_or_none(list(runs)),
        "stages": stages or {},
        "peak_mem_bytes": peak,
        "mem_after_bytes": after,
    }


# --- model construction -------------------------------------------------------------------------
def model_dir(model):
    presets = {"4B": "klein-4b", "9B": "klein-9b"}
    if model in presets:
        return ROOT / "benches" / "configs" / presets[model]
    return Path(model)


def read_config(path):
    cfg = json.loads(Path(path).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_pipeline(mdir, tokenizer_dir, device, dtype):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tcfg = read_config(mdir / "transformer" / "config.json")
    qcfg = Qwen3Config(**{k: v for k, v in read_config(mdir / "text_encoder" / "config.json").items()
                          if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")})
    vcfg = read_config(mdir / "vae" / "config.json")
    scfg = read_config(mdir / "scheduler" / "scheduler_config.json")
    index = json.loads((mdir / "model_index.json").read_text())
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            transformer = Flux2Transformer2DModel(**tcfg)
            text_encoder = Qwen3ForCausalLM(qcfg)
            vae = AutoencoderKLFlux2(**vcfg)
    finally:
        torch.set_default_dtype(prev)
    for m in (transformer, text_encoder, vae):
        m.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    scheduler = FlowMatchEulerDiscreteScheduler(**scfg)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=bool(index.get("is_distilled", False)))


# --- Real-ESRGAN x4plus (RRDBNet), written from the published architecture --------------------
class DenseBlock(torch.nn.Module):
    def __init__(self, nf=64, gc=32):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1) for i in range(5))

    def forward(self, x):
        feats = [x]
        for i, conv in enumerate(self.convs):
            y = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(torch.nn.functional.leaky_relu(y, 0.2))
        return x + 0.2 * y


class RRDB(torch.nn.Module):
    def __init__(self, nf=64, gc=32):
        super().__init__()
        self.blocks = torch.nn.Sequential(DenseBlock(nf, gc), DenseBlock(nf, gc), DenseBlock(nf, gc))

    def forward(self, x):
        return x + 0.2 * self.blocks(x)


class RRDBNetX4(torch.nn.Module):
    def __init__(self, nf=64, nb=23, gc=32):
        super().__init__()
        c = torch.nn.Conv2d
        self.conv_first = c(3, nf, 3, 1, 1)
        self.body = torch.nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.conv_body, self.conv_up1, self.conv_up2 = c(nf, nf, 3, 1, 1), c(nf, nf, 3, 1, 1), c(nf, nf, 3, 1, 1)
        self.conv_hr, self.conv_last = c(nf, nf, 3, 1, 1), c(nf, 3, 3, 1, 1)

    def forward(self, x):
        lrelu = lambda t: torch.nn.functional.leaky_relu(t, 0.2)  # noqa: E731
        up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        f = self.conv_first(x)
        f = f + self.conv_body(self.body(f))
        f = lrelu(self.conv_up1(up(f)))
        f = lrelu(self.conv_up2(up(f)))
        return self.conv_last(lrelu(self.conv_hr(f)))


def upscale_tiled(net, img, tile=256, pad=10, scale=4):
    """The original's RealESRGANer procedure: tile 256, tile_pad 10, paste the unpadded centres."""
    _, _, h, w = img.shape
    out = img.new_zeros((1, 3, h * scale, w * scale))
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            py0, px0, py1, px1 = max(y0 - pad, 0), max(x0 - pad, 0), min(y1 + pad, h), min(x1 + pad, w)
            o = net(img[:, :, py0:py1, px0:px1])
            oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                o[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    return out.clamp_(0, 1)


# --- main ---------------------------------------------------------------------------------------
def reference_images(n, seed, side):
    """Deterministic, non-trivial RGB images (gradient plus noise), side² each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    imgs = []
    for i in range(n):
        base = np.stack([(xx + 37 * i) % 256, (yy + 91 * i) % 256, ((xx + yy) // 2 + 13 * i) % 256], -1)
        noise = rng.integers(0, 32, size=base.shape)
        imgs.append(Image.fromarray(((base + noise) % 256).astype("uint8"), "RGB"))
    return imgs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="4B", help="4B, 9B, or a diffusers-layout dir whose configs define the model")
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/flux2/tiny-model/tokenizer"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, f32 on cpu")
    ap.add_argument("--cases", default="all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ref-size", type=int, default=REF_SIZE, help="side of each reference image")
    ap.add_argument("--json-out")
    ap.add_argument("--md-out")
    a = ap.parse_args()
    if a.runs < 1:
        sys.exit("--runs must be at least 1")
    cases = select(a.cases)
    device = torch.device(a.device)
    dtype_name = a.dtype or ("bf16" if device.type == "cuda" else "f32")
    dtype = DTYPES[dtype_name]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import diffusers

    report = {
        "implementation": "diffusers",
        "implementation_version": f"{diffusers.__version__} (torch {torch.__version__})",
        "weights": "random",
        "model": a.model,
        "quantization": "none",
        "text_encoder_quantization": "none",
        "dtype": dtype_name,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "num_steps": a.steps,
        "warmup": a.warmup,
        "runs": a.runs,
        "started_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cases": [],
    }
    print("RANDOM WEIGHTS: timings and memory only; the images are noise.", file=sys.stderr)

    def peak():
        return torch.cuda.max_memory_allocated(device) if cuda else None

    def now_alloc():
        return torch.cuda.memory_allocated(device) if cuda else None

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        pipe = build_pipeline(model_dir(a.model), Path(a.tokenizer), device, dtype)
        sync()
    except Exception as e:  # the load failing ends the run, as in the Rust bench
        report["cases"].append(case_result("load", "failed", error=repr(e)))
        return finish(report, a)
    load_ms = (time.perf_counter() - t0) * 1e3
    if "load" in cases:
        report["cases"].append(case_result("load", "ok", runs=[load_ms], peak=peak(), after=now_alloc()))
    pipe.set_progress_bar_config(disable=True)
    st = Stages(sync)
    st.wrap(pipe.text_encoder, "forward", "text_encoder_ms")
    st.wrap(pipe.transformer, "forward", "denoise_ms")
    st.wrap(pipe.vae, "decode", "vae_decode_ms")
    st.wrap(pipe.vae, "encode", "encode_refs_ms")
    upscaler = None

    for name in cases:
        if name == "load":
            continue
        spec = parse_case(name)
        if spec[0] == "upscale":
            if upscaler is None:
                with torch.device(device):
                    upscaler = RRDBNetX4().to(device=device, dtype=torch.float16 if cuda else torch.float32).eval()
            side = spec[1]
            g = torch.Generator(device="cpu").manual_seed(a.seed)
            img = torch.rand((1, 3, side, side), generator=g).to(device, next(upscaler.parameters()).dtype)

            def once():
                t = time.perf_counter()
                with torch.no_grad():
                    upscale_tiled(upscaler, img).float().cpu()
                sync()
                return {"upscale_ms": (time.perf_counter() - t) * 1e3}
        else:
            w, h = spec[-2], spec[-1]
            refs = reference_images(spec[1], a.seed, a.ref_size) if spec[0] == "refs" else None

            def once():
                gen = torch.Generator(device=device).manual_seed(a.seed)
                pipe(prompt=PROMPT, image=refs, width=w, height=h, num_inference_steps=a.steps,
                     guidance_scale=1.0, generator=gen)
                return st.take()

        runs, splits = [], []
        try:
            for _ in range(a.warmup):
                once()
            sync()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            st.take()
            for _ in range(a.runs):
                t = time.perf_counter()
                s = once()
                sync()
                runs.append((time.perf_counter() - t) * 1e3)
                splits.append(s)
            stages = {}
            for k in ["encode_refs_ms", "text_encoder_ms", "denoise_ms", "vae_decode_ms", "upscale_ms"]:
                vals = [s[k] for s in splits if k in s]
                if vals and len(vals) == len(splits):
                    stages[k] = statistics.median(vals)
            report["cases"].append(case_result(name, "ok", runs=runs, stages=stages, peak=peak(), after=now_alloc()))
        except Exception as e:  # OOM and friends: report and go on
            st.take()
            report["cases"].append(case_result(name, "failed", error=f"{type(e).__name__}: {e}"[:300],
                                               runs=runs, peak=peak(), after=now_alloc()))
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        print(f"{name}: {report['cases'][-1]['status']} {report['cases'][-1]['median_ms']}", file=sys.stderr)
    return finish(report, a)


def finish(report, a):
    md = to_markdown(report)
    print(md)
    if a.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
        Path(a.json_out).write_text(json.dumps(report, indent=2) + "\n")
    if a.md_out:
        Path(a.md_out).write_text(md)
    return 0 if all(c["status"] != "failed" for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
