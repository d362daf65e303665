//! Append throughput beside a raw-PostgreSQL baseline doing the same minimal work
//! over the same driver in the same run.
//!
//! `cargo bench --bench append` (set `DCBFLOW_BENCH_QUICK=1` for a short run).
//! Uses `DATABASE_URL` when set, otherwise a throwaway PostgreSQL.
//!
//! | bench | dcbflow | baseline |
//! |---|---|---|
//! | single | `append` of 1 event, no condition | one `INSERT` of one row (same columns and indexes), autocommit |
//! | batch_10, batch_100 | `append` of 10 / 100 events | one `INSERT ... SELECT FROM unnest(...)` of 10 / 100 rows |
//! | conditional | `append` of 1 event with a condition on its own tag, after the position of that tag's previous append | one `INSERT` of one row |
//! | append_concurrent/{1,4,16,64} | N tasks on N pooled connections appending 1 event each, with and without group commit | N tasks each running one single-row `INSERT` transaction |
//! | append_concurrent/dcbflow_conditional/{1,4,16,64} | N tasks each appending 1 event with a condition on its own tag (disjoint scopes) after its previous append; any conflict fails the bench | the same raw `INSERT` at N clients |
//! | append_concurrent/dcbflow_conditional_group_commit/{1,4,16,64} | the same conditional appends through a group-commit store | the same raw `INSERT` at N clients |
//! | append_concurrent/raw_scoped/{1,4,16,64} | (baseline of the conditional rows) | the same guarantee in raw SQL: a PL/pgSQL function that takes one advisory lock keyed by the condition's tag, checks `EXISTS` over a btree `event_tags(tag, position)` joined to `events` after the client's last position, and inserts the event and its tag row |
//!
//! After criterion's own report, a table of dcbflow/baseline ratios is printed
//! (throughput ratio: 1.0 means as fast as raw PostgreSQL).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Ratio, Setup};
use criterion::{BenchmarkId, Throughput};
use dcbflow::{AppendCondition, Cursor, Event, Query};
use serde_json::json;

const STORE_SCHEMA: &str = "bench_append";
const RAW_SCHEMA: &str = "bench_append_raw";

fn payload(i: u64) -> serde_json::Value {
    json!({"account": i % 1000, "amount": 42, "currency": "EUR", "note": "bench"})
}

