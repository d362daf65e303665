//! Test servers: a real `dcbflow` HTTP service on a random loopback port, on
//! real PostgreSQL, in a schema of its own (dropped afterwards).
#![allow(dead_code)]

#[path = "../../../examples/support/mod.rs"]
pub mod db;

use std::time::Duration;

use dcbflow_server::app::App;
use dcbflow_server::config::Config;
use serde_json::Value;

/// The token of the operator in [`TestServer::with_tokens`].
pub const OPERATOR: &str = "operator-token-0123456789";
/// The read-only token in [`TestServer::with_tokens`].
pub const READER: &str = "reader-token-0123456789";

/// Longest a test waits for a condition.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A running service.
pub struct TestServer {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its parts.
    pub app: App,
    /// Its schema.
    pub schema: String,
    /// The database URL.
    pub db_url: String,
    /// An HTTP client.
    pub http: reqwest::Client,
    /// The token requests send (None: none).
    pub token: Option<String>,
    /// The OpenAPI document, as served.
    pub doc: Value,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A server with the default configuration (no tokens, no workers).
    pub async fn start() -> TestServer {
        Self::with(|_| {}).await
    }

    /// A server with the operator and read-only tokens configured; requests
    /// send the operator token.
    pub async fn with_tokens() -> TestServer {
        let mut s = Self::with(|c| {
            c.auth.operator_token = Some(OPERATOR.into());
            c.auth.read_token = Some(READER.into());
        })
        .await;
        s.token = Some(OPERATOR.into());
        s
    }

    /// A server with the configuration `edit` makes (workers default to 0).
    pub async fn with(edit: impl FnOnce(&mut Config)) -> TestServer {
        let schema = format!("s_{}", uuid::Uuid::new_v4().simple());
        let db_url = db::Database::shared_url().to_owned();
        let mut config = Config::default();
        config.database.schema = schema.clone();
        config.database.pool_size = 12;
        config.workers.count = 0;
        edit(&mut config);
        let mut app = App::connect(&db_url, config).await.expect("app");
        app.metrics = Some(dcbflow_server::metrics::install());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let doc = serde_json::to_value(dcbflow_server::api::routes(&app).1).unwrap();
        let router = dcbflow_server::api::router(app.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        TestServer {
            url,
            app,
            schema,
            db_url,
            http: dcbflow::http::client_builder().build().unwrap(),
            token: None,
            doc,
            task,
        }
    }

    /// A request to `path` with the server's token.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// GET `path`: status and JSON body (Null if none), checked against the
    /// OpenAPI document.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = send(self.req(reqwest::Method::GET, path)).await;
        conform(&self.doc, "get", path, r.0, &r.1);
        r
    }

    /// POST JSON to `path`: status and JSON body, checked against the OpenAPI
    /// document.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = send(self.req(reqwest::Method::POST, path).json(&body)).await;
        conform(&self.doc, "post", path, r.0, &r.1);
        r
    }

    /// PUT JSON to `path`, checked as [`post`](Self::post) is.
    #[allow(dead_code)]
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        let r = send(self.req(reqwest::Method::PUT, path).json(&body)).await;
        conform(&self.doc, "put", path, r.0, &r.1);
        r
    }
}

/// Sends and returns the status and JSON body (Null when empty or not JSON);
/// every problem document is checked for the RFC 9457 shape.
pub async fn send(r: reqwest::RequestBuilder) -> (u16, Value) {
    let res = r.send().await.expect("request");
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = res.text().await.expect("body");
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status >= 400 {
        assert!(
            ct.starts_with("application/problem+json"),
            "error {status} without a problem document: {ct} {text}"
        );
        assert_eq!(body["status"], status, "{text}");
        assert!(
            body["code"].is_string() && body["detail"].is_string(),
            "{text}"
        );
    }
    (status, body)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
        drop_schema(&self.db_url, &self.schema);
    }
}

/// Drops `schema` on the database at `url`, from any context (a drop, a
/// panicking test): on a thread of its own with its own runtime.
pub fn drop_schema(url: &str, schema: &str) {
    let (url, schema) = (url.to_owned(), schema.to_owned());
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            if let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await;
            }
        });
    })
    .join();
}

/// Waits until `check` returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The OpenAPI path template `path` (without its query) matches, if any.
pub fn template<'a>(doc: &'a Value, path: &str) -> Option<&'a str> {
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    doc["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|t| {
            let ts: Vec<&str> = t.split('/').collect();
            ts.len() == segs.len()
                && ts
                    .iter()
                    .zip(&segs)
                    .all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
        })
}

/// Panics unless the OpenAPI document declares `status` for `method path`
/// and `body` validates against its schema.
pub fn conform(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let t = template(doc, path).unwrap_or_else(|| panic!("{path} is not in the OpenAPI document"));
    let op = &doc["paths"][t][method];
    assert!(
        op.is_object(),
        "{method} {t} is not in the OpenAPI document"
    );
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {t} answered {status}, which its OpenAPI operation does not declare: {body}"
    );
    let Some(content) = response["content"].as_object() else {
        return;
    };
    let Some(schema) = content
        .iter()
        .find(|(ct, _)| ct.contains("json"))
        .map(|(_, c)| c["schema"].clone())
    else {
        return;
    };
    let mut root = serde_json::json!({"components": doc["components"].clone()});
    if let (Some(r), Some(s)) = (root.as_object_mut(), schema.as_object()) {
        for (k, v) in s {
            r.insert(k.clone(), v.clone());
        }
    }
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("schema of {method} {t} {status}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {t} {status}: the body does not match the OpenAPI schema: {errors:?}\n{body}"
    );
}
