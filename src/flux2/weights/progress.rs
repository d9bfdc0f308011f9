//! Model download progress: what /health shows ("downloading", bytes done of total) and what the
//! log says every few seconds (bytes, percent, rate, ETA). The first start of a 4B model fetches
//! ~16 GB; an operator must see that it is moving.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Shared counters of one model download (all files of one `prefetch`).
#[derive(Debug, Default)]
pub struct DownloadProgress {
    active: AtomicBool,
    /// Bytes still to fetch when the download started (files already cached do not count).
    total: AtomicU64,
    /// Bytes of the files finished in this download.
    completed: AtomicU64,
    /// Bytes of the file in flight (including what an earlier, interrupted try had committed).
    current: AtomicU64,
    files_total: AtomicU64,
    files_done: AtomicU64,
    state: Mutex<Timing>,
}

#[derive(Debug, Default)]
struct Timing {
    file: String,
    started: Option<Instant>,
    last_log: Option<Instant>,
    /// `done()` when the download started: a resumed file's committed bytes are not "rate".
    done_at_start: u64,
}

/// A point-in-time view for /health and the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DownloadSnapshot {
    pub file: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Bytes per second since the download started.
    pub rate_bytes_per_sec: f64,
    /// Seconds left at that rate (`None` before any byte arrived).
    pub eta_secs: Option<f64>,
}

impl DownloadSnapshot {
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            return 100.0;
        }
        100.0 * self.done_bytes as f64 / self.total_bytes as f64
    }
}

/// How often the log reports progress.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

impl DownloadProgress {
    /// The process-wide progress the server's /health reads.
    pub fn global() -> Arc<Self> {
        static GLOBAL: OnceLock<Arc<DownloadProgress>> = OnceLock::new();
        GLOBAL.get_or_init(Default::default).clone()
    }

    fn timing(&self) -> std::sync::MutexGuard<'_, Timing> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a download of `files` files, `bytes` in all.
    pub fn begin(&self, files: u64, bytes: u64) {
        let mut t = self.timing();
        *t = Timing {
            started: Some(Instant::now()),
            ..Timing::default()
        };
        self.total.store(bytes, Ordering::Relaxed);
        self.completed.store(0, Ordering::Relaxed);
        self.current.store(0, Ordering::Relaxed);
        self.files_total.store(files, Ordering::Relaxed);
        self.files_done.store(0, Ordering::Relaxed);
        self.active.store(true, Ordering::Release);
    }

    pub fn end(&self) {
        self.active.store(false, Ordering::Release);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// A file (re)starts: its bytes so far are counted again by the next `advance` calls.
    pub fn start_file(&self, file: &str) {
        self.timing().file = file.to_string();
        self.current.store(0, Ordering::Relaxed);
    }

    /// `n` more bytes of the file in flight; logs at most every [`LOG_EVERY`].
    pub fn advance(&self, n: u64) {
        self.current.fetch_add(n, Ordering::Relaxed);
        let due = {
            let mut t = self.timing();
            let now = Instant::now();
            let due = t
                .last_log
                .is_none_or(|last| now.duration_since(last) >= LOG_EVERY);
            if due {
                t.last_log = Some(now);
            }
            due
        };
        if due && let Some(s) = self.snapshot() {
            tracing::info!(
                file = %s.file,
                done_bytes = s.done_bytes,
                total_bytes = s.total_bytes,
                "downloading model files: {} of {} ({:.1}%), {}/s, ETA {}",
                human_bytes(s.done_bytes),
                human_bytes(s.total_bytes),
                s.percent(),
                human_bytes(s.rate_bytes_per_sec as u64),
                s.eta_secs
                    .map(|e| format!("{e:.0} s"))
                    .unwrap_or_else(|| "unknown".into()),
            );
        }
    }

    /// The file in flight is complete at `bytes`.
    pub fn finish_file(&self, bytes: u64) {
        self.completed.fetch_add(bytes, Ordering::Relaxed);
        self.current.store(0, Ordering::Relaxed);
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }

    fn done(&self) -> u64 {
        self.completed.load(Ordering::Relaxed) + self.current.load(Ordering::Relaxed)
    }

    /// `None` when no download runs.
    pub fn snapshot(&self) -> Option<DownloadSnapshot> {
        if !self.is_active() {
            return None;
        }
        let t = self.timing();
        let done = self.done();
        let total = self.total.load(Ordering::Relaxed).max(done);
        let elapsed = t.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
        let fetched = done.saturating_sub(t.done_at_start);
        let rate = if elapsed > 0.0 {
            fetched as f64 / elapsed
        } else {
            0.0
        };
        Some(DownloadSnapshot {
            file: t.file.clone(),
            done_bytes: done,
            total_bytes: total,
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| (total - done) as f64 / rate),
        })
    }
}

/// hf-hub's progress callback, feeding a [`DownloadProgress`].
#[derive(Clone)]
pub(super) struct Reporter(pub Arc<DownloadProgress>);

impl hf_hub::api::tokio::Progress for Reporter {
    async fn init(&mut self, _size: usize, filename: &str) {
        self.0.start_file(filename);
    }

    async fn update(&mut self, size: usize) {
        self.0.advance(size as u64);
    }

    async fn finish(&mut self) {}
}

/// `1.5 GB`, `12.0 MB`, `900 B` (decimal units, as download sizes are usually quoted).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, f64); 3] = [("GB", 1e9), ("MB", 1e6), ("kB", 1e3)];
    for (unit, size) in UNITS {
        if n as f64 >= size {
            return format!("{:.1} {unit}", n as f64 / size);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_and_bytes_and_restarts_a_resumed_file() {
        let p = DownloadProgress::default();
        assert!(p.snapshot().is_none(), "idle: nothing to show");
        p.begin(2, 300);
        p.start_file("a");
        p.advance(100);
        p.finish_file(100);
        p.start_file("b");
        p.advance(50);
        // The connection drops; the retry starts the file again and reports the committed 50
        // bytes plus new ones: no double counting.
        p.start_file("b");
        p.advance(50);
        p.advance(100);
        let s = p.snapshot().unwrap();
        assert_eq!((s.done_bytes, s.total_bytes), (250, 300));
        assert_eq!((s.files_done, s.files_total), (1, 2));
        assert_eq!(s.file, "b");
        assert!((s.percent() - 250.0 / 3.0).abs() < 1e-9);
        p.finish_file(200);
        p.end();
        assert!(p.snapshot().is_none());
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(12_000_000), "12.0 MB");
        assert_eq!(human_bytes(16_100_000_000), "16.1 GB");
    }
}
