//! Flow engine throughput: task transitions per second and SQL statements per
//! transition, with 1 and 4 workers, beside raw PostgreSQL doing a transition's
//! minimal work over the same driver in the same run.
//!
//! `cargo bench --bench flow` (`DCBFLOW_BENCH_QUICK=1` for a short run).
//!
//! | bench | dcbflow | baseline |
//! |---|---|---|
//! | `flow/dcbflow/{1,4}` | instances of a 4-step serial flow of no-op Rust steps, run to completion by N workers; time per transition (a committed transaction appending the instance's next events) | — |
//! | `flow/raw_transition/{1,4}` | — | N clients, each transition one transaction: `SELECT` the instance's events, `INSERT` one event, upsert a state row |
//! | await_event (printed after the table) | 400 instances waiting for a fact each (100 quick), woken by one append of their facts and completed by 4 workers; transitions per second | — |
//! | for_each (printed after the table) | one instance fanning out over 100, then 1,000 items (16 at once, one worker); transitions per second and time per item, whose ratio (1,000 vs 100) shows the fan-out is linear | — |
//! | order saga (printed after the table) | instances per second of the order saga's shape (reserve, charge beside a fraud check, ship; no-op Rust steps, compensations defined) with 4 workers | raw transitions per second at 4 clients divided by the saga's transitions per instance |
//!
//! The raw baseline does no planning, no locking, no leases, no read models beyond
//! one row: it is the floor a hand-rolled state machine on the same table would pay.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Ratio, Setup};
use criterion::{BenchmarkId, Throughput};
use dcbflow::flow::{
    Action, FlowDefinition, Flows, TaskContext, TaskDefinition, TaskError, WorkerOptions,
};
use dcbflow::{CancellationToken, Query, SubscriptionOptions};
use serde_json::{Value, json};

const SCHEMA: &str = "bench_flow";
const RAW: &str = "bench_flow_raw";

fn raw_sql() -> String {
    format!(
        "CREATE SCHEMA {RAW};
         CREATE TABLE {RAW}.events (
             position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
             type text NOT NULL, tags text[] NOT NULL, data jsonb NOT NULL, metadata jsonb,
             id uuid UNIQUE, recorded_at timestamptz NOT NULL DEFAULT now());
         CREATE INDEX ON {RAW}.events USING gin (tags) WITH (fastupdate = off);
         CREATE TABLE {RAW}.state (instance text PRIMARY KEY, step int NOT NULL);"
    )
}

