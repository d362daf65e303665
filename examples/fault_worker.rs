//! Helper process of the fault suite (`tests/fault/killed_processes.rs`), which
//! SIGKILLs it at random moments and starts it again. Not an example to learn from.
//!
//! `fault_worker setup`: creates `accounts` (four accounts of 1,000) and `effects`
//! in the schema, and registers the flow `fault_transfer`: a SQL step `transfer`
//! that moves `amount` from one account to another and records one `effects` row
//! (in one transaction with the step's completion),
//! then a SQL step `audit` that records another. SQL steps are exactly once, so
//! every instance must leave exactly one row of each and the money conserved.
//!
//! `fault_worker run`: two flow workers and an outbox relay posting every
//! `FlowCompleted` event to the webhook, until killed. Prints `ready` once running.
//!
//! Environment: `DATABASE_URL`, `FAULT_SCHEMA`, and for `run` `FAULT_WEBHOOK`.

use std::time::Duration;

use dcbflow::flow::{
    Action, FlowDefinition, Flows, TaskDefinition, TaskRetry, ValueType, WorkerOptions,
};
use dcbflow::outbox::{OutboxRelay, RelayOptions, WebhookPublisher};
use dcbflow::{CancellationToken, Query, Store};
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The flow every worker process registers (same content, same version).
fn definition(s: &str) -> FlowDefinition {
    let retry =
        TaskRetry::attempts(50).backoff(Duration::from_millis(50), Duration::from_millis(500));
    FlowDefinition::builder("fault_transfer")
        .input("from", ValueType::String)
        .input("to", ValueType::String)
        .input("amount", ValueType::Integer)
        .task(
            TaskDefinition::new(
                "transfer",
                Action::sql([
                    // One statement, rows locked in key order: concurrent
                    // transfers between the same accounts cannot deadlock.
                    (
                        format!(
                            "UPDATE \"{s}\".accounts SET balance = balance \
                             + CASE WHEN id = $1 THEN -$3::bigint ELSE $3::bigint END WHERE id IN ($1, $2)"
                        ),
                        vec![
                            json!("{{flow.input.from}}"),
                            json!("{{flow.input.to}}"),
                            json!("{{flow.input.amount}}"),
                        ],
                    ),
                    (
                        format!("INSERT INTO \"{s}\".effects (instance, step) VALUES ($1::uuid, 'transfer')"),
                        vec![json!("{{instance}}")],
                    ),
                    // Widens the window in which a kill lands inside the transaction.
                    ("SELECT pg_sleep(0.02)".to_string(), vec![]),
                ]),
            )
            .timeout(Duration::from_secs(2))
            .retry(retry.clone()),
        )
        .task(
            TaskDefinition::new(
                "audit",
                Action::sql([(
                    format!("INSERT INTO \"{s}\".effects (instance, step) VALUES ($1::uuid, 'audit')"),
                    vec![json!("{{instance}}")],
                )]),
            )
            .after(["transfer"])
            .timeout(Duration::from_secs(2))
            .retry(retry),
        )
        .build()
}

fn env(name: &str) -> Result<String, BoxError> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let mode = std::env::args().nth(1).unwrap_or_default();
    let url = env("DATABASE_URL")?;
    let schema = env("FAULT_SCHEMA")?;
    let store = Store::builder_for_url(&url, Some(10))?
        .schema(&schema)
        .build()
        .await?;
    let flows = Flows::new(store.clone());
    match mode.as_str() {
        "setup" => {
            flows.migrate().await?;
            store
                .pool()
                .get()
                .await?
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS \"{schema}\".accounts (id text PRIMARY KEY, balance bigint NOT NULL);
                     CREATE TABLE IF NOT EXISTS \"{schema}\".effects (instance uuid NOT NULL, step text NOT NULL);
                     INSERT INTO \"{schema}\".accounts VALUES ('a', 1000), ('b', 1000), ('c', 1000), ('d', 1000)
                     ON CONFLICT DO NOTHING;"
                ))
                .await?;
            let version = flows.register(&definition(&schema)).await?;
            println!("setup done: fault_transfer {version}");
            Ok(())
        }
        "run" => run(store, flows, &schema).await,
        other => Err(format!("usage: fault_worker setup|run (got {other:?})").into()),
    }
}

async fn run(store: Store, flows: Flows, schema: &str) -> Result<(), BoxError> {
    let webhook = env("FAULT_WEBHOOK")?;
    flows.register(&definition(schema)).await?;
    let cancel = CancellationToken::new();
    let pid = std::process::id();
    for w in 0..2 {
        let mut options = WorkerOptions::default().id(format!("fault-{pid}-{w}"));
        options.concurrency = 4;
        options.claim_ttl = Duration::from_secs(2);
        options.lease_grace = Duration::from_millis(200);
        options.poll_interval = Duration::from_millis(100);
        let (flows, cancel) = (flows.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                match flows.worker(options.clone()).run(cancel.clone()).await {
                    Ok(()) => return,
                    Err(e) => eprintln!("worker {w} stopped: {e}; restarting"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let mut relay_options = RelayOptions::default();
    relay_options.lease_retry = Duration::from_millis(100);
    let relay = OutboxRelay::new(
        store,
        "fault_webhook",
        Query::items_of(["FlowCompleted"], Vec::<String>::new()),
        WebhookPublisher::new(webhook, Duration::from_secs(2))?,
    )
    .options(relay_options);
    println!("ready");
    loop {
        match relay.run(cancel.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => eprintln!("relay stopped: {e}; restarting"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
