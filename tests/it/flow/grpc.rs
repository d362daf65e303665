//! The gRPC executor against a real tonic server (tests/grpc-fixture, built
//! from its proto/inventory.proto): dynamic messages from templated JSON, the
//! idempotency key and trace context in metadata, retryable and fatal statuses,
//! definitions checked against the descriptor set, the HTTP policy applied.

use std::collections::BTreeSet;
use std::time::Duration;

use dcbflow::flow::{
    Action, FlowDefinition, FlowError, Flows, InstanceStatus, TaskDefinition, TaskRetry,
};
use serde_json::json;

use super::{Workers, engine, wait_for};

const RESERVE: &str = "inventory.v1.Inventory/Reserve";

fn reserve_flow() -> FlowDefinition {
    FlowDefinition::builder("grpc_reserve")
        .task(
            TaskDefinition::new(
                "reserve",
                Action::grpc(
                    "{{flow.input.endpoint}}",
                    RESERVE,
                    "inventory",
                    json!({
                        "sku": "{{flow.input.sku}}",
                        "quantity": "{{flow.input.quantity}}",
                        "order_id": "{{instance}}",
                        "notes": ["{{flow.input.tenant}}", "{{business_key}}"],
                    }),
                )
                .header("x-tenant", "{{flow.input.tenant}}"),
            )
            .retry(
                TaskRetry::attempts(4)
                    .backoff(Duration::from_millis(50), Duration::from_millis(200)),
            )
            .timeout(Duration::from_secs(5)),
        )
        .build()
}

