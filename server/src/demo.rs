//! `serve --demo` (placeholder).

use dcbflow::CancellationToken;
use tokio::task::JoinSet;

use crate::app::App;
use crate::error::ApiResult;

/// Starts the demo.
///
/// # Errors
/// Never yet.
pub async fn start(_app: &App, _stop: CancellationToken, _tasks: &mut JoinSet<()>) -> ApiResult<()> {
    Ok(())
}
