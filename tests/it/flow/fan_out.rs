//! `for_each`: one step per item, at most `max_parallel` at once, outputs in
//! item order, an idempotency key per item, and per-item compensation.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcbflow::flow::{
    Action, FlowDefinition, InstanceStatus, TaskContext, TaskDefinition, TaskError,
};
use serde_json::{Value, json};

use super::{Workers, engine, wait_for};

/// 1,000 items: every item runs once with its own index and idempotency key, and
/// the task's output is the items' outputs in item order (not completion order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_items_complete_with_outputs_in_order() {
    let (_t, flows) = engine().await;
    let keys = Arc::new(Mutex::new(Vec::<(u32, String)>::new()));
    let k = keys.clone();
    flows.function("double", move |ctx: TaskContext| {
        let k = k.clone();
        async move {
            let (item, index) = ctx.item.clone().expect("an item");
            k.lock().unwrap().push((index, ctx.idempotency_key.clone()));
            // Later items finish first now and then, so completion order differs
            // from item order.
            if index % 7 == 0 {
                tokio::task::yield_now().await;
            }
            Ok(json!({"n": item["n"].as_u64().unwrap() * 2, "index": ctx.input["index"]}))
        }
    });
    let def = FlowDefinition::builder("fan")
        .task(
            TaskDefinition::new("double", Action::rust("double"))
                .for_each("{{flow.input.lines}}", 16)
                .input("index", json!("{{item_index}}")),
        )
        .task(
            TaskDefinition::new("total", Action::rust("count"))
                .after(["double"])
                .input("outputs", json!("{{tasks.double.output}}")),
        )
        .build();
    flows.function("count", |ctx: TaskContext| async move {
        Ok(json!({"items": ctx.input["outputs"].as_array().map_or(0, Vec::len)}))
    });
    flows.register(&def).await.unwrap();
    let lines: Vec<Value> = (0..1000u64).map(|n| json!({"n": n})).collect();
    let id = flows
        .start("fan", None, json!({"lines": lines}))
        .await
        .unwrap()
        .instance;
    let workers = Workers::start(&[&flows]);
    let state = wait_for(&flows, id, InstanceStatus::Completed, 240).await;
    workers.stop().await;

    let outputs = state.outputs["double"]
        .as_array()
        .expect("an array")
        .clone();
    assert_eq!(outputs.len(), 1000);
    for (i, o) in outputs.iter().enumerate() {
        assert_eq!(o["n"], json!(i as u64 * 2), "output {i}");
        assert_eq!(o["index"], json!(i), "output {i}");
    }
    assert_eq!(state.outputs["total"], json!({"items": 1000}));
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 1000, "each item ran exactly once");
    let indices: BTreeSet<u32> = keys.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices, (0..1000).collect());
    let distinct: BTreeSet<&String> = keys.iter().map(|(_, k)| k).collect();
    assert_eq!(distinct.len(), 1000, "an idempotency key per item");
    for (i, key) in keys.iter() {
        assert!(key.ends_with(&format!("/double[{i}]/action")), "{key}");
    }
    // One start and one success per item, plus the task's own: linear in the
    // items, not quadratic.
    let timeline = flows.timeline(id).await.unwrap();
    assert!(timeline.len() < 2 * 1000 + 20, "{} events", timeline.len());
}

/// No more than `max_parallel` items run at once, and they do run side by side:
/// the first items wait until three are running together, so a fan-out that ran
/// one item at a time would never get past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_parallel_bounds_the_items_in_flight() {
    let (_t, flows) = engine().await;
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let (r, p) = (running.clone(), peak.clone());
    flows.function("hold", move |_ctx: TaskContext| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while p.load(Ordering::SeqCst) < 3 {
                if tokio::time::Instant::now() > deadline {
                    r.fetch_sub(1, Ordering::SeqCst);
                    return Err(TaskError::fatal("three items never ran at once"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::task::yield_now().await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(json!(null))
        }
    });
    let def = FlowDefinition::builder("bounded")
        .task(TaskDefinition::new("hold", Action::rust("hold")).for_each("{{flow.input.items}}", 3))
        .build();
    flows.register(&def).await.unwrap();
    let id = flows
        .start(
            "bounded",
            None,
            json!({"items": (0..12).collect::<Vec<u32>>()}),
        )
        .await
        .unwrap()
        .instance;
    let workers = Workers::start(&[&flows]);
    let state = wait_for(&flows, id, InstanceStatus::Completed, 60).await;
    workers.stop().await;
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "at most max_parallel at once"
    );
    assert_eq!(state.outputs["hold"], json!(vec![Value::Null; 12]));
}

