//! Subscription delivery beside a raw polling baseline, same driver, same run.
//!
//! `cargo bench --bench subscription` (`DCBFLOW_BENCH_QUICK=1` for a short run).
//!
//! | bench | dcbflow | baseline |
//! |---|---|---|
//! | `catch_up/20000` | a subscription delivering 20,000 stored events (batches of 500) | `SELECT … WHERE position > $1 ORDER BY position LIMIT 500` until caught up |
//! | `latency/live` | append one event → a live subscription hands it out (LISTEN/NOTIFY) | append → a loop polling every 5 ms sees it (and nothing guards it against late committers) |
//! | `live_100/subscribers/100` | 4 tasks appending one event each (no condition) while 100 live subscriptions (`Query::all()`, each in its own task) consume them | the same appends with no subscription (`live_100/subscribers/0`) |
//!
//! `live_100` also reports the p99 delivery latency over every subscriber and
//! event, from before the append call to the subscriber holding the event (goals:
//! throughput ratio ≥ 0.9, p99 < 5 ms).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

    let live = live_100(&mut c, rt, store);
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
        Ratio {
            label: "live_100 appends, 100 subs",
            ours: ("live_100", "subscribers", "100"),
            baseline: ("live_100", "subscribers", "0"),
        },
    ]);
    common::print_goals(&live);
    setup.finish();
}

/// Times one-event appends by 4 tasks with 0, then 100, live subscriptions
/// consuming them, and returns the goal lines: the p99 latency from before an
/// append call to each subscriber holding its event, and the subscribers' errors.
fn live_100(
    c: &mut criterion::Criterion,
    rt: &tokio::runtime::Runtime,
    store: &dcbflow::Store,
) -> Vec<common::Goal> {
    const SUBSCRIBERS: usize = 100;
    const APPENDERS: usize = 4;
    type Log = Arc<std::sync::Mutex<Vec<(i64, Instant)>>>;
    let sent: Log = Log::default();
    // Time and appends of every run (warm-up included), per number of subscribers.
    let totals: Arc<[(AtomicU64, AtomicU64); 2]> = Arc::new(Default::default());
    let overloaded = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("live_100");
    g.throughput(Throughput::Elements(1));
    let bench = |g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
                 n: usize| {
        g.bench_function(BenchmarkId::new("subscribers", n), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (store, sent, totals) = (store.clone(), sent.clone(), totals.clone());
                let overloaded = overloaded.clone();
                async move {
                    let took = common::concurrent(APPENDERS, iters, move |_| {
                        let (store, sent, overloaded) =
                            (store.clone(), sent.clone(), overloaded.clone());
                        async move {
                            let start = Instant::now();
                            let p = loop {
                                match store
                                    .append(vec![Event::new("Live100", ["l"], json!({}))], None)
                                    .await
                                {
                                    Ok(r) => break r.positions[0],
                                    // The in-flight cap is shared with the subscribers' reads.
                                    Err(dcbflow::Error::Overloaded { .. }) => {
                                        overloaded.fetch_add(1, Ordering::Relaxed);
                                        tokio::task::yield_now().await;
                                    }
                                    Err(e) => panic!("append: {e}"),
                                }
                            };
                            sent.lock().unwrap().push((p.0, start));
                        }
                    })
                    .await;
                    let t = &totals[usize::from(n > 0)];
                    t.0.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
                    t.1.fetch_add(iters, Ordering::Relaxed);
                    took
                }
            })
        });
    };
    bench(&mut g, 0);
    let head = rt.block_on(store.head()).expect("head");
    let errors = Arc::new(AtomicU64::new(0));
    let logs: Vec<Log> = (0..SUBSCRIBERS).map(|_| Log::default()).collect();
    let subscribers: Vec<_> = logs
        .iter()
        .map(|log| {
            let (store, log, errors) = (store.clone(), log.clone(), errors.clone());
            rt.spawn(async move {
                let mut sub = dcbflow::Subscription::connect(
                    &store,
                    Query::all(),
                    head,
                    SubscriptionOptions::default(),
                )
                .await
                .expect("subscribe");
                loop {
                    match sub.next_batch().await {
                        Ok(batch) => {
                            let now = Instant::now();
                            log.lock()
                                .unwrap()
                                .extend(batch.iter().map(|e| (e.position.0, now)));
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            })
        })
        .collect();
    // Let every subscriber connect and look once before the appends start.
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(1)).await });
    sent.lock().unwrap().clear();
    overloaded.store(0, Ordering::Relaxed);
    bench(&mut g, SUBSCRIBERS);
    g.finish();
    // Let the last appends arrive, then stop the subscribers.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(500)).await });
    for s in subscribers {
        s.abort();
    }
    let sent: std::collections::HashMap<i64, Instant> =
        sent.lock().unwrap().iter().copied().collect();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut missing = 0usize;
    for log in &logs {
        let got: std::collections::HashMap<i64, Instant> =
            log.lock().unwrap().iter().copied().collect();
        for (p, start) in &sent {
            match got.get(p) {
                Some(at) => latencies.push(at.saturating_duration_since(*start)),
                None => missing += 1,
            }
        }
    }
    latencies.sort();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let p99 = pct(0.99);
    eprintln!(
        "live_100: {} deliveries, p50 {:?}, p99 {:?}, max {:?}, {missing} not delivered, {} subscriber errors",
        latencies.len(),
        pct(0.5),
        p99,
        latencies.last().copied().unwrap_or_default(),
        errors.load(Ordering::Relaxed)
    );
    let per_append = |i: usize| {
        totals[i].0.load(Ordering::Relaxed) as f64
            / totals[i].1.load(Ordering::Relaxed).max(1) as f64
    };
    let ratio = per_append(0) / per_append(1);
    vec![
        common::Goal {
            label: "live_100 throughput ratio".into(),
            value: format!("{ratio:.2}x"),
            goal: ">= 0.9x".into(),
            met: ratio >= 0.9,
        },
        common::Goal {
            label: "live_100 p99 delivery".into(),
            value: format!("{:.2} ms", p99.as_secs_f64() * 1e3),
            goal: "< 5 ms".into(),
            met: p99 < Duration::from_millis(5) && !latencies.is_empty(),
        },
        common::Goal {
            label: "live_100 lost/err/overload".into(),
            value: format!(
                "{missing}/{}/{}",
                errors.load(Ordering::Relaxed),
                overloaded.load(Ordering::Relaxed)
            ),
            goal: "0/0/0".into(),
            met: missing == 0
                && errors.load(Ordering::Relaxed) == 0
                && overloaded.load(Ordering::Relaxed) == 0,
        },
    ]
}
