//! The GPU worker: one thread owns the device, the FLUX pipeline and the upscaler, and takes jobs
//! from a bounded queue. Handlers never touch the models; health endpoints read [`EngineState`].

mod backend;
pub mod models;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use image::RgbImage;
use tokio::sync::{mpsc, oneshot};

pub use backend::{
    DeviceMemory, EngineError, ImageBackend, ItemParams, NoDeviceMemory, NoUpscaler, Upscale,
    UpscaleBackend,
};

use crate::flux2::attention::AttentionReport;
use crate::telemetry::Metrics;

/// Where the FLUX model is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ModelStatus {
    /// Not loaded and not loading (PRELOAD_MODELS=false).
    NotLoaded = 0,
    Loading = 1,
    Loaded = 2,
    Failed = 3,
}

/// State shared between the worker and the HTTP side; reading it never waits for the GPU.
#[derive(Debug)]
pub struct EngineState {
    model: AtomicU8,
    model_error: Mutex<Option<String>>,
    /// Set once the model has loaded.
    attention: Mutex<Option<AttentionReport>>,
    /// Configured LoRA adapters and their load outcome; set once the model has loaded.
    loras: Mutex<Vec<crate::flux2::lora::LoraStatus>>,
    waiting: AtomicUsize,
    capacity: usize,
    busy: AtomicBool,
    draining: AtomicBool,
    /// Set when the shutdown grace period is over: running work is cancelled.
    abort: AtomicBool,
    /// Why the device became unusable, once it has: no more work is taken.
    device_lost: Mutex<Option<String>>,
    refused: Mutex<Option<String>>,
    /// The hub commit of the loaded model's files.
    revision: Mutex<Option<String>>,
}

impl EngineState {
    fn new(capacity: usize) -> Self {
        Self {
            model: AtomicU8::new(ModelStatus::NotLoaded as u8),
            model_error: Mutex::new(None),
            attention: Mutex::new(None),
            loras: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            capacity,
            busy: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            device_lost: Mutex::new(None),
            refused: Mutex::new(None),
            revision: Mutex::new(None),
        }
    }

    pub fn model_status(&self) -> ModelStatus {
        match self.model.load(Ordering::Acquire) {
            1 => ModelStatus::Loading,
            2 => ModelStatus::Loaded,
            3 => ModelStatus::Failed,
            _ => ModelStatus::NotLoaded,
        }
    }

    fn set_model(&self, status: ModelStatus, error: Option<String>) {
        *self.model_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        self.model.store(status as u8, Ordering::Release);
    }

    pub fn model_error(&self) -> Option<String> {
        self.model_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_attention(&self, report: Option<AttentionReport>) {
        *self.attention.lock().unwrap_or_else(|p| p.into_inner()) = report;
    }

    /// The attention backend the loaded model uses and its self-check results.
    pub fn attention(&self) -> Option<AttentionReport> {
        self.attention
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_revision(&self, revision: Option<String>) {
        *self.revision.lock().unwrap_or_else(|p| p.into_inner()) = revision;
    }

    /// The hub commit every file of the loaded model was read at (`None`: local directory or
    /// not loaded).
    pub fn model_revision(&self) -> Option<String> {
        self.revision
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_loras(&self, loras: Vec<crate::flux2::lora::LoraStatus>) {
        *self.loras.lock().unwrap_or_else(|p| p.into_inner()) = loras;
    }

    /// Configured LoRA adapters and whether each loaded (empty before the model has loaded).
    pub fn loras(&self) -> Vec<crate::flux2::lora::LoraStatus> {
        self.loras.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a request may name `name` in `loras`: a per-request adapter that loaded.
    pub fn per_request_lora(&self, name: &str) -> bool {
        self.loras
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| {
                l.name == name
                    && l.status == "loaded"
                    && l.mode == crate::flux2::lora::LoraMode::PerRequest
            })
    }

    /// Jobs admitted and not yet taken by the worker.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the worker is running a job now.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Cancels whatever runs now and everything queued.
    pub fn abort_all(&self) {
        self.abort.store(true, Ordering::Release);
    }

    /// Why the device is unusable, once a job has found it so (a sticky CUDA error): the
    /// process must be restarted, so /ready fails and no new work is admitted.
    pub fn device_lost(&self) -> Option<String> {
        self.device_lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the model load refused this configuration ([`EngineError::Refused`]); the server
    /// exits with it instead of serving.
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_refused(&self, why: String) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Records what a job's error says about the device; the first lost-device error wins.
    fn note(&self, e: &EngineError) {
        if let EngineError::DeviceLost(why) = e {
            let mut lost = self.device_lost.lock().unwrap_or_else(|p| p.into_inner());
            if lost.is_none() {
                tracing::error!(error = %why, "the device is lost: refusing all further work; restart the process");
                *lost = Some(why.clone());
                drop(lost);
                if self.model_status() == ModelStatus::Loaded {
                    self.set_model(ModelStatus::Failed, Some(e.to_string()));
                }
            }
        }
    }

    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Acquire)
    }
}

/// Set by the request side when its client goes away; polled by the worker.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// A guard that cancels when dropped (a handler future dropped on client disconnect),
    /// unless [`CancelOnDrop::disarm`] was called.
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(Some(self.clone()))
    }
}