fn raw_schema_sql() -> String {
    format!(
        "CREATE SCHEMA {RAW_SCHEMA};
         CREATE TABLE {RAW_SCHEMA}.events (
             position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
             type text NOT NULL, tags text[] NOT NULL, data jsonb NOT NULL, metadata jsonb,
             id uuid UNIQUE, recorded_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX ON {RAW_SCHEMA}.events USING gin (tags) WITH (fastupdate = off);
         CREATE INDEX ON {RAW_SCHEMA}.events (type, position);
         CREATE INDEX ON {RAW_SCHEMA}.events (transaction_id);
         -- raw-plain: the same event as one row of a table with only a primary key.
         CREATE TABLE {RAW_SCHEMA}.plain_events (
             position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             type text NOT NULL, tags text[] NOT NULL, data jsonb NOT NULL);"
    ) + &common::raw_scoped_sql(RAW_SCHEMA)
}

fn main() {
    let setup = Setup::new(STORE_SCHEMA, 72, &[RAW_SCHEMA], &raw_schema_sql());
    BENCH_URL.set(setup.db.url.clone()).expect("set once");
    let (rt, pool) = (&setup.rt, &setup.pool);
    // The plain path, every append its own transaction (group commit is on by
    // default; the group-commit rows build their own handle).
    let unbatched = rt
        .block_on(
            dcbflow::Store::builder(pool.clone())
                .schema(STORE_SCHEMA)
                .group_commit(0)
                .migrate(false)
                .build(),
        )
        .expect("plain store");
    let store = &unbatched;
    // The goal windows first, on tables that every side starts empty: after
    // criterion's groups, the store's table and indexes hold millions of events
    // and the raw-plain and raw-scoped tables almost none.
    goals(rt, pool, store);
    let mut c = common::criterion(3, 8);
    let counter = AtomicU64::new(0);
    let next = || counter.fetch_add(1, Ordering::Relaxed);

    let mut group = c.benchmark_group("append");
    for (name, n) in [("single", 1u64), ("batch_10", 10), ("batch_100", 100)] {
        group.throughput(Throughput::Elements(n));
        group.bench_function(BenchmarkId::new("dcbflow", name), |b| {
            b.to_async(rt).iter(|| async {
                let events = (0..n)
                    .map(|_| {
                        let i = next();
                        Event::new("Deposited", [format!("account:{}", i % 1000)], payload(i))
                    })
                    .collect();
                store.append(events, None).await.expect("append")
            })
        });
        group.bench_function(BenchmarkId::new("raw_insert", name), |b| {
            b.to_async(rt).iter(|| async {
                let client = pool.get().await.expect("connection");
                let stmt = client
                    .prepare_cached(&format!(
                        "INSERT INTO {RAW_SCHEMA}.events (type, tags, data) \
                         SELECT 'Deposited', ARRAY[t], d FROM unnest($1::text[], $2::jsonb[]) AS u(t, d)"
                    ))
                    .await
                    .expect("prepare");
                let (mut tags, mut data) = (Vec::new(), Vec::new());
                for _ in 0..n {
                    let i = next();
                    tags.push(format!("account:{}", i % 1000));
                    data.push(payload(i));
                }
                client.execute(&stmt, &[&tags, &data]).await.expect("insert")
            })
        });
    }

    // Conditional: each iteration decides on its own account (disjoint scopes), with
    // the cursor of that account's previous append, as a command handler would.
    group.throughput(Throughput::Elements(1));
    let cursors: std::sync::Mutex<std::collections::HashMap<u64, Cursor>> = Default::default();
    group.bench_function(BenchmarkId::new("dcbflow", "conditional"), |b| {
        b.to_async(rt).iter(|| async {
            let i = next();
            let account = i % 1000;
            let tag = format!("cond:{account}");
            let query = Query::items_of(["Deposited"], [tag.clone()]);
            let cursor = cursors.lock().unwrap().get(&account).cloned();
            let mut condition = AppendCondition::new(query);
            if let Some(c) = cursor {
                condition = condition.after(c);
            }
            let r = store
                .append(
                    vec![Event::new("Deposited", [tag], payload(i))],
                    Some(condition),
                )
                .await
                .expect("no conflicts on disjoint scopes");
            cursors
                .lock()
                .unwrap()
                .insert(account, Cursor::at(r.last_position()));
        })
    });
    group.bench_function(BenchmarkId::new("raw_insert", "conditional"), |b| {
        b.to_async(rt).iter(|| async {
            let client = pool.get().await.expect("connection");
            let stmt = client
                .prepare_cached(&format!(
                    "INSERT INTO {RAW_SCHEMA}.events (type, tags, data) VALUES ('Deposited', ARRAY[$1::text], $2)"
                ))
                .await
                .expect("prepare");
            let i = next();
            client
                .execute(&stmt, &[&format!("cond:{}", i % 1000), &payload(i)])
                .await
                .expect("insert")
        })
    });
    group.finish();

    // Concurrent clients, each appending one event per operation: without and with
    // group commit, beside one single-row INSERT transaction per operation.
    let grouped = rt
        .block_on(
            dcbflow::Store::builder(pool.clone())
                .schema(STORE_SCHEMA)
                .group_commit(128)
                .max_in_flight(4096)
                .migrate(false)
                .build(),
        )
        .expect("group-commit store");
    let mut group = c.benchmark_group("append_concurrent");
    group.throughput(Throughput::Elements(1));
    let insert_sql = format!(
        "INSERT INTO {RAW_SCHEMA}.events (type, tags, data) VALUES ('Deposited', ARRAY[$1::text], $2)"
    );
    for clients in [1usize, 4, 16, 64] {
        // Conditional on disjoint scopes: client i only ever decides on `disjoint:i`,
        // after the cursor of its own previous append; a conflict fails the bench.
        let run = next();
        for (id, s) in [
            ("dcbflow_conditional", store),
            ("dcbflow_conditional_group_commit", &grouped),
        ] {
            group.bench_function(BenchmarkId::new(id, clients), |b| {
                b.to_async(rt).iter_custom(|iters| {
                    let op = conditional(s, clients, &format!("{run}:{}", next()));
                    common::concurrent(clients, iters, move |i| op(i))
                })
            });
        }
        for (id, s) in [("dcbflow", store), ("dcbflow_group_commit", &grouped)] {
            group.bench_function(BenchmarkId::new(id, clients), |b| {
                b.to_async(rt).iter_custom(|iters| {
                    let op = plain(s);
                    common::concurrent(clients, iters, move |i| op(i))
                })
            });
        }
        group.bench_function(BenchmarkId::new("raw_scoped", clients), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let op = raw_scoped(pool, clients, &format!("{run}:{}", next()));
                common::concurrent(clients, iters, move |i| op(i))
            })
        });
        group.bench_function(BenchmarkId::new("raw_insert", clients), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (pool, sql) = (pool.clone(), insert_sql.clone());
                common::concurrent(clients, iters, move |i| {
                    let (pool, sql) = (pool.clone(), sql.clone());
                    async move {
                        let c = pool.get().await.expect("connection");
                        let stmt = c.prepare_cached(&sql).await.expect("prepare");
                        c.execute(&stmt, &[&format!("account:{i}"), &payload(i as u64)])
                            .await
                            .expect("insert");
                    }
                })
            })
        });
    }
    group.finish();

    c.final_summary();

    let ratio = |name| Ratio {
        label: name,
        ours: ("append", "dcbflow", name),
        baseline: ("append", "raw_insert", name),
    };
    let concurrent = |label, id, clients| Ratio {
        label,
        ours: ("append_concurrent", id, clients),
        baseline: ("append_concurrent", "raw_insert", clients),
    };
    let scoped = |label, id, clients| Ratio {
        label,
        ours: ("append_concurrent", id, clients),
        baseline: ("append_concurrent", "raw_scoped", clients),
    };
    common::print_ratios(&[
        ratio("single"),
        ratio("batch_10"),
        ratio("batch_100"),
        ratio("conditional"),
        concurrent("1 client", "dcbflow", "1"),
        concurrent("4 clients", "dcbflow", "4"),
        concurrent("16 clients", "dcbflow", "16"),
        concurrent("64 clients", "dcbflow", "64"),
        concurrent("1 client, conditional", "dcbflow_conditional", "1"),
        concurrent("4 clients, conditional", "dcbflow_conditional", "4"),
        concurrent("16 clients, conditional", "dcbflow_conditional", "16"),
        concurrent("64 clients, conditional", "dcbflow_conditional", "64"),
        concurrent(
            "1 client, conditional, group commit",
            "dcbflow_conditional_group_commit",
            "1",
        ),
        concurrent(
            "4 clients, conditional, group commit",
            "dcbflow_conditional_group_commit",
            "4",
        ),
        concurrent(
            "16 clients, conditional, group commit",
            "dcbflow_conditional_group_commit",
            "16",
        ),
        concurrent(
            "64 clients, conditional, group commit",
            "dcbflow_conditional_group_commit",
            "64",
        ),
        scoped(
            "1 client, conditional vs raw-scoped",
            "dcbflow_conditional",
            "1",
        ),
        scoped(
            "4 clients, conditional vs raw-scoped",
            "dcbflow_conditional",
            "4",
        ),
        scoped(
            "16 clients, conditional vs raw-scoped",
            "dcbflow_conditional",
            "16",
        ),
        scoped(
            "64 clients, conditional vs raw-scoped",
            "dcbflow_conditional",
            "64",
        ),
        scoped(
            "16 clients, conditional, group commit vs raw-scoped",
            "dcbflow_conditional_group_commit",
            "16",
        ),
        concurrent("1 client, group commit", "dcbflow_group_commit", "1"),
        concurrent("4 clients, group commit", "dcbflow_group_commit", "4"),
        concurrent("16 clients, group commit", "dcbflow_group_commit", "16"),
        concurrent("64 clients, group commit", "dcbflow_group_commit", "64"),
    ]);
    setup.finish();
}

