//! Failures: retries with backoff, HTTP status classes and Retry-After, saga
//! compensation in reverse dependency order.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use dcbflow::flow::{
    Action, FlowDefinition, InstanceStatus, OnExhausted, TaskContext, TaskDefinition, TaskError,
    TaskRetry,
};
use serde_json::{Value, json};

use super::{Workers, engine, steps, wait_for};

/// A step failing twice (retryable) then succeeding: two retries scheduled with
/// growing delays, the third attempt wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_with_backoff_then_succeeds() {
    let (_t, flows) = engine().await;
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    flows.function("flaky", move |ctx: TaskContext| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            assert_eq!(ctx.attempt, n);
            if n < 3 {
                Err(TaskError::retryable(format!("flake {n}")).code("flaky"))
            } else {
                Ok(json!({"after": n}))
            }
        }
    });
    let def = FlowDefinition::builder("retrying")
        .task(TaskDefinition::new("flaky", Action::rust("flaky")).retry(
            TaskRetry::attempts(5).backoff(Duration::from_millis(100), Duration::from_secs(1)),
        ))
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("retrying", None, json!({}))
        .await
        .unwrap()
        .instance;
    let state = wait_for(&flows, id, InstanceStatus::Completed, 20).await;
    workers.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(state.outputs["flaky"], json!({"after": 3}));
    let timeline = flows.timeline(id).await.unwrap();
    let retries: Vec<_> = timeline
        .iter()
        .filter(|e| e.event_type() == "FlowStepRetryScheduled")
        .collect();
    assert_eq!(retries.len(), 2);
    assert_eq!(
        timeline
            .iter()
            .filter(|e| e.event_type() == "FlowStepFailed")
            .count(),
        2
    );
}

