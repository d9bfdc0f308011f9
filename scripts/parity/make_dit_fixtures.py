#!/usr/bin/env python3
"""Parity fixtures for the FLUX.2 DiT, VAE, schedule, reference preprocessing and full pipeline.

Runs diffusers in float32 on CPU against the tiny random-weight model that
scripts/parity/make_tiny_model.py writes (tests/fixtures/flux2/tiny-model), and writes small files
to tests/fixtures/flux2/dit/. Run with the parity venv (scripts/parity/setup_venv.sh):

    $PARITY_VENV/bin/python scripts/parity/make_dit_fixtures.py

Everything is seeded; the Rust tests in tests/flux2/parity.rs compare against these files.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/flux2/tiny-model"
OUT = ROOT / "tests/fixtures/flux2/dit"

torch.set_grad_enabled(False)
torch.set_num_threads(2)


def smooth_image(seed: int, w: int, h: int) -> Image.Image:
    """A deterministic image with structure at several scales (not flat, not pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.01, 0.2, size=2)
            ph = rng.uniform(0, 2 * math.pi)
            img[..., c] += np.sin(fx * xx + fy * yy + ph)
        img[..., c] += 0.5 * rng.standard_normal((h, w))
    img = (img - img.min()) / (img.max() - img.min())
    return Image.fromarray((img * 255).round().astype(np.uint8), "RGB")


def schedule_fixtures():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(MODEL / "scheduler")
    cases = []
    for n, seq in [(1, 4), (2, 16), (4, 12), (4, 1024), (4, 4096), (4, 6000), (7, 300), (28, 2048), (50, 4096)]:
        sigmas = np.linspace(1.0, 1 / n, n)
        mu = compute_empirical_mu(image_seq_len=seq, num_steps=n)
        sched.set_timesteps(sigmas=sigmas, mu=mu)
        cases.append({"steps": n, "image_seq_len": seq, "mu": mu, "sigmas": sched.sigmas.tolist()})
    (OUT / "schedule.json").write_text(json.dumps(cases, indent=1))


def transformer_fixtures():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(MODEL / "transformer", torch_dtype=torch.float32).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(1234)
    # Noise tokens on a 3x4 grid plus one 2x3 reference grid (T = 10), 20 text tokens.
    h, w, rh, rw, L = 3, 4, 2, 3, 20
    img_ids = torch.cat([
        torch.cartesian_prod(torch.tensor([0]), torch.arange(h), torch.arange(w), torch.tensor([0])),
        torch.cartesian_prod(torch.tensor([10]), torch.arange(rh), torch.arange(rw), torch.tensor([0])),
    ]).float()
    txt_ids = torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.arange(L)).float()
    n = img_ids.shape[0]
    hidden = torch.randn(1, n, cfg.in_channels, generator=g)
    ctx = torch.randn(1, L, cfg.joint_attention_dim, generator=g)
    out = {}
    for name, t in [("a", 0.73), ("b", 0.05)]:
        timestep = torch.tensor([t], dtype=torch.float32)
        y = model(hidden_states=hidden, encoder_hidden_states=ctx, timestep=timestep, img_ids=img_ids,
                  txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        out[f"output_{name}"] = y.contiguous()
        out[f"timestep_{name}"] = timestep
    out.update(hidden_states=hidden, encoder_hidden_states=ctx, img_ids=img_ids, txt_ids=txt_ids)
    save_file(out, OUT / "transformer.safetensors")


def vae_fixtures():
    from diffusers import AutoencoderKLFlux2
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P

    vae = AutoencoderKLFlux2.from_pretrained(MODEL / "vae", torch_dtype=torch.float32).eval()
    img = smooth_image(7, 48, 32)
    x = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    mean = vae.encode(x).latent_dist.mode()
    patch = P._patchify_latents(mean)
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    normed = (patch - bn_mean) / bn_std
    g = torch.Generator().manual_seed(99)
    z = torch.randn(1, 32, 6, 4, generator=g)
    dec = vae.decode(z, return_dict=False)[0]
    save_file({"image": x.contiguous(), "mean": mean.contiguous(), "normalized": normed.contiguous(),
               "z": z, "decoded": dec.contiguous()}, OUT / "vae.safetensors")


def resize_fixtures():
    src = smooth_image(3, 157, 93)
    src.save(OUT / "resize_src.png")
    arrays = {}
    for (w, h) in [(61, 37), (200, 120), (157, 40), (90, 93)]:
        r = src.resize((w, h), Image.Resampling.LANCZOS)
        arrays[f"{w}x{h}"] = torch.from_numpy(np.asarray(r).copy())
    save_file(arrays, OUT / "resize.safetensors")


def pipeline_fixtures():
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    refs = {
        "ref_a.png": smooth_image(11, 75, 90),
        "ref_b.png": smooth_image(12, 97, 64),
        "ref_c.png": smooth_image(13, 130, 77),
    }
    for name, im in refs.items():
        im.save(OUT / name)
    long_prompt = " ".join(["a very long prompt about a castle on a hill with towers and flags"] * 60)
    cases = [
        # name, prompt, width, height, steps, references, guidance, distilled
        ("t2i", "a red fox in the snow", 64, 48, 4, [], 1.0, True),
        ("ref1", "the same fox, now in a forest", 64, 64, 4, ["ref_a.png"], 1.0, True),
        ("ref3", "combine these", 48, 64, 3, ["ref_a.png", "ref_b.png", "ref_c.png"], 1.0, True),
        ("odd_size", "a lighthouse at dusk", 72, 40, 4, [], 1.0, True),
        ("one_step", "a red fox in the snow", 64, 48, 1, [], 1.0, True),
        ("empty_prompt", "", 48, 48, 4, [], 1.0, True),
        ("long_prompt", long_prompt, 48, 32, 2, [], 1.0, True),
        ("cfg", "a red fox in the snow", 64, 48, 4, [], 4.0, False),
    ]
    meta = []
    for i, (name, prompt, w, h, steps, ref_names, guidance, distilled) in enumerate(cases):
        pipe.register_to_config(is_distilled=distilled)
        g = torch.Generator().manual_seed(500 + i)
        lh, lw = h // 16, w // 16
        latents = torch.randn(1, 128, lh, lw, generator=g)
        kwargs = dict(prompt=prompt, width=w, height=h, num_inference_steps=steps, guidance_scale=guidance,
                      latents=latents.clone())
        if ref_names:
            kwargs["image"] = [Image.open(OUT / r).convert("RGB") for r in ref_names]
        final = pipe(**kwargs, output_type="latent").images
        img = pipe(**kwargs, output_type="pil").images[0]
        img.save(OUT / f"pipe_{name}.png")
        tensors = {"latents": latents, "final_latents": final.contiguous()}
        if name == "t2i":
            embeds, _ = pipe.encode_prompt(prompt=prompt, device="cpu")
            tensors["prompt_embeds"] = embeds.contiguous()
        save_file(tensors, OUT / f"pipe_{name}.safetensors")
        meta.append({"name": name, "prompt": prompt, "width": w, "height": h, "steps": steps,
                     "references": ref_names, "guidance_scale": guidance, "is_distilled": distilled,
                     "out_width": img.size[0], "out_height": img.size[1]})
    pipe.register_to_config(is_distilled=True)
    (OUT / "pipeline.json").write_text(json.dumps(meta, indent=1))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    schedule_fixtures()
    transformer_fixtures()
    vae_fixtures()
    resize_fixtures()
    pipeline_fixtures()
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
