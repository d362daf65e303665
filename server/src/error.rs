//! API errors as RFC 9457 problem documents, with a stable `code`.
//!
//! Every failure the service reports, over HTTP or in the CLI, is an
//! [`ApiError`]: an HTTP status, a stable machine-readable `code`, a title, a
//! detail and, for bad input, the fields at fault. The CLI maps the same codes to
//! its exit codes (see [`ApiError::exit_code`]).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dcbflow::flow::FlowError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One problem with one field of the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldProblem {
    /// Where: a JSON pointer-like path (`events[0].tags`), a query parameter or a key path.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// A problem document (RFC 9457) with a stable `code`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`urn:dcbflow:problem:<code>`).
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened, for a person.
    pub detail: String,
    /// The stable code: `bad_request`, `invalid_input`, `definition_invalid`,
    /// `unauthorized`, `forbidden`, `not_found`, `conflict`, `moved`,
    /// `not_allowed`, `payload_too_large`, `overloaded`, `timeout`,
    /// `unavailable`, `internal`.
    pub code: String,
    /// The fields at fault (bad input only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldProblem>,
}

/// An error of the service: becomes a problem document over HTTP and an exit
/// code in the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code (see [`Problem::code`]).
    pub code: &'static str,
    /// What happened.
    pub detail: String,
    /// The fields at fault.
    pub errors: Vec<FieldProblem>,
    /// Seconds to wait before retrying (503).
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.detail, self.code)?;
        for e in &self.errors {
            write!(f, "\n  {}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// An error with `status`, `code` and `detail`.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    /// 400: the request is malformed (unparsable JSON, a bad parameter).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    /// 400 naming the field at fault.
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let (field, message) = (field.into(), message.into());
        let mut e = Self::bad_request(format!("{field}: {message}"));
        e.errors.push(FieldProblem { field, message });
        e
    }

    /// 422: well-formed but invalid input, every problem listed.
    pub fn invalid(
        code: &'static str,
        detail: impl Into<String>,
        errors: Vec<FieldProblem>,
    ) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail);
        e.errors = errors;
        e
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 409.
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(code: &'static str, detail: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail);
        e.retry_after = Some(retry_after);
        e
    }

    /// 500: a bug or an unexpected state; the detail is logged, not shown.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (see the server log)",
        )
    }

    /// The problem document of this error.
    pub fn problem(&self) -> Problem {
        Problem {
            problem_type: format!("urn:dcbflow:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_owned(),
            errors: self.errors.clone(),
        }
    }

    /// The error a problem document received from a server describes.
    pub fn from_problem(p: Problem) -> Self {
        ApiError {
            status: StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: code_static(&p.code),
            detail: p.detail,
            errors: p.errors,
            retry_after: None,
        }
    }

    /// The CLI's exit code for this error: 2 bad input, 3 not found, 4
    /// conflict or moved, 5 unavailable (database, server, overload, timeout),
    /// 6 unauthorized or forbidden, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self.status.as_u16() {
            400 | 413 | 422 => 2,
            404 => 3,
            409 => 4,
            503 | 504 => 5,
            401 | 403 => 6,
            _ => 1,
        }
    }
}

/// Codes as `'static` strings (the set is closed; unknown codes from a newer
/// server become `error`).
fn code_static(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "bad_request",
        "invalid_input",
        "definition_invalid",
        "input_mismatch",
        "unauthorized",
        "forbidden",
        "not_found",
        "conflict",
        "moved",
        "not_allowed",
        "duplicate",
        "payload_too_large",
        "unsupported_media_type",
        "overloaded",
        "timeout",
        "unavailable",
        "internal",
        "method_not_allowed",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("error")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).expect("problem serializes");
        let mut res = (self.status, body).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

impl From<dcbflow::Error> for ApiError {
    fn from(e: dcbflow::Error) -> Self {
        use dcbflow::Error as E;
        match e {
            E::InvalidInput(i) => ApiError::invalid("invalid_input", i.to_string(), Vec::new()),
            E::Conflict { position } => ApiError::conflict(
                "conflict",
                format!("the append condition failed: event {position} matches it"),
            ),
            E::Overloaded { .. } => ApiError::unavailable(
                "overloaded",
                "too many operations in flight; retry shortly",
                1,
            ),
            E::Timeout(_) => ApiError::unavailable("timeout", e.to_string(), 2),
            E::SchemaNotInstalled { .. } => ApiError::unavailable("unavailable", e.to_string(), 5),
            E::Unreadable { .. } => ApiError::internal(&e),
            ref other if other.is_retryable() => {
                ApiError::unavailable("unavailable", format!("database unavailable: {e}"), 2)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<dcbflow::outbox::Error> for ApiError {
    fn from(e: dcbflow::outbox::Error) -> Self {
        match e {
            dcbflow::outbox::Error::Store(s) => s.into(),
            other => ApiError::unavailable("unavailable", other.to_string(), 2),
        }
    }
}

impl From<FlowError> for ApiError {
    fn from(e: FlowError) -> Self {
        match e {
            FlowError::Definition(d) => ApiError::invalid(
                "definition_invalid",
                format!("flow {:?} is invalid", d.flow),
                d.problems
                    .iter()
                    .map(|p| FieldProblem {
                        field: "definition".into(),
                        message: p.clone(),
                    })
                    .collect(),
            ),
            FlowError::UnknownFlow(f) => ApiError::not_found(format!("no flow {f:?}")),
            FlowError::UnknownInstance(i) => ApiError::not_found(format!("no instance {i}")),
            FlowError::UnknownSchedule(n) => ApiError::not_found(format!("no schedule {n:?}")),
            FlowError::InvalidSchedule(problems) => ApiError::invalid(
                "schedule_invalid",
                "the schedule is invalid",
                problems
                    .into_iter()
                    .map(|message| FieldProblem {
                        field: "schedule".into(),
                        message,
                    })
                    .collect(),
            ),
            FlowError::InputMismatch(problems) => ApiError::invalid(
                "input_mismatch",
                "the input does not match the flow's input fields",
                problems
                    .into_iter()
                    .map(|message| FieldProblem {
                        field: "input".into(),
                        message,
                    })
                    .collect(),
            ),
            FlowError::Moved { expected, actual } => ApiError::conflict(
                "moved",
                format!(
                    "the instance changed since you looked: seen {expected}, now {actual}; reload and decide again"
                ),
            ),
            FlowError::NotAllowed(why) => ApiError::conflict("not_allowed", why),
            FlowError::Contended(why) => ApiError::unavailable("overloaded", why, 1),
            FlowError::Store(s) => s.into(),
            other => ApiError::internal(other),
        }
    }
}

/// The result of the service's operations.
pub type ApiResult<T> = Result<T, ApiError>;
