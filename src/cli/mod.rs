//! The subcommands of the `imagegen` binary other than `serve` (which lives in `config`/`api`).

pub mod bench;
pub mod generate;
pub mod upscale;
