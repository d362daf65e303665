//! Try/confirm/cancel: the engine's TCC task with participants that use the
//! TCC barrier in their own transactions (here on the test's schema).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcbflow::flow::{
    Action, FlowDefinition, Flows, InstanceStatus, TaskContext, TaskDefinition, TaskError,
    TaskRetry, TccParticipant,
};
use dcbflow::tcc::{BarrierOutcome, TccBarrier, TccPhase};
use serde_json::{Value, json};

use super::{Workers, engine, wait_for};
use crate::support::{DEADLINE, TestStore, eventually};

/// How the fake participants behave.
#[derive(Default)]
struct Script {
    /// Participants whose try fails.
    failing: HashSet<String>,
    /// Participants whose try reaches the service late (after the engine gave up).
    late: HashSet<String>,
    /// Every barrier outcome: (participant, phase, outcome).
    outcomes: Vec<(String, TccPhase, BarrierOutcome)>,
}

type Shared = Arc<Mutex<Script>>;

/// A participant service: records holds in `<schema>.holds` behind the barrier.
async fn serve(
    pool: deadpool_postgres::Pool,
    barrier: TccBarrier,
    schema: String,
    script: Shared,
    ctx: TaskContext,
) -> Result<Value, TaskError> {
    let participant = ctx.step.participant.clone().unwrap_or_default();
    let (branch, phase) = TccBarrier::parse_key(&ctx.idempotency_key).expect("a TCC key");
    let branch = branch.to_owned();
    let fail = |e: dcbflow::Error| TaskError::retryable(e.to_string());
    let mut client = pool
        .get()
        .await
        .map_err(|e| TaskError::retryable(e.to_string()))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| TaskError::retryable(e.to_string()))?;
    let outcome = barrier.enter(&tx, &branch, phase).await.map_err(fail)?;
    script
        .lock()
        .unwrap()
        .outcomes
        .push((participant.clone(), phase, outcome));
    let write = |state: &str| {
        format!(
            "INSERT INTO \"{schema}\".holds VALUES ($1, $2, '{state}') ON CONFLICT (branch) DO UPDATE SET state = EXCLUDED.state"
        )
    };
    match (phase, outcome) {
        (TccPhase::Try, BarrierOutcome::Run) => {
            if script.lock().unwrap().failing.contains(&participant) {
                // Fail once both participants' tries got past their barriers, so
                // that the other has a reservation to cancel, however the tries are
                // scheduled (a cancel that overtakes its try is a test of its own).
                eventually("both tries get past their barriers", DEADLINE, {
                    let script = &script;
                    move || async move {
                        let script = script.lock().unwrap();
                        let tries = script.outcomes.iter().filter(|o| o.1 == TccPhase::Try);
                        (tries.count() >= 2).then_some(())
                    }
                })
                .await;
                return Err(TaskError::fatal(format!("{participant}: sold out")));
            }
            tx.execute(&write("reserved"), &[&participant, &branch])
                .await
                .map_err(|e| TaskError::retryable(e.to_string()))?;
        }
        (TccPhase::Confirm, BarrierOutcome::Run) => {
            tx.execute(&write("confirmed"), &[&participant, &branch])
                .await
                .map_err(|e| TaskError::retryable(e.to_string()))?;
        }
        (TccPhase::Cancel, BarrierOutcome::Run) => {
            tx.execute(&write("released"), &[&participant, &branch])
                .await
                .map_err(|e| TaskError::retryable(e.to_string()))?;
        }
        (TccPhase::Try, BarrierOutcome::Rejected) => {
            tx.commit()
                .await
                .map_err(|e| TaskError::retryable(e.to_string()))?;
            return Err(TaskError::fatal("try after cancel: rejected"));
        }
        _ => {}
    }
    tx.commit()
        .await
        .map_err(|e| TaskError::retryable(e.to_string()))?;
    Ok(json!({"participant": participant, "outcome": format!("{outcome:?}")}))
}

