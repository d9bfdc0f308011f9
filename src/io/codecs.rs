//! Image decoding with size limits, and the three output encodings with the original's settings
//! (Pillow defaults: PNG zlib level 6, JPEG quality 75 with 4:2:0 chroma, WebP lossy quality 80).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// The output formats of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("image is {width}x{height} = {pixels} pixels, more than the limit of {limit}")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("cannot encode {format}: {message}")]
    Encode {
        format: &'static str,
        message: String,
    },
}

/// Decodes any supported format to RGB. The pixel count is checked from the header before any
/// pixel is decoded (a few-KB PNG can declare 60000x60000). Alpha is dropped, gray replicated.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, CodecError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(CodecError::Decode(
            "unrecognised image format (expected PNG, JPEG or WebP)".into(),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(65_535);
    limits.max_image_height = Some(65_535);
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(64 << 20));
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(CodecError::TooManyPixels {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    decoder
        .set_limits(limits)
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    let image =
        DynamicImage::from_decoder(decoder).map_err(|e| CodecError::Decode(e.to_string()))?;
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Encodes an RGB image in the given format.
pub fn encode(image: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, CodecError> {
    let err = |message: String| CodecError::Encode {
        format: format.as_str(),
        message,
    };
    let (w, h) = image.dimensions();
    match format {
        OutputFormat::Png => {
            use image::ImageEncoder;
            use image::codecs::png::{CompressionType, FilterType, PngEncoder};
            let mut out = Vec::new();
            PngEncoder::new_with_quality(&mut out, CompressionType::Default, FilterType::Adaptive)
                .write_image(image.as_raw(), w, h, image::ExtendedColorType::Rgb8)
                .map_err(|e| err(e.to_string()))?;
            Ok(out)
        }
        OutputFormat::Jpeg => {
            let (w16, h16) = (
                u16::try_from(w).map_err(|_| err(format!("width {w} exceeds 65535")))?,
                u16::try_from(h).map_err(|_| err(format!("height {h} exceeds 65535")))?,
            );
            let mut out = Vec::new();
            let mut enc = jpeg_encoder::Encoder::new(&mut out, 75);
            enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
            enc.encode(image.as_raw(), w16, h16, jpeg_encoder::ColorType::Rgb)
                .map_err(|e| err(e.to_string()))?;
            Ok(out)
        }
        OutputFormat::Webp => {
            if w > 16383 || h > 16383 {
                return Err(err(format!("{w}x{h} exceeds WebP's 16383x16383 limit")));
            }
            let mem = webp::Encoder::from_rgb(image.as_raw(), w, h).encode(80.0);
            Ok(mem.to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, 128]))
    }

    #[test]
    fn every_format_decodes_back_to_the_same_size_and_close_pixels() {
        let img = gradient(96, 64);
        for (fmt, max_mean_err) in [
            (OutputFormat::Png, 0.0),
            (OutputFormat::Jpeg, 3.0),
            (OutputFormat::Webp, 3.0),
        ] {
            let bytes = encode(&img, fmt).unwrap();
            let guessed = image::guess_format(&bytes).unwrap();
            assert_eq!(guessed.to_mime_type(), fmt.content_type());
            let back = decode_rgb(&bytes, 1 << 20).unwrap();
            assert_eq!(back.dimensions(), (96, 64));
            let total: u64 = img
                .as_raw()
                .iter()
                .zip(back.as_raw())
                .map(|(a, b)| a.abs_diff(*b) as u64)
                .sum();
            let mean = total as f64 / img.as_raw().len() as f64;
            assert!(mean <= max_mean_err, "{fmt:?}: mean error {mean}");
        }
    }

    #[test]
    fn webp_is_lossy_and_jpeg_subsamples_chroma() {
        // Lossy VP8 bitstreams carry the "VP8 " chunk; lossless would be "VP8L".
        let bytes = encode(&gradient(64, 64), OutputFormat::Webp).unwrap();
        assert_eq!(&bytes[12..16], b"VP8 ");
        // JPEG SOF0 component 1 sampling factor 0x22 = 2x2 luma per chroma block: 4:2:0.
        let bytes = encode(&gradient(64, 64), OutputFormat::Jpeg).unwrap();
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        assert_eq!(bytes[sof + 11], 0x22);
    }

    #[test]
    fn pixel_bomb_is_refused_before_decoding() {
        // A valid PNG header declaring 20000x20000, with almost no data.
        let mut png = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png, 20000, 20000);
            enc.set_color(png::ColorType::Grayscale);
            let mut w = enc.write_header().unwrap();
            // One IDAT with a 5-byte stored deflate block: a valid start of a 400 MP image.
            let idat = [0x78, 0x01, 0x00, 0x05, 0x00, 0xfa, 0xff, 0, 0, 0, 0, 0];
            w.write_chunk(png::chunk::IDAT, &idat).unwrap();
        }
        match decode_rgb(&png, 4096 * 4096) {
            Err(CodecError::TooManyPixels {
                width: 20000,
                height: 20000,
                ..
            }) => {}
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn rgba_drops_alpha_and_gray_is_replicated() {
        let rgba = image::RgbaImage::from_pixel(4, 4, image::Rgba([10, 20, 30, 0]));
        let mut bytes = Vec::new();
        DynamicImage::ImageRgba8(rgba)
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        let rgb = decode_rgb(&bytes, 100).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [10, 20, 30]);

        let gray = image::GrayImage::from_pixel(4, 4, image::Luma([77]));
        let mut bytes = Vec::new();
        DynamicImage::ImageLuma8(gray)
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(
            decode_rgb(&bytes, 100).unwrap().get_pixel(3, 3).0,
            [77, 77, 77]
        );
    }

    #[test]
    fn non_images_are_a_clear_error() {
        let err = decode_rgb(b"<html>not an image</html>", 100).unwrap_err();
        assert!(
            err.to_string().contains("unrecognised image format"),
            "{err}"
        );
    }
}
