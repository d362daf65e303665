//! `/health/live`, `/health/ready` and `/metrics`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::App;
use crate::error::ApiResult;

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// `database`, `migrations`, `workers`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// Readiness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// The checks.
    pub checks: Vec<Check>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health/live", tag = "health", security(()),
    responses((status = 200, description = "Alive", body = Object)))]
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "live"}))
}

/// Readiness: the database is reachable, the schema's migrations are current
/// and the configured workers run. 503 otherwise.
#[utoipa::path(get, path = "/health/ready", tag = "health", security(()),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn ready(State(app): State<App>) -> Response {
    let r = readiness(&app).await;
    let status = if r.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut res = (status, Json(r)).into_response();
    if status != StatusCode::OK {
        res.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(5));
    }
    res
}

/// The readiness checks.
pub async fn readiness(app: &App) -> Readiness {
    let mut checks = Vec::new();
    match app.store.head().await {
        Ok(h) => checks.push(Check {
            name: "database".into(),
            ok: true,
            detail: format!("reachable; head {}", h.map_or(0, |p| p.0)),
        }),
        Err(e) => checks.push(Check {
            name: "database".into(),
            ok: false,
            detail: e.to_string(),
        }),
    }
    match app.store.migration_status().await {
        Ok(m) => checks.push(Check {
            name: "migrations".into(),
            ok: m.current,
            detail: m
                .layers
                .iter()
                .map(|l| format!("{} {}/{}", l.layer, l.applied, l.known))
                .collect::<Vec<_>>()
                .join(", "),
        }),
        Err(e) => checks.push(Check {
            name: "migrations".into(),
            ok: false,
            detail: e.to_string(),
        }),
    }
    let (want, run) = (app.config.workers.count, app.workers());
    checks.push(Check {
        name: "workers".into(),
        ok: run >= want,
        detail: format!("{run} of {want} running"),
    });
    Readiness {
        status: if checks.iter().all(|c| c.ok) {
            "ready".into()
        } else {
            "not_ready".into()
        },
        checks,
    }
}

/// Prometheus metrics (text format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(app): State<App>) -> ApiResult<Response> {
    let text = crate::metrics::render(&app).await;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// This document: OpenAPI 3.1, generated from the handlers.
#[utoipa::path(get, path = "/api/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn openapi(
    axum::Extension(doc): axum::Extension<std::sync::Arc<utoipa::openapi::OpenApi>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json(doc.as_ref().clone())
}
