//! HTTPS end to end: the flow engine's HTTP tasks and the outbox's webhooks
//! against a local TLS server with a self-signed certificate, trusted through
//! the client the caller hands in; and a client that does not trust it, which
//! must fail, so that the tests cannot pass over plain HTTP or without
//! certificate verification.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use dcbflow::flow::{Action, FlowDefinition, Flows, InstanceStatus, TaskDefinition, ValueType};
use dcbflow::outbox::{OutboxRelay, RelayOptions, WebhookPublisher};
use dcbflow::{CancellationToken, Event, Query, SequencedEvent};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::flow::{Workers, wait_for};
use crate::support::{DEADLINE, TestStore, eventually};

// ---------------------------------------------------------------------------
// The HTTPS server.
// ---------------------------------------------------------------------------

/// One request the server received.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    path: String,
    idempotency_key: Option<String>,
    /// The body as JSON (`Null` when empty or not JSON).
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A TCP listener that completes a TLS handshake before handing a connection to
/// axum. A failed (or stalled) handshake is counted and the next connection
/// accepted: one bad client never stops the server.
struct TlsListener {
    tcp: TcpListener,
    tls: TlsAcceptor,
    failed_handshakes: Arc<AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                // ECONNABORTED and the like: the next one.
                Err(_) => continue,
            };
            // Bounded, so that a client that never finishes its handshake
            // cannot block the (sequential) accept loop for good.
            match tokio::time::timeout(Duration::from_secs(10), self.tls.accept(tcp)).await {
                Ok(Ok(stream)) => return (stream, addr),
                Ok(Err(_)) | Err(_) => {
                    self.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An HTTPS server on 127.0.0.1 with a fresh self-signed certificate for
/// `localhost` and `127.0.0.1`. Every request, to any path, is recorded and
/// answered with `{"path", "key", "echo"}` (the request's path, its
/// `Idempotency-Key` and its JSON body). Stopped when dropped.
struct HttpsServer {
    port: u16,
    /// The certificate, PEM: what a client must trust.
    cert_pem: String,
    requests: Log,
    failed_handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsServer {
    async fn start() -> Self {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("self-signed certificate");
        let cert_pem = certified.cert.pem();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server certificate");

        let requests: Log = Arc::default();
        let log = requests.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let log = log.clone();
            async move {
                let seen = Seen {
                    path: uri.path().to_owned(),
                    idempotency_key: headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                };
                let reply = json!({
                    "path": seen.path,
                    "key": seen.idempotency_key,
                    "echo": seen.body,
                });
                log.lock().unwrap().push(seen);
                axum::Json(reply)
            }
        });

        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = tcp.local_addr().unwrap().port();
        let failed_handshakes = Arc::new(AtomicUsize::new(0));
        let listener = TlsListener {
            tcp,
            tls: TlsAcceptor::from(Arc::new(config)),
            failed_handshakes: failed_handshakes.clone(),
        };
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        HttpsServer {
            port,
            cert_pem,
            requests,
            failed_handshakes,
            task,
        }
    }

    /// `https://127.0.0.1:<port><path>`.
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The requests received so far, in order.
    fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests received so far on `path`, in order.
    fn requests_to(&self, path: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    fn failed_handshakes(&self) -> usize {
        self.failed_handshakes.load(Ordering::SeqCst)
    }

    /// A client built the crate's way that trusts this server's certificate
    /// (and nothing else).
    fn trusting_client(&self) -> reqwest::Client {
        let cert = reqwest::Certificate::from_pem(self.cert_pem.as_bytes()).expect("PEM");
        dcbflow::http::client_builder()
            .tls_certs_only([cert])
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The error and its sources, one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// The negative control: a client that does not trust the self-signed
/// certificate (the crate's default client: platform roots) fails the TLS
/// handshake, and the server sees no request but a failed handshake; so the
/// server really speaks TLS and clients really verify it. The same request
/// with the trusting client goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_and_a_trusted_one_accepted() {
    let server = HttpsServer::start().await;

    let untrusting = dcbflow::http::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let err = untrusting
        .post(server.url("/probe"))
        .json(&json!({"n": 1}))
        .send()
        .await
        .expect_err("an untrusted self-signed certificate must be refused");
    let why = chain(&err);
    assert!(err.is_connect(), "a connect (TLS) error: {why}");
    let lower = why.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("unknownissuer"),
        "the error says why: {why}"
    );
    eventually("the server sees the failed handshake", DEADLINE, || async {
        (server.failed_handshakes() >= 1).then_some(())
    })
    .await;
    assert!(
        server.requests().is_empty(),
        "no request got through: {:?}",
        server.requests()
    );

    // Plain HTTP to the TLS port gets no HTTP answer either.
    let plain = untrusting
        .get(format!("http://127.0.0.1:{}/probe", server.port))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP is not served: {plain:?}");
    assert!(server.requests().is_empty());

    // The positive side: trusting the certificate, the same call works.
    let reply: Value = server
        .trusting_client()
        .post(server.url("/probe"))
        .header("Idempotency-Key", "k-1")
        .json(&json!({"n": 1}))
        .send()
        .await
        .expect("a trusting client connects")
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        reply,
        json!({"path": "/probe", "key": "k-1", "echo": {"n": 1}})
    );
    assert_eq!(
        server.requests(),
        vec![Seen {
            path: "/probe".into(),
            idempotency_key: Some("k-1".into()),
            body: json!({"n": 1}),
        }]
    );
}

/// A flow whose one task POSTs to an https:// URL, on an engine given a client
/// that trusts the server: the instance completes, the server got exactly one
/// request carrying the step's idempotency key and the rendered body, and the
/// task's output is the server's JSON reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_task_calls_an_https_endpoint() {
    let server = HttpsServer::start().await;
    let t = TestStore::new().await;
    let flows = Flows::with_http_client(t.store.clone(), server.trusting_client())
        .http_policy(dcbflow::flow::HttpPolicy::default().allow_loopback(true));
    let def = FlowDefinition::builder("reserve_tls")
        .input("sku", ValueType::String)
        .task(TaskDefinition::new(
            "reserve",
            Action::http(
                "POST",
                format!("https://127.0.0.1:{}/reserve", server.port),
                Some(json!({"sku": "{{flow.input.sku}}", "qty": 2})),
            ),
        ))
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("reserve_tls", None, json!({"sku": "A-1"}))
        .await
        .unwrap()
        .instance;
    let state = wait_for(&flows, id, InstanceStatus::Completed, DEADLINE.as_secs()).await;
    workers.stop().await;

    let key = format!("{id}/reserve/action");
    let body = json!({"sku": "A-1", "qty": 2});
    assert_eq!(
        server.requests(),
        vec![Seen {
            path: "/reserve".into(),
            idempotency_key: Some(key.clone()),
            body: body.clone(),
        }],
        "exactly one request, with the step's idempotency key"
    );
    assert_eq!(
        state.outputs["reserve"],
        json!({"path": "/reserve", "key": key, "echo": body}),
        "the output is the server's reply"
    );
    assert_eq!(server.failed_handshakes(), 0);
}

