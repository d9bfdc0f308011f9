//! The HTTP API (axum): routes, request/response schemas, errors, OpenAPI, startup, shutdown.

pub mod auth;
mod errors;
mod extract;
mod jobs;
pub mod openapi;
mod routes;
pub mod schemas;
mod stage;
pub mod validation;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use errors::ApiError;

use crate::config::ServeArgs;
use crate::device::GpuInfo;
use crate::device::choice::{self as device_choice, DeviceDecision, SystemProbe};
use crate::engine::{
    Admission, BackendLoader, DeviceMemory, Engine, EngineError, ImageBackend, ModelStatus,
    UpscaleBackend,
};
use crate::flux2::Quantization;
use crate::io::{FetchConfig, Fetcher, UploadConfig, Uploader, UrlPolicy};
use crate::model_args::dtype_name;
use crate::telemetry::{self, Metrics, labels};

/// The version `GET /`, /health and OpenAPI report: Cargo's package version.
pub const API_VERSION: &str = crate::limits::VERSION;

/// Everything the handlers share.
pub struct AppState {
    pub engine: Engine,
    pub fetcher: Fetcher,
    pub uploader: Uploader,
    pub metrics: Arc<Metrics>,
    pub gpu: RwLock<GpuInfo>,
    pub model_id: String,
    pub quantization: Quantization,
    pub text_encoder_quantization: Quantization,
    /// Compute dtype of the models (`DTYPE`, else the device's default).
    pub dtype: candle_core::DType,
    pub max_input_pixels: u64,
    pub retry_after_secs: u64,
    pub auth: Arc<auth::Auth>,
    /// Keys also guard /metrics (PROTECT_METRICS) and /docs + /openapi.json (PROTECT_DOCS).
    pub protect_metrics: bool,
    pub protect_docs: bool,
    /// Model download progress (the process-wide one the hub loader reports to).
    pub downloads: Arc<crate::flux2::weights::DownloadProgress>,
    /// What the operator must know about this process (a GPU the binary cannot use).
    pub warnings: Vec<String>,
    /// Requests fetching their input images, before they take a queue place.
    pub download_stage: stage::DownloadStage,
}

impl AppState {
    /// A `/generate` queue place: refused while draining or without a loaded model.
    fn admit_generate(&self) -> Result<Admission, ApiError> {
        self.check_generate()?;
        self.admit()
    }

    /// Whether `/generate` can take work now (draining, device lost, model not loaded).
    fn check_generate(&self) -> Result<(), ApiError> {
        self.check_upscale()?;
        if self.engine.state().model_status() != ModelStatus::Loaded {
            return Err(self.engine_error(EngineError::NotLoaded));
        }
        Ok(())
    }

    /// An `/upscale` queue place (the upscaler loads on demand, so no model is needed).
    fn admit_upscale(&self) -> Result<Admission, ApiError> {
        self.check_upscale()?;
        self.admit()
    }

    /// Whether `/upscale` can take work now (draining, device lost).
    fn check_upscale(&self) -> Result<(), ApiError> {
        let state = self.engine.state();
        if state.draining() {
            return Err(ApiError::Draining);
        }
        if let Some(why) = state.device_lost() {
            return Err(self.engine_error(EngineError::DeviceLost(why)));
        }
        Ok(())
    }

    /// An engine error as the API answers it (with this server's `Retry-After`).
    fn engine_error(&self, error: EngineError) -> ApiError {
        ApiError::Engine {
            error,
            retry_after: self.retry_after_secs,
        }
    }

    /// A download-stage place, or the 503 that says the stage is full.
    fn enter_downloads(&self) -> Result<stage::DownloadPlace, ApiError> {
        self.download_stage.enter().map_err(|full| {
            self.metrics
                .inc("imagegen_download_rejections_total", String::new(), 1);
            ApiError::DownloadsFull {
                full,
                retry_after: self.retry_after_secs,
            }
        })
    }

