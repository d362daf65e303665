//! Graceful drain of a flow worker (`Worker::run_until`): after the stop
//! signal no new claim and no new step; running steps are recorded within the
//! grace period, the rest abandoned; every claim released.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dcbflow::flow::{
    Action, FlowDefinition, Flows, InstanceStatus, Phase, StepId, TaskContext, TaskDefinition,
    TaskError, TaskRetry,
};
use dcbflow::{CancellationToken, Store};
use serde_json::{Value, json};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::flow::{Workers, engine, fast, wait_for};
use crate::support::{DEADLINE, TestStore, eventually};

/// A task that says it started, then waits until the test lets it go.
fn held(flows: &Flows, name: &str, started: &Arc<Notify>, go: &Arc<Notify>) {
    let (started, go) = (started.clone(), go.clone());
    flows.function(name, move |_ctx: TaskContext| {
        let (started, go) = (started.clone(), go.clone());
        async move {
            started.notify_one();
            go.notified().await;
            Ok::<_, TaskError>(json!("held"))
        }
    });
}

/// `hold`, then `after`.
fn two_steps(timeout: Duration) -> FlowDefinition {
    FlowDefinition::builder("drained")
        .task(
            TaskDefinition::new("hold", Action::rust("hold"))
                .timeout(timeout)
                .retry(TaskRetry::attempts(3)),
        )
        .task(TaskDefinition::new("after", Action::rust("after")).after(["hold"]))
        .build()
}

async fn types_of(flows: &Flows, id: Uuid) -> Vec<String> {
    flows
        .timeline(id)
        .await
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e.event_type(), e.data()["step"]["task"]))
        .collect()
}

/// Who holds the instance's claim, and until when.
async fn claim(t: &TestStore, id: Uuid) -> (Option<String>, Option<DateTime<Utc>>) {
    let row = t
        .raw()
        .await
        .query_one(
            &format!(
                "SELECT claimed_by, claimed_until FROM \"{}\".flow_wakeups WHERE instance = $1",
                t.schema
            ),
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn claimed_by(t: &TestStore, id: Uuid) -> Option<String> {
    claim(t, id).await.0
}

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

/// The step runs when the stop fires; it is let go afterwards, within the
/// grace period: its success is recorded, the next step is not started, and the
/// claim is released; another worker then finishes the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_step_finishes_within_the_grace_period() {
    let (t, flows) = engine().await;
    let (started, go) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    held(&flows, "hold", &started, &go);
    flows.function("after", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    flows
        .register(&two_steps(Duration::from_secs(60)))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let worker = {
        let (w, stop) = (flows.worker(fast("drainer")), stop.clone());
        tokio::spawn(async move { w.run_until(stop, Duration::from_secs(60)).await })
    };
    let id = flows
        .start("drained", None, json!({}))
        .await
        .unwrap()
        .instance;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("the step starts");

    stop.cancel();
    // Draining, the worker keeps its claim alive while the step runs: wait for
    // a renewal after the stop (or for the claim to go, or the worker to end,
    // which would be wrong: a worker that abandons at once does that).
    let (_, until) = claim(&t, id).await;
    eventually("the claim is renewed after the stop", DEADLINE, || async {
        let (by, now) = claim(&t, id).await;
        (by.is_none() || now > until || worker.is_finished()).then_some(())
    })
    .await;
    assert!(
        !worker.is_finished(),
        "the worker returned while its step was running"
    );
    assert_eq!(claimed_by(&t, id).await.as_deref(), Some("drainer"));
    go.notify_one(); // the result arrives while draining
    let drained = tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("the worker drains")
        .unwrap()
        .unwrap();
    assert_eq!(drained.steps_finished, 1, "{drained:?}");
    assert_eq!(drained.steps_abandoned, 0, "{drained:?}");
    assert_eq!(drained.instances_released, 1, "{drained:?}");

    let state = flows.instance(id).await.unwrap().unwrap();
    let hold = state.step(&StepId::new("hold", Phase::Action));
    assert_eq!(hold.status, dcbflow::flow::StepStatus::Succeeded);
    assert_eq!(state.outputs["hold"], json!("held"));
    let timeline = types_of(&flows, id).await;
    assert!(
        !timeline.contains(&"FlowStepStarted \"after\"".to_owned()),
        "no step is started after the stop: {timeline:?}"
    );
    assert_eq!(claimed_by(&t, id).await, None, "the claim is released");

    let workers = Workers::start(&[&flows]);
    wait_for(&flows, id, InstanceStatus::Completed, 30).await;
    workers.stop().await;
}

/// The step is still running when the grace period ends: it is abandoned, the
/// claim released; after the step's lease another worker times the attempt out
/// and completes the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_still_running_after_the_grace_period_is_abandoned() {
    let t = TestStore::new().await;
    let (a, b) = (process(&t).await, process(&t).await);
    let (started, never) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    held(&a, "hold", &started, &never);
    for f in [&a, &b] {
        f.function("after", |_ctx: TaskContext| async move {
            Ok::<_, TaskError>(Value::Null)
        });
    }
    b.function("hold", |ctx: TaskContext| async move {
        Ok::<_, TaskError>(json!({"attempt": ctx.attempt}))
    });
    a.register(&two_steps(Duration::from_secs(5)))
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let worker = {
        let (w, stop) = (a.worker(fast("drainer")), stop.clone());
        tokio::spawn(async move { w.run_until(stop, Duration::from_millis(200)).await })
    };
    let id = a.start("drained", None, json!({})).await.unwrap().instance;
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("the step starts");

    stop.cancel();
    let drained = tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("the worker drains")
        .unwrap()
        .unwrap();
    assert_eq!(drained.steps_abandoned, 1, "{drained:?}");
    assert_eq!(drained.steps_finished, 0, "{drained:?}");
    assert_eq!(drained.instances_released, 1, "{drained:?}");
    assert_eq!(claimed_by(&t, id).await, None, "the claim is released");

    let workers = Workers::start(&[&b]);
    let state = wait_for(&b, id, InstanceStatus::Completed, 30).await;
    workers.stop().await;
    assert_eq!(state.outputs["hold"], json!({"attempt": 2}));
    let timeline = types_of(&b, id).await;
    assert!(
        timeline.contains(&"FlowStepTimedOut \"hold\"".to_owned()),
        "{timeline:?}"
    );
}
