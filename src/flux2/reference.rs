//! Reference-image preprocessing, as diffusers' `Flux2KleinPipeline` does it: validate (side ≥ 64,
//! aspect ≤ 8:1), cap the area at 1024² with PIL's Lanczos, floor to a multiple of 16 with a
//! centre crop, and scale to [−1, 1].

use candle_core::{Device, Result as CResult, Tensor};
use image::RgbImage;

pub use crate::limits::MAX_REFERENCES;
/// Smallest allowed side, in pixels.
pub const MIN_SIDE: u32 = 64;
/// Largest allowed aspect ratio (long side / short side).
pub const MAX_ASPECT: f64 = 8.0;
/// Images with more pixels than this are downscaled to this area first.
pub const MAX_AREA: u64 = 1024 * 1024;

/// Why a reference image was rejected; `index` is 0-based.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReferenceError {
    #[error("references: {count} images given, at most {max} are allowed")]
    TooMany { count: usize, max: usize },
    #[error("references[{index}]: image is {width}x{height}, both sides must be at least {min}px")]
    TooSmall {
        index: usize,
        width: u32,
        height: u32,
        min: u32,
    },
    #[error(
        "references[{index}]: aspect ratio {ratio:.1}:1 ({width}x{height}) exceeds the maximum {max}:1"
    )]
    AspectRatio {
        index: usize,
        width: u32,
        height: u32,
        ratio: f64,
        max: f64,
    },
}

/// diffusers `check_image_input`.
pub fn check(index: usize, img: &RgbImage) -> Result<(), ReferenceError> {
    let (w, h) = img.dimensions();
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(ReferenceError::TooSmall {
            index,
            width: w,
            height: h,
            min: MIN_SIDE,
        });
    }
    let ratio = (w as f64 / h as f64).max(h as f64 / w as f64);
    if ratio > MAX_ASPECT {
        return Err(ReferenceError::AspectRatio {
            index,
            width: w,
            height: h,
            ratio,
            max: MAX_ASPECT,
        });
    }
    Ok(())
}

/// The size diffusers' `_resize_to_target_area` picks: int() of each side times √(area/(w·h)).
pub fn target_area_size(w: u32, h: u32, area: u64) -> (u32, u32) {
    let scale = (area as f64 / (w as f64 * h as f64)).sqrt();
    ((w as f64 * scale) as u32, (h as f64 * scale) as u32)
}

/// Resizes, crops and normalises one (already checked) reference to [1, 3, H, W] in [−1, 1],
/// with H and W multiples of `multiple_of` (16 for FLUX.2).
pub fn preprocess(img: &RgbImage, multiple_of: u32, device: &Device) -> CResult<Tensor> {
    let (mut w, mut h) = img.dimensions();
    let resized;
    let src = if (w as u64) * (h as u64) > MAX_AREA {
        let (nw, nh) = target_area_size(w, h, MAX_AREA);
        resized = lanczos_resize(img, nw, nh);
        (w, h) = (nw, nh);
        &resized
    } else {
        img
    };
    let cw = w / multiple_of * multiple_of;
    let ch = h / multiple_of * multiple_of;
    if cw == 0 || ch == 0 {
        candle_core::bail!("reference is smaller than {multiple_of}px after resizing");
    }
    let left = (w - cw) / 2;
    let top = (h - ch) / 2;
    let mut data = vec![0f32; 3 * (cw * ch) as usize];
    let plane = (cw * ch) as usize;
    for y in 0..ch {
        for x in 0..cw {
            let p = src.get_pixel(left + x, top + y);
            let i = (y * cw + x) as usize;
            for c in 0..3 {
                // diffusers: uint8 / 255 in f32, then 2x − 1.
                let v = p[c] as f32 / 255.0;
                data[c * plane + i] = 2.0 * v - 1.0;
            }
        }
    }
    Tensor::from_vec(data, (1, 3, ch as usize, cw as usize), &Device::Cpu)?.to_device(device)
}

