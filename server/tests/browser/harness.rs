//! What the browser tests drive: a real `dcbflow serve` process on its own
//! schema, headless Chromium through ChromeDriver, and a local HTTP service
//! whose behaviour the test switches.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::post;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::support;

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The operator token of servers started with [`ServerConfig::tokens`].
pub const OPERATOR: &str = support::OPERATOR;
/// The read-only token of servers started with [`ServerConfig::tokens`].
pub const READER: &str = support::READER;

/// Longest any wait takes.
pub const DEADLINE: Duration = support::DEADLINE;

/// Screenshots that make up the documentation's set (docs/img): written to
/// `DCBFLOW_SCREENSHOTS` as well as to `target/browser-screenshots`.
pub const DOC_SHOTS: &[&str] = &[
    "overview",
    "instances",
    "instance",
    "incidents",
    "flows",
    "events",
    "relays",
];

/// A child process killed (with its process group) when dropped.
struct Reaped {
    child: Child,
    group: bool,
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let pid = self.child.id();
        if self.group && pid > 1 {
            // ChromeDriver and the browsers it started share its process
            // group (its pid). `--` matters: procps' `kill -KILL -<pid>`
            // would signal every process (-1).
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a child's output lines on a thread: into `all` and the channel.
fn lines_of(
    out: impl std::io::Read + Send + 'static,
    all: Arc<Mutex<Vec<String>>>,
) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            all.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line starting with `prefix`; returns the rest.
async fn line_after(
    lines: &mut mpsc::UnboundedReceiver<String>,
    prefix: &str,
    what: &str,
    log: &Mutex<Vec<String>>,
) -> String {
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, lines.recv()).await {
            Ok(Some(line)) => {
                if let Some(i) = line.find(prefix) {
                    return line[i + prefix.len()..].trim().to_owned();
                }
            }
            Ok(None) => panic!("{what} exited before saying `{prefix}`: {:?}", log.lock()),
            Err(_) => panic!(
                "{what} did not say `{prefix}` within {DEADLINE:?}: {:?}",
                log.lock()
            ),
        }
    }
}

/// Panics with the Debian packages to install unless Chromium and
/// ChromeDriver are there.
fn require_browser() {
    for (bin, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: the dashboard's browser tests need Chromium and ChromeDriver; \
             install the Debian packages `chromium` and `chromium-driver` \
             (apt-get install chromium chromium-driver); missing: {package}"
        );
    }
}

/// What a test server runs with.
#[derive(Default)]
pub struct ServerConfig {
    /// Flow definitions: (file name, YAML).
    pub flows: Vec<(&'static str, String)>,
    /// `serve --demo`.
    pub demo: bool,
    /// The operator and read-only tokens ([`OPERATOR`], [`READER`]).
    pub tokens: bool,
    /// TOML appended to the configuration (`[[relays]]` tables).
    pub extra: String,
}

/// A running `dcbflow serve` process on a schema of its own.
pub struct Server {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its schema (dropped at the end).
    pub schema: String,
    /// HTTP client for the API.
    pub http: reqwest::Client,
    /// The token API calls send, if any.
    pub token: Option<String>,
    db_url: String,
    dir: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
    process: Option<Reaped>,
}

impl Server {
    /// Writes the configuration and starts the binary; returns once it listens.
    pub async fn start(config: ServerConfig) -> Server {
        let db_url = support::db::Database::shared_url().to_owned();
        let schema = format!("s_{}", uuid::Uuid::new_v4().simple());
        let dir = std::env::temp_dir().join(format!("dcbflow-browser-{schema}"));
        std::fs::create_dir_all(dir.join("flows")).unwrap();
        for (name, yaml) in &config.flows {
            std::fs::write(dir.join("flows").join(name), yaml).unwrap();
        }
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\n\
             [database]\nurl = \"{db_url}\"\nschema = \"{schema}\"\npool_size = 8\n\
             [flows]\npaths = [\"flows\"]\nhttp_allow = [\"loopback\"]\n\
             [workers]\ncount = 1\nconcurrency = 4\nshutdown_grace_ms = 0\n"
        );
        if config.tokens {
            toml.push_str(&format!(
                "[auth]\noperator_token = \"{OPERATOR}\"\nread_token = \"{READER}\"\n"
            ));
        }
        toml.push_str(&config.extra);
        std::fs::write(dir.join("dcbflow.toml"), toml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dcbflow"));
        cmd.args(["serve", "--config"])
            .arg(dir.join("dcbflow.toml"));
        if config.demo {
            cmd.arg("--demo");
        }
        let mut child = cmd
            .env_remove("DATABASE_URL")
            .env_remove("DCBFLOW_DATABASE_URL")
            .env_remove("DCBFLOW_OPERATOR_TOKEN")
            .env_remove("DCBFLOW_READ_TOKEN")
            .env_remove("DCBFLOW_CONFIG")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the dcbflow binary to start");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut lines = lines_of(child.stdout.take().unwrap(), output.clone());
        let _stderr = lines_of(child.stderr.take().unwrap(), output.clone());
        let process = Reaped {
            child,
            group: false,
        };
        let url = line_after(
            &mut lines,
            "dcbflow listening on ",
            "dcbflow serve",
            &output,
        )
        .await
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
        // Keep draining stdout so that the process never blocks on it.
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
        Server {
            url,
            schema,
            http: dcbflow::http::client_builder().build().unwrap(),
            token: config.tokens.then(|| OPERATOR.to_owned()),
            db_url,
            dir,
            output,
            process: Some(process),
        }
    }

