//! Test database: one server per test process, one schema per test, dropped afterwards.

#[path = "../../../examples/support/mod.rs"]
pub mod db;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dcbflow::{
    AppendCondition, AppendResult, Cursor, Error, Event, Limits, Position, Query, ReadOptions,
    SequencedEvent, Store,
};
use serde_json::json;
use tokio::sync::Barrier;

/// A store in a fresh schema of its own; the schema is dropped when this is dropped.
pub struct TestStore {
    pub store: Store,
    pub schema: String,
    pub url: String,
}

impl TestStore {
    pub async fn new() -> Self {
        Self::with_limits(Limits::default(), None).await
    }

    pub async fn with_limits(limits: Limits, max_in_flight: Option<usize>) -> Self {
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let url = with_app_name(db::Database::shared_url(), &schema);
        let mut builder = Store::builder_for_url(&url, Some(24))
            .unwrap()
            .schema(&schema)
            .limits(limits);
        if let Some(n) = max_in_flight {
            builder = builder.max_in_flight(n);
        }
        let store = builder.build().await.expect("store");
        TestStore { store, schema, url }
    }

    /// A plain connection outside the pool, tagged with this test's application name.
    pub async fn raw(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
    }

    /// The cursor of a read of `q` now.
    pub async fn cursor(&self, q: &Query) -> Cursor {
        self.store
            .read_all(q, ReadOptions::default())
            .await
            .unwrap()
            .cursor
    }

    /// The events matching `q`, in order.
    pub async fn events(&self, q: &Query) -> Vec<SequencedEvent> {
        self.store
            .read_all(q, ReadOptions::default())
            .await
            .unwrap()
            .events
    }

    /// Appends `events` unless an event matching `q` appeared after `cursor`.
    pub async fn append_if(
        &self,
        events: Vec<Event>,
        q: &Query,
        cursor: impl Into<Cursor>,
    ) -> dcbflow::Result<AppendResult> {
        let condition = AppendCondition::new(q.clone()).after(cursor);
        self.store.append(events, Some(condition)).await
    }

    /// Number of events in the store.
    pub async fn count(&self) -> i64 {
        let c = self.store.pool().get().await.unwrap();
        c.query_one(
            &format!("SELECT count(*) FROM \"{}\".events", self.schema),
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    /// Sessions of this test that sit inside an open transaction.
    pub async fn open_transactions(&self) -> i64 {
        let c = self.raw().await;
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
            &[&self.schema],
        )
        .await
        .unwrap()
        .get(0)
    }

    /// Sessions of this test waiting for a lock (an advisory scope lock, a row, a
    /// transaction).
    pub async fn lock_waits(&self) -> i64 {
        let c = self.raw().await;
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
            &[&self.schema],
        )
        .await
        .unwrap()
        .get(0)
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        drop_schema(&self.schema);
    }
}

/// Drops a test's schema, on a connection of its own (the test's runtime may be
/// shutting down): first ends the sessions tagged with the schema as application
/// name, then waits at most 10 s for locks.
pub fn drop_schema(schema: &str) {
    let url = db::Database::shared_url().to_string();
    let schema = schema.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
            else {
                return;
            };
            tokio::spawn(conn);
            let _ = client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    &[&schema],
                )
                .await;
            let _ = client
                .batch_execute(&format!(
                    "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                ))
                .await;
        });
    })
    .join()
    .unwrap();
}

fn with_app_name(url: &str, name: &str) -> String {
    if !url.starts_with("postgres") {
        return format!("{url} application_name={name}");
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

/// An event of type `ty` with `tags` and a small payload.
pub fn ev(ty: &str, tags: &[&str]) -> Event {
    Event::new(ty, tags.iter().copied(), json!({"n": 1}))
}

/// Asserts `result` is a conflict naming `position`.
#[track_caller]
pub fn assert_conflict_at<T: std::fmt::Debug>(result: dcbflow::Result<T>, position: Position) {
    match result {
        Err(Error::Conflict { position: p }) => assert_eq!(p, position),
        other => panic!("expected a conflict at {position}, got {other:?}"),
    }
}

/// Runs `n` tasks made by `task(i)`, released at once behind a barrier; their results
/// in order.
pub async fn race<T, F, Fut>(n: usize, task: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (fut, barrier) = (task(i), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                fut.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for h in handles {
        results.push(h.await.expect("task panicked"));
    }
    results
}

/// How long a test waits for something that must happen: generous, so that a
/// loaded machine does not fail a test, yet finite.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `probe` every 15 ms until it yields a value, and returns that; panics
/// naming `what` once `deadline` has passed. The wait for a condition, instead of
/// a fixed sleep: as short as the machine allows, and never too short.
pub async fn eventually<F, Fut, T>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if tokio::time::Instant::now() >= until {
            panic!("{what}: not within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// Held by tests that measure the process's memory, and by those that make it
/// balloon: they share one test process, so they must not overlap.
pub static MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
