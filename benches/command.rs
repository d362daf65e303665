//! Command execution and decision models beside raw-PostgreSQL baselines, same
//! driver, same run.
//!
//! `cargo bench --bench command` (`DCBFLOW_BENCH_QUICK=1` for a short run).
//!
//! | bench | dcbflow | baseline |
//! |---|---|---|
//! | `execute/disjoint/{1,16}` | executor on per-client counters (no contention) | per op: `SELECT` the counter's rows, then `BEGIN; INSERT; COMMIT` |
//! | `execute/hot/16/{optimistic,pessimistic}` | 16 clients on one counter | same baseline, one counter (no correctness guarantee) |
//! | `project/{10,1000,100000}` | `Store::project` of a decision model over N events | `SELECT` of the same rows, fully read |
//!
//! Concurrent benches run N tokio tasks on N pooled connections and time the batch
//! (`iter_custom`), so throughput is total operations / wall time.

#[path = "../examples/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use dcbflow::{
    Command, CommandExecutor, Concurrency, Decided, Event, Projector, Query, RetryPolicy, Store,
    pool_from_url,
};
use deadpool_postgres::Pool;
use serde_json::json;

const SCHEMA: &str = "bench_command";

struct Take(String);

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Command for Take {
    type Model = Projector<i64>;
    type Error = Never;
    fn command_type(&self) -> &str {
        "Take"
    }
    fn model(&self) -> Projector<i64> {
        Projector::new(Query::items_of(["Taken"], [self.0.clone()]), 0, |n, _| {
            *n += 1
        })
    }
    fn decide(&self, n: i64) -> Result<Decided, Never> {
        Ok(vec![Event::new("Taken", [self.0.clone()], json!({"n": n + 1}))].into())
    }
}

async fn raw_op(pool: &Pool, tag: &str) {
    let mut c = pool.get().await.expect("connection");
    let sel = c
        .prepare_cached(&format!(
            "SELECT position, data FROM {SCHEMA}.events WHERE tags @> ARRAY[$1::text]"
        ))
        .await
        .expect("prepare");
    let rows = c.query(&sel, &[&tag]).await.expect("select");
    let tx = c.transaction().await.expect("begin");
    let ins = tx
        .prepare_cached(&format!(
            "INSERT INTO {SCHEMA}.events (transaction_id, type, tags, data) VALUES (pg_current_xact_id(), 'Raw', ARRAY[$1::text], $2)"
        ))
        .await
        .expect("prepare");
    tx.execute(&ins, &[&format!("raw-{tag}"), &json!({"n": rows.len()})])
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
}

