//! Real-ESRGAN upscaling in candle: RRDBNet (x4plus / x2plus) and SRVGGNetCompact
//! (general-x4v3), run with RealESRGANer's exact procedure (tiles, padding, clamp, round and
//! OpenCV Lanczos-4 for scales the network does not produce natively).
//!
//! The engine loads an [`Upscaler`] when a request needs it and drops it afterwards.

pub mod lanczos;
pub mod ncnn;
pub mod procedure;
pub mod rrdbnet;
pub mod srvgg;
pub mod weights;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use procedure::ImageMode;
pub use weights::{Arch, default_cache_dir};

/// Which Real-ESRGAN network to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpscaleModel {
    /// RealESRGAN_x4plus (RRDBNet, 23 blocks): what the original service used for 2× and 4×.
    X4Plus,
    /// RealESRGAN_x2plus (RRDBNet with pixel-unshuffle input): a native 2×.
    X2Plus,
    /// realesr-general-x4v3 (SRVGGNetCompact): a ~15× cheaper 4×.
    GeneralX4V3,
}

impl UpscaleModel {
    /// Short name used by the CLI and config (`x4plus`, `x2plus`, `general-x4v3`).
    pub fn name(self) -> &'static str {
        match self {
            UpscaleModel::X4Plus => "x4plus",
            UpscaleModel::X2Plus => "x2plus",
            UpscaleModel::GeneralX4V3 => "general-x4v3",
        }
    }

    fn accepts(self, arch: &Arch) -> bool {
        match (self, arch) {
            (UpscaleModel::X4Plus, Arch::Rrdb(c)) => c.scale == 4,
            (UpscaleModel::X2Plus, Arch::Rrdb(c)) => c.scale == 2,
            (UpscaleModel::GeneralX4V3, Arch::Compact(_)) => true,
            _ => false,
        }
    }
}

impl std::str::FromStr for UpscaleModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "x4plus" | "realesrgan_x4plus" => Ok(Self::X4Plus),
            "x2plus" | "realesrgan_x2plus" => Ok(Self::X2Plus),
            "general-x4v3" | "realesr-general-x4v3" => Ok(Self::GeneralX4V3),
            other => Err(format!(
                "unknown upscale model {other:?}: expected x4plus, x2plus or general-x4v3"
            )),
        }
    }
}

/// How to find the weights and how to tile.
#[derive(Debug, Clone)]
pub struct UpscalerOptions {
    pub model: UpscaleModel,
    /// Cache folder searched for the model's files (default `~/.cache/realesrgan`).
    pub weights_dir: PathBuf,
    /// An explicit weights file (.pth, .safetensors or ncnn .param); bypasses the cache.
    pub weights_file: Option<PathBuf>,
    /// Tile size in input pixels; 0 runs the whole image at once. The original used 256.
    pub tile: u32,
    /// Context added around each tile (10 in the original).
    pub tile_pad: u32,
    /// Download the official file into `weights_dir` when it is missing.
    pub allow_download: bool,
}

