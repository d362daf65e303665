//! The transactional outbox: orders are placed as events, a relay publishes them to
//! NATS JetStream at least once, and a consumer applies each exactly once by
//! recording message ids in its own transaction.
//!
//! Run with `cargo run --example outbox [ORDERS]` (default 500). Needs NATS with
//! JetStream at `NATS_URL` (default `127.0.0.1:4222`; `nats-server -js`, or
//! `docker compose up -d`). PostgreSQL as for the other examples.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dcbflow::async_nats;
use dcbflow::outbox::{NatsPublisher, OutboxRelay};
use dcbflow::{CancellationToken, Event, Query, Store};
use futures::StreamExt;
use serde_json::json;
use support::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let orders: u64 = std::env::args().nth(1).map_or(Ok(500), |a| a.parse())?;
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let nats = async_nats::connect(&nats_url).await.map_err(|e| {
        format!("cannot reach NATS at {nats_url} ({e}); start `nats-server -js` or `docker compose up -d`")
    })?;
    support::run(async |db| {
        db.with_store("outbox", Some(12), async |store| {
            run(store, nats, orders).await
        })
        .await
    })
    .await
}

async fn run(store: Store, nats: async_nats::Client, orders: u64) -> Result<(), BoxError> {
    let prefix = store.schema().to_string();
    let js = async_nats::jetstream::new(nats.clone());
    let stream_name = prefix.to_uppercase();
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await?;
    let result = relay_and_consume(&store, nats, &stream, &prefix, orders).await;
    js.delete_stream(&stream_name).await?;
    result
}

async fn relay_and_consume(
    store: &Store,
    nats: async_nats::Client,
    stream: &async_nats::jetstream::stream::Stream,
    prefix: &str,
    orders: u64,
) -> Result<(), BoxError> {
    let cancel = CancellationToken::new();
    let placed = Query::items_of(["OrderPlaced"], Vec::<String>::new());

    // The relay: events matching the query → `<prefix>.OrderPlaced`.
    let publisher = NatsPublisher::new(nats, prefix, Duration::from_secs(5));
    let relay = OutboxRelay::new(store.clone(), "orders-to-nats", placed.clone(), publisher);
    let token = cancel.clone();
    let relay = tokio::spawn(async move { relay.run(token).await });

    // The consumer: dedupes by message id in its own transaction, then acks.
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("order-counter".into()),
            ..Default::default()
        })
        .await?;
    let (applied, duplicates) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (store2, applied2, duplicates2, token) = (
        store.clone(),
        applied.clone(),
        duplicates.clone(),
        cancel.clone(),
    );
    let consumer = tokio::spawn(async move {
        let mut messages = consumer.messages().await?;
        loop {
            let message = tokio::select! {
                m = messages.next() => m,
                () = token.cancelled() => return Ok::<_, dcbflow::BoxError>(()),
            };
            let Some(message) = message else {
                return Ok(());
            };
            let message = message?;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .ok_or("message without Nats-Msg-Id")?;
            let mut client = store2.pool().get().await?;
            let tx = client.transaction().await?;
            if dcbflow::outbox::mark_processed(&store2, &tx, "order-counter", &id).await? {
                applied2.fetch_add(1, Ordering::SeqCst); // the "work", once per message
            } else {
                duplicates2.fetch_add(1, Ordering::SeqCst);
            }
            tx.commit().await?;
            message.ack().await?;
        }
    });

    // Place orders from 8 concurrent clients.
    let started = Instant::now();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in (w..orders).step_by(8) {
                    let order = Event::new(
                        "OrderPlaced",
                        [format!("order:{i}")],
                        json!({"order": i, "total": 10 + i % 90}),
                    );
                    store.append(vec![order], None).await?;
                }
                Ok::<_, dcbflow::Error>(())
            })
        })
        .collect();
    for w in writers {
        w.await??;
    }
    println!(
        "placed {orders} orders in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let lag = dcbflow::Checkpoints::new(store.clone())
        .lag("orders-to-nats", &placed)
        .await?;
    println!(
        "relay lag right after placing: {} events behind",
        lag.events_behind
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while applied.load(Ordering::SeqCst) < orders && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end_to_end = started.elapsed();
    cancel.cancel();
    relay.await??;
    consumer
        .await?
        .map_err(|e| -> BoxError { e.to_string().into() })?;

    let mut stream = stream.clone();
    let published = stream.info().await?.state.messages;
    let lag = dcbflow::Checkpoints::new(store.clone())
        .lag("orders-to-nats", &placed)
        .await?;
    let (applied, duplicates) = (
        applied.load(Ordering::SeqCst),
        duplicates.load(Ordering::SeqCst),
    );
    println!(
        "published {published}, consumed {applied} (duplicates skipped: {duplicates}) in {:.2} s; lag now {} events, oldest undelivered waiting {:?}",
        end_to_end.as_secs_f64(),
        lag.events_behind,
        lag.oldest_age()
    );
    if published != orders || applied != orders || lag.events_behind != 0 {
        return Err(format!("expected {orders} published and consumed, nothing behind").into());
    }
    println!("every order published and applied exactly once");
    Ok(())
}