fn main() {
    let quick = std::env::var_os("DCBFLOW_BENCH_QUICK").is_some();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt
        .block_on(support::Database::start())
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = pool_from_url(&db.url, Some(20)).expect("pool");
    let store = rt.block_on(async {
        let c = pool.get().await.expect("connection");
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
            .await
            .expect("drop");
        Store::builder(pool.clone())
            .schema(SCHEMA)
            .build()
            .await
            .expect("store")
    });
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(if quick { 2 } else { 6 }));

    let mut g = c.benchmark_group("execute");
    g.throughput(Throughput::Elements(1));
    for (name, clients, hot, mode) in [
        ("disjoint/1", 1usize, false, Concurrency::Optimistic),
        ("disjoint/16", 16, false, Concurrency::Optimistic),
        ("hot/16/optimistic", 16, true, Concurrency::Optimistic),
        ("hot/16/pessimistic", 16, true, Concurrency::Pessimistic),
    ] {
        let exec = CommandExecutor::new(store.clone())
            .retry(RetryPolicy::attempts(10_000))
            .concurrency(mode);
        let tag = move |i: usize| {
            if hot {
                "counter:hot".to_string()
            } else {
                format!("counter:{i}")
            }
        };
        g.bench_function(BenchmarkId::new("dcbflow", name), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let exec = exec.clone();
                async move {
                    let per = (iters as usize).div_ceil(clients);
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..clients)
                        .map(|i| {
                            let exec = exec.clone();
                            tokio::spawn(async move {
                                for _ in 0..per {
                                    exec.execute(&Take(tag(i))).await.expect("execute");
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("task");
                    }
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per * clients) as f64)
                }
            })
        });
        if mode == Concurrency::Pessimistic {
            continue;
        }
        let pool = Arc::new(pool.clone());
        g.bench_function(BenchmarkId::new("raw", name), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let pool = pool.clone();
                async move {
                    let per = (iters as usize).div_ceil(clients);
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..clients)
                        .map(|i| {
                            let pool = pool.clone();
                            tokio::spawn(async move {
                                for _ in 0..per {
                                    raw_op(&pool, &tag(i)).await;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("task");
                    }
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per * clients) as f64)
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("project");
    for n in [10usize, 1_000, 100_000] {
        let tag = format!("model:{n}");
        rt.block_on(async {
            for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
                let events = chunk
                    .iter()
                    .map(|i| Event::new("Counted", [tag.clone()], json!({"i": i})))
                    .collect();
                store.append(events, None).await.expect("seed");
            }
        });
        g.throughput(Throughput::Elements(n as u64));
        let model = (
            Projector::new(Query::items_of(["Counted"], [tag.clone()]), 0i64, |s, e| {
                *s += e.data()["i"].as_i64().unwrap_or(0)
            }),
            Projector::new(
                Query::items_of(["Counted"], [tag.clone()]),
                0usize,
                |c, _| *c += 1,
            ),
        );
        g.bench_function(BenchmarkId::new("dcbflow", n), |b| {
            b.to_async(&rt)
                .iter(|| async { store.project(&model).await.expect("project").states })
        });
        g.bench_function(BenchmarkId::new("raw_select", n), |b| {
            b.to_async(&rt).iter(|| async {
                let c = pool.get().await.expect("connection");
                let stmt = c
                    .prepare_cached(&format!(
                        "SELECT position, transaction_id::text, type, tags, data, metadata, id, recorded_at \
                         FROM {SCHEMA}.events WHERE tags @> ARRAY[$1::text] ORDER BY position"
                    ))
                    .await
                    .expect("prepare");
                let rows = c.query(&stmt, &[&tag]).await.expect("select");
                rows.iter().map(|r| r.get::<_, serde_json::Value>(4)["i"].as_i64().unwrap_or(0)).sum::<i64>()
            })
        });
    }
    g.finish();
    c.final_summary();
    print_ratios();

    rt.block_on(async {
        let c = pool.get().await.expect("connection");
        let _ = c
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
            .await;
    });
    drop(store);
    drop(pool);
    rt.block_on(db.close());
}

fn print_ratios() {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let mean = |group: &str, id: &str, name: &str| -> Option<f64> {
        let path = format!("{dir}/criterion/{group}/{id}/{name}/new/estimates.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    println!(
        "\n{:<28} {:>12} {:>12} {:>8}",
        "bench", "dcbflow µs", "raw µs", "ratio"
    );
    let rows = [
        ("execute", "disjoint/1", "raw", "disjoint/1"),
        ("execute", "disjoint/16", "raw", "disjoint/16"),
        ("execute", "hot/16/optimistic", "raw", "hot/16/optimistic"),
        ("execute", "hot/16/pessimistic", "raw", "hot/16/optimistic"),
        ("project", "10", "raw_select", "10"),
        ("project", "1000", "raw_select", "1000"),
        ("project", "100000", "raw_select", "100000"),
    ];
    for (group, name, base_id, base_name) in rows {
        if let (Some(d), Some(r)) = (
            mean(group, "dcbflow", &name.replace('/', "_")),
            mean(group, base_id, &base_name.replace('/', "_")),
        ) {
            println!(
                "{:<28} {:>12.1} {:>12.1} {:>7.2}x",
                format!("{group}/{name}"),
                d / 1e3,
                r / 1e3,
                r / d
            );
        }
    }
}
