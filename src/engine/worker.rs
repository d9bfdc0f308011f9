//! The loop of the GPU worker thread.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use super::{
    BackendLoader, DeviceMemory, EngineError, EngineState, GenerateJob, GeneratedItem,
    ImageBackend, ItemOutput, Job, JobKind, ModelStatus, Upscale, UpscaleBackend, UpscaleJob,
    UpscaledImage,
};
use crate::telemetry::Metrics;

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

pub(super) fn run<B: ImageBackend, U: UpscaleBackend, M: DeviceMemory>(
    rx: Receiver<Job>,
    state: Arc<EngineState>,
    metrics: Arc<Metrics>,
    loader: Option<BackendLoader<B>>,
    upscaler: U,
    memory: M,
) {
    let mut backend = None;
    if let Some(load) = loader {
        let started = Instant::now();
        tracing::info!("loading FLUX model");
        match catch_unwind(AssertUnwindSafe(load)) {
            Ok(Ok(b)) => {
                state.set_attention(b.attention_report());
                state.set_revision(b.model_revision());
                state.set_loras(b.lora_status());
                backend = Some(b);
                state.set_model(ModelStatus::Loaded, None);
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "MODEL LOADED - Server ready"
                );
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "loading the FLUX model failed");
                state.set_model(ModelStatus::Failed, Some(e.to_string()));
                if let EngineError::Refused(why) = e {
                    state.set_refused(why);
                }
            }
            Err(p) => {
                let msg = panic_message(p.as_ref());
                tracing::error!(error = %msg, "loading the FLUX model panicked");
                state.set_model(ModelStatus::Failed, Some(msg));
            }
        }
    }

    while let Ok(job) = rx.recv() {
        let Job {
            kind,
            admission,
            span,
        } = job;
        metrics.observe(
            "imagegen_queue_wait_seconds",
            String::new(),
            admission.admitted_at.elapsed(),
        );
        drop(admission);
        let _entered = span.enter();
        state.busy.store(true, Ordering::Release);
        let label = match &kind {
            JobKind::Generate(_) => "generate",
            JobKind::Upscale(_) => "upscale",
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| match kind {
            JobKind::Generate(job) => generate(&state, &metrics, backend.as_ref(), &upscaler, job),
            JobKind::Upscale(job) => upscale(&state, &metrics, &upscaler, job),
        }));
        if let Err(p) = outcome {
            // The job's reply channels were dropped with it: its handler reports the failure.
            tracing::error!(error = %panic_message(p.as_ref()), "job panicked");
        }
        // Everything the job allocated is dropped by now (the upscaler included).
        if catch_unwind(AssertUnwindSafe(|| memory.after_job(label))).is_err() {
            tracing::error!("giving device memory back after the job panicked");
        }
        state.busy.store(false, Ordering::Release);
    }
    tracing::info!("GPU worker stopped");
}

fn generate<B: ImageBackend, U: UpscaleBackend>(
    state: &EngineState,
    metrics: &Metrics,
    backend: Option<&B>,
    upscaler: &U,
    job: GenerateJob,
) {
    let GenerateJob {
        items,
        references,
        upscale,
        cancel,
        events,
    } = job;
    let cancelled = || cancel.is_cancelled() || state.aborted() || events.is_closed();
    let fail_all = |e: EngineError| {
        state.note(&e);
        for index in 0..items.len() {
            let _ = events.send(ItemOutput {
                index,
                result: Err(e.clone()),
            });
        }
    };
    if cancelled() {
        tracing::info!("request cancelled before it started");
        return;
    }
    if let Some(why) = state.device_lost() {
        return fail_all(EngineError::DeviceLost(why));
    }
    let Some(backend) = backend else {
        return fail_all(EngineError::NotLoaded);
    };

    let refs = if references.is_empty() {
        None
    } else {
        let started = Instant::now();
        match backend.encode_references(&references) {
            Ok(r) => {
                metrics.stage("reference_encode", started.elapsed());
                Some(r)
            }
            Err(e) => return fail_all(e),
        }
    };
    drop(references);

    // The upscaler is loaded at most once per batch, on first use, and dropped at the end.
    let mut loaded: Option<Result<U::Upscaler, EngineError>> = None;
    for (index, item) in items.iter().enumerate() {
        if cancelled() {
            tracing::info!(index, "request cancelled; skipping the remaining items");
            for index in index..items.len() {
                let _ = events.send(ItemOutput {
                    index,
                    result: Err(EngineError::Cancelled),
                });
            }
            return;
        }
        tracing::info!(index, prompt = %item.prompt.chars().take(50).collect::<String>(), seed = item.seed, "generating");
        let started = Instant::now();
        let result = backend
            .generate(item, refs.as_ref(), &cancelled)
            .and_then(|image| {
                let inference_ms = ms(started);
                metrics.stage("inference", started.elapsed());
                let Some(scale) = upscale else {
                    return Ok(GeneratedItem {
                        image,
                        inference_ms,
                        upscale_ms: None,
                    });
                };
                let up_started = Instant::now();
                let up = loaded.get_or_insert_with(|| {
                    let r = upscaler.load();
                    metrics.stage("upscaler_load", up_started.elapsed());
                    r
                });
                let up = up.as_ref().map_err(Clone::clone)?;
                let t = Instant::now();
                let image = up.upscale(&image, scale)?;
                metrics.stage("upscale", t.elapsed());
                Ok(GeneratedItem {
                    image,
                    inference_ms,
                    upscale_ms: Some(ms(up_started)),
                })
            });
        if let Err(e) = &result {
            tracing::error!(index, error = %e, "item failed");
            state.note(e);
            if matches!(e, EngineError::DeviceLost(_)) {
                // Nothing more can run on this device: fail the rest of the batch now.
                let why = e.clone();
                let _ = events.send(ItemOutput { index, result });
                for index in index + 1..items.len() {
                    let _ = events.send(ItemOutput {
                        index,
                        result: Err(why.clone()),
                    });
                }
                return;
            }
        }
        if events.send(ItemOutput { index, result }).is_err() {
            return;
        }
    }
}

fn upscale<U: UpscaleBackend>(
    state: &EngineState,
    metrics: &Metrics,
    upscaler: &U,
    job: UpscaleJob,
) {
    let UpscaleJob {
        image,
        scale,
        cancel,
        reply,
    } = job;
    if cancel.is_cancelled() || state.aborted() || reply.is_closed() {
        return;
    }
    if let Some(why) = state.device_lost() {
        let _ = reply.send(Err(EngineError::DeviceLost(why)));
        return;
    }
    let started = Instant::now();
    let result = upscaler.load().and_then(|up| {
        let load_ms = ms(started);
        metrics.stage("upscaler_load", started.elapsed());
        let t = Instant::now();
        let out = up.upscale(&image, scale)?;
        metrics.stage("upscale", t.elapsed());
        Ok(UpscaledImage {
            image: out,
            load_ms,
            upscale_ms: ms(t),
        })
    });
    if let Err(e) = &result {
        state.note(e);
    }
    let _ = reply.send(result);
}
