//! Ticket booking on one hot boundary: a concert with N seats and M concurrent
//! buyers, in the optimistic and the pessimistic executor mode.
//!
//! Every booking decides on all bookings of the concert (one scope, so every pair of
//! concurrent bookings conflicts) and takes a free seat. Optimistic mode retries
//! conflicts with jittered backoff; pessimistic mode locks the scope first so buyers
//! queue. Each mode runs in a fresh store and is checked against its log: never
//! oversold, every seat sold exactly once.
//!
//! Run with `cargo run --example ticket_booking [SEATS] [BUYERS] [ATTEMPTS]`
//! (defaults 100, 50, 1000).

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dcbflow::{
    Command, CommandError, CommandExecutor, CommandRetry, Concurrency, Decided, Event, Projector,
    Query, ReadOptions, Store,
};
use rand::Rng;
use serde_json::json;

struct Book {
    seats: u32,
    buyer: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("sold out")]
struct SoldOut;

impl Command for Book {
    type Model = Projector<HashSet<u64>>;
    type Error = SoldOut;

    fn command_type(&self) -> &str {
        "Book"
    }

    fn model(&self) -> Self::Model {
        Projector::new(
            Query::items_of(["SeatBooked"], ["concert:1"]),
            HashSet::new(),
            |taken, e| {
                taken.insert(e.data()["seat"].as_u64().unwrap_or(0));
            },
        )
    }

    fn decide(&self, taken: HashSet<u64>) -> Result<Decided, SoldOut> {
        let free: Vec<u64> = (0..u64::from(self.seats))
            .filter(|s| !taken.contains(s))
            .collect();
        if free.is_empty() {
            return Err(SoldOut);
        }
        let seat = free[rand::rng().random_range(0..free.len())];
        Ok(vec![Event::new(
            "SeatBooked",
            ["concert:1".to_string(), format!("seat:{seat}")],
            json!({"seat": seat, "buyer": self.buyer}),
        )]
        .into())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seats: u32 = args.next().map_or(Ok(100), |a| a.parse())?;
    let buyers: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let attempts: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    support::run(async |db| {
        println!("{seats} seats, {buyers} concurrent buyers, {attempts} booking attempts");
        for mode in [Concurrency::Optimistic, Concurrency::Pessimistic] {
            db.with_store("tickets", Some(buyers.min(64) + 2), async |store| {
                run(store, mode, seats, buyers, attempts).await
            })
            .await?;
        }
        Ok(())
    })
    .await
}

async fn run(
    store: Store,
    mode: Concurrency,
    seats: u32,
    buyers: usize,
    attempts: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let executor = CommandExecutor::new(store.clone())
        .retry(CommandRetry::attempts(1000))
        .concurrency(mode);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..buyers)
        .map(|buyer| {
            let (executor, next) = (executor.clone(), next.clone());
            tokio::spawn(async move {
                let (mut latencies, mut tries, mut sold_out) = (Vec::new(), 0u64, 0u64);
                while next.fetch_add(1, Ordering::Relaxed) < attempts {
                    let t = Instant::now();
                    match executor.execute(&Book { seats, buyer }).await {
                        Ok(o) => {
                            latencies.push(t.elapsed());
                            tries += u64::from(o.attempts);
                        }
                        Err(CommandError::Rejected(SoldOut)) => {
                            sold_out += 1;
                            tries += 1;
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                    let done = next.load(Ordering::Relaxed).min(attempts);
                    if buyer == 0 {
                        eprint!("\r  {mode:?}: {done}/{attempts} attempts");
                        let _ = std::io::stderr().flush();
                    }
                }
                Ok((latencies, tries, sold_out))
            })
        })
        .collect();
    let (mut latencies, mut tries, mut sold_out) = (Vec::<Duration>::new(), 0, 0);
    for t in tasks {
        let (l, x, s) = t.await??;
        latencies.extend(l);
        tries += x;
        sold_out += s;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let booked = latencies.len() as u64;
    println!(
        "{mode:?}: {booked} booked, {sold_out} sold out, {:.0} bookings/s, conflict rate {:.1}% ({} retries), latency p50 {:.1} ms, p99 {:.1} ms",
        booked as f64 / secs,
        100.0 * (tries - booked - sold_out) as f64 / tries.max(1) as f64,
        tries - booked - sold_out,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );

    let log = store
        .read_all(
            &Query::items_of(["SeatBooked"], ["concert:1"]),
            ReadOptions::default(),
        )
        .await?;
    let mut seen = HashSet::new();
    for e in &log.events {
        let seat = e.data()["seat"].as_u64().unwrap_or(u64::MAX);
        if seat >= u64::from(seats) || !seen.insert(seat) {
            return Err(format!("{mode:?}: seat {seat} sold twice or does not exist").into());
        }
    }
    let expected = (seats as usize).min(attempts);
    if seen.len() != expected || booked as usize != expected {
        return Err(format!("{mode:?}: {} seats sold, expected {expected}", seen.len()).into());
    }
    println!("{mode:?}: invariants hold: never oversold, every seat sold exactly once");
    Ok(())
}
