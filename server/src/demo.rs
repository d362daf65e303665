//! `dcbflow serve --demo`: the order saga of `examples/flows/order_saga.yaml`
//! against a small in-process shop service, and a trickle of orders, so that a
//! newcomer sees live instances, compensations and an incident at once.
//!
//! The shop fails 10% of calls with 503 (retried), declines charges above 400
//! (the order is compensated) and cannot release the stock of `fragile` items
//! (their compensation fails: an incident to retry or handle).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dcbflow::CancellationToken;
use dcbflow::flow::FlowDefinition;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// The demo's flow definition.
pub const ORDER_SAGA: &str = include_str!("../../examples/flows/order_saga.yaml");

/// Seconds between two demo orders.
pub const TRICKLE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Shop {
    stock: i64,
    reservations: HashMap<String, (String, i64)>,
    payments: HashMap<String, i64>,
    /// Idempotency-Key → the answer given.
    answered: HashMap<String, (StatusCode, Value)>,
}

type Shared = Arc<Mutex<Shop>>;

async fn endpoint(
    State(shop): State<Shared>,
    Path((_area, op)): Path<(String, String)>,
    headers: HeaderMap,
    Json(b): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut s = shop.lock().expect("shop");
    if rand::random::<f64>() < 0.1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "busy, try again"})),
        );
    }
    if let Some((status, body)) = s.answered.get(&key) {
        return (*status, Json(body.clone()));
    }
    let order = b["order"].as_str().unwrap_or_default().to_owned();
    let (status, body) = match op.as_str() {
        "reserve" => {
            let qty = b["quantity"].as_i64().unwrap_or(1);
            s.stock -= qty;
            let id = format!("res-{order}");
            let sku = b["sku"].as_str().unwrap_or_default().to_owned();
            s.reservations.insert(id.clone(), (sku, qty));
            (StatusCode::OK, json!({"reservation": id}))
        }
        "release" => {
            let id = b["reservation"].as_str().unwrap_or_default();
            match s.reservations.get(id) {
                // Not answered (not remembered): it fails every time.
                Some((sku, _)) if sku == "fragile" => {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(
                            json!({"error": "the warehouse cannot restock fragile items automatically"}),
                        ),
                    );
                }
                _ => {}
            }
            if let Some((_, qty)) = s.reservations.remove(id) {
                s.stock += qty;
            }
            (StatusCode::OK, json!({"released": id}))
        }
        "charge" => {
            let amount = b["amount"].as_i64().unwrap_or(0);
            if amount > 400 {
                (
                    StatusCode::PAYMENT_REQUIRED,
                    json!({"error": "card declined"}),
                )
            } else {
                let id = format!("pay-{order}");
                s.payments.insert(id.clone(), amount);
                (StatusCode::OK, json!({"payment": id}))
            }
        }
        "refund" => {
            let id = b["payment"].as_str().unwrap_or_default();
            s.payments.remove(id);
            (StatusCode::OK, json!({"refunded": id}))
        }
        "check" => {
            if b["customer"].as_str().is_some_and(|c| c.ends_with("-7")) {
                (StatusCode::FORBIDDEN, json!({"error": "customer flagged"}))
            } else {
                (StatusCode::OK, json!({"score": 0.1}))
            }
        }
        "ship" => (StatusCode::OK, json!({"tracking": format!("trk-{order}")})),
        _ => (StatusCode::NOT_FOUND, json!({"error": "no such endpoint"})),
    };
    s.answered.insert(key, (status, body.clone()));
    (status, Json(body))
}

/// Starts the shop service on a loopback port; returns its base URL.
async fn shop(tasks: &mut JoinSet<()>) -> ApiResult<String> {
    let shop: Shared = Arc::new(Mutex::new(Shop {
        stock: 1_000_000,
        ..Default::default()
    }));
    // The flow's URLs are `/stock/reserve`, `/payments/charge`, ...: the last
    // segment names the operation.
    let app = axum::Router::new()
        .route("/{area}/{op}", post(endpoint))
        .with_state(shop);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(ApiError::internal)?;
    let url = format!(
        "http://{}",
        listener.local_addr().map_err(ApiError::internal)?
    );
    tasks.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

/// The input of demo order `n`: most succeed; every 5th is declined, every
/// 7th customer flagged, every 11th a declined fragile item whose stock cannot
/// be released (an incident).
pub fn order(service: &str, run: &str, n: u64) -> (String, Value) {
    let key = format!("demo-{run}-{n}");
    let declined = n % 5 == 4 || n % 11 == 10;
    let amount = if declined {
        450 + n % 50
    } else {
        20 + (n * 37) % 380
    };
    let sku = if n % 11 == 10 { "fragile" } else { "widget" };
    (
        key.clone(),
        json!({
            "service": service, "order": key, "sku": sku, "quantity": 1 + n % 3,
            "amount": amount, "customer": format!("c-{}", n % 8),
        }),
    )
}

/// Registers the demo flow and starts the shop and the trickle of orders.
///
/// # Errors
/// When the definition cannot be registered.
pub async fn start(app: &App, stop: CancellationToken, tasks: &mut JoinSet<()>) -> ApiResult<()> {
    let def = FlowDefinition::from_yaml(ORDER_SAGA).map_err(dcbflow::flow::FlowError::from)?;
    let version = app.flows.register(&def).await?;
    let url = shop(tasks).await?;
    println!(
        "demo: flow order_saga version {version}; shop service at {url}; one order every {} s (declines are compensated, fragile items raise an incident)",
        TRICKLE.as_secs()
    );
    let flows = app.flows.clone();
    let run = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
    tasks.spawn(async move {
        let mut n = 0u64;
        let mut tick = tokio::time::interval(TRICKLE);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let (key, input) = order(&url, &run, n);
            if let Err(e) = flows.start("order_saga", Some(&key), input).await {
                tracing::warn!(error = %e, "demo order not started");
            }
            n += 1;
        }
    });
    Ok(())
}