    /// What the process printed so far.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    /// A request with the server's token.
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// GET `path`, expecting 200: the JSON body.
    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = support::send(self.req(reqwest::Method::GET, path)).await;
        if status != 200 {
            let out = self.output();
            panic!(
                "GET {path}: {status} {body}\nthe server's last lines:\n{}",
                out[out.len().saturating_sub(15)..].join("\n")
            );
        }
        body
    }

    /// POST JSON to `path`: status and JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        support::send(self.req(reqwest::Method::POST, path).json(&body)).await
    }

    /// Starts an instance of `flow`; returns its id.
    pub async fn start_instance(&self, flow: &str, key: &str, input: Value) -> String {
        let (status, body) = self
            .post(
                "/api/v1/instances",
                json!({"flow": flow, "business_key": key, "input": input}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// The instance's view.
    pub async fn instance(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/instances/{id}")).await
    }

    /// Waits until the instance is in `status`; returns its view.
    pub async fn until_status(&self, id: &str, status: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.instance(id).await;
            if v["status"] == status {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "instance {id} did not become {status}: {v:#}\nserver: {:?}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.process.take());
        support::drop_schema(&self.db_url, &self.schema);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One call the [`Service`] received.
#[derive(Debug, Clone)]
pub struct Call {
    /// `ok`, `undo`, `flaky`, `hang` or `hook`.
    pub endpoint: String,
    /// Its JSON body (Null if none).
    pub body: Value,
}

#[derive(Default)]
struct ServiceState {
    healthy: AtomicBool,
    calls: Mutex<Vec<Call>>,
}

/// A local HTTP service for HTTP tasks and webhooks: `POST /ok` and `/undo`
/// always succeed; `/flaky` answers 503 and `/hook` 400 until
/// [`Service::heal`]; `/hang` never answers.
#[derive(Clone)]
pub struct Service {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<ServiceState>,
}

async fn endpoint(
    State(state): State<Arc<ServiceState>>,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.calls.lock().unwrap().push(Call {
        endpoint: name.clone(),
        body,
    });
    let healthy = state.healthy.load(Ordering::SeqCst);
    match name.as_str() {
        "ok" => (StatusCode::OK, Json(json!({"ok": true}))),
        "undo" => (StatusCode::OK, Json(json!({"undone": true}))),
        "flaky" if healthy => (StatusCode::OK, Json(json!({"charged": 42}))),
        "flaky" => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "the payment provider is down"})),
        ),
        "hook" if healthy => (StatusCode::OK, Json(json!({"received": true}))),
        "hook" => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "not accepting yet"})),
        ),
        "hang" => std::future::pending().await,
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such endpoint"})),
        ),
    }
}

