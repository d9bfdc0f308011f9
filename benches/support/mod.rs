//! Shared by the CPU benches and the memory test (which includes it with `#[path]`).

#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

pub type Weights = VarBuilder<'static>;

/// candle_nn's default initial weights for whatever `build` loads, as plain tensors.
/// `VarBuilder::from_varmap` hands out variables, and every op on a variable records its inputs
/// for backprop: a forward pass then keeps all its activations alive, which skews both the time
/// and the memory a bench or test measures. Production weights are never variables.
pub fn plain_tensors<T>(
    dtype: DType,
    dev: &Device,
    build: impl FnOnce(Weights) -> Result<T>,
) -> Result<HashMap<String, Tensor>> {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, dtype, dev))?;
    let data = vm.data().lock().expect("varmap lock");
    Ok(data
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect())
}

/// A `VarBuilder` over [`plain_tensors`] for the model `build` makes.
pub fn plain_weights<T>(
    dtype: DType,
    dev: &Device,
    build: impl Fn(Weights) -> Result<T>,
) -> Weights {
    let weights = plain_tensors(dtype, dev, build).expect("the model builds");
    VarBuilder::from_tensors(weights, dtype, dev)
}
