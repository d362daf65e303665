//! AMQP steps against the real RabbitMQ at 127.0.0.1:5672 (guest/guest): the
//! message is appended with the step's success and relayed by the outbox to the
//! broker, at least once, persistent, with publisher confirms and the step's
//! idempotency key as its `message_id`.

use dcbflow::CancellationToken;
use dcbflow::flow::{Action, FlowDefinition, InstanceStatus, TaskDefinition, ValueType};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use super::{Workers, engine, wait_for};
use crate::support::{DEADLINE, eventually};

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_amqp_step_reaches_rabbitmq_once_with_its_idempotency_key() {
    let (_t, flows) = engine().await;
    let conn = lapin::Connection::connect(URI, lapin::ConnectionProperties::default())
        .await
        .expect(
            "RabbitMQ at 127.0.0.1:5672 (guest/guest): start it with `rabbitmq-server -detached`",
        );
    let ch = conn.create_channel().await.unwrap();
    let queue = format!("dcbflow-test-{}", uuid::Uuid::new_v4().simple());
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let def = FlowDefinition::builder("announce")
        .input("order", ValueType::String)
        .task(TaskDefinition::new(
            "announce",
            Action::Amqp {
                exchange: String::new(),
                routing_key: queue.clone(),
                payload: json!({"order": "{{flow.input.order}}", "key": "{{idempotency_key}}"}),
            },
        ))
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("announce", None, json!({"order": "o-7"}))
        .await
        .unwrap()
        .instance;
    wait_for(&flows, id, InstanceStatus::Completed, 20).await;
    workers.stop().await;

    let cancel = CancellationToken::new();
    let relay = flows.amqp_relay("amqp-messages", URI).await.unwrap();
    let running = {
        let c = cancel.clone();
        tokio::spawn(async move { relay.run(c).await })
    };
    let message = eventually("the message to reach the queue", DEADLINE, || async {
        ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    })
    .await;
    cancel.cancel();
    running.await.unwrap().unwrap();
    let key = format!("{id}/announce/action");
    let props = &message.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some(key.as_str())
    );
    assert_eq!(*props.delivery_mode(), Some(2), "persistent");
    let trace = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent").cloned());
    assert!(
        matches!(&trace, Some(lapin::types::AMQPValue::LongString(s)) if s.to_string().starts_with(&format!("00-{}-", id.simple()))),
        "{trace:?}"
    );
    let body: Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(body, json!({"order": "o-7", "key": key}));

    // A relay started again from its checkpoint publishes nothing twice.
    let cancel = CancellationToken::new();
    let relay = flows.amqp_relay("amqp-messages", URI).await.unwrap();
    let again = {
        let c = cancel.clone();
        tokio::spawn(async move { relay.run(c).await })
    };
    // A second message behind it shows the relay went past the first.
    let id2 = {
        let workers = Workers::start(&[&flows]);
        let id2 = flows
            .start("announce", None, json!({"order": "o-8"}))
            .await
            .unwrap()
            .instance;
        wait_for(&flows, id2, InstanceStatus::Completed, 20).await;
        workers.stop().await;
        id2
    };
    let next = eventually("the second message", DEADLINE, || async {
        ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
    })
    .await;
    cancel.cancel();
    again.await.unwrap().unwrap();
    assert_eq!(
        next.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string()),
        Some(format!("{id2}/announce/action")),
        "the first message was not published again"
    );
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
