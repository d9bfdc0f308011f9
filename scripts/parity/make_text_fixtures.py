#!/usr/bin/env python3
"""Text-side parity fixtures: token ids, attention masks and prompt embeddings, computed by the
reference code (diffusers `Flux2KleinPipeline._get_qwen3_prompt_embeds` with transformers' Qwen3
and tokenizer) in float32 on CPU, for the tiny model written by make_tiny_model.py.

Also tokenizes the same prompts with the real Qwen3 tokenizer when its directory is given
(`--qwen3-tokenizer DIR`, from `make qwen3-tokenizer`), so the Rust tokenizer is checked against
the real vocabulary too.

Writes tests/fixtures/flux2/text_encoder.{json,safetensors} and qwen3_tokenizer.json.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "flux2"
MAX_LEN = 512
LAYERS = (9, 18, 27)

LONG = " ".join(
    f"Panel {i}: a watercolor painting of a lighthouse on a rocky coast, seagulls, storm clouds, waves."
    for i in range(40)
)

# name, prompt, whether embeddings are stored (each embedding is 196 KB)
PROMPTS = [
    ("normal", "A photograph of a red fox sitting in fresh snow at sunrise, soft light.", True),
    ("empty", "", True),
    ("unicode", "Ein Café in Zürich — 東京の夜景 🌃, naïve façade; ÅNGSTRÖM 123", True),
    ("long", LONG, True),
    (
        "specials",
        "two  spaces\n\nnew line\t<|im_end|> I'LL don't 3.14159 <think>x</think> trailing   ",
        False,
    ),
]


def encode_ids(tokenizer, prompt):
    """Exactly what Flux2KleinPipeline._get_qwen3_prompt_embeds does before the model."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    inputs = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_LEN)
    return text, inputs["input_ids"], inputs["attention_mask"]


def check_against_raw_tokenizers(tok_dir: Path, text: str, ids: torch.Tensor):
    """transformers' tokenizer must equal the plain tokenizer.json pipeline the Rust side uses."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    enc = raw.encode(text, add_special_tokens=True).ids[:MAX_LEN]
    got = ids[0, : len(enc)].tolist()
    assert got == enc, f"transformers vs tokenizers mismatch for {text!r}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen3-tokenizer", type=Path, default=None, help="dir with the real Qwen3 tokenizer.json")
    args = ap.parse_args()

    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.set_grad_enabled(False)
    model_dir = OUT / "tiny-model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    text_encoder = Qwen3ForCausalLM.from_pretrained(str(model_dir / "text_encoder"), dtype=torch.float32).eval()
    assert len(text_encoder.model.layers) > max(LAYERS), "the tiny Qwen3 needs > 27 layers"

    entries = []
    tensors = {}
    for name, prompt, with_embeds in PROMPTS:
        text, ids, mask = encode_ids(tokenizer, prompt)
        check_against_raw_tokenizers(model_dir / "tokenizer", text, ids)
        entry = {
            "name": name,
            "prompt": prompt,
            "formatted": text,
            "num_tokens": int(mask.sum()),
            "input_ids": ids[0].tolist(),
            "attention_mask": mask[0].tolist(),
            "embeds": f"prompt_embeds.{name}" if with_embeds else None,
        }
        if with_embeds:
            emb = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                prompt=prompt,
                dtype=torch.float32,
                device=torch.device("cpu"),
                max_sequence_length=MAX_LEN,
                hidden_states_layers=LAYERS,
            )
            assert emb.shape == (1, MAX_LEN, 3 * text_encoder.config.hidden_size), emb.shape
            tensors[f"prompt_embeds.{name}"] = emb.contiguous()
        entries.append(entry)

    assert entries[3]["num_tokens"] == MAX_LEN, "the long prompt must be truncated"
    assert entries[0]["num_tokens"] < MAX_LEN

    meta = {
        "generated_by": "scripts/parity/make_text_fixtures.py",
        "model_dir": "tests/fixtures/flux2/tiny-model",
        "max_length": MAX_LEN,
        "hidden_states_layers": list(LAYERS),
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": text_encoder.config.hidden_size,
        "prompts": entries,
    }
    (OUT / "text_encoder.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    save_file(tensors, str(OUT / "text_encoder.safetensors"), metadata={"generated_by": meta["generated_by"]})

    if args.qwen3_tokenizer is not None:
        real = AutoTokenizer.from_pretrained(str(args.qwen3_tokenizer))
        assert real.pad_token_id == 151643, real.pad_token_id
        real_entries = []
        for name, prompt, _ in PROMPTS:
            text, ids, mask = encode_ids(real, prompt)
            check_against_raw_tokenizers(args.qwen3_tokenizer, text, ids)
            n = int(mask.sum())
            real_entries.append(
                {
                    "name": name,
                    "prompt": prompt,
                    "num_tokens": n,
                    # pads (151643) and mask zeros after num_tokens are implied
                    "input_ids": ids[0, :n].tolist(),
                }
            )
        (OUT / "qwen3_tokenizer.json").write_text(
            json.dumps(
                {
                    "generated_by": meta["generated_by"],
                    "tokenizer_json_sha256": sha256(args.qwen3_tokenizer / "tokenizer.json"),
                    "max_length": MAX_LEN,
                    "pad_token_id": real.pad_token_id,
                    "prompts": real_entries,
                },
                indent=1,
                ensure_ascii=False,
            )
            + "\n"
        )
    print(f"text fixtures written under {OUT}")


if __name__ == "__main__":
    sys.exit(main())
