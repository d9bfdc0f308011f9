//! FLUX.2 flow-matching schedule (diffusers `FlowMatchEulerDiscreteScheduler` as the klein
//! pipeline drives it: custom sigmas, dynamic exponential shift with the empirical μ).

pub use crate::limits::MAX_STEPS;

/// diffusers `compute_empirical_mu(image_seq_len, num_steps)`; `image_seq_len` counts only the
/// noisy image tokens (no text, no references).
pub fn compute_empirical_mu(image_seq_len: usize, num_steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let seq = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * seq + b2;
    }
    let m_200 = a2 * seq + b2;
    let m_10 = a1 * seq + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * num_steps as f64 + b
}

/// Exponential time shift e^μ / (e^μ + (1/σ − 1)).
fn time_shift(mu: f64, sigma: f64) -> f64 {
    let e = mu.exp();
    e / (e + (1.0 / sigma - 1.0))
}

/// The `num_steps + 1` sigmas: linspace(1, 1/n, n) shifted with μ, then a trailing 0.
///
/// diffusers holds the unshifted sigmas in f32 before shifting, so we round them the same way.
pub fn sigmas(num_steps: usize, image_seq_len: usize) -> Vec<f32> {
    let n = num_steps.max(1);
    let mu = compute_empirical_mu(image_seq_len, n);
    let last = 1.0 / n as f64;
    let mut out: Vec<f32> = (0..n)
        .map(|i| {
            let lin = if n == 1 {
                1.0
            } else {
                1.0 + (last - 1.0) * i as f64 / (n - 1) as f64
            };
            let lin = lin as f32 as f64;
            time_shift(mu, lin) as f32
        })
        .collect();
    out.push(0.0);
    out
}

/// One Euler step of the rectified flow: x + (σ_next − σ)·v, in f32 as diffusers does.
pub fn euler_step(
    sample: &candle_core::Tensor,
    velocity: &candle_core::Tensor,
    sigma: f32,
    sigma_next: f32,
) -> candle_core::Result<candle_core::Tensor> {
    let dt = sigma_next - sigma;
    let dtype = sample.dtype();
    let s = sample.to_dtype(candle_core::DType::F32)?;
    let v = velocity.to_dtype(candle_core::DType::F32)?;
    (s + (v * dt as f64)?)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_worked_values_of_the_spec() {
        // flux2-klein.md §5: 1024² (N = 4096), 4 steps.
        assert!((compute_empirical_mu(4096, 4) - 2.29118).abs() < 1e-4);
        let s = sigmas(4, 4096);
        let want = [1.0, 0.96738, 0.90814, 0.76720, 0.0];
        assert_eq!(s.len(), 5);
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{s:?}");
        }
        // 512², 4 steps; 2048² takes the large-sequence branch; 1024² with 50 steps.
        let s = sigmas(4, 1024);
        for (a, b) in s.iter().zip([1.0, 0.95809, 0.88398, 0.71750, 0.0]) {
            assert!((a - b).abs() < 1e-4, "{s:?}");
        }
        assert!((compute_empirical_mu(16384, 4) - 3.22999).abs() < 1e-4);
        assert!((compute_empirical_mu(4096, 50) - 2.02335).abs() < 1e-4);
    }

    #[test]
    fn one_step_and_fifty_steps_are_monotone() {
        assert_eq!(sigmas(1, 64), vec![1.0, 0.0]);
        let s = sigmas(50, 4096);
        assert_eq!(s.len(), 51);
        assert!(s.windows(2).all(|w| w[0] > w[1]), "{s:?}");
        assert_eq!(s[50], 0.0);
    }

    #[test]
    fn euler_step_moves_by_dt_times_velocity() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = candle_core::Tensor::new(&[1.0f32, 2.0], &dev)?;
        let v = candle_core::Tensor::new(&[0.5f32, -1.0], &dev)?;
        let y = euler_step(&x, &v, 1.0, 0.75)?.to_vec1::<f32>()?;
        assert_eq!(y, vec![1.0 - 0.125, 2.25]);
        Ok(())
    }
}
