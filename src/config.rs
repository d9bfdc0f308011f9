//! Server configuration: every flag is also an environment variable.

/// Arguments of `imagegen serve` (also what the binary does with no subcommand).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {}

impl ServeArgs {
    /// The serve arguments from the environment alone, for a bare `imagegen` invocation.
    pub fn parse_from_env() -> Self {
        #[derive(clap::Parser)]
        struct Bare {
            #[command(flatten)]
            serve: ServeArgs,
        }
        <Bare as clap::Parser>::parse_from(["imagegen"]).serve
    }
}
