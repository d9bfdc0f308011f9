//! Prompt tokenisation exactly as `Flux2KleinPipeline` does it: the Qwen3 chat template for one
//! user turn with thinking disabled, right-padded to 512 tokens, longer prompts truncated.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

/// diffusers' `max_sequence_length` for klein: every prompt becomes exactly this many tokens.
pub const MAX_LENGTH: usize = 512;

/// The pad token's name when `tokenizer_config.json` does not say (Qwen's `<|endoftext|>`).
const DEFAULT_PAD_TOKEN: &str = "<|endoftext|>";

/// Qwen2/Qwen3's pre-tokenizer split (needs a backtracking regex: fancy-regex).
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: String, message: String },
    #[error("pad token '{0}' is not in the tokenizer vocabulary")]
    NoPadToken(String),
    #[error("tokenizing the prompt failed: {0}")]
    Encode(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Token ids and mask of one prompt, always `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for pads.
    pub attention_mask: Vec<u32>,
    /// Number of real tokens (after truncation).
    pub num_tokens: usize,
}

/// The Qwen3 tokenizer plus klein's prompt formatting.
#[derive(Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    max_length: usize,
}

/// The chat template's output for one user message, `add_generation_prompt=True`,
/// `enable_thinking=False` (no system prompt, no BOS).
pub fn format_prompt(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` from a diffusers `tokenizer/` directory; the pad token's name comes
    /// from `tokenizer_config.json` there (Qwen: `<|endoftext|>`, id 151643) and its id from the
    /// vocabulary, never hard-coded.
    /// Without `tokenizer.json`, `vocab.json` + `merges.txt` are used ([`Self::from_vocab_merges`]).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = dir.join("tokenizer_config.json");
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_files(&json, Some(&config));
        }
        Self::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"), &config)
    }

    /// Builds the Qwen2 byte-level BPE from `vocab.json` + `merges.txt`, with the added tokens
    /// (ids, flags) of `tokenizer_config.json`'s `added_tokens_decoder`: the same pipeline that
    /// transformers' `Qwen2TokenizerFast` constructs when a repo has no `tokenizer.json`.
    pub fn from_vocab_merges(
        vocab_json: &Path,
        merges_txt: &Path,
        tokenizer_config: &Path,
    ) -> Result<Self, TokenizerError> {
        let load_err = |path: &Path, e: &dyn std::fmt::Display| TokenizerError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| load_err(p, &e));
        let vocab: serde_json::Value =
            serde_json::from_str(&read(vocab_json)?).map_err(|e| load_err(vocab_json, &e))?;
        let merges_text = read(merges_txt)?;
        let merges: Vec<&str> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        let config: serde_json::Value = serde_json::from_str(&read(tokenizer_config)?)
            .map_err(|e| load_err(tokenizer_config, &e))?;
        let mut added: Vec<(u64, serde_json::Value)> = config
            .get("added_tokens_decoder")
            .and_then(|d| d.as_object())
            .map(|d| {
                d.iter()
                    .filter_map(|(id, t)| Some((id.parse::<u64>().ok()?, t.clone())))
                    .collect()
            })
            .unwrap_or_default();
        added.sort_by_key(|(id, _)| *id);
        let flag = |t: &serde_json::Value, k: &str, default: bool| {
            t.get(k).and_then(|v| v.as_bool()).unwrap_or(default)
        };
        let added_tokens: Vec<serde_json::Value> = added
            .iter()
            .map(|(id, t)| {
                serde_json::json!({
                    "id": id,
                    "content": t.get("content").and_then(|c| c.as_str()).unwrap_or_default(),
                    "single_word": flag(t, "single_word", false),
                    "lstrip": flag(t, "lstrip", false),
                    "rstrip": flag(t, "rstrip", false),
                    "normalized": flag(t, "normalized", false),
                    "special": flag(t, "special", false),
                })
            })
            .collect();
        let byte_level = serde_json::json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
        });
        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX},
                 "behavior": "Isolated", "invert": false},
                byte_level,
            ]},
            "post_processor": byte_level,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let mut tokenizer: Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| load_err(vocab_json, &e))?;
        tokenizer.with_padding(None);
        let pad_name = read_pad_token_name(tokenizer_config)?;
        let pad_id = tokenizer
            .token_to_id(&pad_name)
            .ok_or(TokenizerError::NoPadToken(pad_name))?;
        Ok(Self {
            tokenizer,
            pad_id,
            max_length: MAX_LENGTH,
        })
    }

    /// `tokenizer_config` (optional) names the pad token; without it, `<|endoftext|>`.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let pad_name = match tokenizer_config {
            Some(p) => read_pad_token_name(p)?,
            None => DEFAULT_PAD_TOKEN.to_string(),
        };
        Self::from_file(tokenizer_json, &pad_name)
    }

    pub fn from_file(tokenizer_json: &Path, pad_token: &str) -> Result<Self, TokenizerError> {
        let mut tokenizer =
            Tokenizer::from_file(tokenizer_json).map_err(|e| TokenizerError::Load {
                path: tokenizer_json.display().to_string(),
                message: e.to_string(),
            })?;
        // Padding and truncation are done below, the way transformers does them.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load {
                path: tokenizer_json.display().to_string(),
                message: e.to_string(),
            })?;
        let pad_id = tokenizer
            .token_to_id(pad_token)
            .ok_or_else(|| TokenizerError::NoPadToken(pad_token.to_string()))?;
        Ok(Self {
            tokenizer,
            pad_id,
            max_length: MAX_LENGTH,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Ids of the already formatted text, without padding or truncation.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Formats, tokenizes, truncates to `max_length` (dropping the end, as transformers'
    /// `truncation=True` does) and right-pads with the pad id.
    pub fn encode(&self, prompt: &str) -> Result<EncodedPrompt, TokenizerError> {
        let mut ids = self.encode_raw(&format_prompt(prompt))?;
        ids.truncate(self.max_length);
        let num_tokens = ids.len();
        let mut attention_mask = vec![1u32; num_tokens];
        ids.resize(self.max_length, self.pad_id);
        attention_mask.resize(self.max_length, 0);
        Ok(EncodedPrompt {
            input_ids: ids,
            attention_mask,
            num_tokens,
        })
    }

    /// `[B, max_length]` u32 ids and mask tensors for a batch of prompts.
    pub fn encode_batch(
        &self,
        prompts: &[&str],
        device: &Device,
    ) -> Result<(Tensor, Tensor), TokenizerError> {
        let mut ids = Vec::with_capacity(prompts.len() * self.max_length);
        let mut mask = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            let e = self.encode(p)?;
            ids.extend(e.input_ids);
            mask.extend(e.attention_mask);
        }
        let shape = (prompts.len(), self.max_length);
        Ok((
            Tensor::from_vec(ids, shape, device)?,
            Tensor::from_vec(mask, shape, device)?,
        ))
    }
}

/// `pad_token` in tokenizer_config.json is either a string or `{"content": ...}`.
fn read_pad_token_name(config: &Path) -> Result<String, TokenizerError> {
    let Ok(text) = std::fs::read_to_string(config) else {
        return Ok(DEFAULT_PAD_TOKEN.to_string());
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TokenizerError::Load {
        path: config.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(match v.get("pad_token") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(obj) => obj
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or(DEFAULT_PAD_TOKEN)
            .to_string(),
        None => DEFAULT_PAD_TOKEN.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_matches_qwen3_without_thinking() {
        assert_eq!(
            format_prompt("a cat"),
            "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
    }

    #[test]
    fn pad_token_name_forms() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer_config.json");
        std::fs::write(&p, r#"{"pad_token": "<pad>"}"#).unwrap();
        assert_eq!(read_pad_token_name(&p).unwrap(), "<pad>");
        std::fs::write(&p, r#"{"pad_token": {"content": "<p2>", "special": true}}"#).unwrap();
        assert_eq!(read_pad_token_name(&p).unwrap(), "<p2>");
        std::fs::write(&p, r#"{}"#).unwrap();
        assert_eq!(read_pad_token_name(&p).unwrap(), DEFAULT_PAD_TOKEN);
        assert_eq!(
            read_pad_token_name(&dir.path().join("missing.json")).unwrap(),
            DEFAULT_PAD_TOKEN
        );
    }
}
