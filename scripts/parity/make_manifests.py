#!/usr/bin/env python3
"""Tensor-name/shape manifests of the real FLUX.2-klein checkpoints, built without weights.

The reference classes (transformers Qwen3ForCausalLM, diffusers Flux2Transformer2DModel and
AutoencoderKLFlux2) are instantiated on PyTorch's meta device from the real configs
(docs/flux2-klein.md 1.2, 3, 4), so the names and shapes are exactly what the real files hold.
The BFL single-file names are derived with make_tiny_model.to_bfl and checked by running
diffusers' own single-file converter back to the diffusers names.

Writes tests/fixtures/flux2/manifests/*.json: {"config": {...}, "tensors": {name: shape}}.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_model import to_bfl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "flux2" / "manifests"

QWEN3 = {
    "qwen3-4b": dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
    ),
}

TRANSFORMER = {
    "transformer-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
    "transformer-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
}
TRANSFORMER_COMMON = dict(
    patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)


def shapes(sd):
    return {k: list(v.shape) for k, v in sorted(sd.items())}


def write(name, config, tensors, extra=None):
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"config": config, "tensors": tensors}
    if extra:
        doc.update(extra)
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")
    n = sum(int(torch.tensor(s).prod()) if s else 1 for s in tensors.values())
    print(f"{name}: {len(tensors)} tensors, {n:,} parameters")
    return n


def main():
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for name, cfg in QWEN3.items():
        with torch.device("meta"):
            model = Qwen3ForCausalLM(Qwen3Config(**cfg))
        sd = model.state_dict()
        if cfg["tie_word_embeddings"]:
            sd.pop("lm_head.weight")  # tied: not stored in the checkpoint
        write(name, cfg, shapes(sd))

    for name, cfg in TRANSFORMER.items():
        full = {**TRANSFORMER_COMMON, **cfg}
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**full)
        sd = model.state_dict()
        n = write(name, {**full, "axes_dims_rope": list(full["axes_dims_rope"])}, shapes(sd))
        bfl = to_bfl(sd, cfg["num_layers"], cfg["num_single_layers"])
        back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
        assert {k: list(v.shape) for k, v in back.items()} == shapes(sd), "BFL names must convert back"
        write(name + "-bfl", {**full, "axes_dims_rope": list(full["axes_dims_rope"])}, shapes(bfl))
        expected = {"transformer-4b": 3_875_544_576, "transformer-9b": 9_078_581_248}[name]
        assert n == expected, (name, n, expected)  # matches the official file sizes

    with torch.device("meta"):
        vae = AutoencoderKLFlux2()
    sd = {k: v for k, v in vae.state_dict().items()}
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items() if not k.startswith("_")}
    write("vae", cfg, shapes(sd))


if __name__ == "__main__":
    sys.exit(main())
