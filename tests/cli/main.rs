//! The `imagegen` binary's commands run as a user would: `generate` and `bench`.

#[path = "../common/mod.rs"]
mod common;

mod bench;
mod generate;
