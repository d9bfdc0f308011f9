//! Logging (tracing, text or JSON) and Prometheus metrics (text exposition format, hand-rolled:
//! a handful of counters and histograms do not need a metrics framework).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::config::LogFormat;

/// Installs the global tracing subscriber. `level` is a level name or an env-filter directive.
pub fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level.to_lowercase())
        .map_err(|e| anyhow::anyhow!("invalid LOG_LEVEL '{level}': {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // A subscriber already installed (tests start several servers) is fine.
    let _ = result;
    Ok(())
}

/// Histogram buckets in seconds: 10 ms to 10 minutes (diffusion jobs take minutes).
pub const BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

type Key = (&'static str, String);

/// Process-wide metrics. Label sets are small and bounded (stages, routes, error types).
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    counters: BTreeMap<Key, u64>,
    histograms: BTreeMap<Key, Histogram>,
}

/// Help text of each metric family, also the list of families that exist.
const HELP: &[(&str, &str, &str)] = &[
    (
        "imagegen_http_requests_total",
        "counter",
        "HTTP requests by route template and status code.",
    ),
    (
        "imagegen_items_total",
        "counter",
        "Finished work items (one per generated image or upscale request) by endpoint and outcome.",
    ),
    (
        "imagegen_queue_rejections_total",
        "counter",
        "Requests refused with 503 because the job queue was full.",
    ),
    (
        "imagegen_download_rejections_total",
        "counter",
        "Requests refused with 503 because the download stage (MAX_CONCURRENT_DOWNLOADS) was full.",
    ),
    (
        "imagegen_requests_by_key_total",
        "counter",
        "Admitted requests to protected routes by API key id (a short hash, never the key) and route.",
    ),
    (
        "imagegen_auth_refusals_total",
        "counter",
        "Requests refused by access control: reason missing or invalid (401) or rate_limited (429).",
    ),
    (
        "imagegen_auth_reloads_total",
        "counter",
        "Times the API key file was re-read with changed contents or on SIGHUP.",
    ),
    (
        "imagegen_upload_retries_total",
        "counter",
        "Upload attempts repeated after a connection error or 5xx.",
    ),
    (
        "imagegen_queue_wait_seconds",
        "histogram",
        "Time a job waited in the queue before the GPU worker took it.",
    ),
    (
        "imagegen_stage_duration_seconds",
        "histogram",
        "Duration of each stage: download, reference_encode, inference, upscaler_load, upscale, encode, upload.",
    ),
];

/// Renders a label set `a="x",b="y"` with escaping.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{k}=\"{v}\"");
    }
    out
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn inc(&self, name: &'static str, labels: String, by: u64) {
        *self.lock().counters.entry((name, labels)).or_default() += by;
    }

    pub fn observe(&self, name: &'static str, labels: String, value: Duration) {
        let secs = value.as_secs_f64();
        let mut inner = self.lock();
        let h = inner.histograms.entry((name, labels)).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    pub fn stage(&self, stage: &str, value: Duration) {
        self.observe(
            "imagegen_stage_duration_seconds",
            labels(&[("stage", stage)]),
            value,
        );
    }

    pub fn item(&self, endpoint: &str, outcome: &str) {
        self.inc(
            "imagegen_items_total",
            labels(&[("endpoint", endpoint), ("outcome", outcome)]),
            1,
        );
    }

    /// The exposition text; `gauges` are sampled by the caller (name, help, value).
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let inner = self.lock();
        let mut out = String::new();
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        for (family, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
            if *kind == "counter" {
                for ((name, labels), v) in inner.counters.iter().filter(|((n, _), _)| n == family) {
                    let _ = writeln!(out, "{name}{} {v}", braces(labels));
                }
            } else {
                for ((name, labels), h) in inner.histograms.iter().filter(|((n, _), _)| n == family)
                {
                    let sep = if labels.is_empty() { "" } else { "," };
                    for (b, c) in BUCKETS.iter().zip(h.counts) {
                        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
                    }
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
                    let _ = writeln!(out, "{name}_sum{} {}", braces(labels), h.sum);
                    let _ = writeln!(out, "{name}_count{} {}", braces(labels), h.count);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_add() {
        let m = Metrics::default();
        m.stage("upload", Duration::from_millis(30));
        m.stage("upload", Duration::from_secs(400));
        m.item("generate", "success");
        m.item("generate", "success");
        let text = m.render(&[("imagegen_queue_depth", "Jobs waiting.", 3.0)]);
        assert!(text.contains("imagegen_queue_depth 3\n"), "{text}");
        assert!(
            text.contains(
                "imagegen_stage_duration_seconds_bucket{stage=\"upload\",le=\"0.05\"} 1\n"
            )
        );
        assert!(
            text.contains(
                "imagegen_stage_duration_seconds_bucket{stage=\"upload\",le=\"600\"} 2\n"
            )
        );
        assert!(text.contains("imagegen_stage_duration_seconds_count{stage=\"upload\"} 2\n"));
        assert!(
            text.contains("imagegen_items_total{endpoint=\"generate\",outcome=\"success\"} 2\n")
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z")]), "a=\"x\\\"y\\\\z\"");
    }
}
