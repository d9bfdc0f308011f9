//! A `VarBuilder` backend that fabricates every tensor at random, so the bench can build the
//! exact 4B/9B architectures on a machine that has no weights. For timing and memory only: the
//! images such a model makes are noise, and the bench says so in its output.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// Normal(0, 0.02) for matrices, Normal(1, 0.02) for norm scales: values a trained checkpoint
/// plausibly has, so activations stay finite through dozens of layers. Clones share their count.
#[derive(Clone)]
pub struct RandomBackend {
    /// Tensor names a real checkpoint in the requested layout would not have (for example the
    /// fp8 scale tensors of a bf16 checkpoint); `contains_tensor` answers false for them.
    absent_suffixes: Arc<Vec<String>>,
    /// Every name handed out with its element count, for the bench's "fabricated" line.
    seen: Arc<Mutex<(HashSet<String>, u64)>>,
    /// Where samples are drawn. Tensors kept in host memory (the text encoder's embedding
    /// table) are drawn on the GPU and copied over: the CPU sampler would add seconds per 100M
    /// elements to every `load` the bench times.
    draw_on: Option<Device>,
}

impl RandomBackend {
    pub fn new(absent_suffixes: &[&str]) -> Self {
        Self {
            absent_suffixes: Arc::new(absent_suffixes.iter().map(|s| s.to_string()).collect()),
            seen: Arc::new(Mutex::new((HashSet::new(), 0))),
            draw_on: None,
        }
    }

    /// Draws every sample on `device` (the compute device), whatever device asks for it.
    pub fn drawing_on(mut self, device: &Device) -> Self {
        self.draw_on = Some(device.clone());
        self
    }

    /// Tensors and elements fabricated so far (each name counted once).
    pub fn fabricated(&self) -> (usize, u64) {
        let g = self.seen.lock().unwrap();
        (g.0.len(), g.1)
    }

    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }
}

fn is_norm_scale(name: &str) -> bool {
    let leaf_owner = name.rsplit('.').nth(1).unwrap_or("");
    name.ends_with(".weight") && (leaf_owner.contains("norm") || leaf_owner.starts_with("ln"))
        || name.ends_with(".scale")
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mean = if is_norm_scale(name) { 1.0f32 } else { 0.0 };
        // Drawn in f32 then cast: curand and the CPU sampler have no bf16/f8 normal.
        let t = Tensor::randn(
            mean,
            0.02f32,
            s.clone(),
            self.draw_on.as_ref().unwrap_or(dev),
        )?
        .to_dtype(dtype)?
        .to_device(dev)?;
        let mut g = self.seen.lock().unwrap();
        if g.0.insert(name.to_string()) {
            g.1 += s.elem_count() as u64;
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: '{name}' was requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        !self
            .absent_suffixes
            .iter()
            .any(|s| name.ends_with(s.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    #[test]
    fn fabricates_requested_shapes_and_plausible_values() {
        let backend = RandomBackend::new(&[".weight_scale"]);
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        let w = vb.pp("blocks.0.attn").get((64, 32), "to_q.weight").unwrap();
        assert_eq!(w.dims(), &[64, 32]);
        let mean = w.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(mean.abs() < 0.01, "matrix mean {mean}");
        let n = vb.get(512, "blocks.0.norm_q.weight").unwrap();
        let mean = n.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 0.01, "norm mean {mean}");
        assert!(vb.contains_tensor("blocks.0.attn.to_q.weight"));
        assert!(!vb.contains_tensor("blocks.0.attn.to_q.weight_scale"));
        assert!(vb.get_unchecked("x").is_err());
    }

    #[test]
    fn counts_each_tensor_once() {
        let backend = RandomBackend::new(&[]);
        let vb = backend.var_builder(DType::BF16, &Device::Cpu);
        let t = vb.get((3, 4), "a.weight").unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        vb.get((3, 4), "a.weight").unwrap();
        vb.get(5, "b.bias").unwrap();
        assert_eq!(backend.fabricated(), (2, 17));
    }
}
