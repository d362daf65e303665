//! A distributed transaction as a saga: an order flow (reserve stock, charge the
//! card in parallel with a fraud check, then ship), loaded from
//! `examples/flows/order_saga.yaml`, against a small HTTP shop service this
//! example starts itself. Some cards are declined and some customers flagged:
//! those orders are compensated (stock released, charge refunded). The service
//! fails 10% of calls with 503 to exercise retries, and deduplicates by the
//! `Idempotency-Key` every attempt carries.
//!
//! At the end it prints each instance's outcome and the totals, and checks that
//! stock and money balance: every unit of stock is either on the shelf or in a
//! shipped order, and the money taken equals the shipped orders' total.
//!
//! Run with `cargo run --example order_saga [ORDERS] [WORKERS]` (default 40 orders,
//! 2 workers). PostgreSQL as for the other examples.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use dcbflow::flow::{FlowDefinition, Flows, HttpPolicy, InstanceStatus, WorkerOptions};
use dcbflow::{CancellationToken, Store};
use serde_json::{Value, json};
use support::BoxError;

const INITIAL_STOCK: i64 = 1_000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let orders: usize = args.next().map_or(Ok(40), |a| a.parse())?;
    let workers: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    support::run(async |db| {
        db.with_store("order_saga", Some(16), async |store| {
            run(store, orders, workers).await
        })
        .await
    })
    .await
}

/// The shop's state: what a real inventory, payment and shipping service would
/// keep in their own databases.
#[derive(Default)]
struct Shop {
    stock: i64,
    reservations: HashMap<String, i64>,
    payments: HashMap<String, i64>,
    balance: i64,
    shipped: Vec<String>,
    /// Idempotency-Key → the response given the first time.
    seen: HashMap<String, (StatusCode, Value)>,
    calls: u64,
}

type Shared = Arc<Mutex<Shop>>;

/// Every endpoint: 10% transient 503s, then replay by idempotency key, then `f`.
fn handle(
    shop: &Shared,
    headers: &HeaderMap,
    f: impl FnOnce(&mut Shop) -> (StatusCode, Value),
) -> (StatusCode, Json<Value>) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut s = shop.lock().unwrap();
    s.calls += 1;
    if rand::random::<f64>() < 0.1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "try again"})),
        );
    }
    if let Some((status, body)) = s.seen.get(&key) {
        return (*status, Json(body.clone()));
    }
    let (status, body) = f(&mut s);
    s.seen.insert(key, (status, body.clone()));
    (status, Json(body))
}

async fn service() -> Result<(String, Shared), BoxError> {
    use axum::routing::post;
    let shop: Shared = Arc::new(Mutex::new(Shop {
        stock: INITIAL_STOCK,
        ..Default::default()
    }));
    let app = axum::Router::new()
        .route(
            "/stock/reserve",
            post(
                |State(s): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    handle(&s, &h, |shop| {
                        let qty = b["quantity"].as_i64().unwrap_or(0);
                        if shop.stock < qty {
                            return (StatusCode::CONFLICT, json!({"error": "out of stock"}));
                        }
                        shop.stock -= qty;
                        let id = format!("res-{}", b["order"].as_str().unwrap_or_default());
                        shop.reservations.insert(id.clone(), qty);
                        (StatusCode::OK, json!({"reservation": id}))
                    })
                },
            ),
        )
        .route(
            "/stock/release",
            post(
                |State(s): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    handle(&s, &h, |shop| {
                        let id = b["reservation"].as_str().unwrap_or_default();
                        if let Some(qty) = shop.reservations.remove(id) {
                            shop.stock += qty;
                        }
                        (StatusCode::OK, json!({"released": id}))
                    })
                },
            ),
        )
        .route(
            "/payments/charge",
            post(
                |State(s): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    handle(&s, &h, |shop| {
                        let amount = b["amount"].as_i64().unwrap_or(0);
                        if amount > 400 {
                            return (
                                StatusCode::PAYMENT_REQUIRED,
                                json!({"error": "card declined"}),
                            );
                        }
                        let id = format!("pay-{}", b["order"].as_str().unwrap_or_default());
                        shop.payments.insert(id.clone(), amount);
                        shop.balance += amount;
                        (StatusCode::OK, json!({"payment": id}))
                    })
                },
            ),
        )
        .route(
            "/payments/refund",
            post(
                |State(s): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    handle(&s, &h, |shop| {
                        let id = b["payment"].as_str().unwrap_or_default();
                        if let Some(amount) = shop.payments.remove(id) {
                            shop.balance -= amount;
                        }
                        (StatusCode::OK, json!({"refunded": id}))
                    })
                },
            ),
        )
        .route(
            "/fraud/check",
            post(
                |State(s): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    handle(&s, &h, |_| {
                        if b["customer"].as_str().is_some_and(|c| c.ends_with("-7")) {
                            (StatusCode::FORBIDDEN, json!({"error": "flagged"}))
                        } else {
                            (StatusCode::OK, json!({"score": 0.1}))
                        }
                    })
                },
            ),
        )
        .route(
            "/shipping/ship",
            post(
                |State(s): State<Shared>, h: HeaderMap, Json(b): Json<Value>| async move {
                    handle(&s, &h, |shop| {
                        shop.shipped
                            .push(b["order"].as_str().unwrap_or_default().to_owned());
                        (
                            StatusCode::OK,
                            json!({"tracking": format!("trk-{}", shop.shipped.len())}),
                        )
                    })
                },
            ),
        )
        .with_state(shop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, shop))
}

