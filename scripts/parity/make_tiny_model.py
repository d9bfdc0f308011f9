#!/usr/bin/env python3
"""Builds tiny random-weight FLUX.2-klein models in the exact real file layouts.

Everything here is for parity tests only: the weights are random, the images meaningless.

Writes, under tests/fixtures/flux2/:
  tiny-model/                 diffusers layout (Flux2KleinPipeline.save_pretrained), is_distilled=true
  tiny-model-sharded/         model_index.json, scheduler/, tokenizer/ and the same text_encoder/
                              as 2 shards + model.safetensors.index.json (no transformer/ or vae/)
  flux-2-klein-tiny.safetensors      BFL single-file transformer (fused qkv, linear1/2, [shift; scale])
  flux-2-klein-tiny-fp8.safetensors  BFL single file, block Linears as F8_E4M3 + weight_scale/input_scale

Every parameter is randomised (nothing zero- or one-initialised, norms spread around 1) with
fixed seeds, so outputs depend on every weight. Run with the parity venv (setup_venv.sh).
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "flux2"

# Tiny sizes. The DiT context width must equal 3 x the text encoder hidden size.
TE_HIDDEN = 32
TE_LAYERS = 28  # >= 28: HF returns the final-normed state as the last hidden state.
DIT_HEADS = 2
DIT_HEAD_DIM = 24
TOKENIZER_MERGES = 160

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NON_SPECIAL_ADDED = ["<think>", "</think>"]

# Qwen2/Qwen3 pre-tokenizer split regex (byte-level BPE), verbatim from the Qwen tokenizer.json.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's chat template, restricted to what a single user turn exercises (no tools, no
# assistant history); renders identically to the real one for [{"role": "user", ...}].
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

CORPUS = """
A photograph of a red fox sitting in fresh snow at sunrise, soft light, shallow depth of field.
An astronaut riding a horse on the moon, highly detailed digital painting, dramatic lighting.
A cozy wooden cabin in the mountains surrounded by pine trees, watercolor illustration.
The quick brown fox jumps over the lazy dog. The cat sat on the mat, and the dog slept.
Portrait of an old fisherman with a grey beard, wearing a yellow raincoat, cinematic, 35mm film.
A bowl of ramen with a soft boiled egg, steam rising, studio photo, top view, high resolution.
City street at night in the rain, neon signs reflecting on the wet asphalt, cyberpunk style.
Make the sky purple and add two moons. Replace the background with a beach at sunset.
user assistant system think image picture painting style of the with and in on at a an the
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 and punctuation: commas, periods; colons! ques?
""" * 4


def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_tokenizer(out_dir: Path):
    """A small byte-level BPE with Qwen2's normalizer, split regex, byte-level steps and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + TOKENIZER_MERGES,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator([line for line in CORPUS.splitlines() if line], trainer=trainer)
    from tokenizers import AddedToken

    # Added after training so that, as in Qwen's vocabulary, they sit after the BPE entries.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in NON_SPECIAL_ADDED])

    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=131072,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def finish_tokenizer_dir(tok_dir: Path):
    """Make tokenizer_config.json look like Qwen's (class name, template inline)."""
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["add_bos_token"] = False
    cfg["add_prefix_space"] = False
    cfg["errors"] = "replace"
    tmpl = tok_dir / "chat_template.jinja"
    if tmpl.exists():
        tmpl.unlink()
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def randomise(module: torch.nn.Module, seed: int):
    """Every parameter and buffer drawn at random; norms spread over [0.5, 1.5]."""
    g = seed_all(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            lname = name.lower()
            is_norm = ("norm" in lname or lname.endswith(".scale")) and p.dim() == 1
            if is_norm and leaf in ("weight", "scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif leaf == "bias" or p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for name, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 1.5 + 0.5)


def build_text_encoder(vocab_size: int, pad_id: int, eos_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TE_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=TE_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    model = Qwen3ForCausalLM(cfg).to(torch.float32).eval()
    randomise(model, 1)
    return model


def rewrite_qwen3_config_like_hub(path: Path):
    """Write text_encoder/config.json with the keys the hub's Qwen3 configs carry (`rope_theta`
    at top level, `torch_dtype`), which recent transformers still reads."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 1000000.0))
    out = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "head_dim": cfg["head_dim"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "max_window_layers": cfg["num_hidden_layers"],
        "model_type": "qwen3",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg["vocab_size"],
    }
    path.write_text(json.dumps(out, indent=2) + "\n")


def build_transformer():
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        out_channels=None,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=DIT_HEAD_DIM,
        num_attention_heads=DIT_HEADS,
        joint_attention_dim=3 * TE_HIDDEN,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 8, 8),  # uneven on purpose: sums to head_dim,
        rope_theta=2000,
        eps=1e-6,
        guidance_embeds=False,
    ).to(torch.float32).eval()
    randomise(model, 2)
    return model


def build_vae():
    from diffusers import AutoencoderKLFlux2

    model = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        latent_channels=32,
        norm_num_groups=4,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        batch_norm_eps=1e-4,
        batch_norm_momentum=0.1,
        patch_size=(2, 2),
    ).to(torch.float32).eval()
    randomise(model, 3)
    return model


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The FLUX.2 scheduler config (dynamic shifting, exponential time shift; mu given by the pipeline).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


# ----------------------------------------------------------------------------- BFL single file


def to_bfl(sd: dict, num_double: int, num_single: int) -> dict:
    """diffusers Flux2Transformer2DModel state dict -> BFL flux-2-klein-*.safetensors names."""
    out = {}
    top = {
        "x_embedder.weight": "img_in.weight",
        "context_embedder.weight": "txt_in.weight",
        "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
        "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
        "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
        "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
        "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
        "proj_out.weight": "final_layer.linear.weight",
    }
    for d, b in top.items():
        out[b] = sd[d]
    scale, shift = sd["norm_out.linear.weight"].chunk(2, dim=0)  # diffusers rows: [scale; shift]
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], dim=0)
    for i in range(num_double):
        p = f"transformer_blocks.{i}."
        q = f"double_blocks.{i}."
        out[q + "img_attn.qkv.weight"] = torch.cat(
            [sd[p + "attn.to_q.weight"], sd[p + "attn.to_k.weight"], sd[p + "attn.to_v.weight"]], 0
        )
        out[q + "txt_attn.qkv.weight"] = torch.cat(
            [sd[p + "attn.add_q_proj.weight"], sd[p + "attn.add_k_proj.weight"], sd[p + "attn.add_v_proj.weight"]], 0
        )
        m = {
            "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
            "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
            "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
            "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
            "attn.to_out.0.weight": "img_attn.proj.weight",
            "attn.to_add_out.weight": "txt_attn.proj.weight",
            "ff.linear_in.weight": "img_mlp.0.weight",
            "ff.linear_out.weight": "img_mlp.2.weight",
            "ff_context.linear_in.weight": "txt_mlp.0.weight",
            "ff_context.linear_out.weight": "txt_mlp.2.weight",
        }
        for d, b in m.items():
            out[q + b] = sd[p + d]
    for i in range(num_single):
        p = f"single_transformer_blocks.{i}."
        q = f"single_blocks.{i}."
        out[q + "linear1.weight"] = sd[p + "attn.to_qkv_mlp_proj.weight"]
        out[q + "linear2.weight"] = sd[p + "attn.to_out.weight"]
        out[q + "norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
    assert len(out) == len(sd) - num_double * 4, "every diffusers tensor must map (qkv fuses 3 into 1)"
    return {k: v.contiguous() for k, v in out.items()}


FP8_MAX = 448.0


def to_bfl_fp8(bfl: dict) -> dict:
    """Block Linears as F8_E4M3 with a per-tensor f32 `weight_scale` (w = fp8 * scale) and an
    `input_scale`, the rest in bf16: the layout of BFL's fp8 klein files."""
    out = {}
    for k, v in bfl.items():
        is_block_linear = (k.startswith("double_blocks.") or k.startswith("single_blocks.")) and k.endswith(".weight") and v.dim() == 2
        if is_block_linear:
            scale = v.abs().max() / FP8_MAX
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "weight_scale"] = scale.to(torch.float32).reshape(())
            out[k[: -len("weight")] + "input_scale"] = torch.tensor(1.0, dtype=torch.float32)
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def check_bfl_roundtrip(bfl: dict, sd: dict):
    """diffusers' own single-file converter must turn our BFL file back into the diffusers dict."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    back = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in bfl.items()})
    assert set(back) == set(sd), (set(back) ^ set(sd))
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def shard_safetensors(src: Path, dst_dir: Path, stem: str, index_name: str):
    """Split one safetensors file into two shards + the HF index.json (weight_map)."""
    from safetensors.torch import load_file

    sd = load_file(str(src))
    keys = sorted(sd)
    half = len(keys) // 2
    parts = [keys[:half], keys[half:]]
    weight_map = {}
    total = 0
    for i, part in enumerate(parts):
        fname = f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(dst_dir / fname), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += sd[k].numel() * sd[k].element_size()
    (dst_dir / index_name).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    )


def main():
    from diffusers import Flux2KleinPipeline

    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = OUT / "tiny-model"
    if model_dir.exists():
        shutil.rmtree(model_dir)

    tokenizer = build_tokenizer(model_dir)
    vocab = tokenizer.get_vocab()
    pad_id = vocab["<|endoftext|>"]
    eos_id = vocab["<|im_end|>"]
    vocab_size = ((len(vocab) + 63) // 64) * 64  # padded like Qwen's 151936
    text_encoder = build_text_encoder(vocab_size, pad_id, eos_id)
    transformer = build_transformer()
    vae = build_vae()
    scheduler = build_scheduler()

    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    pipe.save_pretrained(str(model_dir), safe_serialization=True)
    finish_tokenizer_dir(model_dir / "tokenizer")
    # The hub's klein model_index.json names the fast Qwen2 tokenizer class.
    idx = json.loads((model_dir / "model_index.json").read_text())
    idx["tokenizer"] = ["transformers", "Qwen2TokenizerFast"]
    (model_dir / "model_index.json").write_text(json.dumps(idx, indent=2) + "\n")
    rewrite_qwen3_config_like_hub(model_dir / "text_encoder" / "config.json")
    for extra in ("generation_config.json",):
        f = model_dir / "text_encoder" / extra
        if f.exists():
            f.unlink()

    # Sanity: the saved directory loads back as the same pipeline.
    re = Flux2KleinPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    assert re.config.is_distilled is True
    for name, a in transformer.state_dict().items():
        assert torch.equal(a, re.transformer.state_dict()[name]), name
    te_sd = re.text_encoder.state_dict()
    for name, a in text_encoder.state_dict().items():
        assert torch.equal(a, te_sd[name]), name
    assert re.tokenizer.pad_token_id == pad_id and re.tokenizer.padding_side == "right"

    # Sharded variant: the same text encoder split into 2 shards + index.json. Only the
    # components needed to run the text encoder, to keep the fixtures small.
    sharded = OUT / "tiny-model-sharded"
    if sharded.exists():
        shutil.rmtree(sharded)
    sharded.mkdir()
    shutil.copy(model_dir / "model_index.json", sharded / "model_index.json")
    for comp in ("scheduler", "tokenizer"):
        shutil.copytree(model_dir / comp, sharded / comp)
    te = sharded / "text_encoder"
    te.mkdir()
    shutil.copy(model_dir / "text_encoder" / "config.json", te / "config.json")
    shard_safetensors(model_dir / "text_encoder" / "model.safetensors", te, "model", "model.safetensors.index.json")
    from transformers import Qwen3ForCausalLM

    te2 = Qwen3ForCausalLM.from_pretrained(str(te), dtype=torch.float32)
    for name, a in text_encoder.state_dict().items():
        assert torch.equal(a, te2.state_dict()[name]), name

    # BFL single files.
    sd = {k: v.contiguous() for k, v in transformer.state_dict().items()}
    bfl = to_bfl(sd, transformer.config.num_layers, transformer.config.num_single_layers)
    check_bfl_roundtrip(bfl, sd)
    save_file(bfl, str(OUT / "flux-2-klein-tiny.safetensors"))
    save_file(to_bfl_fp8(bfl), str(OUT / "flux-2-klein-tiny-fp8.safetensors"))

    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"tiny models written under {OUT} ({total / 1e6:.2f} MB in fixtures/flux2)")


if __name__ == "__main__":
    sys.exit(main())
