//! The dashboard: a single-page app (`server/ui/`, embedded in the binary) on
//! the same REST API and auth as scripts (ADR 0009). The shell and its assets
//! carry no data, so they are served without a token; every page then reads
//! and acts through `/api/v1` with the user's bearer token.

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

/// The files of `server/ui/`.
#[derive(RustEmbed)]
#[folder = "ui/"]
#[exclude = "*.md"]
#[exclude = "*.sh"]
struct Assets;

/// `/` and `/ui/<file>`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", axum::routing::get(|| async { asset("index.html") }))
        .route(
            "/ui/{*path}",
            axum::routing::get(|Path(path): Path<String>| async move { asset(&path) }),
        )
}

/// Whether `path` is the dashboard's (served without a token).
pub fn is_ui(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

fn asset(path: &str) -> Response {
    match Assets::get(path) {
        Some(file) => {
            let mime = mime_guess::from_path(path).first_or_octet_stream();
            (
                [
                    (header::CONTENT_TYPE, mime.as_ref().to_owned()),
                    (header::CACHE_CONTROL, "no-cache".to_owned()),
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'self'; img-src 'self' data:; style-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'".to_owned(),
                    ),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
                ],
                file.data,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
