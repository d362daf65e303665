//! Scenario 5: pool exhaustion. A pool of 4 connections; 64 tasks that each hold
//! an `EventStream` (a pooled connection) and then append, and 500 tasks
//! appending, all released at once: against a fail-fast store (the default
//! in-flight limit, 4 × the pool) and, at the same time, a queueing one (an
//! in-flight limit far above the burst, so every call queues for the pool).
//! Verdict: no deadlock (everything ends within a deadline), every error typed
//! (`Error::Pool`, `Error::Timeout`, `Error::Overloaded`, never a raw database
//! error), and right after the burst a normal append succeeds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcbflow::{Event, Query, ReadOptions, Store};
use serde_json::json;
use tokio::sync::Barrier;

use crate::figure;
use crate::support::{Cluster, Verdicts, is_typed_capacity_error, kind, long, percentile_ms};

const S: &str = "pool";
const POOL: usize = 4;

/// Everything must have ended by then: the pool's wait timeout (30 s by default)
/// plus what the burst takes.
const DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn pool_exhaustion_no_deadlock_typed_errors() {
    crate::support::run(scenario());
}

#[derive(Default)]
struct Burst {
    elapsed: Duration,
    ok: usize,
    hung: usize,
    errors: BTreeMap<String, usize>,
    untyped: Vec<String>,
    ok_latency: Vec<Duration>,
    after: Option<Result<Duration, String>>,
}

fn event(tag: &str) -> Vec<Event> {
    vec![Event::new("Burst", [tag.to_string()], json!({}))]
}

enum Step {
    Ok(Duration),
    Err(dcbflow::Error),
}

async fn burst(store: Store, holders: usize, appenders: usize) -> Burst {
    let barrier = Arc::new(Barrier::new(holders + appenders));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..holders + appenders {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let work = async {
                let mut steps = Vec::new();
                let _stream = if i < holders {
                    match store.read(&Query::all(), ReadOptions::default()).await {
                        Ok(s) => Some(s),
                        Err(e) => {
                            steps.push(Step::Err(e));
                            return steps;
                        }
                    }
                } else {
                    None
                };
                let t = Instant::now();
                match store
                    .append(event(if i < holders { "holder" } else { "appender" }), None)
                    .await
                {
                    Ok(_) => steps.push(Step::Ok(t.elapsed())),
                    Err(e) => steps.push(Step::Err(e)),
                }
                steps
            };
            tokio::time::timeout(DEADLINE, work).await.ok()
        }));
    }
    let mut b = Burst::default();
    for t in tasks {
        match t.await.expect("burst task") {
            None => b.hung += 1,
            Some(steps) => {
                for s in steps {
                    match s {
                        Step::Ok(d) => {
                            b.ok += 1;
                            b.ok_latency.push(d);
                        }
                        Step::Err(e) => {
                            *b.errors.entry(kind(&e)).or_default() += 1;
                            if !is_typed_capacity_error(&e) {
                                b.untyped.push(format!("{e:?}"));
                            }
                        }
                    }
                }
            }
        }
    }
    b.elapsed = t0.elapsed();
    let t1 = Instant::now();
    b.after = Some(
        match tokio::time::timeout(Duration::from_secs(10), store.append(event("after"), None))
            .await
        {
            Ok(Ok(_)) => Ok(t1.elapsed()),
            Ok(Err(e)) => Err(kind(&e)),
            Err(_) => Err("hung for 10 s".into()),
        },
    );
    b
}

async fn scenario() {
    let (holders, appenders) = if long() { (256, 2_000) } else { (64, 500) };
    let cluster = Cluster::start_async().await;
    let schema = "fault_pool";
    let build = |app: &str, max_in_flight: Option<usize>| {
        let url = cluster.url(app);
        async move {
            let mut b =
                Store::builder(dcbflow::pool_from_url(&url, Some(POOL)).unwrap()).schema(schema);
            if let Some(n) = max_in_flight {
                b = b.max_in_flight(n);
            }
            b.build().await.expect("store")
        }
    };
    let fail_fast = build("fault_pool_fast", None).await;
    let queueing = build("fault_pool_queue", Some(10 * (holders + appenders))).await;
    let (fast, queued) = tokio::join!(
        burst(fail_fast, holders, appenders),
        burst(queueing, holders, appenders)
    );
    let mut v = Verdicts::new(S);
    for (label, mut b) in [("fail-fast", fast), ("queueing", queued)] {
        let p99 = percentile_ms(&mut b.ok_latency, 99.0);
        figure!(
            S,
            "{label} store (pool {POOL}, {holders} stream holders + {appenders} appenders): ended in {:.1} s; {} appends acknowledged (p99 {p99:.0} ms), errors {:?}, hung {}; a normal append right after: {:?}",
            b.elapsed.as_secs_f64(),
            b.ok,
            b.errors,
            b.hung,
            b.after
        );
        v.check(
            &format!("{label}: no deadlock, every task ended within {DEADLINE:?}"),
            b.hung == 0,
            format!("{} hung, {:.1} s", b.hung, b.elapsed.as_secs_f64()),
        );
        v.check(
            &format!("{label}: every error is typed (Pool, Timeout, Overloaded)"),
            b.untyped.is_empty(),
            format!(
                "{:?}; untyped: {:?}",
                b.errors,
                &b.untyped[..b.untyped.len().min(3)]
            ),
        );
        v.check(
            &format!("{label}: right after the burst a normal append succeeds"),
            matches!(b.after, Some(Ok(_))),
            format!("{:?}", b.after),
        );
    }
    v.finish();
}
