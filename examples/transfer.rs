//! Money transfers between 10 accounts by concurrent workers, with overdrafts refused.
//!
//! Each transfer is a command deciding on the source account's balance (one
//! projector over everything tagged with that account) and appending a
//! `MoneyTransferred` event tagged with both accounts, under the condition that
//! nothing touched the source account since the read. At the end the log is read
//! back: no balance may ever have gone negative and the total must be unchanged.
//!
//! Run with `cargo run --example transfer [WORKERS] [TRANSFERS_PER_WORKER]`
//! (defaults 8 and 200). Uses `DATABASE_URL` when set, otherwise a throwaway PostgreSQL.

mod support;

use std::collections::HashMap;
use std::time::Instant;

use dcbflow::{
    Command, CommandError, CommandExecutor, CommandRetry, Decided, Event, Projector, Query,
    QueryItem, ReadOptions, SequencedEvent, Store,
};
use rand::Rng;
use serde_json::json;

const ACCOUNTS: u32 = 10;
const OPENING_BALANCE: i64 = 1_000;

struct Transfer {
    from: u32,
    to: u32,
    amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("account {account} has {balance}, cannot send {amount}")]
struct InsufficientFunds {
    account: u32,
    balance: i64,
    amount: i64,
}

fn tag(account: u32) -> String {
    format!("account:{account}")
}

/// How an event changes `account`'s balance.
fn effect(account: u32, e: &SequencedEvent) -> i64 {
    let d = e.data();
    match e.event_type() {
        "AccountOpened" if d["account"] == account => d["balance"].as_i64().unwrap_or(0),
        "MoneyTransferred" if d["from"] == account => -d["amount"].as_i64().unwrap_or(0),
        "MoneyTransferred" if d["to"] == account => d["amount"].as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn balance(account: u32) -> Projector<i64> {
    let query = Query::from_items([QueryItem::new()
        .types(["AccountOpened", "MoneyTransferred"])
        .tags([tag(account)])]);
    Projector::new(query, 0, move |b, e| *b += effect(account, e))
}

impl Command for Transfer {
    type Model = Projector<i64>;
    type Error = InsufficientFunds;

    fn command_type(&self) -> &str {
        "Transfer"
    }

    fn payload(&self) -> serde_json::Value {
        json!({"from": self.from, "to": self.to, "amount": self.amount})
    }

    fn model(&self) -> Projector<i64> {
        balance(self.from)
    }

    fn decide(&self, balance: i64) -> Result<Decided, InsufficientFunds> {
        if balance < self.amount {
            return Err(InsufficientFunds {
                account: self.from,
                balance,
                amount: self.amount,
            });
        }
        let event = Event::new(
            "MoneyTransferred",
            [tag(self.from), tag(self.to)],
            json!({"from": self.from, "to": self.to, "amount": self.amount}),
        );
        Ok(vec![event].into())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let workers: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let per_worker: usize = args.next().map_or(Ok(200), |a| a.parse())?;
    support::run(async |db| {
        db.with_store("transfer", Some(workers + 2), async |store| {
            run(store, workers, per_worker).await
        })
        .await
    })
    .await
}

async fn run(
    store: Store,
    workers: usize,
    per_worker: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let opened = (0..ACCOUNTS)
        .map(|a| {
            Event::new(
                "AccountOpened",
                [tag(a)],
                json!({"account": a, "balance": OPENING_BALANCE}),
            )
        })
        .collect();
    store.append(opened, None).await?;

    let executor = CommandExecutor::new(store.clone()).retry(CommandRetry::attempts(100));
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let executor = executor.clone();
            tokio::spawn(async move {
                let (mut done, mut rejected, mut retries) = (0u64, 0u64, 0u64);
                for _ in 0..per_worker {
                    let (from, to, amount) = {
                        let mut rng = rand::rng();
                        let from = rng.random_range(0..ACCOUNTS);
                        let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                        (from, to, rng.random_range(1..=400))
                    };
                    match executor.execute(&Transfer { from, to, amount }).await {
                        Ok(o) => {
                            done += 1;
                            retries += u64::from(o.attempts - 1);
                        }
                        Err(CommandError::Rejected(_)) => rejected += 1,
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok((done, rejected, retries))
            })
        })
        .collect();
    let (mut done, mut rejected, mut retries) = (0, 0, 0);
    for t in tasks {
        let (d, r, x) = t.await??;
        done += d;
        rejected += r;
        retries += x;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{workers} workers: {done} transfers, {rejected} refused overdrafts, {retries} conflicts retried, {:.0} transfers/s",
        done as f64 / secs
    );

    // The invariant, from the log: replay in position order.
    let log = store
        .read_all(&Query::all(), ReadOptions::default())
        .await?;
    let mut balances: HashMap<u32, i64> = HashMap::new();
    for e in &log.events {
        for a in 0..ACCOUNTS {
            let b = balances.entry(a).or_default();
            *b += effect(a, e);
            if *b < 0 {
                return Err(format!("account {a} went negative at position {}", e.position).into());
            }
        }
    }
    let total: i64 = balances.values().sum();
    let mut sorted: Vec<_> = balances.into_iter().collect();
    sorted.sort();
    println!("balances: {sorted:?}");
    if total != i64::from(ACCOUNTS) * OPENING_BALANCE {
        return Err(format!("money not conserved: total {total}").into());
    }
    if log.events.len() as u64 != u64::from(ACCOUNTS) + done {
        return Err("the log does not hold exactly the successful transfers".into());
    }
    println!("invariants hold: no negative balance, total {total} conserved");
    Ok(())
}
