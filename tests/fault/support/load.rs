//! Mixed append load with a ledger of what each append was told, and the check of
//! that ledger against the log (by SQL).
//!
//! Every append carries 1-3 `Fault` events, each with `{"w": writer, "a": append
//! id, "i": index, "n": events in the append}`, tagged `writer:<w>`. A writer
//! whose events carry ids re-sends the same append after an error until it is
//! acknowledged (a replay if it had committed); one without ids moves on, and the
//! outcome of the failed append is unknown to it. A conditional writer appends
//! "unless an event of mine appeared after the last one I know of": a conflict
//! then means an append it was not told about did commit, and it re-reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcbflow::{AppendCondition, CancellationToken, Cursor, Error, Event, Position, Query, Store};
use rand::Rng;
use serde_json::json;
use uuid::Uuid;

use super::{Verdicts, kind};

/// One writer task.
#[derive(Clone)]
pub struct WriterSpec {
    pub store: Store,
    /// Which store it uses, for figures (`plain`, `group`).
    pub label: &'static str,
    /// Its events carry ids (and failed appends are re-sent).
    pub ids: bool,
    /// Its appends carry a condition.
    pub conditional: bool,
}

/// What one append was told.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub writer: usize,
    pub append: Uuid,
    pub n: usize,
    /// The positions the store acknowledged, in event order.
    pub acked: Option<Vec<i64>>,
    /// The acknowledgement was a replay of an earlier attempt.
    pub replayed: bool,
    pub attempts: u32,
}

/// An acknowledged append: when its (last) call began and ended.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub label: &'static str,
    pub started: Instant,
    pub done: Instant,
}

/// Errors seen, by [`kind`]: (count, how many said `is_retryable()`).
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub by_kind: BTreeMap<String, (u64, u64)>,
    /// Calls that had not returned after [`CALL_CAP`] (dropped).
    pub hung: u64,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.by_kind.values().map(|(n, _)| n).sum()
    }

    pub fn not_retryable(&self) -> u64 {
        self.by_kind.values().map(|(n, r)| n - r).sum()
    }

    pub fn summary(&self) -> String {
        if self.by_kind.is_empty() && self.hung == 0 {
            return "none".into();
        }
        let mut parts: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, (n, r))| format!("{k} x{n} (retryable {r})"))
            .collect();
        if self.hung > 0 {
            parts.push(format!("hung x{}", self.hung));
        }
        parts.join(", ")
    }

    fn add(&mut self, e: &Error) {
        let entry = self.by_kind.entry(kind(e)).or_default();
        entry.0 += 1;
        entry.1 += u64::from(e.is_retryable());
    }
}

/// The longest one append call may take before the writer drops it as hung.
pub const CALL_CAP: Duration = Duration::from_secs(30);

/// Writers running until [`Load::stop`].
pub struct Load {
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<Report>>,
    acks: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<Mutex<Tally>>,
}

struct Report {
    outcomes: Vec<Outcome>,
    /// (writer, position) of every conflict.
    conflicts: Vec<(usize, i64)>,
}

/// What the writers were told, once they stopped.
pub struct Ledger {
    pub outcomes: Vec<Outcome>,
    pub conflicts: Vec<(usize, i64)>,
    pub acks: Vec<Ack>,
    pub errors: Tally,
}

impl Load {
    pub fn start(specs: Vec<WriterSpec>) -> Load {
        let stop = CancellationToken::new();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Tally::default()));
        let handles = specs
            .into_iter()
            .enumerate()
            .map(|(w, spec)| {
                tokio::spawn(writer(w, spec, stop.clone(), acks.clone(), errors.clone()))
            })
            .collect();
        Load {
            stop,
            handles,
            acks,
            errors,
        }
    }

    /// Acknowledged appends so far.
    pub fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Acknowledged appends of store `label` whose call began at or after `t`.
    pub fn acked_since(&self, label: &str, t: Instant) -> usize {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.label == label && a.started >= t)
            .count()
    }

    /// Errors so far.
    pub fn errors(&self) -> Tally {
        self.errors.lock().unwrap().clone()
    }

    /// Stops the writers (an id-carrying append in progress is still re-sent
    /// until acknowledged) and returns the ledger.
    pub async fn stop(self) -> Ledger {
        self.stop.cancel();
        let mut outcomes = Vec::new();
        let mut conflicts = Vec::new();
        for h in self.handles {
            let r = h.await.expect("writer panicked");
            outcomes.extend(r.outcomes);
            conflicts.extend(r.conflicts);
        }
        Ledger {
            outcomes,
            conflicts,
            acks: self.acks.lock().unwrap().clone(),
            errors: self.errors.lock().unwrap().clone(),
        }
    }
}

