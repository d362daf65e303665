//! Reads beside raw `SELECT`s of the same rows over the same driver, same run.
//!
//! `cargo bench --bench read` (`DCBFLOW_BENCH_QUICK=1` for a short run). The store is
//! seeded with 1,000,000 events; every event carries a tag shared by 10 events and
//! one shared by 1,000.
//!
//! | bench | dcbflow | baseline |
//! |---|---|---|
//! | `stream/1000000` | `Store::read(Query::all())`, every event decoded | `query_raw` of the same columns, every row decoded |
//! | `tag/10`, `tag/1000` | `Store::read_all` of one tag's events | `SELECT … WHERE tags @> $1 ORDER BY position` (`raw_select`), and `btree_join`: the same rows through a normalized `event_tags(tag, position)` btree joined to a copy of the events (the issue-14 baseline) |
//! | `tag_under_writes/{dcbflow,raw_select}/10` | the `tag/10` reads while a task appends without pause | the same read on a quiet store (the ratio is the slowdown; the raw read is the control) |
//! | `growth/{append,conditional_append}/{0,1M,10M}` | one append on an empty store and on the seeded one (10M with `DCBFLOW_BENCH_10M=1`) | the same on the empty store |
//!
//! In the ratio table the "raw" column is each row's baseline.

mod common;

use common::{Ratio, Setup};
use criterion::{BenchmarkId, Throughput};
use dcbflow::{Query, QueryItem, ReadOptions};
use futures::{StreamExt, TryStreamExt};

const SCHEMA: &str = "bench_read";
/// The btree-join baseline: a copy of the events and their tags, normalized.
const RAW: &str = "bench_read_raw";
const EVENTS: u64 = 1_000_000;