type Op = Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// One event, no condition, on its own account tag.
fn plain(store: &dcbflow::Store) -> Op {
    let store = store.clone();
    Arc::new(move |i| {
        let store = store.clone();
        Box::pin(async move {
            let e = Event::new("Deposited", [format!("account:{i}")], payload(i as u64));
            store.append(vec![e], None).await.expect("append");
        })
    })
}

/// One event per client with a condition on the client's own tag (disjoint
/// scopes), after its previous append; a conflict fails the bench.
fn conditional(store: &dcbflow::Store, clients: usize, run: &str) -> Op {
    let store = store.clone();
    let cursors: Arc<Vec<std::sync::Mutex<Option<Cursor>>>> =
        Arc::new((0..clients).map(|_| Default::default()).collect());
    let run = run.to_owned();
    Arc::new(move |i| {
        let (store, cursors) = (store.clone(), cursors.clone());
        let tag = format!("goal:{run}:{i}");
        Box::pin(async move {
            let mut condition = AppendCondition::new(Query::items_of(["Deposited"], [tag.clone()]));
            let last = cursors[i].lock().unwrap().clone();
            if let Some(c) = last {
                condition = condition.after(c);
            }
            let e = Event::new("Deposited", [tag], payload(i as u64));
            let r = store
                .append(vec![e], Some(condition))
                .await
                .expect("no conflicts on disjoint scopes");
            *cursors[i].lock().unwrap() = Some(Cursor::at(r.last_position()));
        })
    })
}

