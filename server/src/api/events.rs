//! `/api/v1/events`: read with a query, append with a condition, live tail (SSE).

use axum::extract::State;
use axum::http::StatusCode;

use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// Reads events.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", responses((status = 200, description = "Events")))]
pub async fn read(State(_app): State<App>) -> ApiResult<()> {
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "internal", "not yet"))
}

/// Appends events.
#[utoipa::path(post, path = "/api/v1/events", tag = "events", responses((status = 200, description = "Appended")))]
pub async fn append(State(_app): State<App>) -> ApiResult<()> {
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "internal", "not yet"))
}

/// Live tail.
#[utoipa::path(get, path = "/api/v1/events/live", tag = "events", responses((status = 200, description = "SSE")))]
pub async fn live(State(_app): State<App>) -> ApiResult<()> {
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "internal", "not yet"))
}