fn main() {
    let setup = Setup::new(SCHEMA, 4, &[RAW], "");
    let (rt, pool, store) = (&setup.rt, &setup.pool, &setup.store);
    rt.block_on(async {
        let c = pool.get().await.expect("connection");
        c.batch_execute(&format!(
            "INSERT INTO {SCHEMA}.events (transaction_id, type, tags, data) \
             SELECT pg_current_xact_id(), 'Seeded', ARRAY['k:' || (g % 100000), 'bulk:' || (g % 1000)], \
                    jsonb_build_object('i', g, 'note', 'seeded event') \
             FROM generate_series(1, {EVENTS}) g; ANALYZE {SCHEMA}.events;
             CREATE SCHEMA {RAW};
             CREATE TABLE {RAW}.events AS SELECT * FROM {SCHEMA}.events;
             ALTER TABLE {RAW}.events ADD PRIMARY KEY (position);
             CREATE TABLE {RAW}.event_tags AS
                 SELECT t.tag, e.position FROM {SCHEMA}.events e, unnest(e.tags) AS t(tag);
             ALTER TABLE {RAW}.event_tags ADD PRIMARY KEY (tag, position);
             ANALYZE {RAW}.events; ANALYZE {RAW}.event_tags;"
        ))
        .await
        .expect("seed");
    });
    let mut c = common::criterion(1, 10).sample_size(10);

    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Elements(EVENTS));
    g.bench_function(BenchmarkId::new("dcbflow", EVENTS), |b| {
        b.to_async(rt).iter(|| async {
            let stream = store
                .read(&Query::all(), ReadOptions::default())
                .await
                .expect("read");
            let n = stream
                .try_fold(0u64, |n, _| async move { Ok(n + 1) })
                .await
                .expect("stream");
            assert_eq!(n, EVENTS);
        })
    });
    g.bench_function(BenchmarkId::new("raw_select", EVENTS), |b| {
        b.to_async(rt).iter(|| async {
            let c = pool.get().await.expect("connection");
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT position, transaction_id::text, type, tags, data, metadata, id, recorded_at \
                     FROM {SCHEMA}.events ORDER BY position"
                ))
                .await
                .expect("prepare");
            let rows = c.query_raw(&stmt, std::iter::empty::<i64>()).await.expect("select");
            let n = rows
                .map(|r| {
                    let r = r.expect("row");
                    let _: (i64, String, Vec<String>, serde_json::Value) = (r.get(0), r.get(2), r.get(3), r.get(4));
                })
                .count()
                .await;
            assert_eq!(n as u64, EVENTS);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("tag");
    for (n, tag) in [(10u64, "k:4242"), (1000, "bulk:77")] {
        g.throughput(Throughput::Elements(n));
        let q = Query::from_items([QueryItem::new().tags([tag])]);
        g.bench_function(BenchmarkId::new("dcbflow", n), |b| {
            b.to_async(rt).iter(|| async {
                let r = store
                    .read_all(&q, ReadOptions::default())
                    .await
                    .expect("read");
                assert_eq!(r.events.len() as u64, n);
            })
        });
        g.bench_function(BenchmarkId::new("raw_select", n), |b| {
            b.to_async(rt).iter(|| async {
                let c = pool.get().await.expect("connection");
                let stmt = c
                    .prepare_cached(&format!(
                        "SELECT position, transaction_id::text, type, tags, data, metadata, id, recorded_at \
                         FROM {SCHEMA}.events WHERE tags @> $1 ORDER BY position"
                    ))
                    .await
                    .expect("prepare");
                let rows = c.query(&stmt, &[&vec![tag]]).await.expect("select");
                for r in &rows {
                    let _: (i64, String, Vec<String>, serde_json::Value) = (r.get(0), r.get(2), r.get(3), r.get(4));
                }
                assert_eq!(rows.len() as u64, n);
            })
        });
        g.bench_function(BenchmarkId::new("btree_join", n), |b| {
            b.to_async(rt).iter(|| async {
                let c = pool.get().await.expect("connection");
                let stmt = c
                    .prepare_cached(&format!(
                        "SELECT e.position, e.transaction_id::text, e.type, e.tags, e.data, e.metadata, e.id, e.recorded_at \
                         FROM {RAW}.event_tags t JOIN {RAW}.events e ON e.position = t.position \
                         WHERE t.tag = $1 ORDER BY t.position"
                    ))
                    .await
                    .expect("prepare");
                let rows = c.query(&stmt, &[&tag]).await.expect("select");
                for r in &rows {
                    let _: (i64, String, Vec<String>, serde_json::Value) =
                        (r.get(0), r.get(2), r.get(3), r.get(4));
                }
                assert_eq!(rows.len() as u64, n);
            })
        });
    }
    g.finish();
    // Tag reads while appends go on in the background (GIN index health, trap 8).
    let mut g = c.benchmark_group("tag_under_writes");
    g.throughput(Throughput::Elements(10));
    let writing = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (store, stop) = (store.clone(), writing.clone());
        rt.spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                let e = dcbflow::Event::new(
                    "Written",
                    [format!("k:{}", i % 100_000), format!("w:{i}")],
                    serde_json::json!({"i": i}),
                );
                store.append(vec![e], None).await.expect("append");
                i += 1;
            }
            i
        })
    };
    let q = Query::from_items([QueryItem::new().tags(["k:4242"])]);
    g.bench_function(BenchmarkId::new("dcbflow", 10), |b| {
        b.to_async(rt).iter(|| async {
            store
                .read_all(&q, ReadOptions::default())
                .await
                .expect("read")
        })
    });
    // Control: the raw tag `SELECT` under the same writes. If it slows down as much,
    // the slowdown is the writer's share of the two cores, not index decay.
    g.bench_function(BenchmarkId::new("raw_select", 10), |b| {
        b.to_async(rt).iter(|| async {
            let c = pool.get().await.expect("connection");
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT position, transaction_id::text, type, tags, data, metadata, id, recorded_at \
                     FROM {SCHEMA}.events WHERE tags @> $1 ORDER BY position"
                ))
                .await
                .expect("prepare");
            c.query(&stmt, &[&vec!["k:4242"]]).await.expect("select")
        })
    });
    writing.cancel();
    let written = rt.block_on(writer).expect("writer");
    println!("{written} events appended while the tag reads ran");
    g.finish();

    // Growth: the same append and tag read on an empty store and on this one
    // (1M events; 10M with DCBFLOW_BENCH_10M=1, which takes a few minutes to seed).
    let empty = rt
        .block_on(
            dcbflow::Store::builder(pool.clone())
                .schema(format!("{SCHEMA}_empty"))
                .build(),
        )
        .expect("empty store");
    // Both stores analyzed, as autovacuum keeps a live store; the appends spread
    // over 100 tags, so that on both stores a tag holds few events (on the empty
    // store one tag shared by every appended event would make its reads slower
    // than on the seeded one, and the comparison meaningless).
    rt.block_on(async {
        let c = pool.get().await.expect("connection");
        c.batch_execute(&format!(
            "ANALYZE {SCHEMA}.events; ANALYZE {SCHEMA}_empty.events;"
        ))
        .await
        .expect("analyze");
    });
    let grown = std::sync::atomic::AtomicU64::new(0);
    let next_tag = || {
        format!(
            "g:{}",
            grown.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100
        )
    };
    let mut g = c.benchmark_group("growth");
    g.throughput(Throughput::Elements(1));
    let mut sizes = vec![("0", &empty), ("1M", store)];
    if std::env::var_os("DCBFLOW_BENCH_10M").is_some() {
        rt.block_on(async {
            let c = pool.get().await.expect("connection");
            c.batch_execute(&format!(
                "INSERT INTO {SCHEMA}.events (transaction_id, type, tags, data) \
                 SELECT pg_current_xact_id(), 'Seeded', ARRAY['k:' || (g % 100000), 'bulk:' || (g % 1000)], \
                        jsonb_build_object('i', g) FROM generate_series(1, 9000000) g; ANALYZE {SCHEMA}.events;"
            ))
            .await
            .expect("seed 10M");
        });
        sizes[1].0 = "10M";
    }
    for (size, s) in sizes {
        g.bench_function(BenchmarkId::new("append", size), |b| {
            b.to_async(rt).iter(|| async {
                s.append(
                    vec![dcbflow::Event::new(
                        "Grown",
                        [next_tag()],
                        serde_json::json!({}),
                    )],
                    None,
                )
                .await
                .expect("append")
            })
        });
        g.bench_function(BenchmarkId::new("conditional_append", size), |b| {
            b.to_async(rt).iter(|| async {
                let tag = next_tag();
                let q = Query::items_of(["Grown"], [tag.clone()]);
                let cursor = s.read_last(&q).await.expect("read").map(|e| e.position);
                let mut condition = dcbflow::AppendCondition::new(q);
                if let Some(p) = cursor {
                    condition = condition.after(p);
                }
                s.append(
                    vec![dcbflow::Event::new("Grown", [tag], serde_json::json!({}))],
                    Some(condition),
                )
                .await
                .expect("append")
            })
        });
    }
    g.finish();
    let _ = rt.block_on(async {
        pool.get()
            .await
            .expect("connection")
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA}_empty CASCADE"))
            .await
    });

    c.final_summary();
    let ratio = |label, group, name| Ratio {
        label,
        ours: (group, "dcbflow", name),
        baseline: (group, "raw_select", name),
    };
    common::print_ratios(&[
        ratio("stream 1M events", "stream", "1000000"),
        ratio("tag query, 10 events", "tag", "10"),
        ratio("tag query, 1,000 events", "tag", "1000"),
        Ratio {
            label: "tag, 10 events vs btree join",
            ours: ("tag", "dcbflow", "10"),
            baseline: ("tag", "btree_join", "10"),
        },
        Ratio {
            label: "tag, 1,000 vs btree join",
            ours: ("tag", "dcbflow", "1000"),
            baseline: ("tag", "btree_join", "1000"),
        },
        Ratio {
            label: "tag read under writes",
            ours: ("tag_under_writes", "dcbflow", "10"),
            baseline: ("tag", "dcbflow", "10"),
        },
        Ratio {
            label: "raw tag read under writes",
            ours: ("tag_under_writes", "raw_select", "10"),
            baseline: ("tag", "raw_select", "10"),
        },
        Ratio {
            label: "append at 1M vs empty",
            ours: ("growth", "append", "1M"),
            baseline: ("growth", "append", "0"),
        },
        Ratio {
            label: "cond. append at 1M vs empty",
            ours: ("growth", "conditional_append", "1M"),
            baseline: ("growth", "conditional_append", "0"),
        },
        Ratio {
            label: "append at 10M vs empty",
            ours: ("growth", "append", "10M"),
            baseline: ("growth", "append", "0"),
        },
        Ratio {
            label: "cond. append at 10M vs empty",
            ours: ("growth", "conditional_append", "10M"),
            baseline: ("growth", "conditional_append", "0"),
        },
    ]);
    read_goals();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM"))
    {
        println!(
            "peak resident memory of the bench process: {}",
            line.trim_start_matches("VmHWM:").trim()
        );
    }
    setup.finish();
}

