//! Shared by the CPU benches.

use std::collections::HashMap;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

pub type Weights = VarBuilder<'static>;

/// A `VarBuilder` over candle_nn's default initial weights for the model `build` makes, as plain
/// tensors. `VarBuilder::from_varmap` hands out variables, and every op on a variable records
/// its inputs for backprop: a forward pass then keeps all its activations alive, which skews
/// both the time and the memory a bench measures. Production weights are never variables.
pub fn plain_weights<T>(
    dtype: DType,
    dev: &Device,
    build: impl Fn(Weights) -> candle_core::Result<T>,
) -> Weights {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, dtype, dev)).expect("the model builds");
    let weights: HashMap<_, _> = vm
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    VarBuilder::from_tensors(weights, dtype, dev)
}