/// An empty array completes the task at once with an empty output; a value
/// that is not an array fails the task with code `for_each`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_items_complete_and_non_arrays_fail() {
    let (_t, flows) = engine().await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    flows.function("each", move |_ctx: TaskContext| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok(json!(1)) }
    });
    let def = FlowDefinition::builder("edge")
        .task(TaskDefinition::new("each", Action::rust("each")).for_each("{{flow.input.items}}", 4))
        .build();
    flows.register(&def).await.unwrap();
    let empty = flows
        .start("edge", None, json!({"items": []}))
        .await
        .unwrap()
        .instance;
    let scalar = flows
        .start("edge", None, json!({"items": "a, b"}))
        .await
        .unwrap()
        .instance;
    let workers = Workers::start(&[&flows]);
    let done = wait_for(&flows, empty, InstanceStatus::Completed, 30).await;
    let failed = wait_for(&flows, scalar, InstanceStatus::Compensated, 30).await;
    workers.stop().await;
    assert_eq!(done.outputs["each"], json!([]));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let timeline = flows.timeline(failed.id).await.unwrap();
    let failure = timeline
        .iter()
        .find(|e| e.event_type() == "FlowStepFailed")
        .expect("a failure");
    assert_eq!(failure.data()["code"], "for_each", "{}", failure.data());
    assert!(
        failure.data()["error"]
            .as_str()
            .unwrap()
            .contains("not an array"),
        "{}",
        failure.data()
    );
}

/// One item failing for good follows `on_exhausted` (compensate, by default):
/// each item that succeeded is compensated with its own item, the failed item and
/// the items never started are not, and the upstream task is compensated after
/// the items.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_item_compensates_each_succeeded_item() {
    let (_t, flows) = engine().await;
    let undone = Arc::new(Mutex::new(Vec::<String>::new()));
    let u = undone.clone();
    flows.function("reserve", |ctx: TaskContext| async move {
        let (item, _) = ctx.item.clone().expect("an item");
        if item == json!("broken") {
            return Err(TaskError::fatal("no such article").code("unknown_article"));
        }
        Ok(json!({"reserved": item}))
    });
    flows.function("release", move |ctx: TaskContext| {
        let u = u.clone();
        async move {
            let (item, index) = ctx.item.clone().expect("an item");
            assert_eq!(ctx.input["reserved"], item, "the item's own output");
            u.lock()
                .unwrap()
                .push(format!("{index}:{}", item.as_str().unwrap()));
            Ok(json!(null))
        }
    });
    flows.function("open", |_ctx: TaskContext| async {
        Ok(json!({"order": 1}))
    });
    let closed = Arc::new(Mutex::new(Vec::<String>::new()));
    let (c, u2) = (closed.clone(), undone.clone());
    flows.function("close", move |_ctx: TaskContext| {
        let (c, u2) = (c.clone(), u2.clone());
        async move {
            // Compensation runs in reverse: every item was released before this.
            c.lock()
                .unwrap()
                .push(format!("after {}", u2.lock().unwrap().len()));
            Ok(json!(null))
        }
    });
    let def = FlowDefinition::builder("reserve_lines")
        .task(TaskDefinition::new("open", Action::rust("open")).compensate(Action::rust("close")))
        .task(
            TaskDefinition::new("reserve", Action::rust("reserve"))
                .after(["open"])
                .for_each("{{flow.input.lines}}", 1)
                .compensate(Action::rust("release"))
                .input("reserved", json!("{{item}}")),
        )
        .build();
    flows.register(&def).await.unwrap();
    let id = flows
        .start(
            "reserve_lines",
            None,
            json!({"lines": ["a", "b", "c", "broken", "d"]}),
        )
        .await
        .unwrap()
        .instance;
    let workers = Workers::start(&[&flows]);
    let state = wait_for(&flows, id, InstanceStatus::Compensated, 60).await;
    workers.stop().await;
    let mut released = undone.lock().unwrap().clone();
    released.sort();
    assert_eq!(released, ["0:a", "1:b", "2:c"]);
    assert_eq!(*closed.lock().unwrap(), ["after 3"]);
    assert!(!state.outputs.contains_key("reserve"));
    // Three compensations of items recorded, each with its item's index.
    let compensated: BTreeSet<u64> = flows
        .timeline(id)
        .await
        .unwrap()
        .iter()
        .filter(|e| {
            e.event_type() == "FlowStepSucceeded"
                && e.data()["step"]["task"] == "reserve"
                && e.data()["step"]["phase"] == "compensate"
        })
        .map(|e| e.data()["step"]["item"].as_u64().expect("an item index"))
        .collect();
    assert_eq!(compensated, BTreeSet::from([0, 1, 2]));
}