/// The read goals of issue 14, from criterion's estimates of this run.
fn read_goals() {
    use common::goals::{Row, mean_ns, throughput_ratio};
    let mut rows = Vec::new();
    let big = if std::env::var_os("DCBFLOW_BENCH_10M").is_some() {
        "10M"
    } else {
        "1M"
    };
    for (label, ours, baseline, bound) in [
        (
            "tag read, 10 events of 1M, vs btree join",
            ("tag", "dcbflow", "10"),
            ("tag", "btree_join", "10"),
            0.9,
        ),
        (
            "tag read, 1,000 events of 1M, vs btree join",
            ("tag", "dcbflow", "1000"),
            ("tag", "btree_join", "1000"),
            0.9,
        ),
        (
            "streaming read of 1M events vs raw SELECT",
            ("stream", "dcbflow", "1000000"),
            ("stream", "raw_select", "1000000"),
            0.9,
        ),
    ] {
        if let Some(r) = throughput_ratio(ours, baseline) {
            rows.push(Row::ratio(label, r, bound));
        }
    }
    for (label, id) in [
        ("append time, grown store vs empty", "append"),
        (
            "conditional append time, grown store vs empty",
            "conditional_append",
        ),
    ] {
        if let (Some(grown), Some(empty)) = (mean_ns("growth", id, big), mean_ns("growth", id, "0"))
        {
            rows.push(Row::at_most(
                format!("{label} ({big})"),
                grown / empty,
                1.2,
                "x",
            ));
        }
    }
    common::goals::report("read", rows);
}