impl Service {
    /// Starts it on a loopback port.
    pub async fn start() -> Service {
        let state = Arc::new(ServiceState::default());
        let app = axum::Router::new()
            .route("/{name}", post(endpoint))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Service { url, state }
    }

    /// From now on `/flaky` and `/hook` succeed.
    pub fn heal(&self) {
        self.state.healthy.store(true, Ordering::SeqCst);
    }

    /// The calls of `endpoint` so far.
    pub fn calls(&self, endpoint: &str) -> Vec<Call> {
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .cloned()
            .collect()
    }
}

/// Where screenshots go: `target/browser-screenshots`.
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("browser-screenshots")
}

/// `DCBFLOW_SCREENSHOTS`, a relative path taken from the workspace root.
fn docs_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DCBFLOW_SCREENSHOTS").filter(|d| !d.is_empty())?;
    let dir = PathBuf::from(dir);
    Some(if dir.is_absolute() {
        dir
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir)
    })
}

/// Headless Chromium, driven through its own ChromeDriver.
pub struct Browser {
    /// The WebDriver session.
    pub client: Option<Client>,
    /// The dashboard's base URL.
    pub base: String,
    scenario: &'static str,
    profile: PathBuf,
    driver: Option<Reaped>,
}

/// A JavaScript string literal.
fn js_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

