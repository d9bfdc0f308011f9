//! RealESRGANer.enhance (Real-ESRGAN `realesrgan/utils.py`) as the original service ran it:
//! RGB in [0,1], pre_pad 0, right/bottom reflect mod-pad for pixel-unshuffle models, hard-cut
//! tiles with `tile_pad` context, clamp, round half to even, and cv2 INTER_LANCZOS4 when the
//! requested scale differs from the network's.

use candle_core::{DType, Device, Module, Tensor};

use super::{UpscaleError, Upscaler, lanczos};

/// Channel layout of the u8 buffers passed to [`Upscaler::enhance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageMode {
    Rgb,
    /// One channel; replicated to RGB for the network, BGR→GRAY weights on the way out.
    Gray,
    /// RGB plus alpha; alpha is upscaled by a second pass of the same network (RealESRGANer's
    /// default `alpha_upsampler='realesrgan'`).
    Rgba,
}

impl ImageMode {
    pub fn channels(self) -> usize {
        match self {
            ImageMode::Rgb => 3,
            ImageMode::Gray => 1,
            ImageMode::Rgba => 4,
        }
    }
}

/// Three float planes (CHW).
#[derive(Debug, Clone)]
pub(crate) struct Planes {
    pub w: usize,
    pub h: usize,
    pub data: Vec<f32>,
}

impl Planes {
    fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.h + y) * self.w + x]
    }
}

fn planes_from(pixels: &[u8], w: usize, h: usize, stride: usize, chans: [usize; 3]) -> Planes {
    let mut data = vec![0f32; 3 * w * h];
    for (c, &src_c) in chans.iter().enumerate() {
        for i in 0..w * h {
            data[c * w * h + i] = pixels[i * stride + src_c] as f32 / 255.0;
        }
    }
    Planes { w, h, data }
}

/// Mirror without repeating the edge (PyTorch `'reflect'`).
fn reflect(i: usize, n: usize) -> usize {
    if i < n || n == 1 {
        i.min(n - 1)
    } else {
        2 * (n - 1) - i
    }
}

fn pad_bottom_right(p: &Planes, pad_h: usize, pad_w: usize) -> Planes {
    if pad_h == 0 && pad_w == 0 {
        return p.clone();
    }
    let (w, h) = (p.w + pad_w, p.h + pad_h);
    let mut data = vec![0f32; 3 * w * h];
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                data[(c * h + y) * w + x] = p.at(c, reflect(y, p.h), reflect(x, p.w));
            }
        }
    }
    Planes { w, h, data }
}

fn is_oom(e: &candle_core::Error) -> bool {
    crate::device::fault::DeviceFault::of(e) == Some(crate::device::fault::DeviceFault::OutOfMemory)
}

/// Tile sizes to try in order: the configured one, then halves down to 32 (rounded to the
/// network's size multiple), used only after an out-of-memory error.
pub fn tile_schedule(tile: u32, multiple: u32) -> Vec<u32> {
    let mut v = vec![tile];
    let mut t = if tile == 0 { 256 } else { tile / 2 };
    while t >= 32 {
        v.push(t / multiple * multiple);
        t /= 2;
    }
    v
}

