//! A NATS step: its message is appended with the step's success and published
//! by the relay with the step's idempotency key as `Nats-Msg-Id`.

use std::time::Duration;

use dcbflow::flow::{Action, FlowDefinition, InstanceStatus, TaskDefinition};
use dcbflow::{CancellationToken, async_nats};
use serde_json::json;

use super::{Workers, engine, wait_for};
use crate::support::{DEADLINE, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_step_publishes_through_the_outbox_with_its_idempotency_key() {
    let (t, flows) = engine().await;
    let prefix = t.schema.clone();
    let client = async_nats::connect(crate::outbox::nats()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let stream = prefix.to_uppercase();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    let def = FlowDefinition::builder("notify")
        .task(TaskDefinition::new(
            "announce",
            Action::nats(
                format!("{prefix}.orders.{{{{flow.input.order}}}}"),
                json!({"order": "{{flow.input.order}}", "total": "{{flow.input.total}}"}),
            ),
        ))
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let cancel = CancellationToken::new();
    let relay = flows.message_relay("flow-messages", client, Duration::from_secs(2));
    let relay = {
        let c = cancel.clone();
        tokio::spawn(async move { relay.run(c).await })
    };
    let id = flows
        .start("notify", None, json!({"order": "o-7", "total": 12}))
        .await
        .unwrap()
        .instance;
    wait_for(&flows, id, InstanceStatus::Completed, 20).await;
    eventually("the message is published", DEADLINE, {
        let (js, stream) = (&js, &stream);
        move || async move {
            let mut s = js.get_stream(stream).await.unwrap();
            (s.info().await.unwrap().state.messages >= 1).then_some(())
        }
    })
    .await;
    let s = js.get_stream(&stream).await.unwrap();
    let m = s.get_raw_message(1).await.unwrap();
    assert_eq!(m.subject.as_str(), format!("{prefix}.orders.o-7"));
    assert_eq!(
        m.headers.get("Nats-Msg-Id").unwrap().as_str(),
        format!("{id}/announce/action")
    );
    assert!(
        m.headers
            .get("traceparent")
            .unwrap()
            .as_str()
            .starts_with(&format!("00-{}-", id.simple())),
        "the step's trace context"
    );
    let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(body, json!({"order": "o-7", "total": 12}));
    cancel.cancel();
    let _ = relay.await;
    workers.stop().await;
    js.delete_stream(&stream).await.unwrap();
}
