#!/usr/bin/env python3
"""bf16 numerics fixtures: diffusers/transformers in float32 and in bfloat16 on CPU, same inputs.

Reads the committed tiny model (tests/fixtures/flux2/tiny-model) and the committed f32 fixtures'
inputs (tests/fixtures/flux2/dit/*, text_encoder.json); never rewrites them. Writes one file,
tests/fixtures/flux2/bf16/numerics.safetensors, holding for every tensor `<name>.f32` (the f32
reference, stored f32) and `<name>.bf16` (what diffusers' bf16 path gives, stored bf16), plus
the inputs the Rust test needs that no other fixture holds. tests/flux2/numerics.rs measures our bf16
drift from `.f32` against diffusers' (`.bf16` vs `.f32`).

    $PARITY_VENV/bin/python scripts/parity/make_bf16_fixtures.py

The text encoder's f32 reference is `prompt_embeds.normal` in text_encoder.safetensors (190 KiB,
not duplicated); only its bf16 counterpart is stored here.
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/flux2"
MODEL = FIX / "tiny-model"
OUT = FIX / "bf16"
BF16 = torch.bfloat16

torch.set_grad_enabled(False)
torch.set_num_threads(2)


def text_fixtures(out):
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    meta = json.loads((FIX / "text_encoder.json").read_text())
    prompt = next(p for p in meta["prompts"] if p["name"] == "normal")["prompt"]
    tok = AutoTokenizer.from_pretrained(str(MODEL / "tokenizer"))
    ref = load_file(FIX / "text_encoder.safetensors")["prompt_embeds.normal"]
    for dtype, tag in [(torch.float32, "f32"), (BF16, "bf16")]:
        te = Qwen3ForCausalLM.from_pretrained(str(MODEL / "text_encoder"), dtype=dtype).eval()
        emb = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=te, tokenizer=tok, prompt=[prompt], dtype=dtype, device="cpu",
            max_sequence_length=meta["max_length"], hidden_states_layers=meta["hidden_states_layers"])
        if tag == "f32":
            # The committed reference must be what this venv computes, or the drifts mean nothing.
            assert torch.equal(emb, ref), "text_encoder.safetensors is stale"
        else:
            out["text.normal.bf16"] = emb.contiguous()


def transformer_fixtures(out):
    from diffusers import Flux2Transformer2DModel

    t = load_file(FIX / "dit/transformer.safetensors")
    n_noise = 12  # 3x4 noise grid, then 6 reference tokens (see make_dit_fixtures.py)
    cases = []
    for sigma in (1.0, 0.73, 0.05):
        cases.append((f"dit.refs.t{int(sigma * 100):03d}", sigma, t["hidden_states"], t["img_ids"]))
    for sigma in (1.0, 0.73):
        cases.append((f"dit.norefs.t{int(sigma * 100):03d}", sigma, t["hidden_states"][:, :n_noise],
                       t["img_ids"][:n_noise]))
    for dtype, tag in [(torch.float32, "f32"), (BF16, "bf16")]:
        model = Flux2Transformer2DModel.from_pretrained(MODEL / "transformer", torch_dtype=dtype).eval()
        for name, sigma, hidden, ids in cases:
            y = model(hidden_states=hidden.to(dtype), encoder_hidden_states=t["encoder_hidden_states"].to(dtype),
                      timestep=torch.tensor([sigma], dtype=dtype), img_ids=ids, txt_ids=t["txt_ids"],
                      guidance=None, return_dict=False)[0]
            out[f"{name}.{tag}"] = y.contiguous()


def vae_fixtures(out):
    from diffusers import AutoencoderKLFlux2
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P

    # Larger than dit/vae.safetensors' inputs, so the 99.9th percentile is not just the maximum
    # of a few hundred values: a 96x64 image (also stored as PNG) and a [1, 32, 8, 12] latent.
    import numpy as np
    sys.path.insert(0, str(ROOT / "scripts/parity"))
    from make_dit_fixtures import smooth_image

    img = smooth_image(21, 96, 64)
    img.save(OUT / "vae_in.png")
    image = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    z = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(31))
    out["vae.z"] = z
    v = {"image": image, "z": z}
    for dtype, tag in [(torch.float32, "f32"), (BF16, "bf16")]:
        vae = AutoencoderKLFlux2.from_pretrained(MODEL / "vae", torch_dtype=dtype).eval()
        mean = vae.encode(v["image"].to(dtype)).latent_dist.mode()
        patch = P._patchify_latents(mean)
        # As the pipeline does: statistics in the model dtype.
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(dtype)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(dtype)
        out[f"vae.mean.{tag}"] = mean.contiguous()
        out[f"vae.normalized.{tag}"] = ((patch - bn_mean) / bn_std).contiguous()
        out[f"vae.decoded.{tag}"] = vae.decode(v["z"].to(dtype), return_dict=False)[0].contiguous()


def pipeline_fixtures(out):
    from diffusers import Flux2KleinPipeline

    ref = Image.open(FIX / "dit/ref_a.png").convert("RGB")
    cases = [("e2e.one_step", 1, 500 + 4), ("e2e.two_step", 2, 600)]
    for dtype, tag in [(torch.float32, "f32"), (BF16, "bf16")]:
        pipe = Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        captured = {}
        orig = pipe.prepare_image_latents

        def capture(*a, **k):
            lat, ids = orig(*a, **k)
            captured["refs"] = lat
            return lat, ids

        pipe.prepare_image_latents = capture
        # Reference latents of one image (resize, VAE mean, patchify, BN, pack) through a 1-step run.
        g = torch.Generator().manual_seed(77)
        pipe(prompt="x", width=64, height=64, num_inference_steps=1, image=[ref],
             latents=torch.randn(1, 128, 4, 4, generator=g), output_type="latent")
        out[f"refs.a.{tag}"] = captured["refs"].contiguous()
        for name, steps, seed in cases:
            g = torch.Generator().manual_seed(seed)
            latents = torch.randn(1, 128, 3, 4, generator=g)
            kw = dict(prompt="a red fox in the snow", width=64, height=48, num_inference_steps=steps,
                      guidance_scale=1.0, latents=latents.clone())
            out[f"{name}.latents.{tag}"] = pipe(**kw, output_type="latent").images.contiguous()
            out[f"{name}.image.{tag}"] = pipe(**kw, output_type="pt").images.contiguous()
            out[f"{name}.noise"] = latents


# --- weight quantisation, written to do exactly what src/flux2/quant.rs does ---
# Per output row: scale = absmax * (1 / MAX) in f32 (candle's `Tensor / f64` multiplies by the
# reciprocal), all-zero rows scale 1; fp8: (w / scale) clamped to +-448 and cast to F8E4M3 (round
# to nearest even); int8: round(w / scale) clamped to +-127. The weight is quantised as loaded in
# the compute dtype, and dequantised in it: q.to(dtype) * scale.to(dtype).
def dequantised(w, kind, dtype):
    w = w.to(dtype).float()
    mx = 448.0 if kind == "fp8" else 127.0
    absmax = w.abs().amax(1, keepdim=True)
    s = absmax * torch.tensor(1.0 / mx, dtype=torch.float32)
    s = torch.where(absmax == 0, torch.ones_like(s), s)
    if kind == "fp8":
        q = (w / s).clamp(-mx, mx).to(torch.float8_e4m3fn)
    else:
        q = torch.round(w / s).clamp(-mx, mx)
    return q.to(dtype) * s.to(dtype)


def quantise_linears(model, kind, dtype, select=lambda name: True):
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and select(name):
            m.weight.data = dequantised(m.weight.data, kind, dtype).to(dtype)
            n += 1
    assert n > 0
    return n


def quant_fixtures(out):
    """The DiT with every Linear quantised (QUANTIZATION) and the text encoder with its decoder
    layers' projections quantised (TEXT_ENCODER_QUANTIZATION), f32 and bf16 compute."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    t = load_file(FIX / "dit/transformer.safetensors")
    meta = json.loads((FIX / "text_encoder.json").read_text())
    prompt = next(p for p in meta["prompts"] if p["name"] == "normal")["prompt"]
    tok = AutoTokenizer.from_pretrained(str(MODEL / "tokenizer"))
    for kind in ("fp8", "int8"):
        for dtype, tag in [(torch.float32, "f32"), (BF16, "bf16")]:
            model = Flux2Transformer2DModel.from_pretrained(MODEL / "transformer", torch_dtype=dtype).eval()
            quantise_linears(model, kind, dtype)
            for name, sigma in [("dit.refs.t100", 1.0), ("dit.refs.t005", 0.05)]:
                y = model(hidden_states=t["hidden_states"].to(dtype),
                          encoder_hidden_states=t["encoder_hidden_states"].to(dtype),
                          timestep=torch.tensor([sigma], dtype=dtype), img_ids=t["img_ids"],
                          txt_ids=t["txt_ids"], guidance=None, return_dict=False)[0]
                out[f"{kind}.{name}.{tag}"] = y.contiguous()
            te = Qwen3ForCausalLM.from_pretrained(str(MODEL / "text_encoder"), dtype=dtype).eval()
            quantise_linears(te, kind, dtype, lambda n: n.startswith("model.layers."))
            emb = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                text_encoder=te, tokenizer=tok, prompt=[prompt], dtype=dtype, device="cpu",
                max_sequence_length=meta["max_length"], hidden_states_layers=meta["hidden_states_layers"])
            # The first 64 of 512 positions (the prompt and the start of the padding): size.
            out[f"{kind}.text.normal64.{tag}"] = emb[:, :64].contiguous()


