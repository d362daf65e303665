//! The outbox relay against a real NATS JetStream server and a real HTTP server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcbflow::async_nats;
use dcbflow::outbox::{
    NatsPublisher, OutboxMessage, OutboxRelay, PublishFailure, Publisher, RelayOptions,
    WebhookPublisher,
};
use dcbflow::{CancellationToken, Query, SequencedEvent, Store};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{DEADLINE, TestStore, ev, eventually};

/// NATS with JetStream: `NATS_URL`, else a server on 127.0.0.1:4222, else a
/// throwaway `nats-server -js` started for this test process.
#[allow(clippy::zombie_processes)] // a watchdog shell stops it when this process exits
pub fn nats() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("NATS_URL") {
            return url;
        }
        if std::net::TcpStream::connect("127.0.0.1:4222").is_ok() {
            return "127.0.0.1:4222".into();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("dcbflow-nats-{port}"));
        let bin = ["nats-server", "/usr/sbin/nats-server", "/usr/local/bin/nats-server"]
            .into_iter()
            .find(|b| std::process::Command::new(b).arg("--version").output().is_ok())
            .expect("no NATS: set NATS_URL, run `nats-server -js`, or install nats-server (apt-get install nats-server)");
        let child = std::process::Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .spawn()
            .expect("start nats-server");
        // Stop it when this test process exits.
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; kill {}; rm -rf '{}'",
                std::process::id(),
                child.id(),
                dir.display()
            ))
            .spawn();
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..50 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        addr
    })
}

fn fast() -> RelayOptions {
    let mut o = RelayOptions::default();
    o.max_attempts = 3;
    o.backoff = dcbflow::Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    o.lease_retry = Duration::from_millis(100);
    o.subscription.poll_interval = Duration::from_millis(100);
    o
}

/// A JetStream stream for `<prefix>.>`, deleted on drop.
struct Stream {
    js: async_nats::jetstream::Context,
    name: String,
}

impl Stream {
    async fn new(prefix: &str) -> Stream {
        let client = async_nats::connect(nats())
            .await
            .expect("NATS at 127.0.0.1:4222 (see .ci/run)");
        let js = async_nats::jetstream::new(client);
        let name = prefix.to_uppercase();
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
        Stream { js, name }
    }

    /// Every message: (Nats-Msg-Id, event).
    async fn messages(&self) -> Vec<(String, SequencedEvent)> {
        let mut stream = self.js.get_stream(&self.name).await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let m = stream.get_raw_message(seq).await.unwrap();
            let id = m.headers.get("Nats-Msg-Id").unwrap().to_string();
            out.push((id, serde_json::from_slice(&m.payload).unwrap()));
        }
        out
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let (js, name) = (self.js.clone(), self.name.clone());
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move { js.delete_stream(&name).await.ok() })
        })
        .join()
        .ok();
    }
}

fn start<P: Publisher + 'static>(
    relay: OutboxRelay<P>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<dcbflow::outbox::Result<()>>,
) {
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    (cancel, tokio::spawn(async move { relay.run(token).await }))
}

async fn orders(store: &Store, n: usize) {
    for i in 0..n {
        store
            .append(
                vec![dcbflow::Event::new(
                    "OrderPlaced",
                    [format!("order:{i}")],
                    serde_json::json!({"i": i}),
                )],
                None,
            )
            .await
            .unwrap();
    }
}

