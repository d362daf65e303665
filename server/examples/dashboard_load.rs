//! How fast the dashboard's API calls answer on a big store: fills a fresh
//! schema with 1,000,000 events and 10,000 flow instances (some completed,
//! some paused with an incident), then times every call the dashboard's pages
//! make, over real HTTP against an in-process server.
//!
//! `cargo run --release -p dcbflow-server --example dashboard_load [EVENTS] [INSTANCES]`
//! (needs `DATABASE_URL` or a PostgreSQL on 127.0.0.1:5432; the schema is
//! dropped at the end). Figures: docs/dashboard.md.

use std::time::{Duration, Instant};

use dcbflow::flow::{FlowDefinition, TaskContext, TaskError, WorkerOptions};
use dcbflow::{CancellationToken, Event};
use dcbflow_server::app::App;
use dcbflow_server::config::Config;
use serde_json::{Value, json};

const FLOW: &str = r#"
name: load
input: { n: integer }
tasks:
  - name: a
    action: { executor: rust, function: ok }
  - name: b
    depends_on: [a]
    action: { executor: rust, function: maybe }
    retry: { max_attempts: 1 }
    on_exhausted: pause
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let instances: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = format!("dash_{}", uuid::Uuid::new_v4().simple());
    let mut config = Config::default();
    config.database.schema = schema.clone();
    config.database.pool_size = 16;
    let app = App::connect(&url, config).await?;
    let result = run(&app, events, instances).await;
    app.store
        .pool()
        .get()
        .await?
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await?;
    result
}

async fn run(app: &App, events: usize, instances: usize) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    // Domain events in batches of 1,000, 50 types, tags over 10,000 accounts.
    let mut written = 0;
    while written < events {
        let n = (events - written).min(1_000);
        let batch: Vec<Event> = (written..written + n)
            .map(|i| {
                Event::new(
                    format!("Type{}", i % 50),
                    [
                        format!("account:{}", i % 10_000),
                        format!("region:{}", i % 7),
                    ],
                    json!({"i": i, "amount": i % 1000}),
                )
            })
            .collect();
        app.store.append(batch, None).await?;
        written += n;
    }
    println!(
        "appended {events} events in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    app.flows.function("ok", |_c: TaskContext| async move {
        Ok::<_, TaskError>(json!({"ok": true}))
    });
    app.flows.function("maybe", |c: TaskContext| async move {
        if c.flow_input["n"].as_i64().unwrap_or(0) % 20 == 0 {
            Err(TaskError::fatal("every 20th fails"))
        } else {
            Ok(Value::Null)
        }
    });
    app.flows
        .register(&FlowDefinition::from_yaml(FLOW)?)
        .await?;
    let t = Instant::now();
    for i in 0..instances {
        app.flows
            .start("load", Some(&format!("key-{i:06}")), json!({"n": i}))
            .await?;
    }
    println!(
        "started {instances} instances in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for w in 0..2 {
        let worker = app
            .flows
            .worker(WorkerOptions::default().id(format!("load-{w}")));
        let stop = stop.clone();
        workers.push(tokio::spawn(async move { worker.run(stop).await }));
    }
    loop {
        let mut f = dcbflow::flow::InstanceFilter::default();
        f.status = Some(dcbflow::flow::InstanceStatus::Running);
        let running = app.flows.count_instances(&f).await?;
        if running == 0 || t.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    for w in workers {
        w.await??;
    }
    println!(
        "ran them in {:.1} s; head {}",
        t.elapsed().as_secs_f64(),
        app.store.head().await?.map_or(0, |p| p.0)
    );
    app.samples.take(app).await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = dcbflow_server::api::router(app.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let http = dcbflow::http::client_builder().build()?;
    let get = |path: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let res = http
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("request");
            assert!(res.status().is_success(), "{path}: {}", res.status());
            res.json::<Value>().await.expect("json")
        }
    };
    let some = get("/api/v1/instances?status=paused&limit=1".into()).await;
    let id = some["items"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let version = some["items"][0]["definition_version"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let groups = get("/api/v1/incidents".into()).await;
    let group = groups["items"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let pages: Vec<(&str, Vec<String>)> = vec![
        (
            "overview",
            vec!["/api/v1/overview".into(), "/api/v1/whoami".into()],
        ),
        (
            "instances",
            vec!["/api/v1/instances?limit=50".into(), "/api/v1/flows".into()],
        ),
        (
            "instances, by status",
            vec!["/api/v1/instances?status=paused&limit=50".into()],
        ),
        (
            "instances, key search",
            vec!["/api/v1/instances?q=key-0042&limit=50".into()],
        ),
        (
            "instances, time range",
            vec![format!(
                "/api/v1/instances?started_after={}&limit=50",
                (chrono::Utc::now() - chrono::Duration::minutes(5))
                    .to_rfc3339()
                    .replace('+', "%2B")
            )],
        ),
        (
            "instance detail",
            vec![
                format!("/api/v1/instances/{id}"),
                format!("/api/v1/instances/{id}/timeline"),
                format!("/api/v1/flows/load/versions/{version}"),
            ],
        ),
        (
            "incidents",
            vec![
                "/api/v1/incidents".into(),
                format!("/api/v1/incidents/{group}"),
            ],
        ),
        (
            "flows",
            vec!["/api/v1/flows".into(), "/api/v1/flows/load".into()],
        ),
        (
            "events, newest",
            vec!["/api/v1/events?limit=50&backwards=true".into()],
        ),
        (
            "events, by tag",
            vec!["/api/v1/events?tags=account:4242&limit=50".into()],
        ),
        (
            "events, by type",
            vec!["/api/v1/events?types=Type7&limit=50&backwards=true".into()],
        ),
        (
            "relays",
            vec!["/api/v1/relays".into(), "/api/v1/dead-letters".into()],
        ),
    ];
    println!("\n| page | calls | median ms | max ms |\n|---|---|---|---|");
    for (page, calls) in pages {
        let mut times = Vec::new();
        for _ in 0..15 {
            let t = Instant::now();
            for c in &calls {
                get(c.clone()).await;
            }
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {page} | {} | {:.1} | {:.1} |",
            calls.len(),
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
    Ok(())
}
