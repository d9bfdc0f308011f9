//! Heap measurement of the lean VAE decoder and encoder against candle's plain ops, on the CPU.
//!
//! A counting global allocator sees every tensor (candle's CPU storage is a `Vec`). One test
//! runs all measurements in sequence, so nothing else allocates in between.
//!
//! On the CPU candle's 3×3 conv builds its im2col in 512-pixel tiles (plus one NHWC copy of the
//! input), unlike the CUDA path's full buffer; so what this measures is the rest of the lean
//! design: GroupNorm+SiLU fused into the conv bands, the fused upsample, band-sized conv input
//! copies, the shortcut added in place and intermediates freed early. The CUDA im2col saving is computed in benches/vae_memory.rs.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imagegen::flux2::vae::{AutoencoderKLFlux2, AutoencoderKLFlux2Config};
use imagegen::nn::LeanBudget;

mod common;
#[path = "common/meter.rs"]
mod meter;
use common::{max_abs, max_abs_diff};
use meter::{Meter, mib, peak_above_live};
#[path = "../benches/support/mod.rs"]
mod support;

#[global_allocator]
static GLOBAL: Meter = Meter;

/// The real VAE's structure (4 blocks, 2 layers, mid attention, 3 resnets per up block) with
/// a quarter of its channels, so a 256² decode runs in seconds yet activations dominate.
fn small_vae_config() -> AutoencoderKLFlux2Config {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 64, 128, 128],
        "norm_num_groups": 8,
        "latent_channels": 32,
    }))
    .unwrap()
}

/// The heap meter is process-wide: tests that read it take this lock, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn lean_vae_peaks_are_bounded_and_outputs_match() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = small_vae_config();
    let dev = Device::Cpu;
    let weights = support::plain_tensors(DType::F32, &Device::Cpu, |vb| {
        AutoencoderKLFlux2::new(&cfg, vb).map(|_| ())
    })
    .unwrap();
    let build = |lean| {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &dev);
        AutoencoderKLFlux2::with_budget(&cfg, vb, lean).unwrap()
    };
    // Small enough that the transient term below (4 MiB) stays under A/2 (8 MiB), so the bound
    // fails for the unfused design, whose full-size tensors alone reach 2.5·A.
    let (im2col, norm) = (1 << 20, 1 << 19);
    let lean_budget = LeanBudget {
        im2col_bytes: im2col,
        norm_bytes: norm,
    };
    let (plain, lean) = (build(LeanBudget::PLAIN), build(lean_budget));
    let (side, lat) = (256usize, 32usize);
    let z = Tensor::randn(0f32, 1.0, (1, 32, lat, lat), &dev).unwrap();

    let (y_plain, peak_plain) = peak_above_live(|| plain.decode(&z).unwrap());
    let (y_lean, peak_lean) = peak_above_live(|| lean.decode(&z).unwrap());
    assert_eq!(y_lean.dims(), &[1, 3, side, side]);
    let rel = max_abs_diff(&y_lean, &y_plain) / max_abs(&y_plain);
    assert!(
        rel <= 1e-5,
        "lean and plain decodes differ: relative {rel:e}"
    );

    // The bound. A = the largest activation: the top up block's 64-channel input at 256², f32.
    // Lean, at most these full-size tensors are alive at once: in the first top-resolution
    // resnet (64 → 32 channels) its input x (A), conv1's output (A/2) and conv2's output (A/2)
    // while conv2 runs (the GroupNorm+SiLU outputs exist only per conv band), then x and conv2's
    // output, into which the shortcut conv adds in place. So 2·A, plus one op's transients: a
    // conv band's padded input slices and candle's NHWC copy (each ≤ im2col/9 per 3×3 band row,
    // ≤ im2col for a 1×1 band), its output and biased output (≤ 2·im2col for the 1×1 64→32
    // shortcut), or the band's normalisation temporaries (≤ 4 band inputs: ≤ 4·im2col/3), or a
    // GroupNorm statistics chunk's f32 temporaries (≤ 5·norm); and candle's per-thread 512-pixel
    // im2col tiles (2 × 512 × 9·64 f32 per thread) and its reshaped kernel copy.
    let a = 64 * side * side * 4;
    let threads = candle_core::utils::get_num_threads();
    let transient = (4 * im2col).max(5 * norm) + threads * 2 * 512 * 9 * 64 * 4 + 9 * 64 * 64 * 4;
    let bound = 2 * a + transient;
    assert!(
        (4 * im2col).max(5 * norm) < a / 2,
        "budgets too large to tell 2·A from 2.5·A"
    );
    eprintln!(
        "decode 32² → 256² (f32, random weights): peak heap above baseline plain {:.1} MiB, lean \
         {:.1} MiB ({:.2}×), analytic lean bound {:.1} MiB; A = {:.1} MiB; {threads} threads",
        mib(peak_plain),
        mib(peak_lean),
        peak_lean as f64 / peak_plain as f64,
        mib(bound),
        mib(a),
    );
    assert!(
        peak_lean <= bound,
        "lean peak {peak_lean} over the bound {bound}"
    );
    assert!(
        (peak_lean as f64) < 0.6 * peak_plain as f64,
        "lean peak {peak_lean} is not well below plain {peak_plain}"
    );
    // The plain path really holds several full-size tensors at once (what the lean one avoids).
    assert!(
        peak_plain > 4 * a,
        "plain peak {peak_plain} ≤ 4·A: nothing to compare against"
    );
    drop((y_plain, y_lean));

    // The encoder on a 256² image: its stride-2 downsamplers pad bottom/right per band.
    let img = Tensor::randn(0f32, 1.0, (1, 3, side, side), &dev).unwrap();
    let (m_plain, enc_plain) = peak_above_live(|| plain.encode_mean(&img).unwrap());
    let (m_lean, enc_lean) = peak_above_live(|| lean.encode_mean(&img).unwrap());
    let rel = max_abs_diff(&m_lean, &m_plain) / max_abs(&m_plain);
    eprintln!(
        "encode 256² → 32²: peak plain {:.1} MiB, lean {:.1} MiB ({:.2}×), relative diff {rel:e}",
        mib(enc_plain),
        mib(enc_lean),
        enc_lean as f64 / enc_plain as f64
    );
    assert!(
        rel <= 1e-5,
        "lean and plain encodes differ: relative {rel:e}"
    );
    assert!(
        (enc_lean as f64) < 0.7 * enc_plain as f64,
        "lean encoder peak {enc_lean} is not well below plain {enc_plain}"
    );
}

