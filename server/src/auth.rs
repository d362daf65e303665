//! Bearer-token authentication: an operator token (everything) and a read-only
//! token (GET and HEAD only), compared in constant time and never logged.
//!
//! Without tokens every request is allowed, and the server refuses to listen
//! on anything but a loopback address (see [`crate::config::Config::check`]).

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::Auth;
use crate::error::ApiError;

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read only.
    Reader,
    /// Everything.
    Operator,
}

/// The configured tokens.
#[derive(Clone)]
pub struct Tokens {
    operator: Option<Vec<u8>>,
    read: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(***)")
    }
}

impl Tokens {
    /// The tokens of `auth`.
    pub fn new(auth: &Auth) -> Self {
        Tokens {
            operator: auth.operator_token.as_ref().map(|t| t.as_bytes().to_vec()),
            read: auth.read_token.as_ref().map(|t| t.as_bytes().to_vec()),
        }
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        self.operator.is_some() || self.read.is_some()
    }

    /// The role `presented` grants (`None`: none).
    pub fn role(&self, presented: &[u8]) -> Option<Role> {
        // Both comparisons always run: the time taken does not tell which
        // token, if any, matched.
        let op = self
            .operator
            .as_deref()
            .map_or(subtle::Choice::from(0), |t| t.ct_eq(presented));
        let rd = self
            .read
            .as_deref()
            .map_or(subtle::Choice::from(0), |t| t.ct_eq(presented));
        if bool::from(op) {
            Some(Role::Operator)
        } else if bool::from(rd) {
            Some(Role::Reader)
        } else {
            None
        }
    }
}

/// The role a request was granted, as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct Granted(pub Role);

/// The middleware: 401 without a valid token, 403 for a read-only token on a
/// method that changes something.
pub async fn require(State(tokens): State<Tokens>, mut req: Request, next: Next) -> Response {
    if is_probe(req.uri().path()) || crate::ui::is_ui(req.uri().path()) {
        return next.run(req).await;
    }
    let role = if tokens.enabled() {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .or_else(|| sse_token(&req));
        let Some(presented) = presented else {
            return unauthorized("a bearer token is required (Authorization: Bearer <token>)");
        };
        match tokens.role(presented.as_bytes()) {
            Some(r) => r,
            None => return unauthorized("the token is not valid"),
        }
    } else {
        Role::Operator
    };
    let reading = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if role == Role::Reader && !reading {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the read-only token cannot change anything; use the operator token",
        )
        .into_response();
    }
    req.extensions_mut().insert(Granted(role));
    next.run(req).await
}

/// The health probes, open to all: they tell whether the service runs, nothing
/// of its data.
pub fn is_probe(path: &str) -> bool {
    matches!(path, "/health/live" | "/health/ready")
}

/// Browsers' `EventSource` cannot set headers: the live tail also accepts the
/// token as `access_token` in its query string (GET only).
fn sse_token(req: &Request) -> Option<&str> {
    if req.method() != Method::GET || !req.uri().path().ends_with("/events/live") {
        return None;
    }
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
}

fn unauthorized(detail: &str) -> Response {
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"dcbflow\""),
    );
    res
}