/// An outbox relay with a webhook publisher whose client trusts the server
/// delivers every event over HTTPS, in order, each with its idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_delivers_over_https() {
    const N: usize = 5;
    let server = HttpsServer::start().await;
    let t = TestStore::new().await;
    for i in 0..N {
        t.store
            .append(
                vec![Event::new(
                    "OrderPlaced",
                    [format!("order:{i}")],
                    json!({"i": i}),
                )],
                None,
            )
            .await
            .unwrap();
    }
    let q = Query::items_of(["OrderPlaced"], Vec::<String>::new());
    let events = t.events(&q).await;
    assert_eq!(events.len(), N);

    let publisher =
        WebhookPublisher::with_client(server.trusting_client(), server.url("/hook")).unwrap();
    let mut options = RelayOptions::default();
    options.backoff = dcbflow::Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    options.subscription.poll_interval = Duration::from_millis(100);
    let relay = OutboxRelay::new(t.store.clone(), "https-hook", q, publisher).options(options);
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { relay.run(cancel).await }
    });

    let seen = eventually("the server receives every event", DEADLINE, || async {
        let seen = server.requests_to("/hook");
        (seen.len() >= N).then_some(seen)
    })
    .await;
    cancel.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(seen.len(), N, "each event once: {seen:?}");
    for (got, want) in seen.iter().zip(&events) {
        assert_eq!(
            got.idempotency_key.as_deref(),
            Some(format!("{}:{}", t.schema, want.position).as_str())
        );
        let delivered: SequencedEvent =
            serde_json::from_value(got.body.clone()).expect("the body is the event");
        assert_eq!(delivered.position, want.position, "in order");
        assert_eq!(delivered.event_type(), "OrderPlaced");
        assert_eq!(delivered.data(), want.data());
    }
    assert_eq!(server.failed_handshakes(), 0);
}