    /// A queue place, or the 503 that says the queue is full.
    fn admit(&self) -> Result<Admission, ApiError> {
        self.engine.admit().map_err(|full| {
            self.metrics
                .inc("imagegen_queue_rejections_total", String::new(), 1);
            ApiError::QueueFull {
                full,
                retry_after: self.retry_after_secs,
            }
        })
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The router with every route and middleware. The probes (`/`, `/health`, `/ready`, `/live`)
/// are always open: load balancers call them without a key.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let key = middleware::from_fn_with_state(state.auth.clone(), auth::require_key);
    let guard =
        |r: Router<Arc<AppState>>, on: bool| if on { r.route_layer(key.clone()) } else { r };
    let jobs = Router::new()
        .route("/generate", post(routes::generate))
        .route("/upscale", post(routes::upscale));
    let metrics = Router::new().route("/metrics", get(routes::metrics));
    let api = Router::new()
        .route("/", get(routes::root))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/live", get(routes::live))
        .merge(guard(metrics, state.protect_metrics))
        .merge(guard(jobs, true))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state.clone());
    let docs = if state.protect_docs {
        openapi::docs_router().route_layer(key)
    } else {
        openapi::docs_router()
    };
    Router::new()
        .merge(docs)
        .merge(api)
        .layer(middleware::from_fn_with_state(state, count_requests))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                // The path only: query strings may carry credentials.
                tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// Counts requests by route template (never the raw path: bounded label values) and status.
async fn count_requests(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state.metrics.inc(
        "imagegen_http_requests_total",
        labels(&[("route", &route), ("status", resp.status().as_str())]),
        1,
    );
    resp
}

/// Runs the server until SIGTERM/SIGINT: binds first, then loads the model in the background.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init_logging(&args.log_level, args.log_format)?;
    let listener = TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{} (HOST/PORT)", args.host, args.port))?;
    serve_on(listener, args, shutdown_signal()).await
}

/// The production server on a given listener, until `shutdown` completes.
pub async fn serve_on(
    listener: TcpListener,
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let device = args
        .model
        .device
        .open()
        .with_context(|| format!("cannot open device '{:?}' (DEVICE)", args.model.device))?;
    crate::flux2::attention::check_available(
        &args.model.attention,
        &crate::flux2::attention::compiled_backends(&device),
    )?;
    let loader = crate::engine::models::flux_loader(&args, &device);
    let upscaler = crate::engine::models::upscaler(&args, &device);
    let memory = crate::engine::models::device_memory(&args, &device);
    run_with_memory(
        listener,
        args,
        device.is_cuda(),
        loader,
        upscaler,
        memory,
        shutdown,
    )
    .await
}

/// The server with any backend (tests use this with their own).
pub async fn run<B: ImageBackend, U: UpscaleBackend>(
    listener: TcpListener,
    args: ServeArgs,
    on_gpu: bool,
    loader: Option<BackendLoader<B>>,
    upscaler: U,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let memory = crate::engine::NoDeviceMemory;
    run_with_memory(listener, args, on_gpu, loader, upscaler, memory, shutdown).await
}