pub struct CancelOnDrop(Option<CancelFlag>);

impl CancelOnDrop {
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.cancel();
        }
    }
}

/// A place in the queue; released when the worker takes the job or when dropped unused.
#[derive(Debug)]
pub struct Admission {
    state: Arc<EngineState>,
    admitted_at: Instant,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub depth: usize,
    pub capacity: usize,
}

/// The result of one `/generate` item from the worker.
#[derive(Debug)]
pub struct ItemOutput {
    pub index: usize,
    pub result: Result<GeneratedItem, EngineError>,
}

#[derive(Debug)]
pub struct GeneratedItem {
    pub image: RgbImage,
    pub inference_ms: f64,
    /// Upscaler load (for the first upscaled item of a batch) plus the upscale itself.
    pub upscale_ms: Option<f64>,
}

#[derive(Debug)]
pub struct UpscaledImage {
    pub image: RgbImage,
    pub load_ms: f64,
    pub upscale_ms: f64,
}

/// A `/generate` request for the worker; results stream back per item.
pub struct GenerateJob {
    pub items: Vec<ItemParams>,
    pub references: Vec<RgbImage>,
    pub upscale: Option<u32>,
    pub cancel: CancelFlag,
    pub events: mpsc::UnboundedSender<ItemOutput>,
}

/// A `/upscale` request for the worker.
pub struct UpscaleJob {
    pub image: RgbImage,
    pub scale: u32,
    pub cancel: CancelFlag,
    pub reply: oneshot::Sender<Result<UpscaledImage, EngineError>>,
}

pub enum JobKind {
    Generate(GenerateJob),
    Upscale(UpscaleJob),
}

/// A job with its queue place and the span of the request it came from (for log lines).
pub(crate) struct Job {
    kind: JobKind,
    admission: Admission,
    span: tracing::Span,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Job>,
    state: Arc<EngineState>,
}

/// Loads the FLUX backend on the worker thread (the thread that will own the device).
pub type BackendLoader<B> = Box<dyn FnOnce() -> Result<B, EngineError> + Send>;

impl Engine {
    /// Starts the worker thread. With a `loader`, the model loads in the background on that
    /// thread (status `Loading`, then `Loaded` or `Failed`); jobs wait until it is done.
    pub fn start<B: ImageBackend, U: UpscaleBackend>(
        queue_size: usize,
        loader: Option<BackendLoader<B>>,
        upscaler: U,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        Self::start_with_memory(queue_size, loader, upscaler, NoDeviceMemory, metrics)
    }

    /// [`Engine::start`] with what to do with device memory after each job.
    pub fn start_with_memory<B: ImageBackend, U: UpscaleBackend, M: DeviceMemory>(
        queue_size: usize,
        loader: Option<BackendLoader<B>>,
        upscaler: U,
        memory: M,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let state = Arc::new(EngineState::new(queue_size));
        if loader.is_some() {
            state.set_model(ModelStatus::Loading, None);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let worker_state = state.clone();
        std::thread::Builder::new()
            .name("gpu-worker".into())
            .spawn(move || worker::run(rx, worker_state, metrics, loader, upscaler, memory))?;
        Ok(Self { tx, state })
    }

    pub fn state(&self) -> &Arc<EngineState> {
        &self.state
    }

    /// Reserves a queue place, or says the queue is full.
    pub fn admit(&self) -> Result<Admission, QueueFull> {
        let capacity = self.state.capacity;
        self.state
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .map(|_| Admission {
                state: self.state.clone(),
                admitted_at: Instant::now(),
            })
            .map_err(|depth| QueueFull { depth, capacity })
    }

    /// Hands a job to the worker.
    pub fn submit(&self, admission: Admission, kind: JobKind) -> Result<(), EngineError> {
        self.tx
            .send(Job {
                kind,
                admission,
                span: tracing::Span::current(),
            })
            .map_err(|_| EngineError::Internal("the GPU worker has stopped".into()))
    }
}