/// A retryable status is retried with the same idempotency key and a new span
/// per attempt; a fatal one is not retried; the reply is the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_carry_idempotency_keys_and_statuses_decide_retries() {
    let (addr, calls) = grpc_fixture::start().await;
    let (_t, flows) = engine().await;
    flows
        .grpc_descriptor_set("inventory", grpc_fixture::DESCRIPTOR_SET)
        .unwrap();
    flows.register(&reserve_flow()).await.unwrap();
    let endpoint = format!("http://{addr}");
    let start = |sku: &str, key: &str| {
        let flows = flows.clone();
        let input = json!({"endpoint": endpoint, "sku": sku, "quantity": 2, "tenant": "acme"});
        let key = key.to_owned();
        async move {
            flows
                .start("grpc_reserve", Some(&key), input)
                .await
                .unwrap()
                .instance
        }
    };
    let flaky = start("flaky", "o-1").await;
    let exhausted = start("exhausted", "o-2").await;
    let unknown = start("unknown", "o-3").await;
    let workers = Workers::start(&[&flows]);
    let ok = wait_for(&flows, flaky, InstanceStatus::Completed, 60).await;
    wait_for(&flows, exhausted, InstanceStatus::Completed, 60).await;
    wait_for(&flows, unknown, InstanceStatus::Compensated, 60).await;
    workers.stop().await;

    // The reply, in proto field names, defaults included, 64-bit integers as
    // numbers.
    assert_eq!(
        ok.outputs["reserve"],
        json!({"reservation_id": "r-flaky-2", "sku": "flaky", "quantity": 2, "attempt": 3})
    );
    let calls = calls.all();
    let of = |sku: &str| -> Vec<_> { calls.iter().filter(|c| c.key == sku).cloned().collect() };
    // UNAVAILABLE twice, then OK: three calls with one key.
    let f = of("flaky");
    assert_eq!(f.len(), 3, "{f:#?}");
    let keys: BTreeSet<_> = f.iter().map(|c| c.idempotency_key.clone()).collect();
    assert_eq!(
        keys,
        BTreeSet::from([Some(format!("{flaky}/reserve/action"))])
    );
    let spans: BTreeSet<_> = f.iter().map(|c| c.traceparent.clone().unwrap()).collect();
    assert_eq!(spans.len(), 3, "a span per attempt: {spans:?}");
    for t in &spans {
        assert!(t.starts_with(&format!("00-{}-", flaky.simple())), "{t}");
    }
    for c in &f {
        assert_eq!(c.tenant.as_deref(), Some("acme"));
        assert_eq!(c.quantity, 2, "the string template became an int32");
        assert!(c.timeout.is_some(), "the step's timeout is the deadline");
        assert!(c.request.contains(&flaky.to_string()), "{}", c.request);
        assert!(c.request.contains("\"o-1\""), "{}", c.request);
    }
    // RESOURCE_EXHAUSTED once, then OK.
    assert_eq!(of("exhausted").len(), 2);
    // NOT_FOUND is fatal: one call, no retry, the task's failure says why.
    assert_eq!(of("unknown").len(), 1);
    let timeline = flows.timeline(unknown).await.unwrap();
    let failed: Vec<_> = timeline
        .iter()
        .filter(|e| e.event_type() == "FlowStepFailed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].data()["code"], "grpc_not_found");
    assert_eq!(failed[0].data()["exhausted"], true);
    assert!(
        failed[0].data()["error"]
            .as_str()
            .unwrap()
            .contains("NOT_FOUND: no such sku"),
        "{}",
        failed[0].data()
    );
    let retried = flows
        .timeline(flaky)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type() == "FlowStepFailed")
        .map(|e| e.data()["code"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(retried, ["grpc_unavailable", "grpc_unavailable"]);
}

/// `register` checks gRPC actions against the registered descriptor set, and
/// lists every problem: unknown set, unknown method, streaming method, unknown
/// message field. A descriptor set that does not decode is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_are_checked_against_the_descriptor_set() {
    let (_t, flows) = engine().await;
    let err = flows.grpc_descriptor_set("broken", b"\xff\xff not a descriptor set");
    assert!(err.is_err(), "garbage is refused");
    let call =
        |method: &str, set: &str, message| Action::grpc("http://127.0.0.1:1", method, set, message);
    let def = FlowDefinition::builder("grpc_bad")
        .task(TaskDefinition::new(
            "no_set",
            call(RESERVE, "inventory", json!({})),
        ))
        .build();
    let problems = |r: Result<String, FlowError>| match r {
        Err(FlowError::Definition(d)) => d.problems,
        other => panic!("expected a definition error, got {other:?}"),
    };
    let p = problems(flows.register(&def).await);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].contains("descriptor set \"inventory\" is not registered"),
        "{p:?}"
    );

    flows
        .grpc_descriptor_set("inventory", grpc_fixture::DESCRIPTOR_SET)
        .unwrap();
    let def = FlowDefinition::builder("grpc_bad")
        .task(TaskDefinition::new(
            "typo",
            call("inventory.v1.Inventory/Reserv", "inventory", json!({})),
        ))
        .task(TaskDefinition::new(
            "stream",
            call("inventory.v1.Inventory/Watch", "inventory", json!({})),
        ))
        .task(TaskDefinition::new(
            "field",
            call(
                RESERVE,
                "inventory",
                json!({"sku": "a", "skew": 1, "orderId": "x"}),
            ),
        ))
        .task(TaskDefinition::new(
            "service",
            call("inventory.v2.Inventory/Reserve", "inventory", json!({})),
        ))
        .build();
    let p = problems(flows.register(&def).await);
    assert_eq!(p.len(), 4, "{p:#?}");
    assert!(
        p[0].contains("task \"typo\"") && p[0].contains("no method \"Reserv\""),
        "{p:?}"
    );
    assert!(
        p[1].contains("task \"stream\"") && p[1].contains("streaming"),
        "{p:?}"
    );
    assert!(
        p[2].contains("task \"field\"") && p[2].contains("\"skew\""),
        "only the unknown field (orderId is the JSON name of order_id): {p:?}"
    );
    assert!(
        p[3].contains("no service \"inventory.v2.Inventory\""),
        "{p:?}"
    );

    // Syntax is validation's: a method that is not package.Service/Method, an
    // endpoint that is not a URL, a reserved metadata key.
    let def = FlowDefinition::builder("grpc_bad")
        .task(TaskDefinition::new(
            "syntax",
            Action::grpc("localhost:50051", "Reserve", "inventory", json!({}))
                .header("grpc-timeout", "1S"),
        ))
        .build();
    let p = problems(flows.register(&def).await);
    assert_eq!(p.len(), 3, "{p:#?}");
}

/// The engine's HTTP policy applies to gRPC endpoints: by default a loopback
/// server is refused, without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_policy_guards_grpc_endpoints() {
    let (addr, calls) = grpc_fixture::start().await;
    let t = crate::support::TestStore::new().await;
    let flows = Flows::new(t.store.clone());
    flows
        .grpc_descriptor_set("inventory", grpc_fixture::DESCRIPTOR_SET)
        .unwrap();
    flows.register(&reserve_flow()).await.unwrap();
    let id = flows
        .start(
            "grpc_reserve",
            Some("o-9"),
            json!({"endpoint": format!("http://{addr}"), "sku": "a", "quantity": 1, "tenant": "t"}),
        )
        .await
        .unwrap()
        .instance;
    let workers = Workers::start(&[&flows]);
    wait_for(&flows, id, InstanceStatus::Compensated, 30).await;
    workers.stop().await;
    assert!(calls.all().is_empty(), "no call reached the server");
    let timeline = flows.timeline(id).await.unwrap();
    let failed = timeline
        .iter()
        .find(|e| e.event_type() == "FlowStepFailed")
        .unwrap();
    assert_eq!(failed.data()["code"], "http_forbidden", "{}", failed.data());
}
