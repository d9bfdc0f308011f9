//! The subcommands of the `imagegen` binary other than `serve` (which lives in `config`/`api`).

pub mod bench;
pub mod download;
pub mod generate;
pub mod progress;
pub mod upscale;
