//! `imagegen download [MODEL]`: fetch every file a model load reads into the hub cache
//! (`HF_HOME`), resumably, e.g. while baking an image, so the first start reads from disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::cli::progress::ProgressLine;
use crate::flux2::weights::{
    DownloadProgress, HubOptions, ModelFiles, hf_token_from_env, human_bytes,
};
use crate::limits::DEFAULT_MODEL_ID;

/// Arguments of `imagegen download`.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// `4B`, `9B` or a hub repo id (a local directory has nothing to fetch).
    #[arg(env = "MODEL_ID", default_value = DEFAULT_MODEL_ID)]
    pub model: String,
}

pub fn run(args: DownloadArgs) -> anyhow::Result<()> {
    // Warnings (a resumed transfer) only: the progress line reports the rest.
    let _ = crate::telemetry::init_logging("warn", crate::config::LogFormat::Text);
    let progress = Arc::new(DownloadProgress::default());
    let opts = HubOptions {
        progress: Some(progress.clone()),
        ..HubOptions::from_env(hf_token_from_env())
    };
    let files = ModelFiles::open_with(&args.model, opts)?;
    let needed = files.needed_files();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = spawn_watcher(progress.clone(), stop.clone());
    let fetched = files.prefetch();
    stop.store(true, Ordering::Release);
    let mut line = watcher
        .join()
        .unwrap_or_else(|_| ProgressLine::new("download"));
    let fetched = fetched?;
    if fetched > 0 {
        line.update(fetched, fetched, &format!("{} done", human_bytes(fetched)));
    }
    // Every needed file resolves from the cache now (this also covers a local model).
    for f in &needed {
        files.get(f)?;
    }
    println!(
        "{}: {} files ready, {} downloaded",
        files.id(),
        needed.len(),
        human_bytes(fetched)
    );
    Ok(())
}

/// Draws the progress line until `stop` is set, then hands the line back for the last word.
fn spawn_watcher(
    progress: Arc<DownloadProgress>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<ProgressLine> {
    std::thread::spawn(move || {
        let mut line = ProgressLine::new("download");
        while !stop.load(Ordering::Acquire) {
            if let Some(s) = progress.snapshot() {
                let eta = s
                    .eta_secs
                    .map(|e| format!(", ETA {e:.0} s"))
                    .unwrap_or_default();
                let detail = format!(
                    "{} / {} ({}/s{eta}) {}",
                    human_bytes(s.done_bytes),
                    human_bytes(s.total_bytes),
                    human_bytes(s.rate_bytes_per_sec as u64),
                    s.file
                );
                line.update(s.done_bytes, s.total_bytes, &detail);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        line
    })
}
