//! The HTTP API (axum): routes, request/response schemas, errors, OpenAPI.

use crate::config::ServeArgs;

/// Runs the server until SIGTERM/SIGINT.
pub async fn serve(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("the server is not implemented yet")
}
