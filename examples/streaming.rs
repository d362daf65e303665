//! Streaming a large log in constant memory.
//!
//! Appends N events (default 1,000,000) in batches of 10,000, then streams all of
//! them back with `store.read(&Query::all(), ..)`, counting them and checking that
//! positions strictly increase, and finally streams a tag query (`account:7`)
//! alone. Rows come from the server as the stream is polled, so memory stays flat
//! however many events match: the example prints the peak resident memory
//! (`VmHWM`) and the current one (`VmRSS`) from `/proc/self/status` before and
//! after the full stream (Linux only; "n/a" elsewhere).
//!
//! Run with `cargo run --release --example streaming [N]`. Uses `DATABASE_URL` when
//! set, otherwise a throwaway PostgreSQL (see `examples/support/mod.rs`).

mod support;

use std::time::Instant;

use dcbflow::{Event, Position, Query, QueryItem, ReadOptions, Store};
use futures::TryStreamExt;
use serde_json::json;

const DEFAULT_EVENTS: usize = 1_000_000;
const BATCH: usize = 10_000;
const ACCOUNTS: usize = 1_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse::<usize>()
            .map_err(|e| format!("N must be a whole number, got {arg:?}: {e}"))?,
        None => DEFAULT_EVENTS,
    };
    if n == 0 {
        return Err("N must be at least 1".into());
    }
    support::run(async |db| {
        db.with_store("streaming", None, async |store| run(store, n).await)
            .await
    })
    .await
}

/// Fails unless `position` comes strictly after `previous`.
fn check_order(previous: Option<Position>, position: Position) -> Result<(), support::BoxError> {
    match previous {
        Some(p) if position <= p => {
            Err(format!("order broken: position {position} streamed after position {p}").into())
        }
        _ => Ok(()),
    }
}

/// Peak (`VmHWM`) and current (`VmRSS`) resident memory in KiB, from `/proc/self/status`.
fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn describe(m: Option<(u64, u64)>) -> String {
    match m {
        Some((peak, rss)) => format!("peak RSS {:.1} MiB, RSS {:.1} MiB", mib(peak), mib(rss)),
        None => "peak RSS n/a, RSS n/a".to_string(),
    }
}

/// Resets the kernel's peak-RSS counter of this process (Linux 4.0+), so that the
/// next `VmHWM` reading covers only what follows.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

async fn run(store: Store, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    println!("memory at start: {}", describe(memory()));

    // 1. Append N events in batches.
    println!("appending {n} events in batches of {BATCH}...");
    let started = Instant::now();
    let mut first_appended: Option<Position> = None;
    let mut last_appended: Option<Position> = None;
    let mut start = 0;
    while start < n {
        let end = (start + BATCH).min(n);
        let batch: Vec<Event> = (start..end)
            .map(|i| {
                Event::new(
                    "MoneyDeposited",
                    [format!("account:{}", i % ACCOUNTS)],
                    json!({"seq": i, "amount": i % 100 + 1}),
                )
            })
            .collect();
        let r = store.append(batch, None).await?;
        if first_appended.is_none() {
            first_appended = Some(r.positions[0]);
        }
        last_appended = Some(r.last_position());
        if end.is_multiple_of(100_000) || end == n {
            println!("  {end} events appended");
        }
        start = end;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "appended {n} events in {secs:.2} s: {:.0} events/s",
        n as f64 / secs
    );

    // 2. Stream them all back, one row at a time.
    let peak_reset = reset_peak();
    let before = memory();
    println!(
        "before streaming: {}{}",
        describe(before),
        if peak_reset {
            " (peak counter reset)"
        } else {
            ""
        }
    );
    let started = Instant::now();
    let mut stream = store.read(&Query::all(), ReadOptions::default()).await?;
    let mut count = 0usize;
    let mut first_seen: Option<Position> = None;
    let mut previous: Option<Position> = None;
    while let Some(e) = stream.try_next().await? {
        check_order(previous, e.position)?;
        if first_seen.is_none() {
            first_seen = Some(e.position);
        }
        previous = Some(e.position);
        count += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let cursor = stream.cursor();
    drop(stream);
    let after = memory();
    println!(
        "streamed {count} events in {secs:.2} s: {:.0} events/s",
        count as f64 / secs
    );
    println!("after streaming: {}", describe(after));
    match (before, after) {
        (Some((_, rss_before)), Some((peak_after, _))) => println!(
            "peak RSS during the stream: {:.1} MiB ({:+.1} MiB over the RSS when it started){}",
            mib(peak_after),
            mib(peak_after) - mib(rss_before),
            if peak_reset {
                ""
            } else {
                " [peak counter not reset: it includes the append phase]"
            }
        ),
        _ => println!("peak RSS during the stream: n/a"),
    }
    if let Some(c) = cursor {
        println!("stream cursor: {c}");
    }
    if count != n {
        return Err(format!("streamed {count} events, expected {n}").into());
    }
    if first_seen != first_appended || previous != last_appended {
        return Err(format!(
            "streamed positions {first_seen:?}..={previous:?}, appended {first_appended:?}..={last_appended:?}"
        )
        .into());
    }
    println!("all {n} events streamed, positions strictly increasing");

    // 3. A partial stream: only the events tagged account:7.
    let account7 = Query::from_items([QueryItem::new().tags(["account:7"])]);
    // Events i with i % 1000 == 7, for i in 0..n.
    let expected = n / ACCOUNTS + usize::from(n % ACCOUNTS > 7);
    let started = Instant::now();
    let mut stream = store.read(&account7, ReadOptions::default()).await?;
    let mut count7 = 0usize;
    let mut previous: Option<Position> = None;
    while let Some(e) = stream.try_next().await? {
        if !account7.matches_sequenced(&e) {
            return Err(format!(
                "event at position {} does not carry account:7: {:?}",
                e.position,
                e.tags()
            )
            .into());
        }
        check_order(previous, e.position)?;
        previous = Some(e.position);
        count7 += 1;
    }
    drop(stream);
    println!(
        "streamed {count7} events tagged account:7 in {:.1} ms (expected {expected})",
        started.elapsed().as_secs_f64() * 1000.0
    );
    if count7 != expected {
        return Err(format!("account:7 has {count7} events, expected {expected}").into());
    }
    Ok(())
}
