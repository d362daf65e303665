//! A soak test: a mixed workload for a long while, sampling what would grow if
//! something leaked, and a verdict at the end.
//!
//! The workload, all at once, on one store:
//! - commands: transfers between accounts through the command executor (optimistic
//!   and pessimistic), refusing overdrafts;
//! - flows: instances of a flow with a SQL step (exactly once) and a Rust step,
//!   run by two workers;
//! - subscriptions: a live subscription counting every event, and a projection
//!   runner keeping a read model;
//! - the outbox: a relay posting the transfers to a local webhook.
//!
//! Every `SAMPLE` it records the process's RSS, the store's connections, the
//! sessions idle in a transaction, the prepared statements of a pooled
//! connection and the projection's lag. The verdict compares the last third of
//! the run with the first: RSS within +25 % (after warm-up), connections within
//! the pool, no transaction left open, prepared statements bounded, lag bounded;
//! and at the end money is conserved, every flow completed with its SQL step
//! applied once, and the subscriber, projection and webhook saw every event.
//!
//! Run with `cargo run --release --example soak [MINUTES]` (default 30; the
//! figures of the last run are in docs/reliability.md). Uses `DATABASE_URL` when
//! set, otherwise a throwaway PostgreSQL. Exits non-zero if the verdict fails.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dcbflow::flow::{Action, FlowDefinition, Flows, InstanceStatus, TaskDefinition, WorkerOptions};
use dcbflow::outbox::{OutboxRelay, WebhookPublisher};
use dcbflow::{
    BoxError, CancellationToken, Checkpoints, Command, CommandExecutor, CommandRetry, Concurrency,
    Decided, Event, ProjectionHandler, ProjectionRunner, Projector, Query, SequencedEvent, Store,
    Subscription, SubscriptionOptions,
};
use serde_json::json;
use support::BoxError as ExampleError;

const ACCOUNTS: u32 = 20;
const OPENING: i64 = 10_000;
const SAMPLE: Duration = Duration::from_secs(20);
const POOL: usize = 16;

struct Transfer {
    from: u32,
    to: u32,
    amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("insufficient funds")]
struct Insufficient;

fn account(n: u32) -> String {
    format!("account:{n}")
}

impl Command for Transfer {
    type Model = Projector<i64>;
    type Error = Insufficient;
    fn command_type(&self) -> &str {
        "Transfer"
    }
    fn model(&self) -> Projector<i64> {
        let me = account(self.from);
        Projector::new(
            Query::items_of(Vec::<String>::new(), [me.clone()]),
            0,
            move |balance, e| {
                let amount = e.data()["amount"].as_i64().unwrap_or(0);
                match e.event_type() {
                    "Opened" => *balance += amount,
                    "Transferred" if e.data()["from"] == json!(me) => *balance -= amount,
                    "Transferred" => *balance += amount,
                    _ => {}
                }
            },
        )
    }
    fn decide(&self, balance: i64) -> Result<Decided, Insufficient> {
        if balance < self.amount {
            return Err(Insufficient);
        }
        Ok(vec![Event::new(
            "Transferred",
            [account(self.from), account(self.to)],
            json!({"from": account(self.from), "to": account(self.to), "amount": self.amount}),
        )]
        .into())
    }
}

/// Counts events into a read-model table.
struct Counter(String);

impl ProjectionHandler for Counter {
    async fn apply(
        &self,
        tx: &dcbflow::deadpool_postgres::Transaction<'_>,
        events: &[SequencedEvent],
    ) -> Result<(), BoxError> {
        tx.execute(
            &format!("UPDATE {} SET n = n + $1", self.0),
            &[&(events.len() as i64)],
        )
        .await?;
        Ok(())
    }
}

/// A set of positions, one bit each.
#[derive(Default)]
struct Positions {
    words: Vec<u64>,
    count: usize,
}

