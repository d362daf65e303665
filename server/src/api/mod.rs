//! The HTTP API: `/api/v1` (JSON, problem documents, cursor pagination),
//! `/health/*`, `/metrics`, `/api/openapi.json` and the dcb.events-compatible
//! `/read` and `/append`.
//!
//! Handlers are thin: they parse and check the request, call the operation in
//! [`crate::ops`] that the CLI calls too, and serialize its view.

pub mod dcb;
pub mod events;
pub mod flows;
pub mod health;
pub mod incidents;
pub mod instances;
pub mod overview;
pub mod relays;
pub mod schedules;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;
use crate::auth::{self, Tokens};
use crate::error::{ApiError, ApiResult, FieldProblem, Problem};

/// The OpenAPI document's fixed parts; the paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dcbflow",
        description = "Event store, flow engine and operator API on PostgreSQL (Dynamic Consistency Boundaries).",
        license(name = "MIT OR Apache-2.0")
    ),
    components(schemas(Problem, FieldProblem)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "flows", description = "Flow definitions"),
        (name = "instances", description = "Flow instances (transactions) and operations on them"),
        (name = "incidents", description = "Incidents (exceptions): failed or stuck steps"),
        (name = "events", description = "The event log: read, append, live tail"),
        (name = "relays", description = "Projections, outbox relays and dead letters"),
        (name = "health", description = "Liveness, readiness, metrics"),
        (name = "dcb", description = "dcb.events-compatible endpoints (benchmark suite)")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route with its OpenAPI operation: the router and the document are
/// built from the same list, so no route can be missing from the document.
pub fn routes(app: &App) -> (Router<App>, utoipa::openapi::OpenApi) {
    let mut r = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(flows::register, flows::list))
        .routes(routes!(flows::show))
        .routes(routes!(flows::version))
        .routes(routes!(instances::start, instances::list))
        .routes(routes!(instances::show))
        .routes(routes!(instances::timeline))
        .routes(routes!(instances::retry))
        .routes(routes!(instances::skip))
        .routes(routes!(instances::signal))
        .routes(routes!(instances::abort))
        .routes(routes!(instances::pause))
        .routes(routes!(instances::resume))
        .routes(routes!(instances::bulk))
        .routes(routes!(incidents::list))
        .routes(routes!(incidents::show))
        .routes(routes!(incidents::handle))
        .routes(routes!(incidents::retry))
        .routes(routes!(events::read, events::append))
        .routes(routes!(events::live))
        .routes(routes!(schedules::list))
        .routes(routes!(schedules::set))
        .routes(routes!(schedules::pause))
        .routes(routes!(schedules::resume))
        .routes(routes!(relays::list))
        .routes(routes!(relays::dead_letters))
        .routes(routes!(relays::replay))
        .routes(routes!(relays::discard))
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .routes(routes!(health::metrics))
        .routes(routes!(health::openapi))
        .routes(routes!(overview::whoami))
        .routes(routes!(overview::overview));
    if app.config.api.dcb_endpoints {
        r = r.routes(routes!(dcb::read)).routes(routes!(dcb::append));
    }
    let (router, mut doc) = r.split_for_parts();
    common_responses(&mut doc);
    (router, doc)
}

/// Declares on every operation what any of them may answer: bad input, auth,
/// body limits, overload.
fn common_responses(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let common = [
        (
            "400",
            "Bad request: a malformed body or parameter (the field is named)",
        ),
        ("401", "No token, or not a valid one"),
        (
            "403",
            "The read-only token on an operation that changes something",
        ),
        ("413", "The body is larger than the configured limit"),
        ("415", "Not a media type this operation takes"),
        (
            "503",
            "Overloaded or the database is unavailable; see Retry-After",
        ),
    ];
    for item in openapi.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            for (code, what) in common {
                op.responses
                    .responses
                    .entry(code.to_owned())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(what)
                            .content(
                                crate::error::PROBLEM_JSON,
                                ContentBuilder::new()
                                    .schema(Some(Ref::from_schema_name("Problem")))
                                    .build(),
                            )
                            .build()
                            .into()
                    });
            }
        }
    }
}