/// The HTTP executor: the idempotency key is stable across attempts, 503 with
/// `Retry-After: 1` is retried no sooner than a second later, 2xx JSON becomes the
/// output, and a 400 is fatal (no retry) and compensates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_executor_retries_honours_retry_after_and_sends_idempotency_keys() {
    let seen = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let traces = Arc::new(Mutex::new(Vec::<String>::new()));
    let (s, tr) = (seen.clone(), traces.clone());
    let app = axum::Router::new()
        .route(
            "/charge",
            axum::routing::post(move |headers: HeaderMap, body: axum::Json<Value>| {
                let (s, tr) = (s.clone(), tr.clone());
                async move {
                    let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                    tr.lock()
                        .unwrap()
                        .push(headers["traceparent"].to_str().unwrap().to_owned());
                    let n = {
                        let mut s = s.lock().unwrap();
                        s.push((key.clone(), Instant::now()));
                        s.len()
                    };
                    if n == 1 {
                        let mut h = HeaderMap::new();
                        h.insert("retry-after", "1".parse().unwrap());
                        return (StatusCode::SERVICE_UNAVAILABLE, h, axum::Json(json!({})))
                            .into_response();
                    }
                    (
                        StatusCode::OK,
                        HeaderMap::new(),
                        axum::Json(json!({"charged": body.0["amount"], "key": key})),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/reject",
            axum::routing::post(|| async { StatusCode::BAD_REQUEST }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (_t, flows) = engine().await;
    let undone = Arc::new(AtomicU32::new(0));
    let u = undone.clone();
    flows.function("refund", move |_ctx: TaskContext| {
        let u = u.clone();
        async move {
            u.fetch_add(1, Ordering::SeqCst);
            Ok::<_, TaskError>(Value::Null)
        }
    });
    let def = FlowDefinition::builder("pay")
        .task(
            TaskDefinition::new(
                "charge",
                Action::http(
                    "POST",
                    format!("http://{addr}/charge"),
                    Some(json!({"amount": "{{flow.input.amount}}"})),
                ),
            )
            .compensate(Action::rust("refund"))
            .retry(
                TaskRetry::attempts(3)
                    .backoff(Duration::from_millis(10), Duration::from_millis(20)),
            ),
        )
        .task(
            TaskDefinition::new(
                "notify",
                Action::http("POST", format!("http://{addr}/reject"), None),
            )
            .after(["charge"])
            .retry(TaskRetry::attempts(5)),
        )
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("pay", None, json!({"amount": 42}))
        .await
        .unwrap()
        .instance;
    let state = wait_for(&flows, id, InstanceStatus::Compensated, 20).await;
    workers.stop().await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, format!("{id}/charge/action"));
    assert_eq!(seen[0].0, seen[1].0, "the same key on every attempt");
    // One trace per instance; a span per attempt.
    let traces = traces.lock().unwrap().clone();
    let prefix = format!("00-{}-", id.simple());
    assert!(
        traces
            .iter()
            .all(|t| t.starts_with(&prefix) && t.ends_with("-01") && t.len() == 55),
        "{traces:?}"
    );
    assert_ne!(traces[0], traces[1], "{traces:?}");
    assert!(
        seen[1].1 - seen[0].1 >= Duration::from_millis(950),
        "Retry-After honoured"
    );
    assert_eq!(state.outputs["charge"]["charged"], json!(42));
    let notify = state.step(&dcbflow::flow::StepId::new(
        "notify",
        dcbflow::flow::Phase::Action,
    ));
    assert_eq!(notify.attempts, 1, "a 400 is not retried");
    assert!(notify.error.unwrap().contains("400"));
    assert_eq!(
        undone.load(Ordering::SeqCst),
        1,
        "the charge was refunded once"
    );
}

/// reserve → (charge ∥ fraud) → ship, where ship fails for good: the completed
/// tasks are compensated in reverse dependency order (charge and fraud before
/// reserve; ship, which never succeeded, is not), each once, and the instance
/// ends compensated. A compensation that keeps failing is a visible state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_step_compensates_completed_tasks_in_reverse_order() {
    let (_t, flows) = engine().await;
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    for name in [
        "reserve",
        "charge",
        "fraud",
        "undo_reserve",
        "undo_charge",
        "undo_fraud",
    ] {
        let log = log.clone();
        flows.function(name, move |ctx: TaskContext| {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap()
                    .push(format!("{}/{}", ctx.step.task, ctx.step.phase.as_str()));
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok::<_, TaskError>(Value::Null)
            }
        });
    }
    flows.function("ship", |_ctx: TaskContext| async move {
        Err::<Value, _>(TaskError::fatal("address unknown"))
    });
    let def = FlowDefinition::builder("order")
        .task(
            TaskDefinition::new("reserve", Action::rust("reserve"))
                .compensate(Action::rust("undo_reserve")),
        )
        .task(
            TaskDefinition::new("charge", Action::rust("charge"))
                .after(["reserve"])
                .compensate(Action::rust("undo_charge")),
        )
        .task(
            TaskDefinition::new("fraud", Action::rust("fraud"))
                .after(["reserve"])
                .compensate(Action::rust("undo_fraud")),
        )
        .task(
            TaskDefinition::new("ship", Action::rust("ship"))
                .after(["charge", "fraud"])
                .on_exhausted(OnExhausted::Compensate),
        )
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("order", None, json!({}))
        .await
        .unwrap()
        .instance;
    let state = wait_for(&flows, id, InstanceStatus::Compensated, 20).await;
    workers.stop().await;
    assert!(state.reason.unwrap_or_default().contains("ship"));
    let log = log.lock().unwrap().clone();
    let at = |s: &str| {
        log.iter()
            .position(|l| l == s)
            .unwrap_or_else(|| panic!("{s} in {log:?}"))
    };
    assert!(at("charge/compensate") < at("reserve/compensate"));
    assert!(at("fraud/compensate") < at("reserve/compensate"));
    assert_eq!(log.len(), 6, "three actions, three compensations: {log:?}");
    let timeline = steps(&flows, id).await;
    assert!(timeline.iter().any(|(t, _)| t == "FlowCompensating"));
    assert_eq!(timeline.last().unwrap().0, "FlowCompensated");
}

/// A compensation that keeps failing leaves the instance in `compensation_failed`
/// with an incident; retrying it once it works finishes the compensation and
/// resolves the incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_compensation_is_visible_and_can_be_retried() {
    let (_t, flows) = engine().await;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let b = broken.clone();
    flows.function("ok", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    flows.function("boom", |_ctx: TaskContext| async move {
        Err::<Value, _>(TaskError::fatal("boom"))
    });
    flows.function("undo", move |_ctx: TaskContext| {
        let b = b.clone();
        async move {
            if b.load(Ordering::SeqCst) {
                Err(TaskError::retryable("refund service down").code("down"))
            } else {
                Ok(Value::Null)
            }
        }
    });
    let def = FlowDefinition::builder("fragile")
        .task(
            TaskDefinition::new("pay", Action::rust("ok"))
                .compensate(Action::rust("undo"))
                .retry(
                    TaskRetry::attempts(2)
                        .backoff(Duration::from_millis(10), Duration::from_millis(10)),
                ),
        )
        .task(TaskDefinition::new("ship", Action::rust("boom")).after(["pay"]))
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("fragile", None, json!({}))
        .await
        .unwrap()
        .instance;
    let state = wait_for(&flows, id, InstanceStatus::CompensationFailed, 20).await;
    let incidents = flows.incidents().await.unwrap();
    let group = incidents
        .iter()
        .find(|g| g.kind == "compensation_failed")
        .expect("a compensation incident");
    assert_eq!(
        (group.flow.as_str(), group.task.as_str()),
        ("fragile", "pay")
    );
    assert_eq!(group.instances, vec![id]);
    assert!(group.error.contains("refund service down"));
    assert!(
        incidents
            .iter()
            .any(|g| g.kind == "exhausted" && g.task == "ship")
    );

    broken.store(false, Ordering::SeqCst);
    let step = dcbflow::flow::StepId::new("pay", dcbflow::flow::Phase::Compensate);
    let by = dcbflow::flow::Operator::new("ops@example.com", "refund service is back");
    flows
        .retry_now(id, &step, state.last_position, &by)
        .await
        .unwrap();
    wait_for(&flows, id, InstanceStatus::Compensated, 20).await;
    workers.stop().await;
    let incidents = flows.incidents().await.unwrap();
    assert!(
        !incidents.iter().any(|g| g.kind == "compensation_failed"),
        "resolved when the step moved on: {incidents:?}"
    );
}
