//! Config structs deserialised from the checkpoint's own JSON files, so any consistent size
//! (4B, 9B, the tiny test models) loads without code changes.

use serde::Deserialize;

/// `model_index.json` of a diffusers pipeline directory.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Distilled klein models ship `true`; the base models omit it (diffusers default `false`).
    #[serde(default)]
    pub is_distilled: bool,
}

/// `text_encoder/config.json` (transformers `Qwen3Config`).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3 sets it explicitly (128 for 4B and 8B), not hidden / heads.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// Hub configs carry `rope_theta` at the top level; transformers >= 5 writes it inside
    /// `rope_parameters`. Read either through [`Qwen3Config::rope_theta`].
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct RopeParameters {
    #[serde(default)]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

impl Qwen3Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base frequency; 10000 is transformers' default when a config omits it.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0)
    }

    /// Rejects configs this encoder does not implement instead of silently computing garbage.
    pub fn validate(&self) -> Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!(
                "text_encoder hidden_act '{}' is not supported (expected silu)",
                self.hidden_act
            ));
        }
        if self.attention_bias {
            return Err(
                "text_encoder attention_bias=true is not supported (Qwen3 has none)".into(),
            );
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
            && t != "default"
        {
            return Err(format!(
                "text_encoder rope_type '{t}' is not supported (expected default)"
            ));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "text_encoder num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rope_theta_in_both_layouts() {
        let hub: Qwen3Config = serde_json::from_str(
            r#"{"vocab_size":151936,"hidden_size":2560,"intermediate_size":9728,
            "num_hidden_layers":36,"num_attention_heads":32,"num_key_value_heads":8,
            "head_dim":128,"rms_norm_eps":1e-6,"rope_theta":1000000,"rope_scaling":null,
            "hidden_act":"silu","attention_bias":false,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        assert_eq!(hub.rope_theta(), 1_000_000.0);
        assert_eq!(hub.head_dim(), 128);
        hub.validate().unwrap();

        let v5: Qwen3Config = serde_json::from_str(
            r#"{"vocab_size":448,"hidden_size":32,"intermediate_size":48,
            "num_hidden_layers":28,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_parameters":{"rope_type":"default","rope_theta":5000.0}}"#,
        )
        .unwrap();
        assert_eq!(v5.rope_theta(), 5000.0);
        assert_eq!(v5.head_dim(), 8);
        v5.validate().unwrap();
    }

    #[test]
    fn rejects_unsupported_variants() {
        let yarn: Qwen3Config = serde_json::from_str(
            r#"{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"rms_norm_eps":1e-6,
            "rope_parameters":{"rope_type":"yarn","rope_theta":5000.0}}"#,
        )
        .unwrap();
        assert!(yarn.validate().unwrap_err().contains("yarn"));
    }

    #[test]
    fn model_index_defaults_to_not_distilled() {
        let base: ModelIndex =
            serde_json::from_str(r#"{"_class_name":"Flux2KleinPipeline"}"#).unwrap();
        assert!(!base.is_distilled);
        let klein: ModelIndex =
            serde_json::from_str(r#"{"_class_name":"Flux2KleinPipeline","is_distilled":true}"#)
                .unwrap();
        assert!(klein.is_distilled);
    }
}
