//! A test-only engine backend for the HTTP-contract tests that need control over timing (slow
//! steps to keep the worker busy, cancellation) — never used by the shipped binary. It paints a
//! flat colour derived from the seed, at the size the real pipeline produces (floored to /16),
//! so tests can tell which seed made which upload.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::Device;
use image::RgbImage;
use imagegen::engine::models::RealEsrgan;
use imagegen::engine::{BackendLoader, EngineError, ImageBackend, ItemParams, UpscaleBackend};
use imagegen::upscale::{UpscaleModel, Upscaler, UpscalerOptions};

#[derive(Clone, Default)]
pub struct Paint {
    pub step_delay: Duration,
    /// Steps run so far, over all items (to see cancellation stop the work).
    pub steps_run: Arc<AtomicUsize>,
    pub reference_encodes: Arc<AtomicUsize>,
}

/// The colour an item with this seed gets.
pub fn seed_colour(seed: u64) -> [u8; 3] {
    [(seed % 251) as u8, (seed / 251 % 251) as u8, 200]
}

impl ImageBackend for Paint {
    type References = usize;

    fn encode_references(&self, images: &[RgbImage]) -> Result<usize, EngineError> {
        self.reference_encodes.fetch_add(1, Ordering::SeqCst);
        Ok(images.len())
    }

    fn generate(
        &self,
        item: &ItemParams,
        _refs: Option<&usize>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<RgbImage, EngineError> {
        for _ in 0..item.num_steps {
            if cancelled() {
                return Err(EngineError::Cancelled);
            }
            std::thread::sleep(self.step_delay);
            self.steps_run.fetch_add(1, Ordering::SeqCst);
        }
        let (w, h) = (item.width / 16 * 16, item.height / 16 * 16);
        Ok(RgbImage::from_pixel(
            w,
            h,
            image::Rgb(seed_colour(item.seed)),
        ))
    }
}

impl Paint {
    pub fn loader(&self, load_delay: Duration) -> Option<BackendLoader<Paint>> {
        let me = self.clone();
        Some(Box::new(move || {
            std::thread::sleep(load_delay);
            Ok(me)
        }))
    }
}

/// The real Real-ESRGAN upscaler (tiny random-weight SRVGGNetCompact x4 fixture from the
/// upscale parity tests), counting how often it is loaded.
#[derive(Clone)]
pub struct TinyEsrgan {
    pub loads: Arc<AtomicUsize>,
    inner: Arc<RealEsrgan>,
}

impl Default for TinyEsrgan {
    fn default() -> Self {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/upscale/srvgg_x4.safetensors");
        Self {
            loads: Arc::default(),
            inner: Arc::new(RealEsrgan {
                options: UpscalerOptions {
                    model: UpscaleModel::GeneralX4V3,
                    weights_dir: std::env::temp_dir(),
                    weights_file: Some(fixture),
                    tile: 0,
                    tile_pad: 10,
                    allow_download: false,
                },
                device: Device::Cpu,
            }),
        }
    }
}

impl UpscaleBackend for TinyEsrgan {
    type Upscaler = Upscaler;

    fn load(&self) -> Result<Upscaler, EngineError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load()
    }
}