// ---- PIL's Lanczos resampling (Resample.c), 8-bit fixed point, horizontal then vertical ----

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Per output pixel: first source index and the fixed-point weights.
fn coeffs(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n)
                .map(|x| lanczos((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u64 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (-0.5 + f) as i32
                    } else {
                        (0.5 + f) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((w, h), LANCZOS)` for RGB images, bit-exact with Pillow's 8-bit path.
pub fn lanczos_resize(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    let hk = coeffs(in_w, out_w);
    let vk = coeffs(in_h, out_h);
    // Rows of the source that the vertical pass reads.
    let y_first = vk.first().map(|(s, _)| *s).unwrap_or(0);
    let y_last = vk.last().map(|(s, k)| s + k.len()).unwrap_or(0);
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let (tmp, tmp_w, tmp_y0) = if need_h {
        let rows = y_last - y_first;
        let mut t = vec![0u8; rows * out_w as usize * 3];
        for y in 0..rows {
            for (xx, (xmin, k)) in hk.iter().enumerate() {
                let mut s = [1i64 << (PRECISION_BITS - 1); 3];
                for (x, &kv) in k.iter().enumerate() {
                    let p = img.get_pixel((xmin + x) as u32, (y + y_first) as u32);
                    for c in 0..3 {
                        s[c] += p[c] as i64 * kv as i64;
                    }
                }
                for c in 0..3 {
                    t[(y * out_w as usize + xx) * 3 + c] = clip8(s[c]);
                }
            }
        }
        (t, out_w as usize, y_first)
    } else {
        (img.as_raw().clone(), in_w as usize, 0)
    };
    if !need_v {
        // The horizontal pass covered exactly the full height.
        return RgbImage::from_raw(out_w, out_h, tmp).expect("buffer size");
    }
    let mut out = vec![0u8; out_w as usize * out_h as usize * 3];
    for (yy, (ymin, k)) in vk.iter().enumerate() {
        for x in 0..tmp_w {
            let mut s = [1i64 << (PRECISION_BITS - 1); 3];
            for (y, &kv) in k.iter().enumerate() {
                let row = ymin + y - tmp_y0;
                let o = (row * tmp_w + x) * 3;
                for c in 0..3 {
                    s[c] += tmp[o + c] as i64 * kv as i64;
                }
            }
            for c in 0..3 {
                out[(yy * tmp_w + x) * 3 + c] = clip8(s[c]);
            }
        }
    }
    RgbImage::from_raw(out_w, out_h, out).expect("buffer size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_index_and_limit() {
        let ok = RgbImage::new(64, 512);
        assert!(check(0, &ok).is_ok());
        let e = check(3, &RgbImage::new(63, 100)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("references[3]") && msg.contains("64px"),
            "{msg}"
        );
        let e = check(1, &RgbImage::new(600, 64)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("references[1]") && msg.contains("8:1"),
            "{msg}"
        );
        assert!(
            check(2, &RgbImage::new(512, 64)).is_ok(),
            "exactly 8:1 is allowed"
        );
    }

    #[test]
    fn area_cap_floors_like_python_int() {
        assert_eq!(target_area_size(2048, 2048, MAX_AREA), (1024, 1024));
        let (w, h) = target_area_size(1500, 1000, MAX_AREA);
        assert_eq!((w, h), (1254, 836));
        assert!((w as u64) * (h as u64) <= MAX_AREA);
    }

    #[test]
    fn crop_is_centred_and_floored() -> CResult<()> {
        let mut img = RgbImage::new(70, 100);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8, y as u8, 255]);
        }
        let t = preprocess(&img, 16, &Device::Cpu)?;
        assert_eq!(t.dims(), &[1, 3, 96, 64]);
        // left = (70 − 64) / 2 = 3, top = (100 − 96) / 2 = 2
        let v = t.get(0)?.to_vec3::<f32>()?;
        assert_eq!(v[0][0][0], 2.0 * 3.0 / 255.0 - 1.0);
        assert_eq!(v[1][0][0], 2.0 * 2.0 / 255.0 - 1.0);
        assert_eq!(v[2][5][5], 1.0);
        Ok(())
    }

    #[test]
    fn large_images_are_resized_to_one_megapixel_then_cropped() -> CResult<()> {
        let mut img = RgbImage::new(1100, 1000);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8]);
        }
        // √(1024² / 1.1 MP) → 1073 x 976, floored to 1072 x 976, crop offset (0, 0).
        let t = preprocess(&img, 16, &Device::Cpu)?;
        assert_eq!(t.dims(), &[1, 3, 976, 1072]);
        let r = lanczos_resize(&img, 1073, 976);
        let v = t.get(0)?.to_vec3::<f32>()?;
        for (x, y) in [(0u32, 0u32), (500, 300), (1071, 975)] {
            let p = r.get_pixel(x, y);
            for c in 0..3 {
                assert_eq!(
                    v[c][y as usize][x as usize],
                    2.0 * (p[c] as f32 / 255.0) - 1.0
                );
            }
        }
        Ok(())
    }

    #[test]
    fn lanczos_keeps_constant_images_and_identity() {
        let img = RgbImage::from_pixel(300, 200, image::Rgb([10, 128, 250]));
        let r = lanczos_resize(&img, 123, 77);
        assert!(r.pixels().all(|p| p.0 == [10, 128, 250]));
        let mut g = RgbImage::new(40, 30);
        for (x, y, p) in g.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8]);
        }
        assert_eq!(lanczos_resize(&g, 40, 30), g);
    }
}