/// raw-plain: a single-row INSERT into a table with only a primary key.
fn raw_plain(pool: &deadpool_postgres::Pool) -> Op {
    let pool = pool.clone();
    Arc::new(move |i| {
        let pool = pool.clone();
        Box::pin(async move {
            let c = pool.get().await.expect("connection");
            let stmt = c
                .prepare_cached(&format!(
                    "INSERT INTO {RAW_SCHEMA}.plain_events (type, tags, data) VALUES ('Deposited', ARRAY[$1::text], $2)"
                ))
                .await
                .expect("prepare");
            c.execute(&stmt, &[&format!("account:{i}"), &payload(i as u64)])
                .await
                .expect("insert");
        })
    })
}

/// raw-scoped: the hand-written conditional append on the client's own tag.
fn raw_scoped(pool: &deadpool_postgres::Pool, clients: usize, run: &str) -> Op {
    let pool = pool.clone();
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let run = run.to_owned();
    Arc::new(move |i| {
        let (pool, last) = (pool.clone(), last.clone());
        let tag = format!("goal:{run}:{i}");
        Box::pin(async move {
            let c = pool.get().await.expect("connection");
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT {RAW_SCHEMA}.append_scoped('Deposited', $1, $2, $3)"
                ))
                .await
                .expect("prepare");
            let after = last[i].load(Ordering::Relaxed) as i64;
            let row = c
                .query_one(&stmt, &[&tag, &payload(i as u64), &after])
                .await
                .expect("append_scoped");
            let position: Option<i64> = row.get(0);
            last[i].store(
                position.expect("no conflicts on disjoint scopes") as u64,
                Ordering::Relaxed,
            );
        })
    })
}

/// A goal workload: ours against a baseline at `clients` clients.
struct Workload {
    label: &'static str,
    clients: usize,
    ours: Op,
    baseline: Op,
    bound: f64,
}

