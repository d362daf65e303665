//! Orders fulfilled by a flow that waits for a fact, fans out and starts
//! sub-flows (`examples/flows/order_fulfilment.yaml` and `shipment.yaml`):
//! - every order line is reserved on its own (`for_each`, four at once), and a
//!   line that cannot be reserved releases the lines already reserved, each
//!   with its own line;
//! - the order then waits for the payment service's `PaymentSettled` event,
//!   tagged `order:<id>`, in the same log (`await_event`): some orders are paid
//!   before the flow gets there, some while it waits, some never (they time out
//!   and release their stock);
//! - a paid order ships from each warehouse that holds lines: a `shipment`
//!   child instance per warehouse, which packs each of its lines (`for_each`)
//!   and dispatches a parcel; then the order is confirmed.
//!
//! At the end it prints each order's outcome and checks the invariants: every
//! order ends the way its scenario calls for; stock reserved minus stock
//! released is exactly the lines of the confirmed orders, no line reserved or
//! released twice; every line of a confirmed order packed exactly once, by the
//! shipment of its warehouse, one parcel per warehouse; the reservations come
//! back in line order; nothing of a cancelled order is packed or confirmed.
//!
//! Run with `cargo run --example order_fulfilment [ORDERS] [WORKERS]`
//! (default 16 orders, 2 workers). PostgreSQL as for the other examples.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcbflow::flow::{
    FlowDefinition, Flows, InstanceStatus, Phase, StepId, StepStatus, TaskContext, TaskError,
    WorkerOptions,
};
use dcbflow::{CancellationToken, Event, Store};
use serde_json::{Value, json};
use support::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let orders: usize = args.next().map_or(Ok(16), |a| a.parse())?;
    let workers: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    support::run(async |db| {
        db.with_store("order_fulfilment", Some(16), async |store| {
            run(store, orders, workers).await
        })
        .await
    })
    .await
}

/// How order `i` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Paid before the flow waits for the payment.
    PaidEarly,
    /// Paid while the flow waits.
    PaidLate,
    /// Never paid: the wait times out.
    Unpaid,
    /// A discontinued line: its reservation fails.
    Discontinued,
}

fn scenario(i: usize) -> Scenario {
    match i % 4 {
        0 => Scenario::PaidEarly,
        1 => Scenario::PaidLate,
        2 => Scenario::Unpaid,
        _ => Scenario::Discontinued,
    }
}

/// The lines of order `i`: 2 to 5, from one or both warehouses.
fn lines(i: usize) -> Vec<Value> {
    let n = 2 + i % 4;
    (0..n)
        .map(|k| {
            let sku = if scenario(i) == Scenario::Discontinued && k == n - 1 {
                "discontinued".to_owned()
            } else {
                format!("sku-{}", (i * 7 + k) % 11)
            };
            // Orders divisible by 5 ship from the north only.
            let warehouse = if i.is_multiple_of(5) || k.is_multiple_of(2) {
                "north"
            } else {
                "south"
            };
            json!({"sku": sku, "quantity": 1 + k, "warehouse": warehouse})
        })
        .collect()
}

