//! Manual intervention: pause/resume, skip, retry now, abort; each recorded with
//! who and why, and refused when the instance moved since the operator looked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dcbflow::flow::{
    Action, FlowDefinition, FlowError, Flows, InstanceFilter, InstanceStatus, OnExhausted,
    Operator, Phase, StepId, TaskContext, TaskDefinition, TaskError, TaskRetry,
};
use serde_json::{Value, json};

use super::{Workers, engine, wait_for};
use crate::support::{DEADLINE, eventually};

/// pay → ship, ship pausing the instance when exhausted; `broken` decides
/// whether ship fails.
async fn paused_flow(flows: &Flows, broken: Arc<AtomicBool>) {
    flows.function("pay", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(json!({"paid": true}))
    });
    flows.function("undo_pay", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    flows.function("ship", move |ctx: TaskContext| {
        let broken = broken.clone();
        async move {
            if broken.load(Ordering::SeqCst) {
                Err(TaskError::fatal("carrier refused"))
            } else {
                Ok(json!({"shipped": ctx.attempt}))
            }
        }
    });
    let def = FlowDefinition::builder("manual")
        .task(TaskDefinition::new("pay", Action::rust("pay")).compensate(Action::rust("undo_pay")))
        .task(
            TaskDefinition::new("ship", Action::rust("ship"))
                .after(["pay"])
                .retry(TaskRetry::attempts(1))
                .on_exhausted(OnExhausted::Pause),
        )
        .build();
    flows.register(&def).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skip_retry_and_abort_a_paused_instance() {
    let (_t, flows) = engine().await;
    let broken = Arc::new(AtomicBool::new(true));
    paused_flow(&flows, broken.clone()).await;
    let workers = Workers::start(&[&flows]);
    let ops = Operator::new("ada@ops", "carrier fixed it by hand");

    // Skip: the operator supplies ship's output; the instance completes.
    let a = flows
        .start("manual", Some("a"), json!({}))
        .await
        .unwrap()
        .instance;
    let paused = wait_for(&flows, a, InstanceStatus::Paused, 20).await;
    assert!(paused.reason.clone().unwrap().contains("carrier refused"));
    let incidents = flows.incidents().await.unwrap();
    assert!(
        incidents
            .iter()
            .any(|g| g.kind == "exhausted" && g.task == "ship" && g.instances.contains(&a))
    );
    let done = flows
        .skip(
            a,
            "ship",
            json!({"shipped": "by hand"}),
            paused.last_position,
            &ops,
        )
        .await
        .unwrap();
    assert_eq!(done.outputs["ship"], json!({"shipped": "by hand"}));
    wait_for(&flows, a, InstanceStatus::Completed, 20).await;
    let skipped = flows
        .timeline(a)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.event_type() == "FlowStepSkipped")
        .unwrap();
    assert_eq!(skipped.data()["actor"], json!("ada@ops"));
    assert_eq!(skipped.data()["reason"], json!("carrier fixed it by hand"));

    // Retry now: with the carrier back, a fresh attempt succeeds.
    let b = flows
        .start("manual", Some("b"), json!({}))
        .await
        .unwrap()
        .instance;
    let paused = wait_for(&flows, b, InstanceStatus::Paused, 20).await;
    broken.store(false, Ordering::SeqCst);
    let ship = StepId::new("ship", Phase::Action);
    flows
        .retry_now(b, &ship, paused.last_position, &ops)
        .await
        .unwrap();
    let done = wait_for(&flows, b, InstanceStatus::Completed, 20).await;
    assert_eq!(done.outputs["ship"], json!({"shipped": 2}));

    // Abort: the paid task is compensated.
    broken.store(true, Ordering::SeqCst);
    let c = flows
        .start("manual", Some("c"), json!({}))
        .await
        .unwrap()
        .instance;
    let paused = wait_for(&flows, c, InstanceStatus::Paused, 20).await;
    // A stale version is refused and writes nothing.
    let stale = dcbflow::Position(paused.last_position.0 - 1);
    assert!(matches!(
        flows.abort(c, stale, &ops).await,
        Err(FlowError::Moved { .. })
    ));
    flows.abort(c, paused.last_position, &ops).await.unwrap();
    let done = wait_for(&flows, c, InstanceStatus::Compensated, 20).await;
    assert!(
        done.step(&StepId::new("pay", Phase::Compensate)).status
            == dcbflow::flow::StepStatus::Succeeded
    );
    workers.stop().await;

    // Nothing left open; queries by status and key.
    let incidents = flows.incidents().await.unwrap();
    assert!(incidents.is_empty(), "{incidents:?}");
    let completed = flows
        .instances(&InstanceFilter::flow("manual").status(InstanceStatus::Completed))
        .await
        .unwrap();
    assert_eq!(completed.len(), 2);
}