async fn processed(t: &TestStore, name: &str) {
    let head = t.store.head().await.unwrap().unwrap();
    assert!(
        dcbflow::Checkpoints::new(t.store.clone())
            .wait_until_processed(name, head, DEADLINE)
            .await
            .unwrap(),
        "relay {name} did not reach {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_in_order_with_stable_ids() {
    let t = TestStore::new().await;
    let stream = Stream::new(&t.schema).await;
    orders(&t.store, 40).await;
    t.store
        .append(vec![ev("NotAnOrder", &[])], None)
        .await
        .unwrap();
    let q = Query::items_of(["OrderPlaced"], Vec::<String>::new());
    let nats = async_nats::connect(nats()).await.unwrap();
    let publisher = NatsPublisher::new(nats, &t.schema, Duration::from_secs(2));
    let (cancel, task) =
        start(OutboxRelay::new(t.store.clone(), "to-nats", q.clone(), publisher).options(fast()));
    processed(&t, "to-nats").await;
    let messages = stream.messages().await;
    assert_eq!(messages.len(), 40);
    assert!(
        messages
            .windows(2)
            .all(|w| w[0].1.position < w[1].1.position),
        "in order"
    );
    for (id, e) in &messages {
        assert_eq!(*id, format!("{}:{}", t.schema, e.position));
        assert_eq!(e.event_type(), "OrderPlaced");
    }
    let lag = dcbflow::Checkpoints::new(t.store.clone())
        .lag("to-nats", &q)
        .await
        .unwrap();
    assert_eq!(lag.events_behind, 0);
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Publishes the first `keep` messages of its first batch, then hangs: a relay that
/// dies mid-batch.
struct DiesMidBatch {
    inner: NatsPublisher,
    keep: usize,
    died: AtomicBool,
}

impl Publisher for DiesMidBatch {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        if !self.died.swap(true, Ordering::SeqCst) {
            let _ = self
                .inner
                .publish(&messages[..self.keep.min(messages.len())])
                .await;
        }
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_restarts_without_loss_and_consumers_drop_duplicates() {
    let t = TestStore::new().await;
    let stream = Stream::new(&t.schema).await;
    orders(&t.store, 30).await;
    let q = Query::items_of(["OrderPlaced"], Vec::<String>::new());
    let nats = async_nats::connect(nats()).await.unwrap();
    let publisher = NatsPublisher::new(nats, &t.schema, Duration::from_secs(2));
    let dying = DiesMidBatch {
        inner: publisher.clone(),
        keep: 12,
        died: AtomicBool::new(false),
    };
    let (_cancel, task) =
        start(OutboxRelay::new(t.store.clone(), "relay", q.clone(), dying).options(fast()));
    eventually("the dying relay publishes 12 messages", DEADLINE, {
        let stream = &stream;
        move || async move { (stream.messages().await.len() >= 12).then_some(()) }
    })
    .await;
    task.abort(); // killed mid-batch: 12 published, checkpoint not moved
    let _ = task.await;
    assert_eq!(stream.messages().await.len(), 12);

    let (cancel, task) =
        start(OutboxRelay::new(t.store.clone(), "relay", q, publisher).options(fast()));
    processed(&t, "relay").await;
    let messages = stream.messages().await;
    // JetStream dropped the re-sent duplicates by Nats-Msg-Id.
    assert_eq!(messages.len(), 30);

    // A consumer that receives some messages twice (at-least-once) applies each once.
    let mut delivered = messages.clone();
    delivered.extend(messages[..12].iter().cloned());
    let mut applied = 0;
    for (id, _) in &delivered {
        let mut client = t.store.pool().get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        if dcbflow::outbox::mark_processed(&t.store, &tx, "billing", id)
            .await
            .unwrap()
        {
            applied += 1;
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(applied, 30);
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Counts the publish attempts that failed: proof that the relay tried.
struct CountsFailures {
    inner: NatsPublisher,
    failed: Arc<std::sync::atomic::AtomicUsize>,
}

impl Publisher for CountsFailures {
    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        let result = self.inner.publish(messages).await;
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

/// A TCP proxy to NATS that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused, in effect
                }
                conns2.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(nats()).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Proxy { addr, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_is_retried_and_a_poison_event_goes_to_dead_letters() {
    let t = TestStore::new().await;
    let stream = Stream::new(&t.schema).await;
    let proxy = Proxy::start().await;
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(100))
        .connect(proxy.addr.to_string())
        .await
        .unwrap();
    let prefix = t.schema.clone();
    // Poison: its subject is bound to no stream, so JetStream never accepts it.
    let publisher = NatsPublisher::with_subject(nats, Duration::from_millis(500), move |e| {
        if e.event_type() == "Poison" {
            "unbound.poison".to_string()
        } else {
            format!("{prefix}.{}", e.event_type())
        }
    });
    let mut options = fast();
    options.max_attempts = 4;
    let q = Query::items_of(["OrderPlaced", "Poison"], Vec::<String>::new());
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = CountsFailures {
        inner: publisher.clone(),
        failed: failed.clone(),
    };
    let (cancel, task) =
        start(OutboxRelay::new(t.store.clone(), "flaky", q, counting).options(options));
    orders(&t.store, 5).await;
    processed(&t, "flaky").await;

    let failed_before = failed.load(Ordering::SeqCst);
    proxy.cut();
    orders(&t.store, 5).await;
    let poison = t
        .store
        .append(vec![ev("Poison", &[])], None)
        .await
        .unwrap()
        .positions[0];
    orders(&t.store, 5).await;
    // The relay had its chances: it tried to publish the new events, and failed,
    // three times.
    eventually("the relay tries to publish while NATS is unreachable", DEADLINE, {
        let failed = &failed;
        move || async move { (failed.load(Ordering::SeqCst) >= failed_before + 3).then_some(()) }
    })
    .await;
    assert_eq!(
        stream.messages().await.len(),
        5,
        "nothing gets through while NATS is unreachable"
    );
    proxy.restore();
    processed(&t, "flaky").await;

    let messages = stream.messages().await;
    assert_eq!(
        messages.len(),
        15,
        "everything but the poison event arrived once"
    );
    assert!(
        messages
            .windows(2)
            .all(|w| w[0].1.position < w[1].1.position)
    );
    let dead = dcbflow::outbox::DeadLetters::new(t.store.clone())
        .list("flaky")
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].position, poison);
    assert_eq!(dead[0].attempts, 4);
    assert!(!dead[0].error.is_empty());
    // Replay still fails (no stream takes it) and keeps the dead letter; discard drops it.
    let err = dcbflow::outbox::DeadLetters::new(t.store.clone())
        .replay(dead[0].id, &publisher)
        .await
        .unwrap_err();
    assert!(matches!(err, dcbflow::outbox::Error::Publish(_)), "{err:?}");
    assert_eq!(
        dcbflow::outbox::DeadLetters::new(t.store.clone())
            .list("flaky")
            .await
            .unwrap()[0]
            .attempts,
        5
    );
    assert!(
        dcbflow::outbox::DeadLetters::new(t.store.clone())
            .discard(dead[0].id)
            .await
            .unwrap()
    );
    assert!(
        dcbflow::outbox::DeadLetters::new(t.store.clone())
            .list("flaky")
            .await
            .unwrap()
            .is_empty()
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receives_idempotency_keys_in_order_and_failures_are_retried() {
    use axum::http::{HeaderMap, StatusCode};
    type Seen = Arc<Mutex<(HashMap<String, u32>, Vec<(String, i64)>)>>;
    let seen: Seen = Default::default();
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let key = headers["idempotency-key"].to_str().unwrap().to_string();
                let event: SequencedEvent = serde_json::from_slice(&body).unwrap();
                let mut s = state.lock().unwrap();
                let tries = s.0.entry(key.clone()).or_default();
                *tries += 1;
                if *tries == 1 && event.position.0 % 3 == 0 {
                    return StatusCode::SERVICE_UNAVAILABLE; // fails once, then works
                }
                s.1.push((key, event.position.0));
                StatusCode::OK
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let t = TestStore::new().await;
    orders(&t.store, 20).await;
    let publisher =
        WebhookPublisher::new(format!("http://{addr}/hook"), Duration::from_secs(5)).unwrap();
    let q = Query::items_of(["OrderPlaced"], Vec::<String>::new());
    let (cancel, task) =
        start(OutboxRelay::new(t.store.clone(), "hook", q, publisher).options(fast()));
    processed(&t, "hook").await;
    let s = seen.lock().unwrap().clone();
    assert_eq!(s.1.len(), 20, "each event accepted once");
    assert!(s.1.windows(2).all(|w| w[0].1 < w[1].1), "in order");
    for (key, position) in &s.1 {
        assert_eq!(*key, format!("{}:{position}", t.schema));
    }
    assert!(
        s.0.values().any(|n| *n == 2),
        "some deliveries were retried with the same key"
    );
    assert!(
        dcbflow::outbox::DeadLetters::new(t.store.clone())
            .list("hook")
            .await
            .unwrap()
            .is_empty()
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}
