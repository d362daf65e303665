//! The dcb.events-compatible `/read` and `/append`.

use axum::extract::State;
use axum::http::StatusCode;

use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// dcb.events read.
#[utoipa::path(get, path = "/read", tag = "dcb", responses((status = 200, description = "Events")))]
pub async fn read(State(_app): State<App>) -> ApiResult<()> {
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "internal", "not yet"))
}

/// dcb.events append.
#[utoipa::path(post, path = "/append", tag = "dcb", responses((status = 200, description = "Appended")))]
pub async fn append(State(_app): State<App>) -> ApiResult<()> {
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "internal", "not yet"))
}