fn main() {
    let setup = Setup::new(SCHEMA, 24, &[RAW], &raw_sql());
    let (rt, pool, store) = (&setup.rt, &setup.pool, &setup.store);
    let mut c = common::criterion(3, 10);
    let flows = Flows::new(store.clone());
    for name in [
        "a", "b", "c", "d", "reserve", "release", "charge", "refund", "fraud", "ship",
    ] {
        flows.function(name, |_ctx: TaskContext| async move {
            Ok::<_, TaskError>(Value::Null)
        });
    }
    let def = FlowDefinition::builder("bench")
        .task(TaskDefinition::new("a", Action::rust("a")))
        .task(TaskDefinition::new("b", Action::rust("b")).after(["a"]))
        .task(TaskDefinition::new("c", Action::rust("c")).after(["b"]))
        .task(TaskDefinition::new("d", Action::rust("d")).after(["c"]))
        .build();
    rt.block_on(flows.register(&def)).expect("register");
    // The order saga's shape (examples/flows/order_saga.yaml) with no-op Rust
    // steps: reserve, then charge beside a fraud check, then ship; compensations
    // defined (not needed: every step succeeds).
    let saga = FlowDefinition::builder("saga")
        .task(
            TaskDefinition::new("reserve", Action::rust("reserve"))
                .compensate(Action::rust("release")),
        )
        .task(
            TaskDefinition::new("charge", Action::rust("charge"))
                .after(["reserve"])
                .compensate(Action::rust("refund")),
        )
        .task(TaskDefinition::new("fraud", Action::rust("fraud")).after(["reserve"]))
        .task(TaskDefinition::new("ship", Action::rust("ship")).after(["charge", "fraud"]))
        .build();
    rt.block_on(flows.register(&saga)).expect("register saga");

    // Transitions per instance, from one instance run alone.
    let per_instance = rt.block_on(async {
        let before = flows.stats();
        let workers = start_workers(&flows, 1);
        run_instances(&flows, "bench", 1).await;
        workers.cancel();
        (flows.stats().transitions - before.transitions).max(1)
    });
    println!("one instance of the 4-step flow takes {per_instance} transitions");

    let mut g = c.benchmark_group("flow");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    let mut per_statement = Vec::new();
    for workers in [1usize, 4] {
        // Workers keep running across samples, as in production.
        let running = rt.block_on(async { start_workers(&flows, workers) });
        let before = flows.stats();
        g.bench_function(BenchmarkId::new("dcbflow", workers), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let flows = flows.clone();
                async move {
                    let instances = iters.div_ceil(per_instance).max(1);
                    let t0 = flows.stats().transitions;
                    let elapsed = run_instances(&flows, "bench", instances).await;
                    let done = (flows.stats().transitions - t0).max(1);
                    elapsed.mul_f64(iters as f64 / done as f64)
                }
            })
        });
        running.cancel();
        let after = flows.stats();
        per_statement.push((
            workers,
            (after.statements - before.statements) as f64
                / (after.transitions - before.transitions).max(1) as f64,
            (after.events - before.events) as f64
                / (after.transitions - before.transitions).max(1) as f64,
        ));
        // Each client moves its own instances, `per_instance` transitions each, so
        // reads see as many events as a flow instance has.
        let counter = std::sync::Arc::new(AtomicU64::new(0));
        g.bench_function(BenchmarkId::new("raw_transition", workers), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (pool, counter) = (pool.clone(), counter.clone());
                common::concurrent(workers, iters, move |i| {
                    let (pool, counter) = (pool.clone(), counter.clone());
                    async move {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        raw_transition(&pool, &format!("i:{workers}:{i}:{}", n / per_instance))
                            .await
                    }
                })
            })
        });
    }
    g.finish();
    c.final_summary();
    common::print_ratios(&[
        Ratio {
            label: "transitions, 1 worker",
            ours: ("flow", "dcbflow", "1"),
            baseline: ("flow", "raw_transition", "1"),
        },
        Ratio {
            label: "transitions, 4 workers",
            ours: ("flow", "dcbflow", "4"),
            baseline: ("flow", "raw_transition", "4"),
        },
    ]);
    println!();
    for (workers, statements, events) in &per_statement {
        println!(
            "{workers} worker(s): {statements:.2} SQL statements per transition, {events:.2} events per transition"
        );
    }
    // Order-saga instances per second with 4 workers, beside the raw figure: the
    // raw transitions per second (4 clients) divided by the saga's transitions.
    let (saga_per_s, saga_transitions) = rt.block_on(async {
        let before = flows.stats();
        let workers = start_workers(&flows, 4);
        run_instances(&flows, "saga", 20).await;
        let n = if common::goals::quick() { 100 } else { 400 };
        let elapsed = run_instances(&flows, "saga", n).await;
        workers.cancel();
        let after = flows.stats();
        (
            n as f64 / elapsed.as_secs_f64(),
            (after.transitions - before.transitions) as f64 / (n + 20) as f64,
        )
    });
    let raw_transition_ns = common::goals::mean_ns("flow", "raw_transition", "4");
    let raw_saga_per_s = raw_transition_ns.map(|ns| 1e9 / ns / saga_transitions);
    println!(
        "order saga, 4 workers: {saga_per_s:.0} instances/s ({saga_transitions:.1} transitions each); \
         raw transitions at the same count: {}",
        raw_saga_per_s.map_or("-".into(), |r| format!("{r:.0} instances/s"))
    );
    // await_event: instances waiting for a fact each, woken by the event
    // waker when the facts are appended (one append of all of them), and
    // completed; transitions per second from the first append to the last
    // completion.
    let awaiting = FlowDefinition::builder("awaiting")
        .task(TaskDefinition::await_event(
            "paid",
            ["BenchPaid"],
            ["bench_order:{{business_key}}"],
        ))
        .task(TaskDefinition::new("a", Action::rust("a")).after(["paid"]))
        .build();
    rt.block_on(flows.register(&awaiting))
        .expect("register awaiting");
    let (await_n, await_per_s, await_transitions) = rt.block_on(async {
        let n: usize = if common::goals::quick() { 100 } else { 400 };
        let workers = start_workers(&flows, 4);
        let store = flows.store();
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut ids = std::collections::HashSet::new();
        for i in 0..n {
            let key = format!("{run}-{i}");
            let id = flows
                .start("awaiting", Some(&key), json!({}))
                .await
                .expect("start")
                .instance;
            ids.insert(format!("flow_instance:{id}"));
        }
        // Every instance waiting (its query in flow_awaits).
        let client = store.pool().get().await.expect("connection");
        let count = format!("SELECT count(*) FROM \"{}\".flow_awaits", store.schema());
        let deadline = Instant::now() + Duration::from_secs(120);
        while client
            .query_one(&count, &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
            < n as i64
        {
            assert!(Instant::now() < deadline, "instances did not all wait");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(client);
        let head = store.head().await.expect("head");
        let completed = Query::items_of(["FlowCompleted"], Vec::<String>::new());
        let mut sub =
            dcbflow::Subscription::connect(store, completed, head, SubscriptionOptions::default())
                .await
                .expect("subscribe");
        let before = flows.stats();
        let start = Instant::now();
        let facts: Vec<dcbflow::Event> = (0..n)
            .map(|i| {
                dcbflow::Event::new(
                    "BenchPaid",
                    [format!("bench_order:{run}-{i}")],
                    json!({"i": i}),
                )
            })
            .collect();
        store.append(facts, None).await.expect("append the facts");
        let mut done = 0;
        while done < n {
            // 100 instances woken at once can take every in-flight permit of
            // the store for a moment: the subscription then waits its turn.
            let batch = match sub.next_batch().await {
                Ok(batch) => batch,
                Err(dcbflow::Error::Overloaded { .. }) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                Err(e) => panic!("completions: {e}"),
            };
            for e in batch {
                if e.tags().iter().any(|t| ids.contains(t)) {
                    done += 1;
                }
            }
        }
        let elapsed = start.elapsed();
        workers.cancel();
        let transitions = flows.stats().transitions - before.transitions;
        (
            n,
            transitions as f64 / elapsed.as_secs_f64(),
            transitions as f64 / n as f64,
        )
    });
    println!(
        "await_event, 4 workers: {await_n} waiting instances woken and completed at {await_per_s:.0} transitions/s \
         ({await_transitions:.1} transitions each, from one append of their facts to the last completion)"
    );
    // for_each: one instance fanning out over n items (16 at once), run by
    // one worker (an instance is claimed by one worker at a time); transitions
    // per second and time per item at 100 and 1,000 items. A fold or a read
    // model that grew with the instance would make the larger fan-out slower
    // per item.
    let fan = FlowDefinition::builder("fan")
        .task(TaskDefinition::new("each", Action::rust("a")).for_each("{{flow.input.items}}", 16))
        .build();
    rt.block_on(flows.register(&fan)).expect("register fan");
    let fan_runs: Vec<(u32, f64, f64)> = rt.block_on(async {
        let workers = start_workers(&flows, 1);
        let mut runs = Vec::new();
        for n in [100u32, 1000] {
            let before = flows.stats();
            let start = Instant::now();
            let id = flows
                .start("fan", None, json!({"items": (0..n).collect::<Vec<u32>>()}))
                .await
                .expect("start fan")
                .instance;
            // The read model's status (one row), not a fold of the instance,
            // so that watching costs the same at any size.
            let client = flows.store().pool().get().await.expect("connection");
            let status = format!(
                "SELECT status FROM \"{}\".flow_instances WHERE id = $1",
                flows.store().schema()
            );
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let row = client.query_opt(&status, &[&id]).await.expect("status");
                if row.is_some_and(|r| r.get::<_, String>(0) == "completed") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the fan-out of {n} did not complete"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let transitions = (flows.stats().transitions - before.transitions) as f64;
            runs.push((n, transitions / elapsed, elapsed * 1e6 / f64::from(n)));
        }
        workers.cancel();
        runs
    });
    for (n, per_s, us) in &fan_runs {
        println!(
            "for_each over {n} items, 1 worker, 16 at once: {per_s:.0} transitions/s, {us:.0} µs per item"
        );
    }
    use common::goals::{Row, throughput_ratio};
    let mut rows = Vec::new();
    if let [(_, _, small), (_, _, large)] = fan_runs[..] {
        rows.push(Row::at_most(
            "for_each time per item, 1,000 items vs 100 (linear: about 1)",
            large / small,
            1.5,
            "x",
        ));
    }
    if let Some(raw) = raw_saga_per_s {
        rows.push(Row::ratio(
            "order-saga instances/s, 4 workers, vs raw (reported)",
            saga_per_s / raw,
            0.5,
        ));
    }
    if let Some(r) = throughput_ratio(("flow", "dcbflow", "4"), ("flow", "raw_transition", "4")) {
        rows.push(Row::ratio("transitions, 4 workers, vs raw", r, 0.5));
    }
    if let Some((_, statements, _)) = per_statement.iter().find(|(w, _, _)| *w == 4) {
        rows.push(Row::at_most(
            "SQL statements per transition, 4 workers",
            *statements,
            4.0,
            "statements",
        ));
    }
    common::goals::report("flow", rows);
    setup.finish();
}

/// `n` workers running until the token is cancelled.
fn start_workers(flows: &Flows, n: usize) -> CancellationToken {
    let cancel = CancellationToken::new();
    for i in 0..n {
        let mut o = WorkerOptions::default().id(format!("bench-{i}"));
        o.poll_interval = Duration::from_millis(20);
        o.concurrency = 32;
        let (w, c) = (flows.worker(o), cancel.clone());
        tokio::spawn(async move { w.run(c).await });
    }
    cancel
}

/// Starts `n` instances and waits until every one completed; the wall time.
async fn run_instances(flows: &Flows, flow: &str, n: u64) -> Duration {
    // Completions arrive by subscription (LISTEN/NOTIFY), not by polling.
    let store = flows.store();
    let head = store.head().await.expect("head");
    let completed = Query::items_of(["FlowCompleted"], Vec::<String>::new());
    let mut sub =
        dcbflow::Subscription::connect(store, completed, head, SubscriptionOptions::default())
            .await
            .expect("subscribe");
    let start = Instant::now();
    let mut ids = std::collections::HashSet::with_capacity(n as usize);
    for _ in 0..n {
        let id = flows
            .start(flow, None, json!({}))
            .await
            .expect("start")
            .instance;
        ids.insert(format!("flow_instance:{id}"));
    }
    let mut done = 0;
    while done < ids.len() {
        for e in sub.next_batch().await.expect("completions") {
            if e.tags().iter().any(|t| ids.contains(t)) {
                done += 1;
            }
        }
    }
    start.elapsed()
}

/// The floor of a transition: read the instance's events, append one, move a state row.
async fn raw_transition(pool: &deadpool_postgres::Pool, instance: &str) {
    let mut client = pool.get().await.expect("connection");
    let tx = client.transaction().await.expect("begin");
    let read = tx
        .prepare_cached(&format!("SELECT position, type, data FROM {RAW}.events WHERE tags @> ARRAY[$1::text] ORDER BY position"))
        .await
        .expect("prepare");
    let rows = tx.query(&read, &[&instance]).await.expect("read");
    let insert = tx
        .prepare_cached(&format!("INSERT INTO {RAW}.events (type, tags, data) VALUES ('FlowStepSucceeded', ARRAY[$1::text], $2)"))
        .await
        .expect("prepare");
    tx.execute(&insert, &[&instance, &json!({"step": rows.len()})])
        .await
        .expect("insert");
    let state = tx
        .prepare_cached(&format!(
            "INSERT INTO {RAW}.state VALUES ($1, 1) ON CONFLICT (instance) DO UPDATE SET step = {RAW}.state.step + 1"
        ))
        .await
        .expect("prepare");
    tx.execute(&state, &[&instance]).await.expect("state");
    tx.commit().await.expect("commit");
}
