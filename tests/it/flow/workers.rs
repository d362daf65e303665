//! Several workers (each with its own pool, as separate processes would be):
//! no attempt runs twice, a killed worker's step is taken over after its lease,
//! and a SQL step commits exactly once even when its worker dies mid-transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcbflow::flow::{
    Action, FlowDefinition, Flows, InstanceStatus, Phase, StepId, TaskContext, TaskDefinition,
    TaskError, TaskRetry,
};
use dcbflow::{CancellationToken, Store};
use serde_json::{Value, json};

use super::{Workers, fast, wait_for};
use crate::support::{DEADLINE, TestStore, eventually};

/// Another "process": its own pool and engine on the test's schema.
async fn process(t: &TestStore) -> Flows {
    let store = Store::builder_for_url(&t.url, Some(8))
        .unwrap()
        .schema(&t.schema)
        .build()
        .await
        .unwrap();
    Flows::new(store)
}

type Runs = Arc<Mutex<HashMap<(uuid::Uuid, String, u32), u32>>>;

/// The engines that have run a step, one bit each.
type Engines = Arc<tokio::sync::watch::Sender<u32>>;

/// Counts the attempts of engine number `engine` in `runs`. Its steps wait until
/// another engine has run a step too (at most 20 s, well within their lease): an
/// engine claims at most as many instances as it has slots, so the others find
/// the rest, and the work is shared however the workers are scheduled.
fn counting(flows: &Flows, runs: &Runs, engine: usize, engines: &Engines) {
    for name in ["a", "b", "c"] {
        let (runs, engines) = (runs.clone(), engines.clone());
        flows.function(name, move |ctx: TaskContext| {
            let (runs, engines) = (runs.clone(), engines.clone());
            async move {
                *runs
                    .lock()
                    .unwrap()
                    .entry((ctx.instance, ctx.step.key(), ctx.attempt))
                    .or_default() += 1;
                engines.send_modify(|bits| *bits |= 1u32 << engine);
                let mut seen = engines.subscribe();
                let shared = seen.wait_for(|bits| bits.count_ones() >= 2);
                let _ = tokio::time::timeout(Duration::from_secs(20), shared).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, TaskError>(Value::Null)
            }
        });
    }
}

/// 4 workers, 40 instances of a → (b ∥ c): every step runs exactly once, and
/// the work is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn competing_workers_never_run_the_same_attempt() {
    let t = TestStore::new().await;
    let runs: Runs = Arc::default();
    let working: Engines = Arc::default();
    let mut engines = Vec::new();
    for i in 0..4 {
        let f = process(&t).await;
        counting(&f, &runs, i, &working);
        engines.push(f);
    }
    let def = FlowDefinition::builder("fanout")
        .task(TaskDefinition::new("a", Action::rust("a")))
        .task(TaskDefinition::new("b", Action::rust("b")).after(["a"]))
        .task(TaskDefinition::new("c", Action::rust("c")).after(["a"]))
        .build();
    engines[0].register(&def).await.unwrap();
    let workers = Workers::start(&engines.iter().collect::<Vec<_>>());
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            engines[i % 4]
                .start("fanout", None, json!({}))
                .await
                .unwrap()
                .instance,
        );
    }
    for id in &ids {
        wait_for(&engines[0], *id, InstanceStatus::Completed, 60).await;
    }
    workers.stop().await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(
        runs.len(),
        120,
        "three steps per instance, first attempts only"
    );
    assert!(
        runs.values().all(|n| *n == 1),
        "an attempt ran twice: {runs:?}"
    );
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        for e in engines[0].timeline(*id).await.unwrap() {
            if e.event_type() == "FlowStepStarted" {
                *by_worker
                    .entry(e.data()["worker"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
    }
    assert!(by_worker.len() >= 2, "work was shared: {by_worker:?}");
}

/// A worker dies while its step runs; after the step's lease another worker times
/// the attempt out and runs attempt 2. The dead worker's late result is never
/// recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_step_is_retried_by_another_after_its_lease() {
    let t = TestStore::new().await;
    let (a, b) = (process(&t).await, process(&t).await);
    a.function("work", |_ctx: TaskContext| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, TaskError>(json!("from the dead"))
    });
    b.function("work", |ctx: TaskContext| async move {
        Ok::<_, TaskError>(json!({"attempt": ctx.attempt}))
    });
    let def = FlowDefinition::builder("takeover")
        .task(TaskDefinition::new("work", Action::rust("work")).timeout(Duration::from_secs(1)))
        .build();
    a.register(&def).await.unwrap();
    let cancel = CancellationToken::new();
    let dying = {
        let w = a.worker(fast("doomed"));
        let c = cancel.clone();
        tokio::spawn(async move { w.run(c).await })
    };
    let id = a.start("takeover", None, json!({})).await.unwrap().instance;
    let step = StepId::new("work", Phase::Action);
    eventually("the doomed worker starts the step", DEADLINE, {
        let (a, step) = (&a, &step);
        move || async move {
            let state = a.instance(id).await.unwrap().unwrap();
            (state.step(step).attempts > 0).then_some(())
        }
    })
    .await;
    dying.abort(); // killed: no release, no completion
    let workers = Workers::start(&[&b]);
    let state = wait_for(&b, id, InstanceStatus::Completed, 20).await;
    workers.stop().await;
    assert_eq!(state.outputs["work"], json!({"attempt": 2}));
    let types: Vec<String> = b
        .timeline(id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_type().to_owned())
        .collect();
    assert!(types.contains(&"FlowStepTimedOut".to_owned()), "{types:?}");
}

