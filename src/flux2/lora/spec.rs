//! What the settings say about adapters (`LORAS`, `LORA_PRELOAD`) and what became of each one
//! at load (reported by /health).

use std::path::PathBuf;

use super::LoraFormat;
use crate::limits::{LORA_SCALE_MAX, LORA_SCALE_MIN, MAX_LORAS};

/// How an adapter is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraMode {
    /// Added into the weights at start-up (`LORAS`); always on, no per-step cost.
    Fused,
    /// Kept unfused (`LORA_PRELOAD`); a request turns it on with `loras: [{name, scale}]`.
    PerRequest,
}

/// One entry of `LORAS` / `LORA_PRELOAD`: `name=source[:scale]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub name: String,
    /// A local path, or `hf:owner/repo/path/in/repo.safetensors`.
    pub source: String,
    /// Fused: the scale it is fused with. Per request: unused (the request gives it).
    pub scale: f64,
    pub mode: LoraMode,
}

/// A parsed `LORAS` / `LORA_PRELOAD` value (a newtype so clap takes the whole list at once).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraList(pub Vec<LoraSpec>);

/// Where a spec's file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraSource {
    Local(PathBuf),
    Hub { repo: String, file: String },
}

impl LoraSpec {
    pub fn location(&self) -> Result<LoraSource, String> {
        if let Some(rest) = self.source.strip_prefix("hf:") {
            let parts: Vec<&str> = rest.splitn(3, '/').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
                return Err(format!(
                    "hub LoRA source '{}' must be hf:owner/repo/file.safetensors",
                    self.source
                ));
            }
            return Ok(LoraSource::Hub {
                repo: format!("{}/{}", parts[0], parts[1]),
                file: parts[2].to_string(),
            });
        }
        Ok(LoraSource::Local(PathBuf::from(&self.source)))
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses `name=source[:scale], …` for the setting `setting` (named in errors). The scale is the
/// text after the last `:` when it parses as a number (so `hf:` sources and paths with colons
/// keep working); it defaults to 1.
pub fn parse_specs(setting: &str, value: &str, mode: LoraMode) -> Result<Vec<LoraSpec>, String> {
    let mut out: Vec<LoraSpec> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, rest) = item.split_once('=').ok_or_else(|| {
            format!(
                "{setting}: '{item}' must be name=path[:scale] or name=hf:owner/repo/file[:scale]"
            )
        })?;
        let name = name.trim();
        if !valid_name(name) {
            return Err(format!(
                "{setting}: adapter name '{name}' must be 1-64 characters of A-Z a-z 0-9 - _ ."
            ));
        }
        let (source, scale) = match rest.rsplit_once(':') {
            Some((src, s)) if s.trim().parse::<f64>().is_ok() => {
                (src.trim(), s.trim().parse::<f64>().unwrap_or(1.0))
            }
            _ => (rest.trim(), 1.0),
        };
        if source.is_empty() {
            return Err(format!("{setting}: adapter '{name}' has no path"));
        }
        if !(LORA_SCALE_MIN..=LORA_SCALE_MAX).contains(&scale) {
            return Err(format!(
                "{setting}: adapter '{name}' scale {scale} is outside {LORA_SCALE_MIN}..={LORA_SCALE_MAX}"
            ));
        }
        if out.iter().any(|s| s.name == name) {
            return Err(format!("{setting}: adapter name '{name}' appears twice"));
        }
        out.push(LoraSpec {
            name: name.to_string(),
            source: source.to_string(),
            scale,
            mode,
        });
    }
    if out.len() > MAX_LORAS {
        return Err(format!(
            "{setting}: {} adapters, at most {MAX_LORAS}",
            out.len()
        ));
    }
    Ok(out)
}

/// What /health says about one configured adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraStatus {
    pub name: String,
    pub source: String,
    pub mode: LoraMode,
    /// Fused adapters: the scale fused in; per-request ones: null.
    pub scale: Option<f64>,
    /// `loaded` or `failed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LoraFormat>,
    /// Linears changed in the transformer and the text encoder.
    pub transformer_targets: usize,
    pub text_encoder_targets: usize,
    pub rank: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_sources_and_scales() {
        let s = parse_specs(
            "LORAS",
            "style=/m/a.safetensors:0.8, hub=hf:o/r/sub/b.safetensors , plain=c.safetensors",
            LoraMode::Fused,
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].name.as_str(), s[0].source.as_str(), s[0].scale),
            ("style", "/m/a.safetensors", 0.8)
        );
        assert_eq!(s[1].source, "hf:o/r/sub/b.safetensors");
        assert_eq!(s[1].scale, 1.0);
        assert_eq!(
            s[1].location().unwrap(),
            LoraSource::Hub {
                repo: "o/r".into(),
                file: "sub/b.safetensors".into()
            }
        );
        assert_eq!(
            s[2].location().unwrap(),
            LoraSource::Local("c.safetensors".into())
        );
    }

    #[test]
    fn errors_name_the_setting_and_the_entry() {
        let e = parse_specs("LORAS", "noequals", LoraMode::Fused).unwrap_err();
        assert!(e.starts_with("LORAS: 'noequals'"), "{e}");
        let e = parse_specs("LORA_PRELOAD", "a=x:1,a=y", LoraMode::PerRequest).unwrap_err();
        assert!(e.contains("'a' appears twice"), "{e}");
        let e = parse_specs("LORAS", "a=x:99", LoraMode::Fused).unwrap_err();
        assert!(e.contains("scale 99 is outside"), "{e}");
        let e = parse_specs("LORAS", "b a=x", LoraMode::Fused).unwrap_err();
        assert!(e.contains("adapter name 'b a'"), "{e}");
        let bad_hub = LoraSpec {
            name: "h".into(),
            source: "hf:only/two".into(),
            scale: 1.0,
            mode: LoraMode::Fused,
        };
        assert!(
            bad_hub
                .location()
                .unwrap_err()
                .contains("hf:owner/repo/file")
        );
    }
}
