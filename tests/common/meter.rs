//! Heap metering for the memory test and bench (included with `#[path]`; each binary installs
//! [`Meter`] as its `#[global_allocator]`). candle's CPU storage is `Vec`-backed, so live heap
//! bytes are live tensor bytes plus small bookkeeping.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live and peak bytes.
pub struct Meter;

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grow(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grow(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grow(new);
        }
        q
    }
}

fn grow(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Runs `f` and returns its result with the peak heap bytes above what was live before it.
pub fn peak_above_live<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = live();
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - base)
}

/// Random weights for whatever `build` loads, as plain (non-variable) tensors: weights straight
/// from a `VarMap` are variables, and ops on variables record their inputs for backprop, which
/// would keep every activation alive and falsify the measurement.
pub fn random_weights(
    dtype: DType,
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<HashMap<String, Tensor>> {
    let vm = VarMap::new();
    build(VarBuilder::from_varmap(&vm, dtype, &Device::Cpu))?;
    let data = vm.data().lock().unwrap();
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
}

pub fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}