/// The SQL executor: the statements commit with the step's completion event.
/// The first worker's transaction is killed after the INSERT ran (its backend is
/// terminated mid-statement and the worker is killed); after the lease another
/// worker runs the step again: exactly one row, and the step succeeded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sql_step_commits_exactly_once_when_its_worker_dies_mid_transaction() {
    let t = TestStore::new().await;
    let raw = t.raw().await;
    let s = &t.schema;
    raw.batch_execute(&format!(
        "CREATE TABLE \"{s}\".payments (instance uuid NOT NULL, amount int NOT NULL);
         CREATE TABLE \"{s}\".flags (slow boolean NOT NULL); INSERT INTO \"{s}\".flags VALUES (true);"
    ))
    .await
    .unwrap();
    let (a, b) = (process(&t).await, process(&t).await);
    let def = FlowDefinition::builder("ledger")
        .input("amount", dcbflow::flow::ValueType::Integer)
        .task(
            TaskDefinition::new(
                "book",
                Action::sql([
                    (
                        format!("INSERT INTO \"{s}\".payments VALUES ($1::uuid, $2::int)"),
                        vec![json!("{{instance}}"), json!("{{flow.input.amount}}")],
                    ),
                    (
                        format!("SELECT pg_sleep(CASE WHEN (SELECT slow FROM \"{s}\".flags) THEN 30 ELSE 0 END)"),
                        vec![],
                    ),
                ]),
            )
            .timeout(Duration::from_secs(2))
            .retry(TaskRetry::attempts(3)),
        )
        .build();
    a.register(&def).await.unwrap();
    let cancel = CancellationToken::new();
    let dying = {
        let w = a.worker(fast("doomed"));
        let c = cancel.clone();
        tokio::spawn(async move { w.run(c).await })
    };
    let id = a
        .start("ledger", None, json!({"amount": 42}))
        .await
        .unwrap()
        .instance;
    // Wait until the INSERT has run and the transaction sleeps, then kill both.
    let sleeping = format!(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(CASE%' AND query LIKE '%{s}%' AND pid <> pg_backend_pid()"
    );
    let pid: i32 = eventually(
        "the step's transaction sleeps after its INSERT",
        DEADLINE,
        {
            let (raw, sleeping) = (&raw, &sleeping);
            move || async move {
                let row = raw.query_opt(sleeping, &[]).await.unwrap();
                row.map(|row| row.get::<_, i32>(0))
            }
        },
    )
    .await;
    dying.abort();
    raw.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    raw.batch_execute(&format!("UPDATE \"{s}\".flags SET slow = false"))
        .await
        .unwrap();

    let workers = Workers::start(&[&b]);
    wait_for(&b, id, InstanceStatus::Completed, 30).await;
    workers.stop().await;
    let rows: i64 = raw
        .query_one(
            &format!("SELECT count(*) FROM \"{s}\".payments WHERE instance = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the payment was booked exactly once");
    let timeline = b.timeline(id).await.unwrap();
    let succeeded: Vec<_> = timeline
        .iter()
        .filter(|e| e.event_type() == "FlowStepSucceeded")
        .collect();
    assert_eq!(succeeded.len(), 1);
    assert_eq!(succeeded[0].data()["attempt"], json!(2));
}

/// A store overloaded for moments (more operations at once than its in-flight
/// limit) while steps run loses no step outcome: recording one is tried again
/// after the overload passes. Before, the failed recording left the step
/// "running" until its lease expired (its 30 s timeout), and the instance
/// waited that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_passing_overload_while_steps_run_loses_no_outcome() {
    let t = TestStore::with_limits(dcbflow::Limits::default(), Some(6)).await;
    let flows = Flows::new(t.store.clone());
    flows.function("a", |_ctx: TaskContext| async move {
        tokio::task::yield_now().await;
        Ok::<_, TaskError>(Value::Null)
    });
    let def = FlowDefinition::builder("overloaded")
        .task(TaskDefinition::new("a", Action::rust("a")))
        .task(TaskDefinition::new("b", Action::rust("a")).after(["a"]))
        .build();
    flows.register(&def).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..60 {
        let id = loop {
            match flows
                .start("overloaded", Some(&format!("o-{i}")), json!({}))
                .await
            {
                Ok(s) => break s.instance,
                Err(e) if matches!(&e, dcbflow::flow::FlowError::Store(s) if s.is_retryable()) => {
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        ids.push(id);
    }
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut o = fast(&format!("w{i}"));
        o.concurrency = 8;
        let (w, c) = (flows.worker(o), cancel.clone());
        tasks.push(tokio::spawn(async move { w.run(c).await.expect("worker") }));
    }
    // Well under the steps' 30 s timeout: an outcome lost to an overload
    // would hold its instance until then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for id in &ids {
        loop {
            let state = loop {
                match flows.instance(*id).await {
                    Ok(s) => break s.expect("instance"),
                    Err(_) => tokio::task::yield_now().await,
                }
            };
            if state.status == InstanceStatus::Completed {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {id} is {:?} with steps {:?} after 20 s",
                state.status,
                state
                    .steps
                    .values()
                    .map(|s| (s.step.key(), s.status))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    cancel.cancel();
    for t in tasks {
        let _ = t.await;
    }
}

/// The workers of one engine share its wake-up subscription, which wakes one of
/// them per look; a worker whose claim fills all its free slots hands the
/// wake-up on. Three workers of two slots each, polling every 2 s: six
/// instances started by another process must all be running at once (each step
/// waits for the other five), which takes every worker's claim, within 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_engines_workers_share_their_wake_ups_and_pass_them_on() {
    const INSTANCES: usize = 6;
    let t = TestStore::new().await;
    let flows = process(&t).await;
    let running = Arc::new(tokio::sync::watch::Sender::new(0usize));
    {
        let running = running.clone();
        flows.function("hold", move |_ctx: TaskContext| {
            let running = running.clone();
            async move {
                running.send_modify(|n| *n += 1);
                let mut seen = running.subscribe();
                let all = seen.wait_for(|n| *n >= INSTANCES);
                match tokio::time::timeout(Duration::from_secs(30), all).await {
                    Ok(_) => Ok(Value::Null),
                    Err(_) => Err(TaskError::fatal("not every instance ran at once")),
                }
            }
        });
    }
    let def = FlowDefinition::builder("held")
        .task(TaskDefinition::new("hold", Action::rust("hold")))
        .build();
    flows.register(&def).await.unwrap();
    let before = flows.stats().statements;
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut o = super::fast(&format!("w{i}"));
        o.concurrency = 2;
        // The subscription is a hint: a start that commits after a later event
        // it has seen is found by the next poll, so polls are not turned off.
        o.poll_interval = Duration::from_secs(2);
        let (worker, cancel) = (flows.worker(o), cancel.clone());
        tasks.push(tokio::spawn(async move {
            worker.run(cancel).await.expect("worker")
        }));
    }
    // Each worker's first claim (finding nothing) is under way before the starts.
    eventually("every worker's first claim", DEADLINE, || async {
        (flows.stats().statements >= before + 3).then_some(())
    })
    .await;
    // Started by another process, one after the other: only the subscription
    // tells this engine's workers (a start wakes its own engine's workers
    // directly), and a look sees several starts at once.
    let other = process(&t).await;
    let mut ids = Vec::new();
    for _ in 0..INSTANCES {
        ids.push(other.start("held", None, json!({})).await.unwrap().instance);
    }
    let mut seen = running.subscribe();
    let all = seen.wait_for(|n| *n >= INSTANCES);
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "only {} of {INSTANCES} instances were running at once",
                *running.borrow()
            )
        })
        .unwrap();
    for id in ids {
        wait_for(&flows, id, InstanceStatus::Completed, 30).await;
    }
    cancel.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}
