//! OpenCV `cv2.resize(..., INTER_LANCZOS4)` for 8-bit images, bit-exact.
//!
//! RealESRGANer makes every `outscale != netscale` output with this call, so the service's 2×
//! (x4plus then downscale) depends on it. OpenCV's kernel is a fixed 8-tap Lanczos (a = 4) that
//! does *not* widen when downscaling (unlike PIL or the `image` crate), with replicated borders
//! and 11-bit fixed-point coefficients for u8 data.

const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// OpenCV's `interpolateLanczos4`: normalised 8-tap weights for fractional offset `x`.
fn lanczos4_coeffs(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let pi = std::f64::consts::PI;
    let y0 = -((x + 3.0) as f64) * pi * 0.25;
    let (s0, c0) = y0.sin_cos();
    let mut coeffs = [0f32; 8];
    let mut sum = 0f32;
    for (i, c) in coeffs.iter_mut().enumerate() {
        let y0_ = x + 3.0 - i as f32;
        *c = if y0_.abs() >= 1e-6 {
            let y = -(y0_ as f64) * pi * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *c;
    }
    let inv = 1.0 / sum;
    for c in coeffs.iter_mut() {
        *c *= inv;
    }
    coeffs
}

/// Source index of the first tap and the fixed-point weights for every destination index.
fn axis_table(src: usize, dst: usize) -> Vec<(isize, [i32; 8])> {
    // OpenCV: scale = 1 / (dst / src) in double; fx = float((d + 0.5) * scale - 0.5).
    let scale = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| {
            let fx = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let sx = fx.floor();
            let frac = fx - sx;
            let c = lanczos4_coeffs(frac);
            // saturate_cast<short>(v * 2048) rounds to nearest, ties to even (cvRound).
            let w = c.map(|v| (v * COEF_SCALE).round_ties_even().clamp(-32768.0, 32767.0) as i32);
            (sx as isize - 3, w)
        })
        .collect()
}

/// Resizes an interleaved u8 image of `channels` channels from `(w, h)` to `(dw, dh)`.
pub fn resize_lanczos4_u8(
    src: &[u8],
    w: usize,
    h: usize,
    channels: usize,
    dw: usize,
    dh: usize,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        w * h * channels,
        "buffer does not match its size"
    );
    let xt = axis_table(w, dw);
    let yt = axis_table(h, dh);
    let clampi = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    // Horizontal pass on every source row, into i32 (values scaled by 2^11).
    let mut rows = vec![0i32; h * dw * channels];
    for y in 0..h {
        let s = &src[y * w * channels..(y + 1) * w * channels];
        let r = &mut rows[y * dw * channels..(y + 1) * dw * channels];
        for (dx, (sx, wt)) in xt.iter().enumerate() {
            for c in 0..channels {
                let mut acc = 0i32;
                for (k, &a) in wt.iter().enumerate() {
                    acc += s[clampi(sx + k as isize, w) * channels + c] as i32 * a;
                }
                r[dx * channels + c] = acc;
            }
        }
    }
    // Vertical pass; OpenCV's FixedPtCast<int, uchar, 22>: (v + 2^21) >> 22, saturated.
    let mut out = vec![0u8; dw * dh * channels];
    let row_len = dw * channels;
    for (dy, (sy, wt)) in yt.iter().enumerate() {
        let o = &mut out[dy * row_len..(dy + 1) * row_len];
        for (i, v) in o.iter_mut().enumerate() {
            let mut acc = 0i64;
            for (k, &b) in wt.iter().enumerate() {
                acc += rows[clampi(sy + k as isize, h) * row_len + i] as i64 * b as i64;
            }
            *v = ((acc + (1 << 21)) >> 22).clamp(0, 255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_are_symmetric_at_half() {
        let c = lanczos4_coeffs(0.5);
        let s: f32 = c.iter().sum();
        assert!((s - 1.0).abs() < 1e-6, "{c:?}");
        for i in 0..4 {
            assert!((c[i] - c[7 - i]).abs() < 1e-6, "{c:?}");
        }
        // Negative lobes are what distinguishes Lanczos from a box/bilinear filter.
        assert!(c[2] < 0.0 && c[3] > 0.5);
    }

    #[test]
    fn integer_offset_copies_the_source() {
        // A same-size resize has fx = 0 everywhere: one tap of weight 1 (OpenCV's 1e30 trick).
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_lanczos4_u8(&src, 5, 4, 3, 5, 4), src);
    }
}
