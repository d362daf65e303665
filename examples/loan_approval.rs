//! Loan applications as a flow with a branch, a human approval and a timer
//! (`examples/flows/loan_approval.yaml`):
//! - a credit score routes each application (a `when:` condition in CEL):
//!   good scores for modest amounts are approved at once, the others wait for
//!   an underwriter's decision, a signal with a timeout;
//! - the underwriter (simulated here) approves some, rejects some and lets some
//!   expire; one decision is sent twice, as a retried request would, and counts
//!   once;
//! - an approved loan waits out a cooling-off period, a durable timer, then is
//!   paid out.
//!
//! At the end it prints each application's outcome and checks the invariants:
//! every application ends exactly one way (paid out, rejected or expired) and
//! the one its score and the underwriter's decision call for; each loan is paid
//! out at most once and no earlier than its cooling-off period allows; the
//! money paid out equals the approved amounts.
//!
//! Run with `cargo run --example loan_approval [APPLICATIONS] [WORKERS]`
//! (default 20 applications, 2 workers). PostgreSQL as for the other examples.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcbflow::flow::{
    FlowDefinition, Flows, InstanceStatus, Phase, Signal, StepId, StepStatus, TaskContext,
    TaskError, WorkerOptions,
};
use dcbflow::{CancellationToken, Store};
use serde_json::{Value, json};
use support::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let applications: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let workers: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    support::run(async |db| {
        db.with_store("loan_approval", Some(16), async |store| {
            run(store, applications, workers).await
        })
        .await
    })
    .await
}

/// What the bank's systems would record: payouts and rejection letters.
#[derive(Default)]
struct Bank {
    /// Applicant → (amount, how many times paid).
    paid: HashMap<String, (f64, u32)>,
    rejected: Vec<String>,
}

/// What the underwriter does with application `i` if it reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Approve,
    Reject,
    /// Never answers: the application expires.
    Ignore,
}

fn decision(i: usize) -> Decision {
    match i % 3 {
        0 => Decision::Approve,
        1 => Decision::Reject,
        _ => Decision::Ignore,
    }
}

/// The credit score of application `i` (deterministic, so the outcome is known).
fn score(i: usize) -> i64 {
    [720, 650, 810, 540, 700][i % 5]
}

fn amount(i: usize) -> f64 {
    [5_000.0, 12_000.0, 30_000.0, 8_000.0, 15_000.0][(i / 5) % 5]
}

fn auto_approved(i: usize) -> bool {
    score(i) >= 700 && amount(i) <= 20_000.0
}

