//! Serial and parallel flows, inputs and outputs, YAML definitions, idempotent start.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcbflow::flow::{
    Action, FlowDefinition, FlowError, InstanceStatus, TaskContext, TaskDefinition, TaskError,
    ValueType,
};
use serde_json::{Value, json};

use super::{Workers, engine, steps, wait_for};

/// a → (b ∥ c) → d: every task runs once, b and c both start before either
/// finishes, d sees both outputs, and the outputs flow through templates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serial_and_parallel_tasks_complete_with_outputs() {
    let (_t, flows) = engine().await;
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    // b and c each wait for the other to start (at most 10 s), so they overlap
    // when run in parallel, however they are scheduled; run one after the other,
    // they do not, and the order of the log says so.
    let both = Arc::new(tokio::sync::Barrier::new(2));
    for name in ["a", "b", "c", "d"] {
        let (log, both) = (log.clone(), both.clone());
        flows.function(name, move |ctx: TaskContext| {
            let (log, both) = (log.clone(), both.clone());
            async move {
                log.lock().unwrap().push(format!("start {}", ctx.step.task));
                if ctx.step.task == "b" || ctx.step.task == "c" {
                    let _ = tokio::time::timeout(Duration::from_secs(10), both.wait()).await;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
                log.lock().unwrap().push(format!("end {}", ctx.step.task));
                Ok::<_, TaskError>(json!({"task": ctx.step.task, "input": ctx.input}))
            }
        });
    }
    let def = FlowDefinition::builder("diamond")
        .input("n", ValueType::Integer)
        .task(TaskDefinition::new("a", Action::rust("a")).input("n", json!("{{flow.input.n}}")))
        .task(
            TaskDefinition::new("b", Action::rust("b"))
                .after(["a"])
                .input("from_a", json!("{{tasks.a.output.input.n}}")),
        )
        .task(TaskDefinition::new("c", Action::rust("c")).after(["a"]))
        .task(
            TaskDefinition::new("d", Action::rust("d"))
                .after(["b", "c"])
                .input(
                    "summary",
                    json!("b saw {{tasks.b.output.input.from_a}}, c was {{tasks.c.output.task}}"),
                ),
        )
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let started = flows.start("diamond", None, json!({"n": 7})).await.unwrap();
    let state = wait_for(&flows, started.instance, InstanceStatus::Completed, 20).await;
    workers.stop().await;

    assert_eq!(
        state.outputs["b"]["input"]["from_a"],
        json!(7),
        "a typed value stays typed"
    );
    assert_eq!(
        state.outputs["d"]["input"]["summary"],
        json!("b saw 7, c was c")
    );
    let log = log.lock().unwrap().clone();
    let at = |s: &str| {
        log.iter()
            .position(|l| l == s)
            .unwrap_or_else(|| panic!("{s} in {log:?}"))
    };
    assert!(at("end a") < at("start b") && at("end a") < at("start c"));
    assert!(
        at("start b") < at("end c") && at("start c") < at("end b"),
        "b and c ran in parallel: {log:?}"
    );
    assert!(at("end b") < at("start d") && at("end c") < at("start d"));
    assert_eq!(log.len(), 8, "each task ran once: {log:?}");
    let timeline = steps(&flows, started.instance).await;
    assert_eq!(timeline.first().unwrap().0, "FlowStarted");
    assert_eq!(timeline.last().unwrap().0, "FlowCompleted");
    assert_eq!(
        timeline
            .iter()
            .filter(|(t, _)| t == "FlowStepSucceeded")
            .count(),
        4
    );
}

/// A flow loaded from a YAML file runs end to end; the same content registered
/// from JSON has the same version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_yaml_flow_runs_end_to_end() {
    let (_t, flows) = engine().await;
    flows.function("echo", |ctx: TaskContext| async move {
        Ok::<_, TaskError>(ctx.input)
    });
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/flow/greeting.yaml");
    let def = FlowDefinition::from_file(path).unwrap();
    let version = flows.register(&def).await.unwrap();
    let again = FlowDefinition::from_json(&serde_json::to_string(&def).unwrap()).unwrap();
    assert_eq!(
        flows.register(&again).await.unwrap(),
        version,
        "same content, same version"
    );
    let workers = Workers::start(&[&flows]);
    let started = flows
        .start("greeting", None, json!({"name": "Ada"}))
        .await
        .unwrap();
    let state = wait_for(&flows, started.instance, InstanceStatus::Completed, 20).await;
    workers.stop().await;
    assert_eq!(state.outputs["shout"]["text"], json!("HELLO, Ada!"));
    assert_eq!(state.definition_version, version);
}

