//! The FLUX.2 model's tests, one test binary (one link instead of eight): hub and file layout,
//! checkpoint manifests, parity with diffusers per component and end to end, bf16/fp8/int8
//! numerics, and the memory-lean layers against the same fixtures.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/fake_hub.rs"]
mod fake_hub;

mod hub;
mod lean_parity;
mod lora;
mod manifests;
mod numerics;
mod parity;
mod pipeline;
mod text;
mod weights;