fn register_functions(flows: &Flows, bank: &Arc<Mutex<Bank>>) {
    flows.function("credit_score", |ctx: TaskContext| async move {
        let applicant = ctx.flow_input["applicant"].as_str().unwrap_or_default();
        let i: usize = applicant
            .trim_start_matches("applicant-")
            .parse()
            .unwrap_or(0);
        Ok::<_, TaskError>(json!({"score": score(i)}))
    });
    flows.function("auto_approve", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(json!({"approved": true, "by": "policy"}))
    });
    let b = bank.clone();
    flows.function("notify_rejection", move |ctx: TaskContext| {
        let b = b.clone();
        async move {
            let who = ctx.flow_input["applicant"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            b.lock().unwrap().rejected.push(who);
            Ok::<_, TaskError>(Value::Null)
        }
    });
    let b = bank.clone();
    flows.function("disburse", move |ctx: TaskContext| {
        let b = b.clone();
        async move {
            let who = ctx.flow_input["applicant"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let amount = ctx.flow_input["amount"].as_f64().unwrap_or_default();
            // Idempotent by applicant, as a payment system is by its key.
            let mut bank = b.lock().unwrap();
            let entry = bank.paid.entry(who).or_insert((amount, 0));
            entry.1 += 1;
            Ok::<_, TaskError>(json!({"paid": amount}))
        }
    });
    flows.function("claw_back", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
}

async fn run(store: Store, applications: usize, workers: usize) -> Result<(), BoxError> {
    let flows = Flows::new(store);
    let bank = Arc::new(Mutex::new(Bank::default()));
    register_functions(&flows, &bank);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/flows/loan_approval.yaml"
    );
    let definition = FlowDefinition::from_file(path)?;
    let version = flows.register(&definition).await?;
    println!("registered flow loan_approval version {version} from {path}");

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
    for i in 0..applications {
        let applicant = format!("applicant-{i}");
        let input = json!({"applicant": applicant, "amount": amount(i)});
        let s = flows
            .start("loan_approval", Some(&applicant), input)
            .await?;
        instances.push((i, s.instance));
    }

    // The underwriter: decides each application waiting for them (or not).
    let review = StepId::new("manual_review", Phase::Action);
    let mut decided = vec![false; applications];
    let outcomes = loop {
        let mut finals = Vec::new();
        for (i, id) in &instances {
            let s = flows.instance(*id).await?.ok_or("instance vanished")?;
            if s.step(&review).status == StepStatus::Waiting && !decided[*i] {
                decided[*i] = true;
                let approved = match decision(*i) {
                    Decision::Approve => true,
                    Decision::Reject => false,
                    Decision::Ignore => continue,
                };
                let signal = Signal::new("underwriter_decision", format!("decision-{i}"))
                    .payload(json!({"approved": approved, "by": "ada"}))
                    .actor("ada")
                    .reason(if approved {
                        "income verified"
                    } else {
                        "debt too high"
                    });
                flows.signal(*id, signal.clone()).await?;
                // A retried request: the same id changes nothing.
                flows.signal(*id, signal).await?;
            }
            if s.status.is_final() {
                finals.push(s);
            }
        }
        if finals.len() == instances.len() {
            break finals;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "{} of {} applications still open after 120 s",
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
    let bank = bank.lock().unwrap();
    let (mut paid_out, mut approved_total, mut counts) = (0.0, 0.0, HashMap::new());
    for s in &outcomes {
        let applicant = s.business_key.clone().unwrap_or_default();
        let i: usize = applicant.trim_start_matches("applicant-").parse()?;
        let expected = if auto_approved(i) {
            "paid out"
        } else {
            match decision(i) {
                Decision::Approve => "paid out",
                Decision::Reject => "rejected",
                Decision::Ignore => "expired",
            }
        };
        let actual = match (s.status, s.outputs.contains_key("disburse")) {
            (InstanceStatus::Completed, true) => "paid out",
            (InstanceStatus::Completed, false) => "rejected",
            (InstanceStatus::Compensated, false) => "expired",
            (status, _) => return Err(format!("{applicant}: unexpected {status:?}").into()),
        };
        println!(
            "{applicant:<14} score {:>3}  amount {:>7}  {actual:<9}  {}",
            score(i),
            amount(i),
            s.reason.clone().unwrap_or_default()
        );
        if actual != expected {
            return Err(format!("{applicant}: {actual}, expected {expected}").into());
        }
        *counts.entry(actual).or_insert(0) += 1;
        let times_paid = bank.paid.get(&applicant).map_or(0, |p| p.1);
        let rejected = bank.rejected.iter().filter(|r| **r == applicant).count();
        match actual {
            "paid out" => {
                approved_total += amount(i);
                if times_paid != 1 || rejected != 0 {
                    return Err(format!(
                        "{applicant}: paid {times_paid} times, rejected {rejected}"
                    )
                    .into());
                }
                // Paid no earlier than the cooling-off period's end.
                let until: chrono::DateTime<chrono::Utc> =
                    serde_json::from_value(s.outputs["cooling_off"]["waited_until"].clone())?;
                let paid_at = s
                    .step(&StepId::new("disburse", Phase::Action))
                    .first_started;
                let waited = s
                    .step(&StepId::new("cooling_off", Phase::Action))
                    .first_started;
                match (waited, paid_at) {
                    (Some(from), Some(at))
                        if at >= until && until - from >= chrono::Duration::milliseconds(990) => {}
                    other => {
                        return Err(format!(
                            "{applicant}: cooling off until {until}, (reached, paid) {other:?}"
                        )
                        .into());
                    }
                }
            }
            _ if times_paid != 0 => return Err(format!("{applicant}: paid but {actual}").into()),
            "rejected" if rejected != 1 => {
                return Err(format!("{applicant}: {rejected} rejection letters").into());
            }
            _ => {}
        }
        // Each decision was consumed once, whatever was sent twice.
        if s.signals.len() > 1 || s.signals.iter().any(|g| g.consumed_by.is_none()) {
            return Err(format!("{applicant}: signals {:?}", s.signals).into());
        }
    }
    paid_out += bank.paid.values().map(|(a, _)| a).sum::<f64>();
    println!(
        "\n{} applications in {:.1} s: {} paid out, {} rejected, {} expired; {paid_out} paid out",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        counts.get("paid out").unwrap_or(&0),
        counts.get("rejected").unwrap_or(&0),
        counts.get("expired").unwrap_or(&0),
    );
    if (paid_out - approved_total).abs() > f64::EPSILON {
        return Err(format!("paid out {paid_out}, approved {approved_total}").into());
    }
    println!(
        "invariants hold: one outcome each, the expected one; each loan paid once, after its cooling-off; money paid = money approved"
    );
    Ok(())
}