mod hostile_images {
    //! Random, truncated and hostile image bytes through the service's decoder: never a panic,
    //! and the heap stays within a bound set by the pixel limit, whatever the header claims.

    use std::io::Cursor;

    use imagegen::io::decode_rgb;
    use proptest::prelude::*;

    use super::{SERIAL, peak_above_live};

    /// The pixel limit of these cases (the service's default is 4096²; small here so the bound
    /// is tight).
    const MAX_PIXELS: u64 = 256 * 256;

    fn encoded(w: u32, h: u32, seed: u8, format: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([x as u8 ^ seed, y as u8, seed.wrapping_mul(3)])
        });
        let mut out = Vec::new();
        let fmt = match format % 3 {
            0 => image::ImageFormat::Png,
            1 => image::ImageFormat::Jpeg,
            _ => image::ImageFormat::WebP,
        };
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), fmt)
            .unwrap();
        out
    }

    /// Writes a huge width and height where each format keeps them (PNG IHDR, JPEG SOF0, the
    /// WebP VP8L/VP8 frame header): a small file that claims a big image.
    fn claim_huge(bytes: &mut [u8], w: u16, h: u16) {
        if bytes.starts_with(b"\x89PNG") && bytes.len() >= 24 {
            bytes[16..20].copy_from_slice(&(w as u32 * 7).to_be_bytes());
            bytes[20..24].copy_from_slice(&(h as u32 * 7).to_be_bytes());
        } else if bytes.starts_with(&[0xff, 0xd8]) {
            if let Some(i) = bytes.windows(2).position(|p| p == [0xff, 0xc0])
                && bytes.len() >= i + 9
            {
                bytes[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
                bytes[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
            }
        } else if bytes.len() >= 30 {
            // VP8 key frame: 14-bit width and height at 26..30.
            bytes[26..28].copy_from_slice(&(w & 0x3fff).to_le_bytes());
            bytes[28..30].copy_from_slice(&(h & 0x3fff).to_le_bytes());
        }
    }

    fn hostile() -> impl Strategy<Value = Vec<u8>> {
        let valid = (1u32..96, 1u32..96, any::<u8>(), any::<u8>())
            .prop_map(|(w, h, seed, f)| encoded(w, h, seed, f));
        prop_oneof![
            // Random bytes behind each format's magic.
            (
                prop::sample::select(vec![
                    b"\x89PNG\r\n\x1a\n".to_vec(),
                    vec![0xff, 0xd8, 0xff, 0xe0],
                    b"RIFF\x00\x01\x00\x00WEBPVP8 ".to_vec(),
                    b"GIF89a".to_vec(),
                ]),
                prop::collection::vec(any::<u8>(), 0..4096)
            )
                .prop_map(|(mut magic, rest)| {
                    magic.extend(rest);
                    magic
                }),
            // Valid images cut short.
            (valid.clone(), any::<prop::sample::Index>()).prop_map(|(b, at)| {
                let n = at.index(b.len());
                b[..n].to_vec()
            }),
            // Valid images with bytes flipped.
            (
                valid.clone(),
                prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
            )
                .prop_map(|(mut b, flips)| {
                    for (at, v) in flips {
                        let i = at.index(b.len());
                        b[i] = v;
                    }
                    b
                }),
            // Valid small files claiming huge dimensions.
            (valid, 1u16..u16::MAX, 1u16..u16::MAX).prop_map(|(mut b, w, h)| {
                claim_huge(&mut b, w, h);
                b
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(600))]

        #[test]
        fn hostile_bytes_never_panic_and_stay_within_the_memory_bound(bytes in hostile()) {
            let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
            let len = bytes.len();
            let (result, peak) = peak_above_live(|| {
                std::panic::catch_unwind(|| decode_rgb(&bytes, MAX_PIXELS))
            });
            let decoded = result.map_err(|_| TestCaseError::fail("decode_rgb panicked"))?;
            // The decoder's own allocation cap (8 bytes per allowed pixel, at least 64 MiB),
            // plus the image it returns and a few copies of the input.
            let bound = (MAX_PIXELS * 8).max(64 << 20) as usize + 3 * MAX_PIXELS as usize + 4 * len;
            prop_assert!(peak <= bound, "{len} input bytes peaked at {peak} heap bytes (bound {bound})");
            if let Ok(img) = decoded {
                prop_assert!(img.width() as u64 * img.height() as u64 <= MAX_PIXELS);
            }
        }
    }
}