/// Pause holds new steps back; resume lets them run. Operations that do not
/// apply are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_and_resume() {
    let (_t, flows) = engine().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    flows.function("first", move |_ctx: TaskContext| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok::<_, TaskError>(Value::Null)
        }
    });
    flows.function("second", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    let def = FlowDefinition::builder("pausable")
        .task(TaskDefinition::new("first", Action::rust("first")))
        .task(TaskDefinition::new("second", Action::rust("second")).after(["first"]))
        .build();
    flows.register(&def).await.unwrap();
    // An instance of its own, to show that the worker keeps working.
    let probe = FlowDefinition::builder("probe")
        .task(TaskDefinition::new("probe", Action::rust("second")))
        .build();
    flows.register(&probe).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("pausable", None, json!({}))
        .await
        .unwrap()
        .instance;
    let ops = Operator::new("bob", "maintenance window");
    // Wait until `first` runs, then pause.
    let running = step_reaches(&flows, id, "first", dcbflow::flow::StepStatus::Running).await;
    let paused = flows.pause(id, running.last_position, &ops).await.unwrap();
    assert!(matches!(
        flows.resume(id, running.last_position, &ops).await,
        Err(FlowError::Moved { .. })
    ));
    gate.notify_one();
    // `first` finishes while paused; `second` must not start.
    let after_first = step_reaches(&flows, id, "first", dcbflow::flow::StepStatus::Succeeded).await;
    // The worker had its chance to start `second`: an instance started after
    // `first` finished has completed (the worker claims due instances oldest first).
    let later = flows
        .start("probe", None, json!({}))
        .await
        .unwrap()
        .instance;
    wait_for(&flows, later, InstanceStatus::Completed, 60).await;
    let still = flows.instance(id).await.unwrap().unwrap();
    assert_eq!(still.status, InstanceStatus::Paused);
    assert_eq!(
        still.step(&StepId::new("second", Phase::Action)).attempts,
        0
    );
    assert!(after_first.last_position > paused.last_position);
    assert!(matches!(
        flows.pause(id, still.last_position, &ops).await,
        Err(FlowError::NotAllowed(_))
    ));
    flows.resume(id, still.last_position, &ops).await.unwrap();
    wait_for(&flows, id, InstanceStatus::Completed, 20).await;
    workers.stop().await;
}

/// The instance's state once its step `task` (action) has `status`.
async fn step_reaches(
    flows: &Flows,
    id: uuid::Uuid,
    task: &str,
    status: dcbflow::flow::StepStatus,
) -> dcbflow::flow::InstanceState {
    let what = format!("step {task} of {id} is {status:?}");
    eventually(&what, DEADLINE, move || async move {
        let s = flows.instance(id).await.unwrap().unwrap();
        (s.step(&StepId::new(task, Phase::Action)).status == status).then_some(s)
    })
    .await
}

/// Eight operators pause one running instance at once, each having seen the
/// same position: exactly one pause is recorded, the others are told the
/// instance moved (or is already paused). Operations are transitions: each
/// first tries the optimistic one-statement commit (ADR 0011), whose condition
/// must refuse all but one, then the pessimistic command.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pauses_of_one_instance_record_one() {
    let (t, flows) = engine().await;
    flows.function("wait", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    let def = FlowDefinition::builder("pausable")
        .task(TaskDefinition::new("wait", Action::rust("wait")))
        .build();
    flows.register(&def).await.unwrap();
    for round in 0..5 {
        // No worker runs: the instance stays running with its step due.
        let id = flows
            .start("pausable", None, json!({}))
            .await
            .unwrap()
            .instance;
        let seen = flows.instance(id).await.unwrap().unwrap().last_position;
        let results = crate::support::race(8, |i| {
            let flows = flows.clone();
            async move {
                flows
                    .pause(id, seen, &Operator::new(format!("op{i}"), "race"))
                    .await
            }
        })
        .await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, FlowError::Moved { .. } | FlowError::NotAllowed(_)),
                    "round {round}: a losing pause failed with {e:?}"
                );
            }
        }
        let paused = flows
            .timeline(id)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.event_type() == "FlowPaused")
            .count();
        assert_eq!((won, paused), (1, 1), "round {round}: {results:?}");
    }
    drop(t);
}
