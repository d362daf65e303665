//! Many events in one append: speed, atomicity and idempotency.
//!
//! 1. Appends 5,000 events in one call: one transaction, one round trip; all
//!    events share the result's transaction id and get strictly increasing
//!    positions. Compares its rate with appending events one by one (only the
//!    first 500 of 5,000 single appends are timed and the total is extrapolated).
//! 2. Atomicity: a batch of 10 events whose 10th is invalid (empty type) is refused
//!    with `Error::InvalidInput`, and none of its events is written.
//! 3. Idempotency: a batch of 100 events carrying ids, appended twice; the second
//!    call writes nothing and returns the original positions with `replayed`.
//!
//! Run with `cargo run --release --example batch`. Uses `DATABASE_URL` when set,
//! otherwise a throwaway PostgreSQL (see `examples/support/mod.rs`).

mod support;

use std::time::Instant;

use dcbflow::{Error, Event, InvalidInput, Query, ReadOptions, Store};
use serde_json::json;

/// Events in the big batch (within the default limit of 10,000 per append).
const BATCH: usize = 5_000;
/// Single appends actually timed; the time for `BATCH` of them is extrapolated.
const SINGLES_TIMED: usize = 500;
/// Events in the idempotent batch.
const IDEMPOTENT: usize = 100;

fn item(event_type: &str, i: usize) -> Event {
    Event::new(event_type, [format!("item:{i}")], json!({"n": i}))
}

/// Number of events in the log.
async fn count(store: &Store) -> dcbflow::Result<usize> {
    Ok(store
        .read_all(&Query::all(), ReadOptions::default())
        .await?
        .events
        .len())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    support::run(async |db| {
        db.with_store("batch", None, async |store| run(store).await)
            .await
    })
    .await
}

async fn run(store: Store) -> Result<(), Box<dyn std::error::Error>> {
    // 1a. One append of BATCH events.
    let events: Vec<Event> = (0..BATCH).map(|i| item("ItemImported", i)).collect();
    let started = Instant::now();
    let r = store.append(events, None).await?;
    let batch_secs = started.elapsed().as_secs_f64();
    if r.positions.len() != BATCH || r.replayed {
        return Err(format!(
            "expected {BATCH} new positions, got {} (replayed: {})",
            r.positions.len(),
            r.replayed
        )
        .into());
    }
    if !r.positions.windows(2).all(|w| w[0] < w[1]) {
        return Err("the batch's positions are not strictly increasing".into());
    }
    let (first, last) = (r.positions[0], r.last_position());
    let gapless = last.value() - first.value() + 1 == BATCH as i64;
    // Read the batch back: every event carries the one transaction id.
    let stored = store
        .read_all(
            &Query::items_of(["ItemImported"], Vec::<String>::new()),
            ReadOptions::default(),
        )
        .await?;
    if stored.events.len() != BATCH {
        return Err(format!(
            "read back {} events of the batch, expected {BATCH}",
            stored.events.len()
        )
        .into());
    }
    if let Some((e, p)) = stored
        .events
        .iter()
        .zip(&r.positions)
        .find(|(e, p)| e.position != **p || e.transaction_id != r.transaction_id)
    {
        return Err(format!(
            "stored event at position {} (transaction {}) does not match the append result (position {p}, transaction {})",
            e.position, e.transaction_id, r.transaction_id
        )
        .into());
    }
    let batch_rate = BATCH as f64 / batch_secs;
    println!(
        "1 append of {BATCH} events: {:.1} ms, {batch_rate:.0} events/s; one transaction ({}), positions {first}..={last} strictly increasing{}",
        batch_secs * 1000.0,
        r.transaction_id,
        if gapless { " and gapless" } else { "" }
    );

    // 1b. The same number of events, one append each (the first SINGLES_TIMED timed).
    let started = Instant::now();
    for i in 0..SINGLES_TIMED {
        store
            .append(vec![item("ItemAppendedAlone", i)], None)
            .await?;
    }
    let singles_secs = started.elapsed().as_secs_f64();
    let singles_rate = SINGLES_TIMED as f64 / singles_secs;
    let estimated_secs = singles_secs * BATCH as f64 / SINGLES_TIMED as f64;
    println!(
        "{BATCH} appends of 1 event: ~{estimated_secs:.2} s, {singles_rate:.0} events/s \
         (timed the first {SINGLES_TIMED} single appends, {singles_secs:.2} s, and extrapolated)"
    );
    println!(
        "batching is ~{:.0}x faster than one append per event",
        batch_rate / singles_rate
    );

    // 2. Atomicity: the 10th event is invalid, so none of the 10 is written.
    let count_before = count(&store).await?;
    let head_before = store.head().await?;
    let mut events: Vec<Event> = (0..9).map(|i| item("ItemImported", BATCH + i)).collect();
    events.push(Event::new("", ["item:bad"], json!({})));
    match store.append(events, None).await {
        Err(Error::InvalidInput(e)) => {
            println!("batch of 10 with an empty type in the 10th: refused, {e}");
            if !matches!(e, InvalidInput::EmptyType { index: 9 }) {
                return Err(format!("expected EmptyType {{ index: 9 }}, got {e:?}").into());
            }
        }
        Ok(r) => {
            return Err(format!("the invalid batch was written at {:?}", r.positions).into());
        }
        Err(e) => return Err(format!("expected Error::InvalidInput, got {e:?}").into()),
    }
    let count_after = count(&store).await?;
    let head_after = store.head().await?;
    println!(
        "events in the log: {count_before} before, {count_after} after; head {head_before:?} before, {head_after:?} after"
    );
    if count_after != count_before || head_after != head_before {
        return Err("the refused batch changed the log".into());
    }

    // 3. Idempotency: the same batch with ids, sent twice.
    let events: Vec<Event> = (0..IDEMPOTENT)
        .map(|i| item("ItemReserved", i).with_id(uuid::Uuid::new_v4()))
        .collect();
    let count_before = count(&store).await?;
    let original = store.append(events.clone(), None).await?;
    let again = store.append(events, None).await?;
    println!(
        "batch of {IDEMPOTENT} events with ids: first append replayed={}, positions {}..={}, transaction {}",
        original.replayed,
        original.positions[0],
        original.last_position(),
        original.transaction_id
    );
    println!(
        "same batch again:                      replayed={}, positions {}..={}, transaction {}",
        again.replayed,
        again.positions[0],
        again.last_position(),
        again.transaction_id
    );
    if original.replayed || !again.replayed {
        return Err(format!(
            "expected replayed false then true, got {} then {}",
            original.replayed, again.replayed
        )
        .into());
    }
    if again.positions != original.positions || again.transaction_id != original.transaction_id {
        return Err("the replayed append returned other positions or another transaction".into());
    }
    let count_after = count(&store).await?;
    if count_after != count_before + IDEMPOTENT {
        return Err(format!(
            "expected {} events after the idempotent batch, found {count_after}",
            count_before + IDEMPOTENT
        )
        .into());
    }

    // The whole log: the big batch, the timed singles and the idempotent batch.
    let total = count(&store).await?;
    let expected = BATCH + SINGLES_TIMED + IDEMPOTENT;
    println!("the log holds {total} events (expected {expected})");
    if total != expected {
        return Err(format!("the log holds {total} events, expected {expected}").into());
    }
    Ok(())
}