/// What the warehouse and the carrier would record.
#[derive(Default)]
struct Warehouse {
    /// Reservation id (the idempotency key) → (order, line).
    reserved: HashMap<String, (String, u64)>,
    /// Reservations released (by the reservation's id), with the count.
    released: HashMap<String, u32>,
    /// (order, warehouse, sku, quantity) packed, with the count.
    packed: HashMap<(String, String, String, u64), u32>,
    /// (order, warehouse) → parcels.
    parcels: HashMap<(String, String), u32>,
    confirmed: Vec<String>,
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

fn register_functions(flows: &Flows, w: &Arc<Mutex<Warehouse>>) {
    let wh = w.clone();
    flows.function("reserve_stock", move |ctx: TaskContext| {
        let wh = wh.clone();
        async move {
            if ctx.input["sku"] == "discontinued" {
                return Err(TaskError::fatal("discontinued article").code("discontinued"));
            }
            let order = ctx.business_key.clone().unwrap_or_default();
            let line = ctx.input["line"].as_u64().unwrap_or_default();
            // Idempotent by the step's key, as a stock service is by its key:
            // a retried attempt finds its reservation.
            let id = ctx.idempotency_key.clone();
            wh.lock()
                .unwrap()
                .reserved
                .entry(id.clone())
                .or_insert((order, line));
            Ok(json!({"reservation": id, "sku": ctx.input["sku"], "line": line}))
        }
    });
    let wh = w.clone();
    flows.function("release_stock", move |ctx: TaskContext| {
        let wh = wh.clone();
        async move {
            // The compensation of line i names the reservation of line i.
            let id = ctx.idempotency_key.replace("/compensate", "/action");
            *wh.lock().unwrap().released.entry(id).or_default() += 1;
            Ok::<_, TaskError>(Value::Null)
        }
    });
    flows.function("split_by_warehouse", |ctx: TaskContext| async move {
        let mut by: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        by.insert("north", Vec::new());
        by.insert("south", Vec::new());
        for line in ctx.flow_input["lines"].as_array().into_iter().flatten() {
            let w = if line["warehouse"] == "south" {
                "south"
            } else {
                "north"
            };
            by.get_mut(w).expect("a warehouse").push(line.clone());
        }
        Ok::<_, TaskError>(json!(by))
    });
    let wh = w.clone();
    flows.function("pack_line", move |ctx: TaskContext| {
        let wh = wh.clone();
        async move {
            let key = (
                text(&ctx.flow_input, "order"),
                text(&ctx.flow_input, "warehouse"),
                text(&ctx.input, "sku"),
                ctx.input["quantity"].as_u64().unwrap_or_default(),
            );
            *wh.lock().unwrap().packed.entry(key).or_default() += 1;
            Ok::<_, TaskError>(json!({"packed": ctx.input["sku"]}))
        }
    });
    let wh = w.clone();
    flows.function("dispatch", move |ctx: TaskContext| {
        let wh = wh.clone();
        async move {
            let (order, warehouse) = (
                text(&ctx.flow_input, "order"),
                text(&ctx.flow_input, "warehouse"),
            );
            *wh.lock()
                .unwrap()
                .parcels
                .entry((order.clone(), warehouse.clone()))
                .or_default() += 1;
            Ok::<_, TaskError>(json!({"tracking": format!("{warehouse}-{order}")}))
        }
    });
    let wh = w.clone();
    flows.function("confirm_order", move |ctx: TaskContext| {
        let wh = wh.clone();
        async move {
            let order = ctx.business_key.clone().unwrap_or_default();
            wh.lock().unwrap().confirmed.push(order);
            Ok::<_, TaskError>(Value::Null)
        }
    });
}

fn settled(order: &str, amount: f64) -> Event {
    Event::new(
        "PaymentSettled",
        [format!("order:{order}")],
        json!({"order": order, "amount": amount}),
    )
}

async fn run(store: Store, orders: usize, workers: usize) -> Result<(), BoxError> {
    let flows = Flows::new(store.clone());
    let warehouse = Arc::new(Mutex::new(Warehouse::default()));
    register_functions(&flows, &warehouse);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows");
    for file in ["shipment.yaml", "order_fulfilment.yaml"] {
        let definition = FlowDefinition::from_file(format!("{dir}/{file}"))?;
        let version = flows.register(&definition).await?;
        println!("registered flow {} version {version}", definition.name);
    }

    let cancel = CancellationToken::new();
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            let worker = flows.worker(WorkerOptions::default().id(format!("worker-{i}")));
            let cancel = cancel.clone();
            tokio::spawn(async move { worker.run(cancel).await })
        })
        .collect();

    let started = Instant::now();
    // A run's own order ids, so that a second run on the same store starts
    // new orders.
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let mut instances = Vec::new();
    for i in 0..orders {
        let order = format!("order-{run_id}-{i}");
        let amount = 10.0 * (i + 1) as f64;
        let id = flows
            .start(
                "order_fulfilment",
                Some(&order),
                json!({"lines": lines(i), "amount": amount}),
            )
            .await?
            .instance;
        if scenario(i) == Scenario::PaidEarly {
            // Paid before the order has even reserved its stock.
            store.append(vec![settled(&order, amount)], None).await?;
        }
        instances.push((i, order, amount, id));
    }

    // The payment service: pays the late orders once they wait for it.
    let payment = StepId::new("payment", Phase::Action);
    let mut paid = vec![false; orders];
    let outcomes = loop {
        let mut finals = Vec::new();
        for (i, order, amount, id) in &instances {
            let s = flows.instance(*id).await?.ok_or("instance vanished")?;
            if scenario(*i) == Scenario::PaidLate
                && !paid[*i]
                && s.step(&payment).status == StepStatus::Waiting
            {
                paid[*i] = true;
                store.append(vec![settled(order, *amount)], None).await?;
            }
            if s.status.is_final() {
                finals.push((*i, order.clone(), s));
            }
        }
        if finals.len() == instances.len() {
            break finals;
        }
        if started.elapsed() > Duration::from_secs(180) {
            return Err(format!(
                "{} of {} orders still open after 180 s",
                instances.len() - finals.len(),
                instances.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cancel.cancel();
    for h in handles {
        h.await??;
    }

    // The invariants.
    let w = warehouse.lock().unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut confirmed_lines = 0;
    for (i, order, s) in &outcomes {
        let expected = match scenario(*i) {
            Scenario::PaidEarly | Scenario::PaidLate => InstanceStatus::Completed,
            Scenario::Unpaid | Scenario::Discontinued => InstanceStatus::Compensated,
        };
        let order_lines = lines(*i);
        let reserved: Vec<&String> = w
            .reserved
            .iter()
            .filter(|(_, (o, _))| o == order)
            .map(|(id, _)| id)
            .collect();
        let released: u32 = reserved
            .iter()
            .map(|id| w.released.get(*id).copied().unwrap_or(0))
            .sum();
        let warehouses: Vec<&str> = ["north", "south"]
            .into_iter()
            .filter(|h| order_lines.iter().any(|l| l["warehouse"] == *h))
            .collect();
        let packed: u32 = w
            .packed
            .iter()
            .filter(|((o, _, _, _), _)| o == order)
            .map(|(_, n)| n)
            .sum();
        let parcels: u32 = w
            .parcels
            .iter()
            .filter(|((o, _), _)| o == order)
            .map(|(_, n)| n)
            .sum();
        let confirmed = w.confirmed.iter().filter(|c| *c == order).count();
        println!(
            "{order:<18} {:<12} {} lines  {:<11} reserved {} released {released} packed {packed} parcels {parcels}",
            format!("{:?}", scenario(*i)),
            order_lines.len(),
            s.status.as_str(),
            reserved.len(),
        );
        if s.status != expected {
            return Err(format!("{order}: {:?}, expected {expected:?}", s.status).into());
        }
        if w.released.values().any(|n| *n > 1) {
            return Err("a reservation was released twice".into());
        }
        if expected == InstanceStatus::Completed {
            *counts.entry("confirmed").or_default() += 1;
            confirmed_lines += order_lines.len();
            // Every line reserved once, none released, the outputs in line order.
            if reserved.len() != order_lines.len() || released != 0 || confirmed != 1 {
                return Err(format!(
                    "{order}: {} of {} lines reserved, {released} released, confirmed {confirmed} times",
                    reserved.len(),
                    order_lines.len()
                )
                .into());
            }
            let out = s.outputs["reserve"].as_array().ok_or("no reservations")?;
            for (k, (o, l)) in out.iter().zip(&order_lines).enumerate() {
                if o["line"] != json!(k) || o["sku"] != l["sku"] {
                    return Err(format!("{order}: reservation {k} is {o}, line {l}").into());
                }
            }
            // The payment fact is the wait's output.
            if s.outputs["payment"]["data"]["order"] != json!(order) {
                return Err(format!("{order}: payment {}", s.outputs["payment"]).into());
            }
            // Each line packed once, by its warehouse's shipment; a parcel each.
            for l in &order_lines {
                let key = (
                    order.clone(),
                    text(l, "warehouse"),
                    text(l, "sku"),
                    l["quantity"].as_u64().unwrap_or_default(),
                );
                if w.packed.get(&key) != Some(&1) {
                    return Err(
                        format!("{order}: line {l} packed {:?} times", w.packed.get(&key)).into(),
                    );
                }
            }
            if packed as usize != order_lines.len() || parcels as usize != warehouses.len() {
                return Err(format!(
                    "{order}: {packed} packed, {parcels} parcels for {warehouses:?}"
                )
                .into());
            }
            for h in ["north", "south"] {
                let task = format!("ship_{h}");
                let shipped = s.outputs.contains_key(&task);
                if shipped != warehouses.contains(&h) {
                    return Err(format!("{order}: {task} shipped {shipped}").into());
                }
                if shipped
                    && s.outputs[&task]["dispatch"]["tracking"] != json!(format!("{h}-{order}"))
                {
                    return Err(format!("{order}: {task} output {}", s.outputs[&task]).into());
                }
            }
        } else {
            *counts.entry("cancelled").or_default() += 1;
            // Whatever was reserved is released, once; nothing shipped.
            if released as usize != reserved.len() || packed != 0 || parcels != 0 || confirmed != 0
            {
                return Err(format!(
                    "{order}: {} reserved, {released} released, {packed} packed, {parcels} parcels, confirmed {confirmed}",
                    reserved.len()
                )
                .into());
            }
            if scenario(*i) == Scenario::Unpaid && reserved.len() != order_lines.len() {
                return Err(
                    format!("{order}: unpaid but only {} lines reserved", reserved.len()).into(),
                );
            }
            if scenario(*i) == Scenario::Discontinued && reserved.len() >= order_lines.len() {
                return Err(format!("{order}: the discontinued line was reserved").into());
            }
        }
    }
    let outstanding = w.reserved.len()
        - w.reserved
            .keys()
            .filter(|id| w.released.contains_key(*id))
            .count();
    println!(
        "\n{} orders in {:.1} s: {} confirmed, {} cancelled; {outstanding} reservations outstanding for {confirmed_lines} confirmed lines",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        counts.get("confirmed").unwrap_or(&0),
        counts.get("cancelled").unwrap_or(&0),
    );
    if outstanding != confirmed_lines {
        return Err(format!(
            "{outstanding} reservations outstanding, {confirmed_lines} confirmed lines"
        )
        .into());
    }
    println!(
        "invariants hold: each order ended as its scenario calls for; stock reserved - released = confirmed lines, nothing reserved or released twice; each confirmed line packed once by its warehouse's shipment, one parcel per warehouse; reservations in line order"
    );
    Ok(())
}