async fn setup(t: &TestStore, flows: &Flows, script: Shared) {
    let raw = t.raw().await;
    raw.batch_execute(&format!(
        "CREATE TABLE \"{}\".holds (participant text NOT NULL, branch text PRIMARY KEY, state text NOT NULL)",
        t.schema
    ))
    .await
    .unwrap();
    let barrier = TccBarrier::new(&t.schema).unwrap();
    barrier
        .install(&t.store.pool().get().await.unwrap())
        .await
        .unwrap();
    let pool = t.store.pool().clone();
    let schema = t.schema.clone();
    flows.function("participant", move |ctx: TaskContext| {
        let (pool, barrier, schema, script) = (
            pool.clone(),
            barrier.clone(),
            schema.clone(),
            script.clone(),
        );
        async move {
            let participant = ctx.step.participant.clone().unwrap_or_default();
            let late = ctx.step.phase == dcbflow::flow::Phase::Try
                && script.lock().unwrap().late.contains(&participant);
            if late {
                // The request is delayed in the network: it reaches the service
                // after the engine timed the try out and cancelled it.
                let handle = tokio::spawn(async move {
                    eventually("the engine cancels the late try", DEADLINE, {
                        let (script, participant) = (&script, &participant);
                        move || async move {
                            let script = script.lock().unwrap();
                            let mut outcomes = script.outcomes.iter();
                            let cancelled =
                                outcomes.any(|o| o.0 == *participant && o.1 == TccPhase::Cancel);
                            cancelled.then_some(())
                        }
                    })
                    .await;
                    serve(pool, barrier, schema, script, ctx).await
                });
                return handle.await.unwrap();
            }
            serve(pool, barrier, schema, script, ctx).await
        }
    });
    let p = |name: &str| TccParticipant {
        name: name.into(),
        try_action: Action::rust("participant"),
        confirm: Action::rust("participant"),
        cancel: Action::rust("participant"),
    };
    let def = FlowDefinition::builder("trip")
        .task(
            TaskDefinition::tcc("book", vec![p("hotel"), p("flight")])
                .retry(TaskRetry::attempts(1))
                // Ample for a try, even on a loaded machine; a late try exceeds it.
                .timeout(Duration::from_secs(2))
                .try_deadline(Duration::from_secs(5)),
        )
        .build();
    flows.register(&def).await.unwrap();
}

async fn holds(t: &TestStore) -> Vec<(String, String)> {
    let raw = t.raw().await;
    raw.query(
        &format!(
            "SELECT participant, state FROM \"{}\".holds ORDER BY participant",
            t.schema
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_tries_succeed_then_every_participant_confirms() {
    let (t, flows) = engine().await;
    let script: Shared = Arc::default();
    setup(&t, &flows, script.clone()).await;
    let workers = Workers::start(&[&flows]);
    let id = flows.start("trip", None, json!({})).await.unwrap().instance;
    wait_for(&flows, id, InstanceStatus::Completed, 20).await;
    workers.stop().await;
    assert_eq!(
        holds(&t).await,
        vec![
            ("flight".into(), "confirmed".into()),
            ("hotel".into(), "confirmed".into())
        ]
    );
    let outcomes = script.lock().unwrap().outcomes.clone();
    assert_eq!(outcomes.len(), 4, "two tries, two confirms: {outcomes:?}");
    assert!(outcomes.iter().all(|o| o.2 == BarrierOutcome::Run));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_try_cancels_every_participant_that_tried() {
    let (t, flows) = engine().await;
    let script: Shared = Arc::default();
    script.lock().unwrap().failing.insert("flight".into());
    setup(&t, &flows, script.clone()).await;
    let workers = Workers::start(&[&flows]);
    let id = flows.start("trip", None, json!({})).await.unwrap().instance;
    let state = wait_for(&flows, id, InstanceStatus::Compensated, 20).await;
    workers.stop().await;
    assert!(state.reason.unwrap().contains("sold out"));
    // The hotel was reserved, then released; the flight's failed try rolled back,
    // so its cancel found nothing to release.
    assert_eq!(holds(&t).await, vec![("hotel".into(), "released".into())]);
    let outcomes = script.lock().unwrap().outcomes.clone();
    assert!(outcomes.contains(&("hotel".into(), TccPhase::Cancel, BarrierOutcome::Run)));
    assert!(outcomes.contains(&(
        "flight".into(),
        TccPhase::Cancel,
        BarrierOutcome::NullCancel
    )));
    assert!(!outcomes.iter().any(|o| o.1 == TccPhase::Confirm));
}

/// The flight's try is delayed past its timeout: the engine cancels it first
/// (a null cancel at the participant), and when the try finally arrives the
/// barrier rejects it, so nothing stays reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_that_overtakes_its_try_blocks_the_late_try() {
    let (t, flows) = engine().await;
    let script: Shared = Arc::default();
    script.lock().unwrap().late.insert("flight".into());
    setup(&t, &flows, script.clone()).await;
    let workers = Workers::start(&[&flows]);
    let id = flows.start("trip", None, json!({})).await.unwrap().instance;
    wait_for(&flows, id, InstanceStatus::Compensated, 20).await;
    // Let the delayed try arrive.
    eventually("the delayed try arrives", DEADLINE, {
        let script = &script;
        move || async move {
            let script = script.lock().unwrap();
            let mut outcomes = script.outcomes.iter();
            let tried = outcomes.any(|o| o.0 == "flight" && o.1 == TccPhase::Try);
            tried.then_some(())
        }
    })
    .await;
    workers.stop().await;
    let outcomes = script.lock().unwrap().outcomes.clone();
    let flight: Vec<_> = outcomes
        .iter()
        .filter(|o| o.0 == "flight")
        .map(|o| (o.1, o.2))
        .collect();
    assert_eq!(
        flight,
        vec![
            (TccPhase::Cancel, BarrierOutcome::NullCancel),
            (TccPhase::Try, BarrierOutcome::Rejected)
        ],
        "{outcomes:?}"
    );
    assert_eq!(holds(&t).await, vec![("hotel".into(), "released".into())]);
}