/// The issue-14 goals of the append path, each a median of 3 interleaved
/// windows of ours and the baseline (1 in a quick run), with the server's CPU
/// per operation and the machine's busy share beside each figure.
fn goals(rt: &tokio::runtime::Runtime, pool: &deadpool_postgres::Pool, store: &dcbflow::Store) {
    use common::goals::{Row, window};
    let quick = common::goals::quick();
    let (rounds, secs) = if quick { (1, 2) } else { (3, 10) };
    let grouped = |max_in_flight| {
        rt.block_on(
            dcbflow::Store::builder(pool.clone())
                .schema(STORE_SCHEMA)
                .group_commit(128)
                .max_in_flight(max_in_flight)
                .migrate(false)
                .build(),
        )
        .expect("group-commit store")
    };
    let gc = grouped(4096);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let workloads = vec![
        Workload {
            label: "unconditional, 1 client, vs raw-plain",
            clients: 1,
            ours: plain(store),
            baseline: raw_plain(pool),
            bound: 0.8,
        },
        Workload {
            label: "unconditional, 16 clients, vs raw-plain",
            clients: 16,
            ours: plain(store),
            baseline: raw_plain(pool),
            bound: 0.8,
        },
        Workload {
            label: "conditional, 1 client, vs raw-scoped",
            clients: 1,
            ours: conditional(store, 1, &format!("{run}a")),
            baseline: raw_scoped(pool, 1, &format!("{run}a")),
            bound: 0.8,
        },
        Workload {
            label: "conditional, 16 clients, vs raw-scoped",
            clients: 16,
            ours: conditional(store, 16, &format!("{run}b")),
            baseline: raw_scoped(pool, 16, &format!("{run}b")),
            bound: 0.8,
        },
        Workload {
            label: "group commit, unconditional, 16 clients, vs raw-plain",
            clients: 16,
            ours: plain(&gc),
            baseline: raw_plain(pool),
            bound: 2.0,
        },
        Workload {
            label: "group commit, conditional, 16 clients, vs raw-scoped",
            clients: 16,
            ours: conditional(&gc, 16, &format!("{run}c")),
            baseline: raw_scoped(pool, 16, &format!("{run}c")),
            bound: 1.5,
        },
        Workload {
            label: "group commit, unconditional, 64 clients, vs raw-plain",
            clients: 64,
            ours: plain(&gc),
            baseline: raw_plain(pool),
            bound: 3.0,
        },
        Workload {
            label: "group commit vs plain path, 1 client",
            clients: 1,
            ours: plain(&gc),
            baseline: plain(store),
            bound: 1.0,
        },
    ];
    let mut rows = Vec::new();
    println!(
        "\n{:<54} {:>8} {:>8} {:>6} {:>13} {:>13} {:>9}",
        "goal workload (median of windows); ours/baseline",
        "ours/s",
        "base/s",
        "ratio",
        "server ms/op",
        "client ms/op",
        "busy"
    );
    for w in &workloads {
        let mut ratios = Vec::new();
        let mut last = None;
        for round in 0..rounds {
            // Alternate which goes first, so that drift favours neither.
            let run = |op: &Op| {
                let op = op.clone();
                rt.block_on(window(w.clients, Duration::from_secs(secs), move |i| op(i)))
            };
            let (ours, base) = if round % 2 == 0 {
                let o = run(&w.ours);
                (o, run(&w.baseline))
            } else {
                let b = run(&w.baseline);
                (run(&w.ours), b)
            };
            ratios.push(ours.per_second() / base.per_second());
            last = Some((ours, base));
        }
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        let (ours, base) = last.expect("one round");
        println!(
            "{:<54} {:>8.0} {:>8.0} {:>5.2}x {:>6.3}/{:<6.3} {:>6.3}/{:<6.3} {:>4.0}/{:<3.0}%",
            w.label,
            ours.per_second(),
            base.per_second(),
            ratio,
            ours.server_ms_per_op,
            base.server_ms_per_op,
            ours.client_ms_per_op,
            base.client_ms_per_op,
            ours.busy * 100.0,
            base.busy * 100.0
        );
        rows.push(Row::ratio(w.label, ratio, w.bound));
    }
    // Two group-commit writers side by side (two store handles with their own
    // pools and writers: to the server, two processes), against one.
    let second = rt.block_on(async {
        let pool2 =
            dcbflow::pool_from_url(BENCH_URL.get().expect("set in main"), Some(40)).expect("pool");
        dcbflow::Store::builder(pool2)
            .schema(STORE_SCHEMA)
            .group_commit(128)
            .max_in_flight(4096)
            .migrate(false)
            .build()
            .await
            .expect("second group-commit store")
    });
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let one = rt.block_on(window(64, Duration::from_secs(secs), {
            let op = plain(&gc);
            move |i| op(i)
        }));
        let (a, b) = (plain(&gc), plain(&second));
        let two = rt.block_on(window(64, Duration::from_secs(secs), move |i| {
            if i % 2 == 0 { a(i) } else { b(i) }
        }));
        println!(
            "group commit, 64 clients: one writer {:.0}/s, two writers {:.0}/s (busy {:.0}% / {:.0}%)",
            one.per_second(),
            two.per_second(),
            one.busy * 100.0,
            two.busy * 100.0
        );
        ratios.push(two.per_second() / one.per_second());
    }
    ratios.sort_by(f64::total_cmp);
    rows.push(Row::ratio(
        "group commit, two writers (processes) vs one, 64 clients",
        ratios[ratios.len() / 2],
        1.0,
    ));
    common::goals::report("append", rows);
}

/// The bench database's URL (for a second, independent pool).
static BENCH_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