/// Starting twice with one business key, even concurrently, gives one instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_with_a_business_key_is_idempotent() {
    let (_t, flows) = engine().await;
    flows.function("noop", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    let def = FlowDefinition::builder("once")
        .task(TaskDefinition::new("noop", Action::rust("noop")))
        .build();
    flows.register(&def).await.unwrap();
    let results = crate::support::race(8, |_| {
        let flows = flows.clone();
        async move {
            flows
                .start("once", Some("order-1"), json!({}))
                .await
                .unwrap()
        }
    })
    .await;
    let first = results[0].instance;
    assert!(results.iter().all(|r| r.instance == first));
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    let other = flows
        .start("once", Some("order-2"), json!({}))
        .await
        .unwrap();
    assert!(other.created && other.instance != first);
    let listed = flows
        .instances(&dcbflow::flow::InstanceFilter::flow("once"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
}

/// Input that does not match the declared fields is refused and writes nothing;
/// so is an unknown flow and an invalid definition.
#[tokio::test]
async fn bad_input_and_bad_definitions_are_refused() {
    let (t, flows) = engine().await;
    flows.function("noop", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    let def = FlowDefinition::builder("typed")
        .input("amount", ValueType::Integer)
        .input("sku", ValueType::String)
        .task(TaskDefinition::new("noop", Action::rust("noop")))
        .build();
    flows.register(&def).await.unwrap();
    let before = t.count().await;
    match flows
        .start("typed", None, json!({"amount": "twelve"}))
        .await
    {
        Err(FlowError::InputMismatch(problems)) => {
            assert_eq!(
                problems,
                [
                    r#"field "amount" must be an integer, got "twelve""#,
                    r#"field "sku" is missing (it must be a string)"#
                ],
            );
        }
        other => panic!("expected invalid input, got {other:?}"),
    }
    assert!(matches!(
        flows.start("nope", None, json!({})).await,
        Err(FlowError::UnknownFlow(_))
    ));
    let bad = FlowDefinition::builder("bad")
        .task(TaskDefinition::new("x", Action::rust("missing")).after(["y"]))
        .task(TaskDefinition::new("x", Action::rust("noop")))
        .build();
    match flows.register(&bad).await {
        Err(FlowError::Definition(e)) => assert!(e.problems.len() >= 3, "{e}"),
        other => panic!("expected a definition error, got {other:?}"),
    }
    assert_eq!(t.count().await, before, "nothing was written");
}

/// Registering a changed definition makes a new version; an instance started on
/// the old one finishes on it (its tasks, not the new ones), and new instances run
/// the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_instance_keeps_the_version_it_started_with() {
    let (_t, flows) = engine().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    {
        let gate = gate.clone();
        flows.function("gated", move |_ctx: TaskContext| {
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, TaskError>(json!({}))
            }
        });
    }
    flows.function("noop", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(json!({}))
    });
    let v1 = FlowDefinition::builder("evolving")
        .task(TaskDefinition::new("first", Action::rust("gated")))
        .build();
    let v1_version = flows.register(&v1).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let old = flows.start("evolving", None, json!({})).await.unwrap();
    assert_eq!(old.definition_version, v1_version);

    let v2 = FlowDefinition::builder("evolving")
        .task(TaskDefinition::new("first", Action::rust("gated")))
        .task(TaskDefinition::new("second", Action::rust("noop")).after(["first"]))
        .build();
    let v2_version = flows.register(&v2).await.unwrap();
    assert_ne!(v1_version, v2_version, "new content, new version");
    let new = flows.start("evolving", None, json!({})).await.unwrap();
    assert_eq!(new.definition_version, v2_version);

    gate.add_permits(2);
    let old_state = wait_for(&flows, old.instance, InstanceStatus::Completed, 20).await;
    let new_state = wait_for(&flows, new.instance, InstanceStatus::Completed, 20).await;
    workers.stop().await;
    assert_eq!(old_state.definition_version, v1_version);
    assert!(old_state.outputs.contains_key("first"));
    assert!(
        !old_state.outputs.contains_key("second"),
        "the old instance ran only its version's tasks"
    );
    assert_eq!(new_state.definition_version, v2_version);
    assert!(new_state.outputs.contains_key("second"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_converted_and_completed_with_defaults() {
    let (_t, flows) = engine().await;
    flows.function("noop", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    let def = FlowDefinition::builder("inputs")
        .input("amount", ValueType::Integer)
        .input("rate", ValueType::Number)
        .input("express", ValueType::Boolean)
        .input_default("currency", ValueType::String, json!("EUR"))
        .input_optional("note", ValueType::String)
        .task(TaskDefinition::new("noop", Action::rust("noop")))
        .build();
    flows.register(&def).await.unwrap();
    let id = flows
        .start(
            "inputs",
            None,
            json!({"amount": "42", "rate": "0.5", "express": "true", "extra": 1}),
        )
        .await
        .unwrap()
        .instance;
    let s = flows.instance(id).await.unwrap().unwrap();
    assert_eq!(
        s.input,
        json!({"amount": 42, "rate": 0.5, "express": true, "currency": "EUR", "extra": 1})
    );
    // A default of the wrong type is a problem at register, naming the field.
    let bad = FlowDefinition::builder("bad-default")
        .input_default("count", ValueType::Integer, json!("many"))
        .task(TaskDefinition::new("noop", Action::rust("noop")))
        .build();
    match flows.register(&bad).await {
        Err(FlowError::Definition(e)) => assert!(
            e.problems
                .iter()
                .any(|p| p.starts_with(r#"flow input "count": its default must be an integer"#)),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
}