impl Upscaler {
    fn forward_crop(
        &self,
        img: &Planes,
        x0: usize,
        x1: usize,
        y0: usize,
        y1: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let (cw, ch) = (x1 - x0, y1 - y0);
        let mut crop = Vec::with_capacity(3 * cw * ch);
        for c in 0..3 {
            for y in y0..y1 {
                let row = (c * img.h + y) * img.w;
                crop.extend_from_slice(&img.data[row + x0..row + x1]);
            }
        }
        let x = Tensor::from_vec(crop, (1, 3, ch, cw), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let y = self.net.forward(&x)?;
        y.to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// `tile_process` (or one whole pass when `tile == 0`) on an already padded image.
    fn run_tiles(&self, img: &Planes, tile: usize) -> candle_core::Result<Planes> {
        let s = self.net.netscale() as usize;
        let (w, h) = (img.w, img.h);
        let (ow, oh) = (w * s, h * s);
        if tile == 0 {
            let data = self.forward_crop(img, 0, w, 0, h)?;
            return Ok(Planes { w: ow, h: oh, data });
        }
        let pad = self.tile_pad as usize;
        let mut out = vec![0f32; 3 * ow * oh];
        for ty in 0..h.div_ceil(tile) {
            for tx in 0..w.div_ceil(tile) {
                let (sx, ex) = (tx * tile, ((tx + 1) * tile).min(w));
                let (sy, ey) = (ty * tile, ((ty + 1) * tile).min(h));
                let (psx, pex) = (sx.saturating_sub(pad), (ex + pad).min(w));
                let (psy, pey) = (sy.saturating_sub(pad), (ey + pad).min(h));
                let t = self.forward_crop(img, psx, pex, psy, pey)?;
                let (tw, th) = ((pex - psx) * s, (pey - psy) * s);
                // Copy only the core, scaled, from its offset inside the padded tile output.
                let (ox, oy) = ((sx - psx) * s, (sy - psy) * s);
                let (cw, chh) = ((ex - sx) * s, (ey - sy) * s);
                for c in 0..3 {
                    for y in 0..chh {
                        let src = (c * th + oy + y) * tw + ox;
                        let dst = (c * oh + sy * s + y) * ow + sx * s;
                        out[dst..dst + cw].copy_from_slice(&t[src..src + cw]);
                    }
                }
            }
        }
        Ok(Planes {
            w: ow,
            h: oh,
            data: out,
        })
    }

    /// pre_process → tiles (retrying smaller tiles on device OOM) → post_process → clamp.
    fn process(&self, img: &Planes) -> Result<Planes, UpscaleError> {
        let m = self.net.size_multiple() as usize;
        let padded = pad_bottom_right(img, (m - img.h % m) % m, (m - img.w % m) % m);
        let out = with_tile_retry(&tile_schedule(self.tile, m as u32), |tile| {
            self.run_tiles(&padded, tile as usize)
        })?;
        // Crop the mod-pad and clamp.
        let s = self.net.netscale() as usize;
        let (w, h) = (img.w * s, img.h * s);
        let mut data = Vec::with_capacity(3 * w * h);
        for c in 0..3 {
            for y in 0..h {
                let row = (c * out.h + y) * out.w;
                data.extend(out.data[row..row + w].iter().map(|v| v.clamp(0.0, 1.0)));
            }
        }
        Ok(Planes { w, h, data })
    }
}

/// Runs `run` with each tile size in turn until one does not run out of device memory; other
/// errors end it at once.
pub fn with_tile_retry<T>(
    schedule: &[u32],
    mut run: impl FnMut(u32) -> candle_core::Result<T>,
) -> Result<T, UpscaleError> {
    let mut last_oom = None;
    for &tile in schedule {
        match run(tile) {
            Ok(v) => return Ok(v),
            Err(e) if is_oom(&e) => {
                tracing::warn!(tile, error = %e, "upscaler out of device memory; retrying with a smaller tile");
                last_oom = Some((tile, e));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(match last_oom {
        Some((tile, source)) => UpscaleError::OutOfMemory { tile, source },
        None => UpscaleError::InvalidInput {
            field: "tile",
            message: "no tile size to try".into(),
        },
    })
}

/// `(x * 255).round()` with numpy's round-half-to-even.
fn quantize(v: f32) -> u8 {
    (v * 255.0).round_ties_even() as u8
}

/// cv2.COLOR_BGR2GRAY on floats: 0.299 R + 0.587 G + 0.114 B.
fn gray(p: &Planes, i: usize) -> f32 {
    let n = p.w * p.h;
    p.data[2 * n + i] * 0.114 + p.data[n + i] * 0.587 + p.data[i] * 0.299
}

pub(crate) fn enhance(
    up: &Upscaler,
    mode: ImageMode,
    pixels: &[u8],
    w: usize,
    h: usize,
    scale: usize,
) -> Result<Vec<u8>, UpscaleError> {
    let cn = mode.channels();
    if pixels.len() != w * h * cn {
        return Err(UpscaleError::InvalidInput {
            field: "image",
            message: format!(
                "{} bytes do not make a {w}x{h} image of {cn} channels",
                pixels.len()
            ),
        });
    }
    let (color, alpha) = match mode {
        ImageMode::Rgb => (planes_from(pixels, w, h, 3, [0, 1, 2]), None),
        ImageMode::Gray => (planes_from(pixels, w, h, 1, [0, 0, 0]), None),
        ImageMode::Rgba => (
            planes_from(pixels, w, h, 4, [0, 1, 2]),
            Some(planes_from(pixels, w, h, 4, [3, 3, 3])),
        ),
    };
    let out = up.process(&color)?;
    let out_alpha = alpha.map(|a| up.process(&a)).transpose()?;
    let n = out.w * out.h;
    let mut bytes = vec![0u8; n * cn];
    match mode {
        ImageMode::Rgb => {
            for i in 0..n {
                for c in 0..3 {
                    bytes[i * 3 + c] = quantize(out.data[c * n + i]);
                }
            }
        }
        ImageMode::Gray => {
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = quantize(gray(&out, i));
            }
        }
        ImageMode::Rgba => {
            let a = out_alpha.expect("alpha planes exist in RGBA mode");
            for i in 0..n {
                for c in 0..3 {
                    bytes[i * 4 + c] = quantize(out.data[c * n + i]);
                }
                bytes[i * 4 + 3] = quantize(gray(&a, i));
            }
        }
    }
    if scale == up.net.netscale() as usize {
        return Ok(bytes);
    }
    Ok(lanczos::resize_lanczos4_u8(
        &bytes,
        out.w,
        out.h,
        cn,
        w * scale,
        h * scale,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        // torch.nn.functional.pad([0,1,2,3,4], (0,2), 'reflect') == [0,1,2,3,4,3,2]
        let idx: Vec<usize> = (0..7).map(|i| reflect(i, 5)).collect();
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 3, 2]);
    }

    fn oom() -> candle_core::Error {
        // What cudarc reports through candle when an allocation fails.
        candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into())
    }

    #[test]
    fn out_of_memory_retries_with_smaller_tiles() {
        let mut tried = vec![];
        let r = with_tile_retry(&tile_schedule(256, 1), |t| {
            tried.push(t);
            if t > 64 { Err(oom()) } else { Ok(t) }
        });
        assert_eq!(r.unwrap(), 64);
        assert_eq!(tried, vec![256, 128, 64]);
    }

    #[test]
    fn out_of_memory_at_every_size_fails_naming_the_last_tile() {
        let r: Result<(), _> = with_tile_retry(&tile_schedule(128, 1), |_| Err(oom()));
        assert!(
            matches!(r, Err(UpscaleError::OutOfMemory { tile: 32, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut calls = 0;
        let r: Result<(), _> = with_tile_retry(&[256, 128], |_| {
            calls += 1;
            Err(candle_core::Error::Msg("shape mismatch".into()))
        });
        assert!(matches!(r, Err(UpscaleError::Candle(_))));
        assert_eq!(calls, 1);
    }

    #[test]
    fn tile_schedule_halves_and_respects_the_multiple() {
        assert_eq!(tile_schedule(256, 1), vec![256, 128, 64, 32]);
        assert_eq!(tile_schedule(0, 2), vec![0, 256, 128, 64, 32]);
        assert_eq!(tile_schedule(100, 4), vec![100, 48]);
    }
}
