#!/usr/bin/env python3
"""LoRA parity fixtures: a tiny random LoRA in each key layout, and what diffusers makes of it.

For each layout (diffusers/PEFT, kohya, BFL) a rank-4 random LoRA for the tiny model
(tests/fixtures/flux2/tiny-model) is written, loaded with diffusers'
`Flux2KleinPipeline.load_lora_weights` + `set_adapters(weights=<non-unit scale>)`, and the
`t2i` case of make_dit_fixtures.py (same prompt, size, steps and latents) is run. Written to
tests/fixtures/flux2/lora/:

  <fmt>.safetensors        the LoRA file, as a user would have it
  <fmt>_out.safetensors    final_latents (output_type="latent"), and for every Linear the LoRA
                           changes, `merged.<diffusers name>` = (W + s·alpha/r·B@A) @ probe.<in>
                           taken from the weights diffusers' fuse_lora produces (a per-layer
                           check of the merged weights without storing whole matrices);
                           probe.<in> are fixed random [in, 3] matrices
  <fmt>.png                the image (output_type="pil")
  te.safetensors / te_out.safetensors
                           a diffusers-layout LoRA that also changes the Qwen3 text encoder;
                           diffusers' Flux2 loader ignores text-encoder keys, so its reference is
                           the merge formula applied here in float64 (text encoder merged probes
                           only)
  lora.json                scales, formats and target counts

Run with the parity venv (make parity-venv) after make_tiny_model.py:

    $PARITY_VENV/bin/python scripts/parity/make_lora_fixtures.py
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests/fixtures/flux2/tiny-model"
DIT = ROOT / "tests/fixtures/flux2/dit"
OUT = ROOT / "tests/fixtures/flux2/lora"
RANK = 4

torch.set_grad_enabled(False)
torch.set_num_threads(2)


def bfl_module_shapes(cfg):
    """BFL module -> (out, in) of the tiny transformer, for the modules LoRA files target."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = int(d * cfg["mlp_ratio"])
    m = {"img_in": (d, cfg["in_channels"]), "txt_in": (d, cfg["joint_attention_dim"]),
         "time_in.in_layer": (d, cfg["timestep_guidance_channels"]), "time_in.out_layer": (d, d),
         "final_layer.linear": (cfg["in_channels"], d)}
    for i in range(cfg["num_layers"]):
        for s in ("img", "txt"):
            m[f"double_blocks.{i}.{s}_attn.qkv"] = (3 * d, d)
            m[f"double_blocks.{i}.{s}_attn.proj"] = (d, d)
            m[f"double_blocks.{i}.{s}_mlp.0"] = (2 * f, d)
            m[f"double_blocks.{i}.{s}_mlp.2"] = (d, f)
    for i in range(cfg["num_single_layers"]):
        m[f"single_blocks.{i}.linear1"] = (3 * d + 2 * f, d)
        m[f"single_blocks.{i}.linear2"] = (d, d + f)
    return m