/// The whole HTTP service for `app`.
pub fn router(app: App) -> Router {
    let (api, mut doc) = routes(&app);
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let doc = Arc::new(doc);
    let tokens = Tokens::new(&app.config.auth);
    let slots = Arc::new(Semaphore::new(app.config.api.max_in_flight));
    let limit = app.config.api.body_limit_bytes;
    api.merge(crate::ui::routes())
        .layer(axum::Extension(doc))
        .layer(middleware::from_fn_with_state(slots, shed))
        .layer(middleware::from_fn_with_state(tokens, auth::require))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// Load shedding: beyond `max_in_flight` requests at once, 503 with `Retry-After`.
/// Health probes are never shed.
async fn shed(State(slots): State<Arc<Semaphore>>, req: Request, next: Next) -> Response {
    if auth::is_probe(req.uri().path()) {
        return next.run(req).await;
    }
    match slots.try_acquire_owned() {
        Ok(permit) => {
            let res = next.run(req).await;
            drop(permit);
            res
        }
        Err(_) => ApiError::unavailable(
            "overloaded",
            "the server is handling as many requests as it is configured to; retry shortly",
            1,
        )
        .into_response(),
    }
}

/// A JSON request body: 415 unless JSON, 413 past the body limit, 400 for
/// malformed JSON, nesting deeper than 64, an unknown field or a field of the
/// wrong type (naming the field).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_ascii_lowercase();
        if !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("expected application/json, got {ct}"),
            ));
        }
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The request's body, 413 past the limit.
pub async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> ApiResult<bytes::Bytes> {
    bytes::Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than the server's limit (api.body_limit_bytes)",
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}

/// Most nesting a JSON request may have.
pub const MAX_JSON_DEPTH: usize = 64;

/// Parses JSON into `T`, naming the field at fault.
///
/// # Errors
/// 400 `bad_request`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    if json_depth(bytes) > MAX_JSON_DEPTH {
        return Err(ApiError::bad_request(format!(
            "the JSON nests deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_data() && path != "." {
            ApiError::bad_field(path, inner.to_string())
        } else {
            ApiError::bad_request(format!("malformed JSON: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// The deepest nesting of arrays and objects in `bytes` (strings skipped),
/// without recursion.
fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Query-string parameters: 400 naming the parameter for a bad or unknown one.
/// Repeated keys (`types=a&types=b`) make lists.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or_default();
        let de = serde_html_form::Deserializer::from_bytes(q.as_bytes());
        serde_path_to_error::deserialize(de)
            .map(Params)
            .map_err(|e| {
                let path = e.path().to_string();
                let msg = e.into_inner().to_string();
                if path == "." {
                    ApiError::bad_request(format!("query string: {msg}"))
                } else {
                    ApiError::bad_field(path, msg)
                }
            })
    }
}

/// An `Operator` from a request's actor and reason: both required.
pub fn operator(actor: &str, reason: &str) -> ApiResult<dcbflow::flow::Operator> {
    let mut problems = Vec::new();
    if actor.trim().is_empty() {
        problems.push(FieldProblem {
            field: "actor".into(),
            message: "who does this: must not be empty".into(),
        });
    }
    if reason.trim().is_empty() {
        problems.push(FieldProblem {
            field: "reason".into(),
            message: "why: must not be empty".into(),
        });
    }
    if actor.len() > 200 || reason.len() > 2000 {
        problems.push(FieldProblem {
            field: "reason".into(),
            message: "actor at most 200 and reason at most 2000 bytes".into(),
        });
    }
    if problems.is_empty() {
        Ok(dcbflow::flow::Operator::new(actor, reason))
    } else {
        Err(ApiError::invalid(
            "invalid_input",
            "an operation needs an actor and a reason",
            problems,
        ))
    }
}

/// `201 Created` or `200 OK` with a JSON body.
pub fn created<T: serde::Serialize>(created: bool, body: T) -> Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}