/// [`run`] with what the worker does with device memory after each job.
pub async fn run_with_memory<B: ImageBackend, U: UpscaleBackend, M: DeviceMemory>(
    listener: TcpListener,
    args: ServeArgs,
    on_gpu: bool,
    loader: Option<BackendLoader<B>>,
    upscaler: U,
    memory: M,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut warnings = Vec::new();
    if let DeviceDecision::Proceed { warning: Some(w) } =
        device_choice::decide(args.model.device, cfg!(feature = "cuda"), &SystemProbe)
    {
        tracing::warn!("{}", "!".repeat(78));
        tracing::warn!("{w}");
        tracing::warn!("{}", "!".repeat(78));
        warnings.push(w);
    }
    let policy = UrlPolicy {
        allow_private: args.allow_private_urls,
    };
    if policy.allow_private {
        tracing::warn!(
            "ALLOW_PRIVATE_URLS=true: downloads and uploads may reach loopback and private networks"
        );
    }
    let model_id = args.resolved_model_id();
    let dtype = args.model.resolved_dtype_on(on_gpu);
    tracing::info!(
        addr = %listener.local_addr()?,
        model_id,
        quantization = %args.model.quantization,
        text_encoder_quantization = %args.resolved_text_encoder_quantization(),
        dtype = %dtype_name(dtype),
        preload = args.preload_models,
        device = if on_gpu { "cuda" } else { "cpu" },
        token = if args.token().is_some() { "set" } else { "unset" },
        queue_size = args.queue_size,
        "STARTING IMAGE-GEN SERVER"
    );
    let metrics = Arc::new(Metrics::default());
    let auth = Arc::new(auth::Auth::new(&args.auth_config(), metrics.clone())?);
    match auth.mode() {
        auth::AuthMode::None => tracing::warn!(
            "NO API KEY CONFIGURED: anyone who can reach this port can run the GPU and make the \
             server PUT to any URL. Set API_KEYS or API_KEYS_FILE (see README-VASTAI.md)."
        ),
        auth::AuthMode::ApiKey => tracing::info!(
            keys = auth.key_count(),
            key_file = ?args.api_keys_file,
            rate_limit_per_key = ?args.rate_limit_per_key,
            protect_metrics = args.protect_metrics,
            protect_docs = args.protect_docs,
            "API keys required on /generate and /upscale"
        ),
    }
    auth.watch(Duration::from_secs(args.api_keys_poll_secs));
    let loader = if args.preload_models { loader } else { None };
    let engine = Engine::start_with_memory(
        args.queue_size as usize,
        loader,
        upscaler,
        memory,
        metrics.clone(),
    )?;
    let state = Arc::new(AppState {
        engine: engine.clone(),
        fetcher: Fetcher::new(FetchConfig {
            timeout: args.download_timeout(),
            max_bytes: args.max_download_bytes,
            max_redirects: args.max_redirects,
            policy,
        })?,
        uploader: Uploader::new(UploadConfig {
            timeout: args.upload_timeout(),
            deadline: args.upload_deadline(),
            retries: args.upload_retries,
            retry_base: Duration::from_millis(args.upload_retry_base_ms),
            policy,
        })?,
        metrics,
        gpu: RwLock::new(GpuInfo {
            available: on_gpu,
            ..Default::default()
        }),
        model_id,
        quantization: args.model.quantization,
        text_encoder_quantization: args.resolved_text_encoder_quantization(),
        dtype,
        max_input_pixels: args.max_input_pixels,
        retry_after_secs: args.retry_after_secs,
        auth,
        protect_metrics: args.protect_metrics,
        protect_docs: args.protect_docs,
        downloads: crate::flux2::weights::DownloadProgress::global(),
        warnings,
        download_stage: stage::DownloadStage::new(args.max_concurrent_downloads as usize),
    });
    if on_gpu {
        tokio::spawn(sample_gpu(Arc::downgrade(&state)));
    }

    let app = router(state.clone(), args.max_body_bytes);
    let engine_state = engine.state().clone();
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_delay = Duration::from_secs(args.shutdown_drain_delay_secs);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining (/ready now answers 503)");
        engine_state.start_draining();
        let _ = signalled_tx.send(());
        // Keep the listener open a little so load balancers see /ready fail first.
        tokio::time::sleep(drain_delay).await;
    });
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let engine_state = engine.state().clone();
    let mut server = std::pin::pin!(server.into_future());
    let refusal_state = engine.state().clone();
    let refused = async move {
        loop {
            if let Some(why) = refusal_state.refused() {
                return why;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = &mut server => r?,
        why = refused => {
            tracing::error!(error = %why, "refusing to start");
            engine.state().start_draining();
            anyhow::bail!("refusing to start: {why}");
        }
        _ = async { if signalled_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending().await } } => {
            tracing::warn!("grace period of {grace:?} over: cancelling running work");
            engine_state.abort_all();
            if tokio::time::timeout(Duration::from_secs(10), &mut server).await.is_err() {
                tracing::warn!("connections still open after cancelling; exiting anyway");
            }
        }
    }
    tracing::info!("server stopped");
    Ok(())
}

/// Refreshes the GPU name and memory every 10 s (nvidia-smi runs off the async threads).
async fn sample_gpu(state: std::sync::Weak<AppState>) {
    loop {
        let Some(sample) = tokio::task::spawn_blocking(crate::device::query_nvidia_smi)
            .await
            .ok()
        else {
            return;
        };
        let Some(state) = state.upgrade() else { return };
        if let Some((name, total, used)) = sample {
            let mut gpu = state.gpu.write().unwrap_or_else(|p| p.into_inner());
            gpu.name = Some(name);
            gpu.memory_gb = Some(total);
            gpu.memory_used_gb = Some(used);
        }
        drop(state);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
