//! Flows 2 control flow against a real PostgreSQL and real workers: conditions
//! (`when`), durable timers (`wait`) and signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dcbflow::flow::{
    Action, FlowDefinition, FlowError, Flows, InstanceStatus, OnExhausted, Operator, Phase, Signal,
    StepId, StepStatus, TaskContext, TaskDefinition, TaskError, ValueType, events::types,
};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Workers, engine, fast, wait_for};
use crate::support::{DEADLINE, eventually};

/// The number of events of `event_type` in the instance's timeline.
async fn count(flows: &Flows, id: Uuid, event_type: &str) -> usize {
    flows
        .timeline(id)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type() == event_type)
        .count()
}

/// Registers a Rust function that counts its calls and returns `output`.
fn counted(flows: &Flows, name: &str, output: Value) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    flows.function(name, move |_ctx: TaskContext| {
        let (c, output) = (c.clone(), output.clone());
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, TaskError>(output)
        }
    });
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_false_condition_skips_its_branch_and_the_join_completes() {
    let (_t, flows) = engine().await;
    flows.function("score", |ctx: TaskContext| async move {
        Ok::<_, TaskError>(json!({"value": ctx.flow_input["score"]}))
    });
    let auto = counted(&flows, "auto", json!({"approved": true}));
    let manual = counted(&flows, "manual", json!({"approved": "by a human"}));
    let join = counted(&flows, "join", json!({}));
    let def = FlowDefinition::builder("route")
        .input("score", ValueType::Integer)
        .task(TaskDefinition::new("score", Action::rust("score")))
        .task(
            TaskDefinition::new("auto", Action::rust("auto"))
                .after(["score"])
                .when("tasks.score.output.value >= 700"),
        )
        .task(
            TaskDefinition::new("manual", Action::rust("manual"))
                .after(["score"])
                .when("tasks.score.output.value < 700"),
        )
        .task(TaskDefinition::new("join", Action::rust("join")).after(["auto", "manual"]))
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);

    let high = flows
        .start("route", None, json!({"score": 720}))
        .await
        .unwrap()
        .instance;
    let low = flows
        .start("route", None, json!({"score": 500}))
        .await
        .unwrap()
        .instance;
    let high = wait_for(&flows, high, InstanceStatus::Completed, 30).await;
    let low = wait_for(&flows, low, InstanceStatus::Completed, 30).await;
    workers.stop().await;

    assert_eq!(
        auto.load(Ordering::SeqCst),
        1,
        "auto ran for the high score only"
    );
    assert_eq!(
        manual.load(Ordering::SeqCst),
        1,
        "manual ran for the low score only"
    );
    assert_eq!(join.load(Ordering::SeqCst), 2, "the join ran for both");
    let manual_step = high.step(&StepId::new("manual", Phase::Action));
    assert_eq!(manual_step.status, StepStatus::Skipped);
    assert_eq!(
        manual_step.skip_reason.as_deref(),
        Some("condition false: tasks.score.output.value < 700")
    );
    assert!(
        !high.outputs.contains_key("manual"),
        "a skipped task has no output"
    );
    assert_eq!(low.outputs["manual"], json!({"approved": "by a human"}));
    assert_eq!(count(&flows, high.id, types::TASK_SKIPPED).await, 1);
    let skipped = flows
        .timeline(low.id)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.event_type() == types::TASK_SKIPPED)
        .expect("a skip event");
    assert_eq!(skipped.data()["task"], "auto");
    assert_eq!(
        skipped.data()["condition"],
        "tasks.score.output.value >= 700"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ill_typed_condition_is_refused_at_register() {
    let (_t, flows) = engine().await;
    counted(&flows, "a", json!({}));
    let def = FlowDefinition::builder("typed")
        .input("amount", ValueType::Number)
        .task(TaskDefinition::new("a", Action::rust("a")).when("flow.input.amount > 'ten'"))
        .task(TaskDefinition::new("b", Action::rust("a")).when("tasks.a.output.x"))
        .build();
    let Err(FlowError::Definition(e)) = flows.register(&def).await else {
        panic!("registered an ill-typed condition");
    };
    assert!(
        e.problems
            .iter()
            .any(|p| p.contains("orders a number against a string")),
        "{e}"
    );
    assert!(
        e.problems.iter().any(|p| p.contains("refers to task \"a\", which is not among the tasks it depends on")),
        "{e}"
    );
    assert!(
        matches!(
            flows.definition("typed", None).await,
            Err(FlowError::UnknownFlow(_))
        ),
        "nothing registered"
    );
}

/// The wake-up row of `id`: its due time, if it has one.
async fn wakeup(flows: &Flows, id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    let client = flows.store().pool().get().await.unwrap();
    let row = client
        .query_opt(
            &format!(
                "SELECT due_at FROM \"{}\".flow_wakeups WHERE instance = $1",
                flows.store().schema()
            ),
            &[&id],
        )
        .await
        .unwrap();
    row.map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timer_survives_its_worker_being_killed_mid_wait() {
    let (t, flows) = engine().await;
    let after = counted(&flows, "after", json!({"done": true}));
    let def = FlowDefinition::builder("timer")
        .task(TaskDefinition::wait(
            "cool_off",
            Duration::from_millis(1500),
        ))
        .task(TaskDefinition::new("after", Action::rust("after")).after(["cool_off"]))
        .build();
    flows.register(&def).await.unwrap();

    // Worker A reaches the timer, and is killed (its task aborted, as a crash
    // would: no drain, no release of its claim).
    let worker = flows.worker(fast("doomed"));
    let killed = tokio::spawn(async move {
        let _ = worker.run(dcbflow::CancellationToken::new()).await;
    });
    let id = flows
        .start("timer", None, json!({}))
        .await
        .unwrap()
        .instance;
    let waiting = eventually("the timer to be reached", DEADLINE, || async {
        let s = flows.instance(id).await.unwrap()?;
        let step = s.step(&StepId::new("cool_off", Phase::Action));
        (step.status == StepStatus::Waiting).then_some(step)
    })
    .await;
    killed.abort();
    let _ = killed.await;
    let until = waiting.due_at.expect("the timer's due time");
    // The timer is a row of the wake-up table, not a sleeping worker.
    assert_eq!(wakeup(&flows, id).await, Some(until));
    assert_eq!(after.load(Ordering::SeqCst), 0);

    // Another process's engine on the same store fires it.
    let other = Flows::new(t.store.clone());
    let after2 = counted(&other, "after", json!({"done": true}));
    let workers = Workers::start(&[&other]);
    let done = wait_for(&other, id, InstanceStatus::Completed, 30).await;
    workers.stop().await;
    assert_eq!(after2.load(Ordering::SeqCst), 1);
    let fired = flows
        .timeline(id)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.event_type() == types::STEP_SUCCEEDED && e.data()["step"]["task"] == "cool_off")
        .expect("the timer fired");
    assert!(
        fired.recorded_at >= until,
        "fired at {} before its time {until}",
        fired.recorded_at
    );
    assert_eq!(done.outputs["cool_off"]["waited_until"], json!(until));
}

/// first (held until `gate` opens) → approve (signal `approved`) → recheck
/// (signal `approved` again).
async fn signal_flow(flows: &Flows) -> Arc<tokio::sync::Notify> {
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    flows.function("first", move |_ctx: TaskContext| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok::<_, TaskError>(json!({}))
        }
    });
    let def = FlowDefinition::builder("approval")
        .task(TaskDefinition::new("first", Action::rust("first")).timeout(Duration::from_secs(60)))
        .task(TaskDefinition::signal("approve", "approved").after(["first"]))
        .task(TaskDefinition::signal("recheck", "approved").after(["approve"]))
        .build();
    flows.register(&def).await.unwrap();
    gate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_sent_early_is_kept_and_consumed_once() {
    let (_t, flows) = engine().await;
    let gate = signal_flow(&flows).await;
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("approval", None, json!({}))
        .await
        .unwrap()
        .instance;
    eventually("first to run", DEADLINE, || async {
        let s = flows.instance(id).await.unwrap()?;
        (s.step(&StepId::new("first", Phase::Action)).status == StepStatus::Running).then_some(())
    })
    .await;

    // Sent before `approve` is reached, by 8 racing senders with one id.
    let sends = (0..8).map(|_| {
        let flows = flows.clone();
        async move {
            flows
                .signal(
                    id,
                    Signal::new("approved", "s-1")
                        .payload(json!({"by": "ada"}))
                        .actor("ada"),
                )
                .await
        }
    });
    for r in futures::future::join_all(sends).await {
        r.expect("an idempotent send succeeds");
    }
    assert_eq!(
        count(&flows, id, types::SIGNAL_RECEIVED).await,
        1,
        "one id, one signal"
    );
    gate.notify_one();

    // `approve` consumes it; `recheck` waits for a signal of its own.
    let waiting = eventually("recheck to wait", DEADLINE, || async {
        let s = flows.instance(id).await.unwrap()?;
        (s.step(&StepId::new("recheck", Phase::Action)).status == StepStatus::Waiting).then_some(s)
    })
    .await;
    assert_eq!(waiting.outputs["approve"], json!({"by": "ada"}));
    assert_eq!(waiting.signals.len(), 1);
    assert_eq!(waiting.signals[0].consumed_by.as_deref(), Some("approve"));
    assert_eq!(waiting.status, InstanceStatus::Running);

    flows
        .signal(id, Signal::new("approved", "s-2").payload(json!("again")))
        .await
        .unwrap();
    let done = wait_for(&flows, id, InstanceStatus::Completed, 30).await;
    workers.stop().await;
    assert_eq!(done.outputs["recheck"], json!("again"));
    assert_eq!(count(&flows, id, types::SIGNAL_RECEIVED).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_signals_are_refused_and_write_nothing() {
    let (_t, flows) = engine().await;
    let _gate = signal_flow(&flows).await;
    let id = flows
        .start("approval", None, json!({}))
        .await
        .unwrap()
        .instance;
    flows
        .signal(id, Signal::new("approved", "s-1").payload(json!(1)))
        .await
        .unwrap();
    let before = flows.timeline(id).await.unwrap().len();
    for (signal, expected) in [
        (
            Signal::new("aproved", "x"),
            "no task of flow \"approval\" waits for signal \"aproved\"",
        ),
        (
            Signal::new("approved", "s-1").payload(json!(2)),
            "already sent",
        ),
        (Signal::new("approved", ""), "a signal id must be"),
        (
            Signal::new("approved", "x".repeat(201)),
            "a signal id must be",
        ),
    ] {
        match flows.signal(id, signal).await {
            Err(FlowError::NotAllowed(m)) => assert!(m.contains(expected), "{m}"),
            other => panic!("expected a refusal with {expected:?}, got {other:?}"),
        }
    }
    match flows
        .signal(Uuid::new_v4(), Signal::new("approved", "y"))
        .await
    {
        Err(FlowError::UnknownInstance(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        flows.timeline(id).await.unwrap().len(),
        before,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_that_does_not_come_in_time_follows_on_exhausted() {
    let (_t, flows) = engine().await;
    let def = FlowDefinition::builder("deadline")
        .task(
            TaskDefinition::signal("approve", "approved")
                .signal_timeout(Duration::from_millis(300))
                .on_exhausted(OnExhausted::Pause),
        )
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("deadline", None, json!({}))
        .await
        .unwrap()
        .instance;
    let paused = wait_for(&flows, id, InstanceStatus::Paused, 30).await;
    let step = StepId::new("approve", Phase::Action);
    assert!(
        paused
            .step(&step)
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("no signal \"approved\""),
        "{paused:?}"
    );
    // A signal sent while the instance is paused is kept; "retry now" waits
    // again, with a fresh timeout, and consumes it at once.
    flows
        .signal(
            id,
            Signal::new("approved", "late").payload(json!({"ok": true})),
        )
        .await
        .unwrap();
    let kept = flows.instance(id).await.unwrap().unwrap();
    assert_eq!(kept.status, InstanceStatus::Paused);
    let ops = Operator::new("ada", "the approver is back");
    flows
        .retry_now(id, &step, kept.last_position, &ops)
        .await
        .unwrap();
    let done = wait_for(&flows, id, InstanceStatus::Completed, 30).await;
    workers.stop().await;
    assert_eq!(done.outputs["approve"], json!({"ok": true}));
    assert_eq!(done.step(&step).attempts, 2, "waited twice");
}

/// pay: waits for `PaymentSettled` tagged with the order (the business key),
/// then `ship` records the amount it saw.
async fn payment_flow(flows: &Flows) -> Arc<std::sync::Mutex<Vec<Value>>> {
    let shipped = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = shipped.clone();
    flows.function("ship", move |ctx: TaskContext| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(ctx.outputs["paid"].clone());
            Ok::<_, TaskError>(json!({}))
        }
    });
    let def = FlowDefinition::builder("payment")
        .task(TaskDefinition::await_event(
            "paid",
            ["PaymentSettled"],
            ["order:{{business_key}}"],
        ))
        .task(TaskDefinition::new("ship", Action::rust("ship")).after(["paid"]))
        .build();
    flows.register(&def).await.unwrap();
    shipped
}

fn settled(order: &str, amount: i64) -> dcbflow::Event {
    dcbflow::Event::new(
        "PaymentSettled",
        [format!("order:{order}")],
        json!({"amount": amount}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn await_event_catches_an_event_committed_late_by_a_writer_held_open() {
    let (t, flows) = engine().await;
    let shipped = payment_flow(&flows).await;
    let workers = Workers::start(&[&flows]);
    let a = flows
        .start("payment", Some("o1"), json!({}))
        .await
        .unwrap()
        .instance;
    let b = flows
        .start("payment", Some("o2"), json!({}))
        .await
        .unwrap()
        .instance;
    for id in [a, b] {
        eventually("the payment to be awaited", DEADLINE, || async {
            let s = flows.instance(id).await.unwrap()?;
            (s.step(&StepId::new("paid", Phase::Action)).status == StepStatus::Waiting)
                .then_some(())
        })
        .await;
    }
    // o1's payment is written by a transaction held open; o2's, after it, commits.
    let mut client = t.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let late = t
        .store
        .append_in_tx(&tx, vec![settled("o1", 10)], None)
        .await
        .unwrap()
        .last_position();
    let later = t
        .store
        .append(vec![settled("o2", 20)], None)
        .await
        .unwrap()
        .last_position();
    assert!(later > late);
    // Give a waker time to go past o1: one that delivered o2 and moved its
    // cursor beyond o1's position would never come back to it. (o2 may be
    // found before o1 commits, by the worker's read after a waker's first
    // sweep; through the subscription it is not delivered before o1's writer
    // ends.)
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        wait_for(&flows, b, InstanceStatus::Completed, 30),
    )
    .await;
    tx.commit().await.unwrap();
    let a = wait_for(&flows, a, InstanceStatus::Completed, 30).await;
    let b = wait_for(&flows, b, InstanceStatus::Completed, 30).await;
    workers.stop().await;
    assert_eq!(a.outputs["paid"]["position"], json!(late.0));
    assert_eq!(a.outputs["paid"]["data"], json!({"amount": 10}));
    assert_eq!(b.outputs["paid"]["position"], json!(later.0));
    assert_eq!(shipped.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_already_in_the_log_is_taken_and_one_that_never_comes_times_out() {
    let (t, flows) = engine().await;
    let shipped = payment_flow(&flows).await;
    let def = FlowDefinition::builder("patient")
        .task(
            TaskDefinition::await_event("paid", ["PaymentSettled"], ["order:{{business_key}}"])
                .signal_timeout(Duration::from_millis(300))
                .on_exhausted(OnExhausted::Fail),
        )
        .build();
    flows.register(&def).await.unwrap();
    let before = t
        .store
        .append(vec![settled("o3", 30)], None)
        .await
        .unwrap()
        .last_position();
    // Workers started after the event: the waker's first sweep and the
    // worker's read find it.
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("payment", Some("o3"), json!({}))
        .await
        .unwrap()
        .instance;
    let done = wait_for(&flows, id, InstanceStatus::Completed, 30).await;
    assert_eq!(done.outputs["paid"]["position"], json!(before.0));
    assert_eq!(shipped.lock().unwrap().len(), 1);
    let never = flows
        .start("patient", Some("o4"), json!({}))
        .await
        .unwrap()
        .instance;
    let failed = wait_for(&flows, never, InstanceStatus::Failed, 30).await;
    workers.stop().await;
    let step = failed.step(&StepId::new("paid", Phase::Action));
    assert!(
        step.error
            .as_deref()
            .unwrap_or_default()
            .contains("no event of"),
        "{step:?}"
    );
}

/// `order`: reserve (compensated by `release`) → shipment (a child `shipment`
/// flow: `pack`, then waiting for the signal `picked_up` when the input says so)
/// → done. `pack` fails for order "bad".
async fn parent_and_child(flows: &Flows) -> Arc<AtomicUsize> {
    let released = Arc::new(AtomicUsize::new(0));
    counted(flows, "reserve", json!({"reserved": true}));
    counted(flows, "done", json!({}));
    let r = released.clone();
    flows.function("release", move |_ctx: TaskContext| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, TaskError>(json!({}))
        }
    });
    flows.function("pack", |ctx: TaskContext| async move {
        if ctx.flow_input["order"] == "bad" {
            Err(TaskError::fatal("no such parcel"))
        } else {
            Ok(json!({"parcel": format!("p-{}", ctx.flow_input["order"].as_str().unwrap_or("?"))}))
        }
    });
    let child = FlowDefinition::builder("shipment")
        .input("order", ValueType::String)
        .input_default("wait", ValueType::Boolean, json!(false))
        .task(
            TaskDefinition::new("pack", Action::rust("pack"))
                .retry(dcbflow::flow::TaskRetry::attempts(1))
                .on_exhausted(OnExhausted::Fail),
        )
        .task(
            TaskDefinition::signal("pickup", "picked_up")
                .after(["pack"])
                .when("flow.input.wait"),
        )
        .build();
    flows.register(&child).await.unwrap();
    let parent = FlowDefinition::builder("order")
        .input("order", ValueType::String)
        .input_default("wait", ValueType::Boolean, json!(false))
        .task(
            TaskDefinition::new("reserve", Action::rust("reserve"))
                .compensate(Action::rust("release")),
        )
        .task(
            TaskDefinition::sub_flow(
                "shipment",
                "shipment",
                json!({"order": "{{flow.input.order}}", "wait": "{{flow.input.wait}}"}),
            )
            .after(["reserve"]),
        )
        .task(TaskDefinition::new("done", Action::rust("done")).after(["shipment"]))
        .build();
    flows.register(&parent).await.unwrap();
    released
}

/// The child instance a parent's `shipment` task started.
async fn child_of(flows: &Flows, parent: Uuid) -> Uuid {
    eventually("the child to start", DEADLINE, || async {
        flows
            .instance(parent)
            .await
            .unwrap()?
            .step(&StepId::new("shipment", Phase::Action))
            .child
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sub_flow_completes_with_its_childs_outputs_and_links_both_ways() {
    let (_t, flows) = engine().await;
    let released = parent_and_child(&flows).await;
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("order", Some("o-1"), json!({"order": "o-1"}))
        .await
        .unwrap()
        .instance;
    let done = wait_for(&flows, id, InstanceStatus::Completed, 30).await;
    let child = done
        .step(&StepId::new("shipment", Phase::Action))
        .child
        .expect("a child");
    let child_state = flows.instance(child).await.unwrap().unwrap();
    workers.stop().await;
    assert_eq!(child_state.status, InstanceStatus::Completed);
    assert_eq!(done.outputs["shipment"]["pack"], json!({"parcel": "p-o-1"}));
    let parent = child_state.parent.expect("the child names its parent");
    assert_eq!((parent.instance, parent.task.as_str()), (id, "shipment"));
    assert_eq!(released.load(Ordering::SeqCst), 0);
    // Started once per parent and task: one shipment instance.
    let starts = flows
        .store()
        .read_all(
            &dcbflow::Query::items_of([types::STARTED], ["flow:shipment"]),
            dcbflow::ReadOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(starts.events.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_child_fails_its_task_and_compensates_the_parent() {
    let (_t, flows) = engine().await;
    let released = parent_and_child(&flows).await;
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("order", Some("o-bad"), json!({"order": "bad"}))
        .await
        .unwrap()
        .instance;
    let compensated = wait_for(&flows, id, InstanceStatus::Compensated, 30).await;
    workers.stop().await;
    let step = compensated.step(&StepId::new("shipment", Phase::Action));
    assert_eq!(step.status, StepStatus::Failed);
    assert!(
        step.error
            .as_deref()
            .unwrap_or_default()
            .contains("is failed"),
        "{step:?}"
    );
    assert_eq!(
        released.load(Ordering::SeqCst),
        1,
        "the reservation was released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborting_the_parent_aborts_its_running_child() {
    let (_t, flows) = engine().await;
    let released = parent_and_child(&flows).await;
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("order", Some("o-2"), json!({"order": "o-2", "wait": true}))
        .await
        .unwrap()
        .instance;
    let child = child_of(&flows, id).await;
    eventually("the child to wait for its pickup", DEADLINE, || async {
        let s = flows.instance(child).await.unwrap()?;
        (s.step(&StepId::new("pickup", Phase::Action)).status == StepStatus::Waiting).then_some(())
    })
    .await;
    let parent = flows.instance(id).await.unwrap().unwrap();
    flows
        .abort(
            id,
            parent.last_position,
            &Operator::new("ada", "customer cancelled"),
        )
        .await
        .unwrap();
    let parent = wait_for(&flows, id, InstanceStatus::Compensated, 30).await;
    let child = wait_for(&flows, child, InstanceStatus::Compensated, 30).await;
    workers.stop().await;
    assert!(child.reason.unwrap_or_default().contains(&id.to_string()));
    assert_eq!(released.load(Ordering::SeqCst), 1);
    assert_eq!(
        parent
            .step(&StepId::new("shipment", Phase::Compensate))
            .status,
        StepStatus::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_parents_complete_whenever_their_children_end() {
    let (_t, flows) = engine().await;
    parent_and_child(&flows).await;
    // Default claims (30 s): a claim left behind would show as a stall.
    let cancel = dcbflow::CancellationToken::new();
    let mut handles = Vec::new();
    for i in 0..2 {
        let mut o = dcbflow::flow::WorkerOptions::default().id(format!("d{i}"));
        o.poll_interval = Duration::from_millis(50);
        let (w, c) = (flows.worker(o), cancel.clone());
        handles.push(tokio::spawn(async move { w.run(c).await.unwrap() }));
    }
    let mut ids = Vec::new();
    for i in 0..20 {
        let key = format!("m-{i}");
        ids.push(
            flows
                .start("order", Some(&key), json!({"order": key}))
                .await
                .unwrap()
                .instance,
        );
    }
    for id in ids {
        wait_for(&flows, id, InstanceStatus::Completed, 20).await;
    }
    cancel.cancel();
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_woken_with_nothing_to_do_releases_its_claim() {
    let (t, flows) = engine().await;
    payment_flow(&flows).await;
    // Default claims: a claim left behind would hold the instance for 30 s.
    let cancel = dcbflow::CancellationToken::new();
    let mut o = dcbflow::flow::WorkerOptions::default().id("default-claims");
    o.poll_interval = Duration::from_millis(50);
    let worker = flows.worker(o);
    let c = cancel.clone();
    let handle = tokio::spawn(async move { worker.run(c).await.unwrap() });
    let id = flows
        .start("payment", Some("o9"), json!({}))
        .await
        .unwrap()
        .instance;
    eventually("the payment to be awaited", DEADLINE, || async {
        let s = flows.instance(id).await.unwrap()?;
        (s.step(&StepId::new("paid", Phase::Action)).status == StepStatus::Waiting).then_some(())
    })
    .await;
    // Woken with nothing to do (as an event waker's sweep does).
    let table = format!("\"{}\".flow_wakeups", t.store.schema());
    let client = t.store.pool().get().await.unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {table} (instance, due_at) VALUES ($1, now()) \
                 ON CONFLICT (instance) DO UPDATE SET due_at = now()"
            ),
            &[&id],
        )
        .await
        .unwrap();
    // The worker claims it, finds nothing to do, and lets it go: no row (a
    // claim left behind would hold it for 30 s, whatever woke it next).
    eventually(
        "the wake-up to be taken and dropped",
        Duration::from_secs(10),
        || async {
            let row = client
                .query_opt(
                    &format!("SELECT 1 FROM {table} WHERE instance = $1"),
                    &[&id],
                )
                .await
                .unwrap();
            row.is_none().then_some(())
        },
    )
    .await;
    t.store.append(vec![settled("o9", 9)], None).await.unwrap();
    wait_for(&flows, id, InstanceStatus::Completed, 10).await;
    cancel.cancel();
    handle.await.unwrap();
}
