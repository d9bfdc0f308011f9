//! Bench results: one JSON schema shared with `benches/diffusers_baseline.py`, and markdown.

use serde::{Deserialize, Serialize};

/// Per-stage medians in milliseconds (absent where a stage does not apply to a case).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stages {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encode_refs_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denoise_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_decode_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upscale_ms: Option<f64>,
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// Stable case id, e.g. `t2i-1024x1024`, `refs4-1024x768`, `upscale-x4plus-1024`, `load`.
    pub case: String,
    /// `ok`, `failed` (see `error`) or `skipped` (see `error` for why).
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every timed run in milliseconds (warm-up runs excluded).
    pub runs_ms: Vec<f64>,
    pub median_ms: Option<f64>,
    /// Stage medians over the timed runs.
    pub stages: Stages,
    /// Peak device memory during the case (allocator high-water mark), bytes; null on CPU.
    pub peak_mem_bytes: Option<u64>,
    /// Device memory in use after the case, bytes; null on CPU.
    pub mem_after_bytes: Option<u64>,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `imagegen` or `diffusers`.
    pub implementation: String,
    pub implementation_version: String,
    /// `random`: weights drawn at random (timings and memory only; images are noise).
    pub weights: String,
    pub model: String,
    /// Transformer weight storage.
    pub quantization: String,
    /// Text encoder projection storage (reports written before it existed read as `none`).
    #[serde(default = "none")]
    pub text_encoder_quantization: String,
    pub dtype: String,
    pub device: String,
    pub device_name: String,
    pub num_steps: u32,
    pub warmup: u32,
    pub runs: u32,
    /// RFC 3339 UTC time at the start of the run.
    pub started_at: String,
    /// The attention backend the load-time self-check chose and each candidate's result
    /// (absent in reports written before it existed, and when the load failed).
    #[serde(default)]
    pub attention: Option<crate::flux2::attention::AttentionReport>,
    pub cases: Vec<CaseResult>,
}

fn none() -> String {
    "none".into()
}

pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn ms(x: Option<f64>) -> String {
    match x {
        Some(v) if v >= 10.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "–".into(),
    }
}

fn gb(x: Option<u64>) -> String {
    x.map_or_else(|| "n/a".into(), |b| format!("{:.2}", b as f64 / 1e9))
}

impl Report {
    /// A markdown table: one row per case, times in ms (medians), memory in GB (10^9 bytes).
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        if self.weights == "random" {
            s.push_str("**RANDOM WEIGHTS**: timings and memory only; the images are noise.\n\n");
        }
        s.push_str(&format!(
            "{} {} · model {} ({} weights) · transformer {}, text encoder {} · {} · {} ({}) · {} steps · {} warm-up + median of {} · {}\n\n",
            self.implementation,
            self.implementation_version,
            self.model,
            self.weights,
            self.quantization,
            self.text_encoder_quantization,
            self.dtype,
            self.device,
            self.device_name,
            self.num_steps,
            self.warmup,
            self.runs,
            self.started_at
        ));
        s.push_str("| case | status | median ms | encode refs | text enc | denoise | VAE decode | upscale | peak GB | after GB |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for c in &self.cases {
            let status = match &c.error {
                Some(e) => format!("{}: {}", c.status, e.replace('|', "/").replace('\n', " ")),
                None => c.status.clone(),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                c.case,
                status,
                ms(c.median_ms),
                ms(c.stages.encode_refs_ms),
                ms(c.stages.text_encoder_ms),
                ms(c.stages.denoise_ms),
                ms(c.stages.vae_decode_ms),
                ms(c.stages.upscale_ms),
                gb(c.peak_mem_bytes),
                gb(c.mem_after_bytes),
            ));
        }
        if let Some(a) = &self.attention {
            s.push_str(&attention_markdown(a));
        }
        s
    }
}

/// The attention self-check as a table: one row per backend checked (naive first).
fn attention_markdown(a: &crate::flux2::attention::AttentionReport) -> String {
    let mut s = format!(
        "\nattention: **{}** (requested {}, {})\n",
        a.selected, a.requested, a.dtype
    );
    if a.naive.is_none() {
        s.push_str("(no self-check ran: no fused backend compiled in, or naive was forced)\n");
        return s;
    }
    s.push_str("\n| backend | ok | ms per call (all shapes) | max error | tolerance | not used because |\n");
    s.push_str("|---|---|---:|---:|---:|---|\n");
    for c in a.naive.iter().chain(&a.candidates) {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0e} | {} |\n",
            c.name,
            if c.ok { "yes" } else { "no" },
            ms(c.time_ms),
            c.max_error
                .map_or_else(|| "–".into(), |e| format!("{e:.2e}")),
            c.tolerance,
            c.reason.as_deref().unwrap_or("").replace('|', "/"),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn markdown_has_a_row_per_case_and_flags_random_weights() {
        let case = |name: &str, status: &str| CaseResult {
            case: name.into(),
            status: status.into(),
            error: (status != "ok").then(|| "out of memory | oops".into()),
            runs_ms: vec![12.0],
            median_ms: Some(12.0),
            stages: Stages {
                denoise_ms: Some(7.5),
                ..Default::default()
            },
            peak_mem_bytes: Some(17_320_000_000),
            mem_after_bytes: None,
        };
        let candidate = |name: &str, time: Option<f64>, reason: Option<&str>| {
            crate::flux2::attention::CandidateReport {
                name: name.into(),
                ok: reason.is_none(),
                time_ms: time,
                max_error: time.map(|_| 0.004),
                tolerance: 0.03,
                reason: reason.map(Into::into),
            }
        };
        let r = Report {
            implementation: "imagegen".into(),
            implementation_version: "0.1.0".into(),
            weights: "random".into(),
            model: "4B".into(),
            quantization: "fp8".into(),
            text_encoder_quantization: "int8".into(),
            dtype: "bf16".into(),
            device: "cuda".into(),
            device_name: "NVIDIA H100".into(),
            num_steps: 4,
            warmup: 1,
            runs: 3,
            started_at: "2026-11-27T00:00:00Z".into(),
            attention: Some(crate::flux2::attention::AttentionReport {
                selected: "naive".into(),
                requested: "auto".into(),
                dtype: "bf16".into(),
                shapes: vec![],
                naive: Some(candidate("naive", Some(40.0), None)),
                candidates: vec![candidate("fused", None, Some("error: bad | arch"))],
            }),
            cases: vec![case("t2i-512x512", "ok"), case("refs2-512x512", "failed")],
        };
        let md = r.to_markdown();
        assert!(md.starts_with("**RANDOM WEIGHTS**"));
        assert!(
            md.contains("· transformer fp8, text encoder int8 ·"),
            "{md}"
        );
        assert!(
            md.contains("| t2i-512x512 | ok | 12 | – | – | 7.50 | – | – | 17.32 | n/a |"),
            "{md}"
        );
        // A '|' inside an error must not break the table.
        assert!(
            md.contains("| refs2-512x512 | failed: out of memory / oops |"),
            "{md}"
        );
        assert!(
            md.contains("attention: **naive** (requested auto, bf16)"),
            "{md}"
        );
        assert!(
            md.contains("| naive | yes | 40 | 4.00e-3 | 3e-2 |  |"),
            "{md}"
        );
        assert!(
            md.contains("| fused | no | – | – | 3e-2 | error: bad / arch |"),
            "{md}"
        );
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
