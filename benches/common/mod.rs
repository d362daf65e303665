//! What every bench shares: the database, a fresh store, criterion's settings, timing
//! concurrent clients, and the table of ratios against the raw baselines.
#![allow(dead_code)]

pub mod goals;
#[path = "../../examples/support/mod.rs"]
pub mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use criterion::Criterion;
use dcbflow::{Store, pool_from_url};
use deadpool_postgres::Pool;

/// A bench's database, pool and store (in `schema`, recreated empty).
pub struct Setup {
    pub rt: tokio::runtime::Runtime,
    pub db: support::Database,
    pub pool: Pool,
    pub store: Store,
    schemas: Vec<String>,
}

impl Setup {
    /// Starts the database, recreates `schema` for the store, and runs `extra_sql`
    /// (for baseline tables in schemas listed in `extra_schemas`).
    pub fn new(schema: &str, pool_size: usize, extra_schemas: &[&str], extra_sql: &str) -> Setup {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let db = rt
            .block_on(support::Database::start())
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("database: {}", db.origin);
        let pool = pool_from_url(&db.url, Some(pool_size)).expect("pool");
        let mut schemas = vec![schema.to_string()];
        schemas.extend(extra_schemas.iter().map(|s| s.to_string()));
        let store = rt.block_on(async {
            let c = pool.get().await.expect("connection");
            c.batch_execute(&drop_sql(&schemas)).await.expect("drop");
            c.batch_execute(extra_sql).await.expect("baseline schema");
            Store::builder(pool.clone())
                .listen_config(db.url.parse().expect("database URL"))
                .schema(schema)
                .build()
                .await
                .expect("store")
        });
        Setup {
            rt,
            db,
            pool,
            store,
            schemas,
        }
    }

    /// Drops the bench's schemas and whatever was throwaway.
    pub fn finish(self) {
        let Setup {
            rt,
            db,
            pool,
            store,
            schemas,
        } = self;
        rt.block_on(async {
            let c = pool.get().await.expect("connection");
            let _ = c.batch_execute(&drop_sql(&schemas)).await;
        });
        drop((store, pool));
        rt.block_on(db.close());
    }
}

fn drop_sql(schemas: &[String]) -> String {
    schemas
        .iter()
        .map(|s| format!("DROP SCHEMA IF EXISTS {s} CASCADE;"))
        .collect()
}

/// Criterion with the measurement time of `full` seconds, or 2 s when
/// `DCBFLOW_BENCH_QUICK` is set.
pub fn criterion(warm_up: u64, full: u64) -> Criterion {
    let quick = std::env::var_os("DCBFLOW_BENCH_QUICK").is_some();
    Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(if quick { 1 } else { warm_up }))
        .measurement_time(Duration::from_secs(if quick { 2 } else { full }))
}

/// Time per operation of `iters` operations shared by `clients` concurrent tasks,
/// each running `op(client)` in a loop (for criterion's `iter_custom`).
pub async fn concurrent<F, Fut>(clients: usize, iters: u64, op: F) -> Duration
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let per = (iters as usize).div_ceil(clients);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let op = op.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    op(i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("bench task");
    }
    start
        .elapsed()
        .mul_f64(iters as f64 / (per * clients) as f64)
}

/// One row of the ratio table: a dcbflow bench and its baseline, as
/// `(group, id, name)` criterion paths.
pub struct Ratio<'a> {
    pub label: &'a str,
    pub ours: (&'a str, &'a str, &'a str),
    pub baseline: (&'a str, &'a str, &'a str),
}

/// Prints dcbflow's throughput relative to each baseline, from criterion's estimates
/// (1.0 = as fast as raw PostgreSQL).
pub fn print_ratios(rows: &[Ratio<'_>]) {
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let mean = |(group, id, name): (&str, &str, &str)| -> Option<f64> {
        let path = format!(
            "{dir}/criterion/{group}/{id}/{}/new/estimates.json",
            name.replace('/', "_")
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    println!(
        "\n{:<28} {:>12} {:>12} {:>8}",
        "bench", "dcbflow µs", "raw µs", "ratio"
    );
    for row in rows {
        if let (Some(d), Some(r)) = (mean(row.ours), mean(row.baseline)) {
            println!(
                "{:<28} {:>12.1} {:>12.1} {:>7.2}x",
                row.label,
                d / 1e3,
                r / 1e3,
                r / d
            );
        }
    }
}

/// One line of the goals table that [`print_goals`] prints after the ratios: a
/// measured value beside its goal.
pub struct Goal {
    pub label: String,
    pub value: String,
    pub goal: String,
    pub met: bool,
}

/// Prints goal lines (label, measured value, goal, whether it is met).
pub fn print_goals(rows: &[Goal]) {
    for row in rows {
        println!(
            "{:<28} {:>12} {:>12} {:>8}",
            row.label,
            row.value,
            row.goal,
            if row.met { "met" } else { "MISSED" }
        );
    }
}

/// The raw-scoped baseline in `schema` (which must exist): the guarantee of a
/// conditional append on one tag, written by hand. `append_scoped` takes one
/// advisory lock keyed by the tag, checks `EXISTS` over a btree
/// `event_tags(tag, position)` joined to `scoped_events` after `p_after`, and
/// inserts the event and its tag row; it returns the new position, or NULL if
/// the condition failed.
pub fn raw_scoped_sql(schema: &str) -> String {
    format!(
        "CREATE TABLE {schema}.scoped_events (
             position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             type text NOT NULL, data jsonb NOT NULL);
         CREATE TABLE {schema}.event_tags (
             tag text NOT NULL, position bigint NOT NULL, PRIMARY KEY (tag, position));
         CREATE FUNCTION {schema}.append_scoped(p_type text, p_tag text, p_data jsonb, p_after bigint)
         RETURNS bigint LANGUAGE plpgsql AS $fn$
         DECLARE v_position bigint;
         BEGIN
             PERFORM pg_advisory_xact_lock(hashtextextended(p_tag, 0));
             IF EXISTS (SELECT 1 FROM {schema}.event_tags t
                          JOIN {schema}.scoped_events e ON e.position = t.position
                         WHERE t.tag = p_tag AND t.position > p_after AND e.type = p_type) THEN
                 RETURN NULL;
             END IF;
             INSERT INTO {schema}.scoped_events (type, data) VALUES (p_type, p_data)
             RETURNING position INTO v_position;
             INSERT INTO {schema}.event_tags (tag, position) VALUES (p_tag, v_position);
             RETURN v_position;
         END;
         $fn$;"
    )
}