impl Ledger {
    /// For each fault `(injected, server_back)`: how long after the server was
    /// reported back (`pg_ctl` returned) the first append of store `label` was
    /// acknowledged, and the outage its writers saw: the longest time without
    /// any acknowledgement between the fault and that first one. An
    /// acknowledgement that ends after `server_back` came from the new server.
    pub fn recovery(
        &self,
        label: &str,
        faults: &[(Instant, Instant)],
    ) -> Vec<Option<(Duration, Duration)>> {
        let mut done: Vec<Instant> = self
            .acks
            .iter()
            .filter(|a| a.label == label)
            .map(|a| a.done)
            .collect();
        done.sort();
        faults
            .iter()
            .map(|(fault, back)| {
                let first = *done.iter().find(|d| **d >= *back)?;
                let outage = done
                    .windows(2)
                    .filter(|w| w[1] > *fault && w[1] <= first)
                    .map(|w| w[1] - w[0])
                    .max()?;
                Some((first - *back, outage))
            })
            .collect()
    }
}

async fn writer(
    w: usize,
    spec: WriterSpec,
    stop: CancellationToken,
    acks: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<Mutex<Tally>>,
) -> Report {
    let tag = format!("writer:{w}");
    let mine = Query::items_of(["Fault"], [tag.clone()]);
    let mut last_known: Option<i64> = None;
    let mut report = Report {
        outcomes: Vec::new(),
        conflicts: Vec::new(),
    };
    while !stop.is_cancelled() {
        let append = Uuid::new_v4();
        let n = rand::rng().random_range(1..=3usize);
        let events: Vec<Event> = (0..n)
            .map(|i| {
                let e = Event::new(
                    "Fault",
                    [tag.clone()],
                    json!({"w": w, "a": append, "i": i, "n": n}),
                );
                if spec.ids {
                    e.with_id(Uuid::new_v4())
                } else {
                    e
                }
            })
            .collect();
        let condition = spec.conditional.then(|| {
            let c = AppendCondition::new(mine.clone());
            match last_known {
                Some(p) => c.after(Cursor::at(Position(p))),
                None => c,
            }
        });
        let mut outcome = Outcome {
            writer: w,
            append,
            n,
            acked: None,
            replayed: false,
            attempts: 0,
        };
        let mut resync = false;
        loop {
            outcome.attempts += 1;
            let started = Instant::now();
            let result = tokio::time::timeout(
                CALL_CAP,
                spec.store.append(events.clone(), condition.clone()),
            )
            .await;
            match result {
                Ok(Ok(r)) => {
                    let done = Instant::now();
                    outcome.acked = Some(r.positions.iter().map(|p| p.0).collect());
                    outcome.replayed = r.replayed;
                    last_known = Some(r.last_position().0);
                    acks.lock().unwrap().push(Ack {
                        label: spec.label,
                        started,
                        done,
                    });
                    break;
                }
                Ok(Err(Error::Conflict { position })) => {
                    // An append of ours that we were not told about did commit.
                    report.conflicts.push((w, position.0));
                    resync = true;
                    break;
                }
                Ok(Err(e)) => {
                    errors.lock().unwrap().add(&e);
                    let refused = matches!(e, Error::InvalidInput(_));
                    if !spec.ids || refused || outcome.attempts >= 2000 {
                        break;
                    }
                }
                Err(_) => {
                    errors.lock().unwrap().hung += 1;
                    if !spec.ids || outcome.attempts >= 2000 {
                        break;
                    }
                }
            }
            // Pacing between attempts, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report.outcomes.push(outcome);
        if resync {
            // Learn the last of our events, whoever was told about it.
            loop {
                match tokio::time::timeout(CALL_CAP, spec.store.read_last(&mine)).await {
                    Ok(Ok(last)) => {
                        last_known = last.map(|e| e.position.0);
                        break;
                    }
                    Ok(Err(e)) => errors.lock().unwrap().add(&e),
                    Err(_) => errors.lock().unwrap().hung += 1,
                }
                if stop.is_cancelled() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    report
}

/// One stored `Fault` event.
#[derive(Debug, Clone)]
pub struct Stored {
    pub position: i64,
    pub append: Uuid,
    pub i: i64,
}

/// The `Fault` events of `schema`, in position order.
pub async fn stored(client: &tokio_postgres::Client, schema: &str) -> Vec<Stored> {
    client
        .query(
            &format!(
                "SELECT position, (data->>'a')::uuid, (data->>'i')::bigint FROM \"{schema}\".events WHERE type = 'Fault' ORDER BY position"
            ),
            &[],
        )
        .await
        .expect("read the log")
        .iter()
        .map(|r| Stored {
            position: r.get(0),
            append: r.get(1),
            i: r.get(2),
        })
        .collect()
}

/// Figures of a ledger checked against the log.
#[derive(Debug, Default)]
pub struct Checked {
    pub appends: usize,
    pub acked: usize,
    pub replayed: usize,
    pub unacked_absent: usize,
    pub unacked_committed: usize,
    pub partial: usize,
    pub events: usize,
}

/// Checks the ledger against the log: every acknowledged append present exactly
/// once at the positions it was told; every other append whole or absent; no
/// event the writers did not send; every conflict explained by an append of the
/// same writer that was not acknowledged.
pub fn check(ledger: &Ledger, log: &[Stored], v: &mut Verdicts) -> Checked {
    let mut by_append: HashMap<Uuid, Vec<&Stored>> = HashMap::new();
    for s in log {
        by_append.entry(s.append).or_default().push(s);
    }
    let known: HashSet<Uuid> = ledger.outcomes.iter().map(|o| o.append).collect();
    let phantom = log.iter().filter(|s| !known.contains(&s.append)).count();
    let mut c = Checked {
        appends: ledger.outcomes.len(),
        events: log.len(),
        ..Checked::default()
    };
    let mut wrong_ack = Vec::new();
    let mut duplicated = Vec::new();
    let mut partial = Vec::new();
    let mut unacked_commits: HashMap<usize, Vec<i64>> = HashMap::new();
    for o in &ledger.outcomes {
        let rows = by_append.get(&o.append).map(Vec::as_slice).unwrap_or(&[]);
        let mut indexes: Vec<i64> = rows.iter().map(|s| s.i).collect();
        indexes.sort();
        let distinct = indexes.windows(2).all(|w| w[0] != w[1]);
        if !distinct {
            duplicated.push(o.append);
        }
        match &o.acked {
            Some(positions) => {
                c.acked += 1;
                c.replayed += usize::from(o.replayed);
                let mut stored: Vec<(i64, i64)> = rows.iter().map(|s| (s.i, s.position)).collect();
                stored.sort();
                let stored: Vec<i64> = stored.into_iter().map(|(_, p)| p).collect();
                if &stored != positions {
                    wrong_ack.push(format!(
                        "{} told {positions:?}, stored {stored:?}",
                        o.append
                    ));
                }
            }
            None if rows.is_empty() => c.unacked_absent += 1,
            None if rows.len() == o.n && distinct => {
                c.unacked_committed += 1;
                unacked_commits
                    .entry(o.writer)
                    .or_default()
                    .extend(rows.iter().map(|s| s.position));
            }
            None => {
                c.partial += 1;
                partial.push(format!("{}: {} of {}", o.append, rows.len(), o.n));
            }
        }
    }
    let unexplained: Vec<_> = ledger
        .conflicts
        .iter()
        .filter(|(w, p)| !unacked_commits.get(w).is_some_and(|ps| ps.contains(p)))
        .collect();
    v.check(
        "every acknowledged append is stored exactly once, at the positions it was told",
        wrong_ack.is_empty() && duplicated.is_empty(),
        format!(
            "{} acknowledged ({} as replays); wrong: {:?}; duplicated: {:?}",
            c.acked,
            c.replayed,
            &wrong_ack[..wrong_ack.len().min(5)],
            &duplicated[..duplicated.len().min(5)]
        ),
    );
    v.check(
        "no append is half-written (unacknowledged ones are whole or absent)",
        partial.is_empty(),
        format!(
            "{} unacknowledged: {} absent, {} committed whole, {} partial {:?}",
            c.unacked_absent + c.unacked_committed + c.partial,
            c.unacked_absent,
            c.unacked_committed,
            c.partial,
            &partial[..partial.len().min(5)]
        ),
    );
    v.check(
        "the log holds no event the writers did not send",
        phantom == 0,
        format!("{phantom} unknown events of {}", log.len()),
    );
    v.check(
        "every conflict is explained by an unacknowledged append of the same writer that committed",
        unexplained.is_empty(),
        format!(
            "{} conflicts, unexplained {:?}",
            ledger.conflicts.len(),
            unexplained
        ),
    );
    c
}
