//! Subscription delivery beside a raw polling baseline, same driver, same run.
//!
//! `cargo bench --bench subscription` (`DCBFLOW_BENCH_QUICK=1` for a short run).
//!
//! | bench | dcbflow | baseline |
//! |---|---|---|
//! | `catch_up/20000` | a subscription delivering 20,000 stored events (batches of 500) | `SELECT … WHERE position > $1 ORDER BY position LIMIT 500` until caught up |
//! | `latency/live` | append one event → a live subscription hands it out (LISTEN/NOTIFY) | append → a loop polling every 5 ms sees it (and nothing guards it against late committers) |

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Ratio, Setup};
use criterion::{BenchmarkId, Throughput};
use dcbflow::{Event, Position, Query, SubscriptionOptions};
use serde_json::json;
use tokio::sync::{Mutex, mpsc};

const SCHEMA: &str = "bench_subscription";
const EVENTS: usize = 20_000;

fn main() {
    let setup = Setup::new(SCHEMA, 8, &[], "");
    let (rt, pool, store) = (&setup.rt, &setup.pool, &setup.store);
    rt.block_on(async {
        for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(5_000) {
            let events = chunk
                .iter()
                .map(|i| Event::new("Stored", [format!("k:{}", i % 100)], json!({"i": i})))
                .collect();
            store.append(events, None).await.expect("seed");
        }
    });
    let mut c = common::criterion(2, 6).sample_size(10);

    let mut g = c.benchmark_group("catch_up");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function(BenchmarkId::new("dcbflow", EVENTS), |b| {
        b.to_async(rt).iter(|| async {
            let mut sub = dcbflow::Subscription::connect(
                store,
                Query::all(),
                None,
                SubscriptionOptions::default(),
            )
            .await
            .expect("subscribe");
            let mut n = 0;
            while n < EVENTS {
                n += sub.next_batch().await.expect("batch").len();
            }
        })
    });
    g.bench_function(BenchmarkId::new("raw_poll", EVENTS), |b| {
        b.to_async(rt).iter(|| async {
            let c = pool.get().await.expect("connection");
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT position, transaction_id::text, type, tags, data, metadata, id, recorded_at \
                     FROM {SCHEMA}.events WHERE position > $1 ORDER BY position LIMIT 500"
                ))
                .await
                .expect("prepare");
            let (mut after, mut n) = (0i64, 0);
            while n < EVENTS {
                let rows = c.query(&stmt, &[&after]).await.expect("select");
                // Materialize what a subscriber hands out, as dcbflow does.
                for r in &rows {
                    let _: (String, Vec<String>, serde_json::Value) = (r.get(2), r.get(3), r.get(4));
                }
                n += rows.len();
                after = rows.last().map_or(after, |r| r.get(0));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("latency");
    // dcbflow: a live subscription forwarding positions.
    let (tx, rx) = mpsc::unbounded_channel::<Position>();
    let rx = Arc::new(Mutex::new(rx));
    // The start is read before the first append, so that no append precedes it.
    let head = rt.block_on(store.head()).expect("head");
    let live = {
        let store = store.clone();
        rt.spawn(async move {
            let mut sub = dcbflow::Subscription::connect(
                &store,
                Query::items_of(["Live"], Vec::<String>::new()),
                head,
                SubscriptionOptions::default(),
            )
            .await
            .expect("subscribe");
            loop {
                for e in sub.next_batch().await.expect("batch") {
                    let _ = tx.send(e.position);
                }
            }
        })
    };
    g.bench_function(BenchmarkId::new("dcbflow", "live"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let rx = rx.clone();
            async move {
                let mut rx = rx.lock().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let p = store
                        .append(vec![Event::new("Live", ["l"], json!({}))], None)
                        .await
                        .expect("append")
                        .positions[0];
                    while rx.recv().await.expect("live") < p {}
                    total += start.elapsed();
                }
                total
            }
        })
    });
    live.abort();
    // Baseline: poll every 5 ms.
    let (tx, rx) = mpsc::unbounded_channel::<i64>();
    let rx = Arc::new(Mutex::new(rx));
    let start = rt.block_on(store.head()).expect("head").map_or(0, |p| p.0);
    let poller = {
        let pool = pool.clone();
        rt.spawn(async move {
            let c = pool.get().await.expect("connection");
            let mut after: i64 = start;
            loop {
                let rows = c
                    .query(&format!("SELECT position FROM {SCHEMA}.events WHERE position > $1 AND type = 'Raw' ORDER BY position"), &[&after])
                    .await
                    .expect("poll");
                for r in &rows {
                    after = r.get(0);
                    let _ = tx.send(after);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    g.bench_function(BenchmarkId::new("raw_poll", "live"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (rx, pool) = (rx.clone(), pool.clone());
            async move {
                let mut rx = rx.lock().await;
                let c = pool.get().await.expect("connection");
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let p: i64 = c
                        .query_one(&format!("INSERT INTO {SCHEMA}.events (transaction_id, type, tags, data) VALUES (pg_current_xact_id(), 'Raw', '{{}}', '{{}}') RETURNING position"), &[])
                        .await
                        .expect("insert")
                        .get(0);
                    while rx.recv().await.expect("poll") < p {}
                    total += start.elapsed();
                }
                total
            }
        })
    });
    poller.abort();
    g.finish();
    c.final_summary();
    common::print_ratios(&[
        Ratio {
            label: "catch_up (events/s)",
            ours: ("catch_up", "dcbflow", "20000"),
            baseline: ("catch_up", "raw_poll", "20000"),
        },
        Ratio {
            label: "latency append→handler",
            ours: ("latency", "dcbflow", "live"),
            baseline: ("latency", "raw_poll", "live"),
        },
    ]);
    setup.finish();
}