async fn run(store: Store, orders: usize, workers: usize) -> Result<(), BoxError> {
    let (url, shop) = service().await?;
    // The shop runs on 127.0.0.1: HTTP tasks may call loopback only when allowed.
    let flows = Flows::new(store).http_policy(HttpPolicy::default().allow_loopback(true));
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/flows/order_saga.yaml"
    );
    let definition = FlowDefinition::from_file(path)?;
    let version = flows.register(&definition).await?;
    println!("registered flow order_saga version {version} from {path}");

    let cancel = CancellationToken::new();
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            let worker = flows.worker(WorkerOptions::default().id(format!("worker-{i}")));
            let cancel = cancel.clone();
            tokio::spawn(async move { worker.run(cancel).await })
        })
        .collect();

    let started = Instant::now();
    let mut instances = Vec::new();
    for i in 0..orders {
        let amount = 50 + (i as i64 * 37) % 450; // some above 400: declined
        let input = json!({
            "service": url, "order": format!("o-{i}"), "sku": "widget", "quantity": 1 + i % 3,
            "amount": amount, "customer": format!("c-{}", i % 10),
        });
        let s = flows
            .start("order_saga", Some(&format!("o-{i}")), input)
            .await?;
        instances.push((i, s.instance, amount));
    }
    // Starting again with the same business key returns the same instance.
    let again = flows
        .start("order_saga", Some("o-0"), json!({"service": url, "order": "o-0", "sku": "widget", "quantity": 1, "amount": 50, "customer": "c-0"}))
        .await?;
    assert!(!again.created && again.instance == instances[0].1);

    let mut outcomes: HashMap<InstanceStatus, usize> = HashMap::new();
    let mut shipped_total = 0;
    let mut shipped_units = 0;
    for (i, id, amount) in &instances {
        let state = loop {
            let s = flows.instance(*id).await?.ok_or("instance vanished")?;
            if s.status.is_final() || s.status == InstanceStatus::CompensationFailed {
                break s;
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err(format!("order {i} still {:?} after 120 s", s.status).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let why = state.reason.clone().unwrap_or_default();
        println!("order o-{i:<3} {:>12}  {why}", state.status.as_str());
        if state.status == InstanceStatus::Completed {
            shipped_total += amount;
            shipped_units += 1 + (*i as i64) % 3;
        }
        *outcomes.entry(state.status).or_default() += 1;
    }
    cancel.cancel();
    for h in handles {
        h.await??;
    }
    let elapsed = started.elapsed();

    let incidents = flows.incidents().await?;
    let shop = shop.lock().unwrap();
    println!(
        "\n{} orders in {:.1} s: {} completed, {} compensated, {} other; {} HTTP calls",
        orders,
        elapsed.as_secs_f64(),
        outcomes.get(&InstanceStatus::Completed).unwrap_or(&0),
        outcomes.get(&InstanceStatus::Compensated).unwrap_or(&0),
        orders
            - outcomes.get(&InstanceStatus::Completed).unwrap_or(&0)
            - outcomes.get(&InstanceStatus::Compensated).unwrap_or(&0),
        shop.calls
    );
    println!(
        "stock: {} on the shelf + {} shipped = {} (started with {INITIAL_STOCK})",
        shop.stock,
        shipped_units,
        shop.stock + shipped_units
    );
    println!(
        "money: {} taken, shipped orders total {}",
        shop.balance, shipped_total
    );
    let balanced = shop.stock + shipped_units == INITIAL_STOCK
        && shop.balance == shipped_total
        && shop.shipped.len() == *outcomes.get(&InstanceStatus::Completed).unwrap_or(&0)
        && incidents.is_empty()
        && outcomes.len() <= 2;
    if !balanced {
        return Err(format!("books do not balance (incidents: {incidents:?})").into());
    }
    println!("books balance: every unit and every cent accounted for");
    Ok(())
}