impl Browser {
    /// Starts ChromeDriver on a free port and a fresh headless Chromium.
    pub async fn open(scenario: &'static str, base: &str) -> Browser {
        require_browser();
        let profile = std::env::temp_dir().join(format!(
            "dcbflow-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver to start");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut lines = lines_of(child.stdout.take().unwrap(), output.clone());
        let driver = Reaped { child, group: true };
        let port = line_after(
            &mut lines,
            "was started successfully on port ",
            "chromedriver",
            &output,
        )
        .await
        .trim_end_matches('.')
        .to_owned();
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.enforce_http(true);
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("a Chromium session through chromedriver: {e}"));
        // `--window-size` is the window's; make the page itself 1280x800.
        let inner = client
            .execute("return [window.innerWidth, window.innerHeight]", vec![])
            .await
            .unwrap();
        let (w, h) = client.get_window_size().await.unwrap();
        let (iw, ih) = (inner[0].as_u64().unwrap(), inner[1].as_u64().unwrap());
        client
            .set_window_size((w + 1280 - iw) as u32, (h + 800 - ih) as u32)
            .await
            .unwrap();
        Browser {
            client: Some(client),
            base: base.to_owned(),
            scenario,
            profile,
            driver: Some(driver),
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Opens `#<route>` of the dashboard (a full page load).
    pub async fn goto(&self, route: &str) {
        self.c()
            .goto(&format!("{}/#{route}", self.base))
            .await
            .unwrap_or_else(|e| panic!("goto {route}: {e}"));
    }

    /// Reloads the page.
    pub async fn reload(&self) {
        self.c().refresh().await.unwrap();
    }

    /// The current URL.
    pub async fn url(&self) -> String {
        self.c().current_url().await.unwrap().to_string()
    }

    /// Runs `script` (a function body) and returns its value; Null if it
    /// fails (a page being replaced), as the conditions are polled.
    pub async fn probe(&self, script: &str) -> Value {
        self.c()
            .execute(script, vec![])
            .await
            .unwrap_or(Value::Null)
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> usize {
        self.probe(&format!(
            "return document.querySelectorAll({}).length",
            js_str(css)
        ))
        .await
        .as_u64()
        .unwrap_or(0) as usize
    }

    /// The text of the first element matching `css` now, if any.
    pub async fn text(&self, css: &str) -> Option<String> {
        self.probe(&format!(
            "const e = document.querySelector({}); return e ? e.textContent : null",
            js_str(css)
        ))
        .await
        .as_str()
        .map(|s| s.trim().to_owned())
    }

    /// An attribute of the first element matching `css` now, if any.
    pub async fn attr(&self, css: &str, attr: &str) -> Option<String> {
        self.probe(&format!(
            "const e = document.querySelector({}); return e ? e.getAttribute({}) : null",
            js_str(css),
            js_str(attr)
        ))
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// The value of the form field matching `css` now, if any.
    pub async fn value(&self, css: &str) -> Option<String> {
        self.probe(&format!(
            "const e = document.querySelector({}); return e ? e.value : null",
            js_str(css)
        ))
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// Waits until `check` gives `Some`; on timeout saves a screenshot and
    /// fails with what the page shows.
    pub async fn until<T>(&self, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if start.elapsed() > DEADLINE {
                self.fail(&format!("timed out after {DEADLINE:?} waiting for {what}"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails the test with the page's URL and text and a screenshot.
    pub async fn fail(&self, why: &str) -> ! {
        let name = format!("{}-FAILED", self.scenario);
        self.save(&name).await;
        let text = self
            .probe("return document.body ? document.body.innerText : ''")
            .await;
        panic!(
            "{why}\nurl: {}\nscreenshot: {}\npage text:\n{}",
            self.url().await,
            screenshot_dir().join(format!("{name}.png")).display(),
            text.as_str().unwrap_or_default()
        );
    }

    /// Waits until an element matches `css` (and is displayed).
    pub async fn wait(&self, css: &str) {
        self.until(&format!("`{css}`"), async || {
            let e = self.c().find(Locator::Css(css)).await.ok()?;
            e.is_displayed().await.ok()?.then_some(())
        })
        .await
    }

    /// Waits until something matches `css` (displayed or not: SVG parts).
    pub async fn present(&self, css: &str) {
        self.until(&format!("`{css}`"), async || {
            (self.count(css).await > 0).then_some(())
        })
        .await
    }

    /// Waits until nothing matches `css`.
    pub async fn wait_gone(&self, css: &str) {
        self.until(&format!("`{css}` to go"), async || {
            (self.count(css).await == 0).then_some(())
        })
        .await
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        self.until(&format!("`{css}` to show {what}"), async || {
            self.text(css).await.filter(|t| ok(t))
        })
        .await
    }

    /// Waits for `css` to be displayed and enabled, then clicks it (again
    /// while the page re-renders under it).
    pub async fn click(&self, css: &str) {
        self.until(&format!("`{css}` to be clickable"), async || {
            let e = self.c().find(Locator::Css(css)).await.ok()?;
            if !e.is_displayed().await.ok()? || !e.is_enabled().await.ok()? {
                return None;
            }
            e.click().await.ok()
        })
        .await
    }

    /// Types `text` into the field `css` (after clearing it); a `<select>`
    /// gets the option with that value.
    pub async fn fill(&self, css: &str, text: &str) {
        self.until(&format!("`{css}` to take {text:?}"), async || {
            let e = self.c().find(Locator::Css(css)).await.ok()?;
            if e.tag_name().await.ok()?.eq_ignore_ascii_case("select") {
                e.select_by_value(text).await.ok()
            } else {
                e.clear().await.ok()?;
                e.send_keys(text).await.ok()
            }
        })
        .await
    }

    /// Saves a screenshot as `<name>.png` in `target/browser-screenshots`,
    /// and in `DCBFLOW_SCREENSHOTS` if `name` is one of [`DOC_SHOTS`].
    pub async fn shot(&self, name: &str) {
        self.save(name).await;
        if DOC_SHOTS.contains(&name)
            && let Some(dir) = docs_dir()
        {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(
                screenshot_dir().join(format!("{name}.png")),
                dir.join(format!("{name}.png")),
            )
            .unwrap();
        }
    }

    async fn save(&self, name: &str) {
        let png = match self.c().screenshot().await {
            Ok(png) => png,
            Err(e) => {
                eprintln!("screenshot {name}: {e}");
                return;
            }
        };
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Logs in with `token` if the page asks for one.
    pub async fn login(&self, token: &str) {
        self.wait("#token").await;
        self.fill("#token", token).await;
        self.click("#login").await;
        self.wait_gone("#token").await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Ends the session (ChromeDriver quits Chromium); the process
            // group is killed afterwards in any case.
            let _ = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(tokio::time::timeout(Duration::from_secs(5), client.close()))
            });
        }
        drop(self.driver.take());
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
