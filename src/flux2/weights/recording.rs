//! A `VarBuilder` with no weights behind it, for tests and manifests: builds the real 4B/9B
//! architectures at no memory cost and records what they ask for.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// Names and shapes requested from a [`recording_var_builder`].
pub type RequestLog =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>>;

struct RecordingBackend {
    log: RequestLog,
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.log
            .lock()
            .map_err(|_| candle_core::Error::msg("request log poisoned"))?
            .insert(name.to_string(), s.dims().to_vec());
        // A stride-0 view of one zero: the real 4B/9B shapes cost no memory.
        Tensor::zeros(1, dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("recording backend: {name} requested without a shape")
    }

    /// Every checkpoint name, but not the BFL backend's raw-fp8 aliases.
    fn contains_tensor(&self, name: &str) -> bool {
        !name.contains('#')
    }
}

/// A `VarBuilder` that serves zero tensors of any requested shape and logs every request:
/// builds a model at the real 4B/9B sizes without weights, to check against the committed
/// checkpoint manifests (tests/fixtures/flux2/manifests) which names and shapes it would load.
pub fn recording_var_builder(dtype: DType, device: &Device) -> (VarBuilder<'static>, RequestLog) {
    let log = RequestLog::default();
    let backend = RecordingBackend { log: log.clone() };
    (
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        log,
    )
}