impl Default for UpscalerOptions {
    fn default() -> Self {
        Self {
            model: UpscaleModel::X4Plus,
            weights_dir: default_cache_dir(),
            weights_file: None,
            tile: 256,
            tile_pad: 10,
            allow_download: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpscaleError {
    /// A caller-supplied value is out of range; the message names the field and the limit.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    #[error("weights file {path} not found: {fix}")]
    WeightsMissing { path: PathBuf, fix: String },
    #[error("cannot use weights file {path}: {reason}")]
    BadWeights { path: PathBuf, reason: String },
    #[error("downloading {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("checksum mismatch for {url}: expected sha256 {expected}, got {actual}")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("out of device memory even with tile size {tile}: {source}")]
    OutOfMemory {
        tile: u32,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A loaded network of either architecture.
#[derive(Debug, Clone)]
pub enum Network {
    Rrdb(Box<rrdbnet::RrdbNet>),
    Compact(srvgg::SrvggNetCompact),
}

impl Network {
    /// Builds the network for `arch` from a BasicSR-named tensor map, rejecting missing or
    /// extra tensors (PyTorch `strict=True`).
    pub fn from_tensors(
        arch: &Arch,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, String> {
        let expected = arch.expected_keys();
        let missing: Vec<&String> = expected
            .iter()
            .filter(|k| !tensors.contains_key(*k))
            .collect();
        let extra: Vec<&String> = tensors.keys().filter(|k| !expected.contains(k)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(format!(
                "state dict does not match {arch:?}: missing {:?}, unexpected {:?}",
                &missing[..missing.len().min(5)],
                &extra[..extra.len().min(5)]
            ));
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let net = match arch {
            Arch::Rrdb(c) => rrdbnet::RrdbNet::new(c, vb).map(|n| Network::Rrdb(Box::new(n))),
            Arch::Compact(c) => srvgg::SrvggNetCompact::new(c, vb).map(Network::Compact),
        };
        net.map_err(|e| e.to_string())
    }

    pub fn netscale(&self) -> u32 {
        match self {
            Network::Rrdb(n) => n.config().scale as u32,
            Network::Compact(n) => n.config().upscale as u32,
        }
    }

    /// Pixel multiple the input sides must have (pixel-unshuffle factor).
    pub fn size_multiple(&self) -> u32 {
        match self {
            Network::Rrdb(n) => n.config().unshuffle() as u32,
            Network::Compact(_) => 1,
        }
    }
}

impl Module for Network {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Network::Rrdb(n) => n.forward(x),
            Network::Compact(n) => n.forward(x),
        }
    }
}

/// A Real-ESRGAN model ready to run on one device (f32 on CPU, f16 on CUDA).
pub struct Upscaler {
    net: Network,
    device: Device,
    dtype: DType,
    tile: u32,
    tile_pad: u32,
    weights_path: PathBuf,
}

impl Upscaler {
    /// Finds (or downloads) the weights, checks they are the requested architecture and
    /// builds the network on `device`.
    pub fn load(opts: &UpscalerOptions, device: &Device) -> Result<Self, UpscaleError> {
        let path = match &opts.weights_file {
            Some(p) => p.clone(),
            None => weights::resolve_in_cache(opts.model, &opts.weights_dir, opts.allow_download)?,
        };
        let tensors = weights::load_tensors(&path)?;
        let bad = |reason: String| UpscaleError::BadWeights {
            path: path.clone(),
            reason,
        };
        let arch = weights::detect_arch(&tensors).map_err(bad)?;
        if !opts.model.accepts(&arch) {
            return Err(bad(format!(
                "it holds {arch:?}, which is not model {}",
                opts.model.name()
            )));
        }
        let dtype = compute_dtype(device);
        let net = Network::from_tensors(&arch, tensors, dtype, device).map_err(bad)?;
        tracing::info!(model = opts.model.name(), path = %path.display(), ?arch, ?dtype, "loaded Real-ESRGAN");
        Self::from_network(net, device, opts.tile, opts.tile_pad).map(|mut u| {
            u.weights_path = path;
            u
        })
    }

    /// Wraps an already-built network (tests and benches use random-weight ones).
    pub fn from_network(
        net: Network,
        device: &Device,
        tile: u32,
        tile_pad: u32,
    ) -> Result<Self, UpscaleError> {
        let mut up = Self {
            net,
            device: device.clone(),
            dtype: compute_dtype(device),
            tile: 0,
            tile_pad: 0,
            weights_path: PathBuf::new(),
        };
        up.set_tiling(tile, tile_pad)?;
        Ok(up)
    }

    /// Changes the tile size and padding (validated like at load time).
    pub fn set_tiling(&mut self, tile: u32, tile_pad: u32) -> Result<(), UpscaleError> {
        let m = self.net.size_multiple();
        if !tile.is_multiple_of(m) || !tile_pad.is_multiple_of(m) {
            return Err(UpscaleError::InvalidInput {
                field: "tile",
                message: format!(
                    "tile ({tile}) and tile_pad ({tile_pad}) must be multiples of {m} for a {}x RRDBNet",
                    self.net.netscale()
                ),
            });
        }
        self.tile = tile;
        self.tile_pad = tile_pad;
        Ok(())
    }

    /// The file the weights came from (empty for networks built in memory).
    pub fn weights_path(&self) -> &std::path::Path {
        &self.weights_path
    }

    pub fn netscale(&self) -> u32 {
        self.net.netscale()
    }

    /// Upscales an RGB image by 2 or 4 (the service's entry point).
    pub fn upscale(
        &self,
        image: &image::RgbImage,
        scale: u32,
    ) -> Result<image::RgbImage, UpscaleError> {
        check_scale(scale)?;
        let (w, h) = image.dimensions();
        let out = self.enhance(ImageMode::Rgb, image.as_raw(), w, h, scale)?;
        Ok(image::RgbImage::from_raw(w * scale, h * scale, out)
            .expect("enhance returns w·s × h·s × 3"))
    }

    /// Upscales any 8-bit image as RealESRGANer does: gray stays gray (channels replicated for
    /// the network, BGR→GRAY weights on the output), alpha goes through the network too.
    /// 16-bit and float inputs are reduced to 8 bits first.
    pub fn upscale_dynamic(
        &self,
        image: &image::DynamicImage,
        scale: u32,
    ) -> Result<image::DynamicImage, UpscaleError> {
        use image::DynamicImage as D;
        check_scale(scale)?;
        let (w, h) = (image.width(), image.height());
        let (ow, oh) = (w * scale, h * scale);
        Ok(match image {
            D::ImageLuma8(_) | D::ImageLuma16(_) => {
                let g = image.to_luma8();
                let out = self.enhance(ImageMode::Gray, g.as_raw(), w, h, scale)?;
                D::ImageLuma8(image::GrayImage::from_raw(ow, oh, out).expect("size"))
            }
            D::ImageLumaA8(_)
            | D::ImageRgba8(_)
            | D::ImageLumaA16(_)
            | D::ImageRgba16(_)
            | D::ImageRgba32F(_) => {
                let rgba = image.to_rgba8();
                let out = self.enhance(ImageMode::Rgba, rgba.as_raw(), w, h, scale)?;
                D::ImageRgba8(image::RgbaImage::from_raw(ow, oh, out).expect("size"))
            }
            _ => D::ImageRgb8(self.upscale(&image.to_rgb8(), scale)?),
        })
    }

    /// The RealESRGANer pipeline on an interleaved u8 buffer of `mode`'s channel count;
    /// returns `w·scale × h·scale` pixels in the same layout.
    pub fn enhance(
        &self,
        mode: ImageMode,
        pixels: &[u8],
        w: u32,
        h: u32,
        scale: u32,
    ) -> Result<Vec<u8>, UpscaleError> {
        check_scale(scale)?;
        if w == 0 || h == 0 {
            return Err(UpscaleError::InvalidInput {
                field: "image",
                message: format!("image is {w}x{h}; both sides must be at least 1 pixel"),
            });
        }
        procedure::enhance(self, mode, pixels, w as usize, h as usize, scale as usize)
    }
}

/// f16 on CUDA, as the original service ran RealESRGANer (`half=True`); f32 on the CPU, where
/// half precision is not faster.
fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

fn check_scale(scale: u32) -> Result<(), UpscaleError> {
    if scale == 2 || scale == 4 {
        Ok(())
    } else {
        Err(UpscaleError::InvalidInput {
            field: "scale",
            message: format!("scale must be 2 or 4, got {scale}"),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn upscaler_can_move_to_the_gpu_worker_thread() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<super::Upscaler>();
    }
}