def diffusers_module_shapes(cfg):
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = int(d * cfg["mlp_ratio"])
    m = {"x_embedder": (d, cfg["in_channels"]), "context_embedder": (d, cfg["joint_attention_dim"]),
         "proj_out": (cfg["in_channels"], d), "double_stream_modulation_img.linear": (6 * d, d)}
    for i in range(cfg["num_layers"]):
        p = f"transformer_blocks.{i}"
        for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            m[f"{p}.attn.{n}"] = (d, d)
        for ff in ("ff", "ff_context"):
            m[f"{p}.{ff}.linear_in"] = (2 * f, d)
            m[f"{p}.{ff}.linear_out"] = (d, f)
    for i in range(cfg["num_single_layers"]):
        m[f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"] = (3 * d + 2 * f, d)
        m[f"single_transformer_blocks.{i}.attn.to_out"] = (d, d + f)
    return m


def pair(g, out, inp, gain=0.3):
    """down [r, in], up [out, r]: the delta's entries have std ~ gain / sqrt(in), a sizeable
    fraction of the base weights' 1 / sqrt(in), so a missed or misplaced pair shows."""
    down = torch.randn(RANK, inp, generator=g) / inp ** 0.5
    up = torch.randn(out, RANK, generator=g) * gain / RANK ** 0.5
    return down.contiguous(), up.contiguous()


def make_loras(cfg, te_cfg):
    g = torch.Generator().manual_seed(4242)
    loras = {}
    sd = {}
    for name, (o, i) in diffusers_module_shapes(cfg).items():
        a, b = pair(g, o, i)
        sd[f"transformer.{name}.lora_A.weight"] = a
        sd[f"transformer.{name}.lora_B.weight"] = b
    loras["diffusers"] = sd
    sd = {}
    for name, (o, i) in bfl_module_shapes(cfg).items():
        a, b = pair(g, o, i)
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = a
        sd[f"{k}.lora_up.weight"] = b
        # alpha 2 for rank 4 (scale 0.5) on most, none (= rank) on a few
        if not name.startswith("time_in"):
            sd[f"{k}.alpha"] = torch.tensor(2.0)
    loras["kohya"] = sd
    sd = {}
    for name, (o, i) in bfl_module_shapes(cfg).items():
        a, b = pair(g, o, i)
        sd[f"diffusion_model.{name}.lora_A.weight"] = a
        sd[f"diffusion_model.{name}.lora_B.weight"] = b
    loras["bfl"] = sd
    # transformer (a few) + text encoder
    sd = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_out"):
        o, i = diffusers_module_shapes(cfg)[name]
        a, b = pair(g, o, i)
        sd[f"transformer.{name}.lora_A.weight"] = a
        sd[f"transformer.{name}.lora_B.weight"] = b
    h, hd = te_cfg["hidden_size"], te_cfg.get("head_dim") or te_cfg["hidden_size"] // te_cfg["num_attention_heads"]
    nq, nkv, inter = te_cfg["num_attention_heads"], te_cfg["num_key_value_heads"], te_cfg["intermediate_size"]
    te_shapes = {}
    for layer in (0, 5, 17):
        p = f"model.layers.{layer}"
        te_shapes.update({f"{p}.self_attn.q_proj": (nq * hd, h), f"{p}.self_attn.v_proj": (nkv * hd, h),
                          f"{p}.self_attn.o_proj": (h, nq * hd), f"{p}.mlp.up_proj": (inter, h),
                          f"{p}.mlp.down_proj": (h, inter)})
    for name, (o, i) in te_shapes.items():
        a, b = pair(g, o, i, gain=1.0)
        sd[f"text_encoder.{name}.lora_A.weight"] = a
        sd[f"text_encoder.{name}.lora_B.weight"] = b
    loras["te"] = sd
    return loras, te_shapes


def probes(dims):
    g = torch.Generator().manual_seed(777)
    return {i: torch.randn(i, 3, generator=g) for i in sorted(dims)}


def main():
    from diffusers import Flux2KleinPipeline
    from PIL import Image  # noqa: F401  (the pipeline returns PIL images)

    OUT.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((MODEL / "transformer/config.json").read_text())
    te_cfg = json.loads((MODEL / "text_encoder/config.json").read_text())
    loras, te_shapes = make_loras(cfg, te_cfg)
    scales = {"diffusers": 0.7, "kohya": 1.3, "bfl": 0.6, "te": 0.8}
    t2i = next(c for c in json.loads((DIT / "pipeline.json").read_text()) if c["name"] == "t2i")
    latents = load_file(DIT / "pipe_t2i.safetensors")["latents"]

    def fresh():
        p = Flux2KleinPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
        p.set_progress_bar_config(disable=True)
        return p

    pipe = fresh()
    base = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}
    probe = probes({w.shape[1] for w in base.values()} | {i for _, i in te_shapes.values()})
    meta = {"rank": RANK, "scales": scales, "case": t2i, "formats": {}}
    for fmt in ("diffusers", "kohya", "bfl"):
        path = OUT / f"{fmt}.safetensors"
        save_file(loras[fmt], path)
        pipe = fresh()
        pipe.load_lora_weights(str(path), adapter_name=fmt)
        pipe.set_adapters([fmt], adapter_weights=[scales[fmt]])
        kwargs = dict(prompt=t2i["prompt"], width=t2i["width"], height=t2i["height"],
                      num_inference_steps=t2i["steps"], guidance_scale=1.0, latents=latents.clone())
        final = pipe(**kwargs, output_type="latent").images
        pipe(**kwargs, output_type="pil").images[0].save(OUT / f"{fmt}.png")
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[fmt])
        tensors = {"final_latents": final.contiguous()}
        changed = set()
        for n, m in pipe.transformer.named_modules():
            w = getattr(m, "weight", None)
            if n.endswith(".base_layer"):
                n = n[: -len(".base_layer")]
            if w is None or n not in base or w.dim() != 2:
                continue
            if torch.equal(w, base[n]):
                continue
            changed.add(n)
            tensors[f"merged.{n}"] = (w.double() @ probe[w.shape[1]].double()).float().contiguous()
        for i, p in probe.items():
            tensors[f"probe.{i}"] = p.contiguous()
        save_file(tensors, OUT / f"{fmt}_out.safetensors")
        meta["formats"][fmt] = {"scale": scales[fmt], "linears_changed": len(changed)}
        print(f"{fmt}: {len(changed)} Linears changed")

    # Text encoder: diffusers' Flux2 loader has no text-encoder LoRA, so the reference is the
    # merge formula itself, in float64 (alpha absent: alpha / r = 1).
    save_file(loras["te"], OUT / "te.safetensors")
    te = load_file(MODEL / "text_encoder/model.safetensors")
    tensors = {}
    for name in te_shapes:
        w = te[f"{name}.weight"].double()
        a = loras["te"][f"text_encoder.{name}.lora_A.weight"].double()
        b = loras["te"][f"text_encoder.{name}.lora_B.weight"].double()
        merged = w + scales["te"] * (b @ a)
        tensors[f"merged.{name}"] = (merged @ probe[w.shape[1]].double()).float().contiguous()
    for i, p in probe.items():
        tensors[f"probe.{i}"] = p.contiguous()
    save_file(tensors, OUT / "te_out.safetensors")
    meta["formats"]["te"] = {"scale": scales["te"], "text_encoder_linears": len(te_shapes)}
    (OUT / "lora.json").write_text(json.dumps(meta, indent=1))
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1e3:.0f} KB)")


if __name__ == "__main__":
    sys.exit(main())
