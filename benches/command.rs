//! Command execution and decision models beside raw-PostgreSQL baselines, same
//! driver, same run.
//!
//! `cargo bench --bench command` (`DCBFLOW_BENCH_QUICK=1` for a short run).
//!
//! | bench | dcbflow | baseline |
//! |---|---|---|
//! | `execute/disjoint/{1,16}` | executor on per-client counters (no contention) | per op: `SELECT` the counter's rows, then `BEGIN; INSERT; COMMIT` |
//! | `execute/hot/16/{optimistic,pessimistic}` | 16 clients on one counter | same baseline, one counter (no correctness guarantee) |
//! | `execute/raw_booking/hot/16/pessimistic` | (baseline of the hot boundary goal) | 16 clients booking on one scope with the same guarantee by hand: read the scope's events through a btree tag table, the raw-scoped conditional append after the last one, again on failure |
//! | `project/{100,100000}` | `Store::project` of a decision model over N events | `SELECT` of the same rows, fully read |
//!
//! Concurrent benches run N tokio tasks on N pooled connections and time the batch
//! (`iter_custom`), so throughput is total operations / wall time.

mod common;

use common::{Ratio, Setup};
use criterion::{BenchmarkId, Throughput};
use dcbflow::{
    Command, CommandExecutor, CommandRetry, Concurrency, Decided, Event, Projector, Query,
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

/// The raw hot-boundary booking with the same guarantee: read the scope's
/// events through the btree tag table, then the raw-scoped conditional append
/// after the last of them; when it fails (another racer booked first), read and
/// try again.
async fn raw_booking(pool: &Pool, tag: &str) {
    let c = pool.get().await.expect("connection");
    let read = c
        .prepare_cached(&format!(
            "SELECT e.position, e.data FROM {RAW}.event_tags t \
             JOIN {RAW}.scoped_events e ON e.position = t.position \
             WHERE t.tag = $1 ORDER BY t.position"
        ))
        .await
        .expect("prepare");
    let append = c
        .prepare_cached(&format!("SELECT {RAW}.append_scoped('Taken', $1, $2, $3)"))
        .await
        .expect("prepare");
    loop {
        let rows = c.query(&read, &[&tag]).await.expect("read");
        let after = rows.last().map_or(0, |r| r.get::<_, i64>(0));
        let data = json!({"n": rows.len() + 1});
        let row = c
            .query_one(&append, &[&tag, &data, &after])
            .await
            .expect("append_scoped");
        if row.get::<_, Option<i64>>(0).is_some() {
            return;
        }
    }
}

/// The schema of the raw-scoped baseline.
const RAW: &str = "bench_command_raw";

fn main() {
    let setup = Setup::new(
        SCHEMA,
        20,
        &[RAW],
        &format!("CREATE SCHEMA {RAW};{}", common::raw_scoped_sql(RAW)),
    );
    let (rt, pool, store) = (&setup.rt, &setup.pool, &setup.store);
    let mut c = common::criterion(1, 6).sample_size(10);

    let mut g = c.benchmark_group("execute");
    g.throughput(Throughput::Elements(1));
    for (name, clients, hot, mode) in [
        ("disjoint/1", 1usize, false, Concurrency::Optimistic),
        ("disjoint/16", 16, false, Concurrency::Optimistic),
        ("hot/16/optimistic", 16, true, Concurrency::Optimistic),
        ("hot/16/pessimistic", 16, true, Concurrency::Pessimistic),
    ] {
        let exec = CommandExecutor::new(store.clone())
            .retry(CommandRetry::attempts(10_000))
            .concurrency(mode);
        let tag = move |i: usize| {
            if hot {
                "counter:hot".to_string()
            } else {
                format!("counter:{i}")
            }
        };
        g.bench_function(BenchmarkId::new("dcbflow", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let exec = exec.clone();
                common::concurrent(clients, iters, move |i| {
                    let exec = exec.clone();
                    async move {
                        exec.execute(&Take(tag(i))).await.expect("execute");
                    }
                })
            })
        });
        if mode == Concurrency::Pessimistic {
            // The same guarantee by hand, on a hot scope of its own.
            g.bench_function(BenchmarkId::new("raw_booking", name), |b| {
                b.to_async(rt).iter_custom(|iters| {
                    let pool = pool.clone();
                    common::concurrent(clients, iters, move |_| {
                        let pool = pool.clone();
                        async move { raw_booking(&pool, "counter:hot").await }
                    })
                })
            });
            continue;
        }
        g.bench_function(BenchmarkId::new("raw", name), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let pool = pool.clone();
                common::concurrent(clients, iters, move |i| {
                    let pool = pool.clone();
                    async move { raw_op(&pool, &tag(i)).await }
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("project");
    for n in [100usize, 100_000] {
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
            b.to_async(rt).iter(|| async {
                dcbflow::project(store, &model)
                    .await
                    .expect("project")
                    .states
            })
        });
        g.bench_function(BenchmarkId::new("raw_select", n), |b| {
            b.to_async(rt).iter(|| async {
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
    let execute = |label, name, base| Ratio {
        label,
        ours: ("execute", "dcbflow", name),
        baseline: ("execute", "raw", base),
    };
    let project = |label, name| Ratio {
        label,
        ours: ("project", "dcbflow", name),
        baseline: ("project", "raw_select", name),
    };
    common::print_ratios(&[
        execute("execute/disjoint/1", "disjoint/1", "disjoint/1"),
        execute("execute/disjoint/16", "disjoint/16", "disjoint/16"),
        execute(
            "execute/hot/16/optimistic",
            "hot/16/optimistic",
            "hot/16/optimistic",
        ),
        execute(
            "execute/hot/16/pessimistic",
            "hot/16/pessimistic",
            "hot/16/optimistic",
        ),
        Ratio {
            label: "hot/16/pessimistic vs raw booking",
            ours: ("execute", "dcbflow", "hot/16/pessimistic"),
            baseline: ("execute", "raw_booking", "hot/16/pessimistic"),
        },
        project("project/100", "100"),
        project("project/100000", "100000"),
    ]);
    use common::goals::{Row, throughput_ratio};
    let mut rows = Vec::new();
    if let Some(r) = throughput_ratio(
        ("execute", "dcbflow", "hot/16/pessimistic"),
        ("execute", "raw_booking", "hot/16/pessimistic"),
    ) {
        rows.push(Row::ratio(
            "hot boundary, 16 racers, pessimistic vs raw booking",
            r,
            1.5,
        ));
    }
    common::goals::report("command", rows);
    setup.finish();
}