def bfl_fp8_fixtures(out):
    """The BFL fp8 single file as stored (block Linears F8E4M3 with a per-tensor f32
    `weight_scale`, the rest bf16), dequantised as QLinear does (q.to(dtype) * scale.to(dtype)),
    mapped to diffusers names by diffusers' own converter; f32 and bf16 compute."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    sd = load_file(FIX / "flux-2-klein-tiny-fp8.safetensors")
    t = load_file(FIX / "dit/transformer.safetensors")
    for dtype, tag in [(torch.float32, "f32"), (BF16, "bf16")]:
        deq = {}
        for k, v in sd.items():
            if k.endswith(("weight_scale", "input_scale")):
                continue
            if v.dtype == torch.float8_e4m3fn:
                deq[k] = v.to(dtype) * sd[k[: -len("weight")] + "weight_scale"].to(dtype)
            else:
                deq[k] = v.to(dtype)
        model = Flux2Transformer2DModel.from_pretrained(MODEL / "transformer", torch_dtype=dtype).eval()
        model.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(deq), strict=True)
        for name, sigma in [("dit.refs.t100", 1.0), ("dit.refs.t005", 0.05)]:
            y = model(hidden_states=t["hidden_states"].to(dtype),
                      encoder_hidden_states=t["encoder_hidden_states"].to(dtype),
                      timestep=torch.tensor([sigma], dtype=dtype), img_ids=t["img_ids"],
                      txt_ids=t["txt_ids"], guidance=None, return_dict=False)[0]
            out[f"bflfp8.{name}.{tag}"] = y.contiguous()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    out = {}
    text_fixtures(out)
    transformer_fixtures(out)
    vae_fixtures(out)
    pipeline_fixtures(out)
    quant_fixtures(out)
    bfl_fp8_fixtures(out)
    out = {k: (v.to(BF16) if k.endswith(".bf16") else v.float()).contiguous() for k, v in out.items()}
    for k in sorted(out):
        if k.endswith(".bf16"):
            f = out[k[:-5] + ".f32"] if k[:-5] + ".f32" in out else None
            if f is not None:
                d = (out[k].float() - f).abs()
                print(f"{k[:-5]:28s} diffusers bf16 drift: mean {d.mean():.3e} max {d.max():.3e}")
    save_file(out, OUT / "numerics.safetensors")
    print(f"wrote {OUT / 'numerics.safetensors'} ({(OUT / 'numerics.safetensors').stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