impl Positions {
    fn insert(&mut self, p: usize) {
        let (w, b) = (p / 64, p % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & (1 << b) == 0 {
            self.words[w] |= 1 << b;
            self.count += 1;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    connections: i64,
    idle_in_tx: i64,
    prepared: i64,
    lag: i64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), ExampleError> {
    let minutes: f64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(30.0);
    support::run(async |db| soak(db, Duration::from_secs_f64(minutes * 60.0)).await).await
}

async fn soak(db: &support::Database, length: Duration) -> Result<(), ExampleError> {
    let schema = "soak";
    let app = format!("dcbflow-soak-{}", std::process::id());
    let url = if db.url.contains('?') {
        format!("{}&application_name={app}", db.url)
    } else {
        format!("{}?application_name={app}", db.url)
    };
    let store = Store::builder_for_url(&url, Some(POOL))?
        .schema(schema)
        .build()
        .await?;
    let admin = store.pool().get().await?;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; CREATE SCHEMA \"{schema}\";"
        ))
        .await?;
    drop(admin);
    let store = Store::builder_for_url(&url, Some(POOL))?
        .schema(schema)
        .build()
        .await?;
    let c = store.pool().get().await?;
    c.batch_execute(&format!(
        "CREATE TABLE \"{schema}\".counted (n bigint NOT NULL); INSERT INTO \"{schema}\".counted VALUES (0);
         CREATE TABLE \"{schema}\".ledger (instance text PRIMARY KEY, amount bigint NOT NULL);"
    ))
    .await?;
    drop(c);
    for n in 0..ACCOUNTS {
        store
            .append(
                vec![Event::new(
                    "Opened",
                    [account(n)],
                    json!({"amount": OPENING}),
                )],
                None,
            )
            .await?;
    }

    // The webhook the relay posts to. It keeps a bit per position (the message
    // id is `<schema>:<position>`), so that the harness itself does not grow
    // the process's memory by much while it measures it.
    let received: Arc<std::sync::Mutex<Positions>> = Arc::default();
    let hook = {
        let received = received.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let received = received.clone();
                async move {
                    if let Some(p) = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|k| k.rsplit(':').next()?.parse().ok())
                    {
                        received.lock().unwrap().insert(p);
                    }
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook_url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, hook).await });

    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    // Subscriber: counts every event.
    let seen = Arc::new(AtomicU64::new(0));
    {
        let (store, seen, cancel) = (store.clone(), seen.clone(), cancel.clone());
        let mut sub =
            Subscription::connect(&store, Query::all(), None, SubscriptionOptions::default())
                .await?;
        tasks.spawn(async move {
            while let Ok(Some(batch)) = sub.next_batch_or_cancel(&cancel).await {
                seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        });
    }
    // Projection.
    {
        let runner = ProjectionRunner::new(
            store.clone(),
            "counter",
            Query::all(),
            Counter(format!("\"{schema}\".counted")),
        );
        let cancel = cancel.clone();
        tasks.spawn(async move {
            runner.run(cancel).await.expect("projection");
        });
    }
    // Relay.
    {
        let relay = OutboxRelay::new(
            store.clone(),
            "to-hook",
            Query::items_of(["Transferred"], Vec::<String>::new()),
            WebhookPublisher::new(&hook_url, Duration::from_secs(5))?,
        );
        let cancel = cancel.clone();
        tasks.spawn(async move {
            relay.run(cancel).await.expect("relay");
        });
    }
    // Flows: a SQL step exactly once, then a Rust step.
    let flows = Flows::new(store.clone());
    flows.function("note", |_ctx| async { Ok(json!({"noted": true})) });
    let flow = FlowDefinition::builder("book")
        .task(TaskDefinition::new(
            "ledger",
            Action::sql([(
                format!("INSERT INTO \"{schema}\".ledger (instance, amount) VALUES ($1, 1)"),
                vec![json!("{{instance}}")],
            )]),
        ))
        .task(TaskDefinition::new("note", Action::rust("note")).after(["ledger"]))
        .build();
    flows.register(&flow).await?;
    for i in 0..2 {
        let worker = flows.worker(WorkerOptions::default().id(format!("soak-{i}")));
        let cancel = cancel.clone();
        tasks.spawn(async move {
            worker.run(cancel).await.expect("worker");
        });
    }
    let started_flows = Arc::new(AtomicI64::new(0));
    {
        let (flows, cancel, started) = (flows.clone(), cancel.clone(), started_flows.clone());
        tasks.spawn(async move {
            while !cancel.is_cancelled() {
                if flows.start("book", None, json!({})).await.is_ok() {
                    started.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    // Commands.
    let executed = Arc::new(AtomicU64::new(0));
    for w in 0..4u32 {
        let executor = CommandExecutor::new(store.clone())
            .retry(CommandRetry::attempts(50))
            .concurrency(if w % 2 == 0 {
                Concurrency::Optimistic
            } else {
                Concurrency::Pessimistic
            });
        let (cancel, executed) = (cancel.clone(), executed.clone());
        tasks.spawn(async move {
            let mut n = w;
            while !cancel.is_cancelled() {
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let t = Transfer {
                    from: n % ACCOUNTS,
                    to: (n / 7 + 1) % ACCOUNTS,
                    amount: i64::from(n % 50 + 1),
                };
                if t.from != t.to && executor.execute(&t).await.is_ok() {
                    executed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    // Sampling.
    let probe = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await?;
    tokio::spawn(probe.1);
    let probe = probe.0;
    let checkpoints = Checkpoints::new(store.clone());
    let began = Instant::now();
    let mut samples = Vec::new();
    while began.elapsed() < length {
        tokio::time::sleep(SAMPLE.min(length.saturating_sub(began.elapsed()))).await;
        let connections: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await?
            .get(0);
        let idle_in_tx: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                 AND state LIKE 'idle in transaction%' AND now() - state_change > interval '5 seconds'",
                &[&app],
            )
            .await?
            .get(0);
        let prepared: i64 = {
            let c = store.pool().get().await?;
            c.query_one("SELECT count(*) FROM pg_prepared_statements", &[])
                .await?
                .get(0)
        };
        let lag = checkpoints
            .lag("counter", &Query::all())
            .await?
            .events_behind;
        let s = Sample {
            at: began.elapsed(),
            rss_kib: rss_kib(),
            connections,
            idle_in_tx,
            prepared,
            lag,
        };
        println!(
            "{:>6.0}s  rss {:>7} KiB  connections {:>3}  idle-in-tx {:>2}  prepared {:>3}  lag {:>5}  commands {:>7}  flows {:>6}  seen {:>8}",
            s.at.as_secs_f64(),
            s.rss_kib,
            s.connections,
            s.idle_in_tx,
            s.prepared,
            s.lag,
            executed.load(Ordering::Relaxed),
            started_flows.load(Ordering::Relaxed),
            seen.load(Ordering::Relaxed)
        );
        samples.push(s);
    }

    // Drain: stop the load, let consumers and workers catch up.
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let head = store.head().await?.map_or(0, |p| p.0);
    let drain = Instant::now();
    let cancel = CancellationToken::new();
    let mut drainers = tokio::task::JoinSet::new();
    {
        let runner = ProjectionRunner::new(
            store.clone(),
            "counter",
            Query::all(),
            Counter(format!("\"{schema}\".counted")),
        );
        let c = cancel.clone();
        drainers.spawn(async move { runner.run(c).await.expect("projection") });
        let relay = OutboxRelay::new(
            store.clone(),
            "to-hook",
            Query::items_of(["Transferred"], Vec::<String>::new()),
            WebhookPublisher::new(&hook_url, Duration::from_secs(5))?,
        );
        let c = cancel.clone();
        drainers.spawn(async move { relay.run(c).await.expect("relay") });
        for i in 0..2 {
            let worker = flows.worker(WorkerOptions::default().id(format!("drain-{i}")));
            let c = cancel.clone();
            drainers.spawn(async move { worker.run(c).await.expect("worker") });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let conn = store.pool().get().await?;
    loop {
        let unfinished: i64 = conn
            .query_one(
                &format!(
                    "SELECT count(*) FROM \"{schema}\".flow_instances WHERE status <> 'completed'"
                ),
                &[],
            )
            .await?
            .get(0);
        let lag = checkpoints
            .lag("counter", &Query::all())
            .await?
            .events_behind;
        if unfinished == 0 && lag == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("did not drain: {unfinished} flows unfinished, lag {lag}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_in = drain.elapsed();
    cancel.cancel();
    while drainers.join_next().await.is_some() {}

    // Verdict.
    let mut problems = Vec::new();
    let all = store
        .read_all(&Query::all(), dcbflow::ReadOptions::default())
        .await?;
    let mut balances = vec![0i64; ACCOUNTS as usize];
    let mut transfers = 0;
    for e in &all.events {
        let amount = e.data()["amount"].as_i64().unwrap_or(0);
        let idx = |k: &str| -> Option<usize> {
            e.data()[k].as_str()?.strip_prefix("account:")?.parse().ok()
        };
        match e.event_type() {
            "Opened" => {
                let n: usize = e.tags()[0].strip_prefix("account:").unwrap().parse()?;
                balances[n] += amount;
            }
            "Transferred" => {
                transfers += 1;
                balances[idx("from").unwrap()] -= amount;
                balances[idx("to").unwrap()] += amount;
            }
            _ => {}
        }
    }
    if balances.iter().sum::<i64>() != i64::from(ACCOUNTS) * OPENING {
        problems.push("money not conserved".to_string());
    }
    if balances.iter().any(|b| *b < 0) {
        problems.push("a balance went negative".to_string());
    }
    let ledger: i64 = conn
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".ledger"), &[])
        .await?
        .get(0);
    let instances: i64 = conn
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".flow_instances"),
            &[],
        )
        .await?
        .get(0);
    if ledger != instances {
        problems.push(format!(
            "{ledger} SQL steps applied for {instances} instances (must be exactly one each)"
        ));
    }
    let not_completed: i64 = conn
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".flow_instances WHERE status <> $1"),
            &[&InstanceStatus::Completed.as_str()],
        )
        .await?
        .get(0);
    if not_completed > 0 {
        problems.push(format!("{not_completed} flow instances did not complete"));
    }
    let counted: i64 = conn
        .query_one(&format!("SELECT n FROM \"{schema}\".counted"), &[])
        .await?
        .get(0);
    if counted != all.events.len() as i64 {
        problems.push(format!(
            "projection counted {counted} of {} events",
            all.events.len()
        ));
    }
    let hooked = received.lock().unwrap().count;
    if hooked != transfers {
        problems.push(format!("webhook got {hooked} of {transfers} transfers"));
    }
    let third = (samples.len() / 3).max(1);
    let avg = |s: &[Sample], f: fn(&Sample) -> i64| {
        s.iter().map(f).sum::<i64>() as f64 / s.len().max(1) as f64
    };
    // The first third is warm-up (caches, pools, statement caches filling):
    // growth is judged between the middle third and the last.
    let (early, late) = (
        &samples[third.min(samples.len())..(2 * third).min(samples.len())],
        &samples[samples.len().saturating_sub(third)..],
    );
    let rss_early = avg(early, |s| s.rss_kib as i64);
    let rss_late = avg(late, |s| s.rss_kib as i64);
    if samples.len() >= 6 && rss_late > rss_early * 1.25 {
        problems.push(format!("RSS grew from {rss_early:.0} to {rss_late:.0} KiB"));
    }
    if samples.iter().any(|s| s.connections > POOL as i64 + 8) {
        problems.push("more connections than the pool and the dedicated ones".into());
    }
    if samples.iter().any(|s| s.idle_in_tx > 0) {
        problems.push("a transaction was left idle for over 5 s".into());
    }
    if samples.iter().any(|s| s.prepared > 200) {
        problems.push("a connection's prepared statements grew past 200".into());
    }
    let lag_late = avg(late, |s| s.lag);
    println!(
        "\n{:.1} min, {} events ({head} positions), {transfers} transfers, {instances} flows, drained in {:.1} s",
        length.as_secs_f64() / 60.0,
        all.events.len(),
        drained_in.as_secs_f64()
    );
    println!(
        "RSS middle third {rss_early:.0} KiB, last third {rss_late:.0} KiB; connections max {}; prepared max {}; lag last third {lag_late:.0}; listen reconnects {}",
        samples.iter().map(|s| s.connections).max().unwrap_or(0),
        samples.iter().map(|s| s.prepared).max().unwrap_or(0),
        store.stats().listen_reconnects
    );
    drop(conn);
    let c = store.pool().get().await?;
    c.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await?;
    if problems.is_empty() {
        println!("verdict: ok");
        Ok(())
    } else {
        Err(format!("verdict: {}", problems.join("; ")).into())
    }
}
