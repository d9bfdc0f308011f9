//! The `imagegen` binary's commands run as a user would: `generate` and `bench`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/fake_hub.rs"]
mod fake_hub;

mod bench;
mod download;
mod generate;
