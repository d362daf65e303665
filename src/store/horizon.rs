//! What the subscriptions of one store handle share: one `LISTEN` connection and
//! one watcher of the writer horizon.
//!
//! Without sharing, every subscription held a `LISTEN` connection of its own and
//! computed the horizon itself, and that reads `pg_locks`, which takes every
//! partition lock of PostgreSQL's lock manager: 100 subscribers meant 100
//! connections and 100 pollers of the lock table. The [`Feed`] of a store handle
//! (shared by its clones) is created by the first subscription and ends, with its
//! tasks and its connection, when the last one is dropped:
//!
//! - the **listener** holds the one `LISTEN` connection (reopened with backoff when
//!   lost) and counts the notifications in a watch channel;
//! - the **watcher** computes the safe horizon (see `writer_horizon` in
//!   `sql/store/0003_horizon.sql`) and publishes it. It runs a round only when a
//!   subscription wants more than the last published horizon: one asked for a
//!   fresh one ([`Feed::fresh`]), or one is waiting ([`Feed::wait_beyond`]) and a
//!   notification came in, or writers in flight hold the horizon back (then it
//!   looks again every `horizon_interval`). A round costs one `pg_locks` query
//!   whatever the number of subscribers.
//! - when the horizon moved while several subscriptions want it, the watcher also
//!   reads the events it uncovered (at most [`TAIL_EVENTS`] per round) once, and
//!   keeps the last [`TAIL_KEEP`] in the **tail**: a subscription whose position
//!   lies inside the tail takes its events from memory instead of reading them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{Error, Position, Query, ReadOptions, Result, SequencedEvent, Store};
use crate::backoff::Backoff;

/// Most events the watcher reads into the shared tail in one round.
const TAIL_EVENTS: u64 = 256;

/// Most events the shared tail keeps (the oldest chunks are dropped first).
const TAIL_KEEP: usize = 1024;

/// The shortest time between the starts of two rounds while several
/// subscriptions wait: under a stream of appends, rounds (and their tail reads)
/// come at most this often, each covering more events, instead of back to back.
const MIN_ROUND: Duration = Duration::from_millis(2);

/// The horizon re-check interval when no subscription has set one.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);

/// Where a store handle keeps its [`Feed`] while some subscription uses it.
#[derive(Default)]
pub(crate) struct FeedSlot(tokio::sync::Mutex<Weak<Feed>>);

/// The listener and the horizon watcher of one store handle; they end when this
/// is dropped (by the last subscription holding it).
pub(crate) struct Feed {
    shared: Arc<Shared>,
    horizon: watch::Receiver<Published>,
    notes: watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the tasks and the subscriptions share.
struct Shared {
    /// Wakes the watcher: a request, a new waiter, a notification.
    poke: Notify,
    /// Notifications received (and connection losses and reopenings, after which
    /// events may have been missed).
    notes: watch::Sender<u64>,
    /// The last horizon published.
    horizon: watch::Sender<Published>,
    /// Fresh horizons asked for so far.
    requested: AtomicU64,
    /// Subscriptions now waiting for the horizon to move, or for a fresh one.
    interested: AtomicUsize,
    /// The shortest `horizon_interval` of the subscriptions, in nanoseconds.
    interval_ns: AtomicU64,
}

/// A horizon published by the watcher.
#[derive(Clone, Default)]
pub(crate) struct Published {
    /// Every writer of an event at or below this position has ended.
    pub(crate) safe: i64,
    /// Requests (see [`Feed::fresh`]) this round serves: it started after them.
    served: u64,
    /// Whether this round failed (the horizon is then the previous one).
    failed: bool,
    /// The last events below the horizon, in chunks of contiguous ranges
    /// (possibly none). Shared as one `Arc`: every waiting subscription clones
    /// the published horizon on each look, and cloning (and dropping) the
    /// chunks one by one, a reference count each, across threads, was the
    /// largest cost of 100 live subscriptions.
    pub(crate) tail: Arc<[Arc<Chunk>]>,
}

/// Every event with a position in `(after, up_to]`, in position order.
pub(crate) struct Chunk {
    pub(crate) after: i64,
    pub(crate) up_to: i64,
    pub(crate) events: Vec<SequencedEvent>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Counts a subscription as interested while it lives.
struct Interest<'a>(&'a Shared);

impl<'a> Interest<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.interested.fetch_add(1, Ordering::AcqRel);
        Interest(shared)
    }
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        self.0.interested.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Store {
    /// The feed of this store handle if some subscription holds it now.
    pub(crate) fn live_feed(&self) -> Option<Arc<Feed>> {
        self.inner.feed.0.try_lock().ok()?.upgrade()
    }

    /// The feed of this store handle, started (with its first `LISTEN`
    /// connection, when the store has a listen config) if no subscription holds
    /// it now.
    ///
    /// # Errors
    /// Database errors while opening the `LISTEN` connection.
    pub(crate) async fn feed(&self) -> Result<Arc<Feed>> {
        let mut slot = self.inner.feed.0.lock().await;
        if let Some(feed) = slot.upgrade() {
            return Ok(feed);
        }
        let (notes, notes_rx) = watch::channel(0u64);
        let (horizon, horizon_rx) = watch::channel(Published::default());
        let shared = Arc::new(Shared {
            poke: Notify::new(),
            notes,
            horizon,
            requested: AtomicU64::new(0),
            interested: AtomicUsize::new(0),
            interval_ns: AtomicU64::new(u64::MAX),
        });
        let mut tasks = Vec::new();
        if let Some(config) = self.listen_config() {
            tasks.push(listen(self, config.clone(), shared.clone()).await?);
        }
        let span = tracing::debug_span!("dcbflow.horizon", db.system.name = "postgresql", db.namespace = %self.schema());
        tasks.push(tokio::spawn(tracing::Instrument::instrument(
            watch_horizon(self.clone(), shared.clone()),
            span,
        )));
        let feed = Arc::new(Feed {
            shared,
            horizon: horizon_rx,
            notes: notes_rx,
            tasks,
        });
        *slot = Arc::downgrade(&feed);
        Ok(feed)
    }
}

impl Feed {
    /// Tells the watcher of events appended through this process (as a
    /// notification would, without waiting for it to come back from the server).
    pub(crate) fn appended(&self) {
        self.shared.note();
    }

    /// The last horizon published.
    pub(crate) fn published(&self) -> Published {
        self.horizon.borrow().clone()
    }

    /// The notification counter, for subscriptions that wake on notifications
    /// rather than on the horizon.
    pub(crate) fn notes(&self) -> watch::Receiver<u64> {
        self.notes.clone()
    }

    /// Lets the watcher re-check at least every `interval` while writers in
    /// flight hold the horizon back.
    pub(crate) fn horizon_interval(&self, interval: Duration) {
        let ns = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.shared.interval_ns.fetch_min(ns, Ordering::AcqRel);
    }

    /// A horizon from a round of the watcher that started after this call (so it
    /// covers every append that returned before it). Requests that arrive
    /// together share one round.
    ///
    /// # Errors
    /// The database error of the round, or [`Error::Timeout`] if no round
    /// answered within four call timeouts.
    pub(crate) async fn fresh(&self, store: &Store) -> Result<Published> {
        let _interest = Interest::new(&self.shared);
        let mine = self.shared.requested.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared.poke.notify_one();
        // A round is at most two bounded queries and a bounded read; one may be
        // running ahead of ours.
        let bound = store.deadline().saturating_duration_since(Instant::now()) * 4;
        let mut rx = self.horizon.clone();
        let published = match tokio::time::timeout(bound, rx.wait_for(|p| p.served >= mine)).await {
            Ok(Ok(p)) => p.clone(),
            _ => return Err(Error::Timeout("waiting for the writer horizon")),
        };
        if published.failed {
            // Surface the error the watcher met (if it persists); the published
            // horizon is still a safe one.
            store.writer_horizon().await?;
        }
        Ok(published)
    }

    /// Waits until the published horizon passes `position` (`true`), or
    /// `timeout` (`false`).
    pub(crate) async fn wait_beyond(&self, position: i64, timeout: Duration) -> bool {
        let _interest = Interest::new(&self.shared);
        self.shared.poke.notify_one();
        let mut rx = self.horizon.clone();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|p| p.safe > position)).await,
            Ok(Ok(_))
        )
    }
}

impl Shared {
    fn interval(&self) -> Duration {
        match self.interval_ns.load(Ordering::Acquire) {
            u64::MAX => DEFAULT_INTERVAL,
            ns => Duration::from_nanos(ns),
        }
    }

    /// Counts a notification (or a reason to look as if there had been one).
    fn note(&self) {
        self.notes.send_modify(|n| *n = n.wrapping_add(1));
        self.poke.notify_one();
    }
}

/// The watcher: computes and publishes the horizon while subscriptions want it.
async fn watch_horizon(store: Store, shared: Arc<Shared>) {
    let mut safe = 0i64;
    let mut pending: Option<(i64, Vec<String>)> = None;
    let mut served = 0u64;
    let mut notes_seen = 0u64;
    let mut last_round: Option<Instant> = None;
    let mut tail: Vec<Arc<Chunk>> = Vec::new();
    loop {
        let requested = shared.requested.load(Ordering::Acquire);
        let interested = shared.interested.load(Ordering::Acquire) > 0;
        let noted = *shared.notes.borrow() != notes_seen;
        let recheck = match (&pending, last_round) {
            (Some(_), Some(at)) if interested => Some(at + shared.interval()),
            _ => None,
        };
        let due = requested > served
            || (interested && noted)
            || recheck.is_some_and(|at| at <= Instant::now());
        if !due {
            let poked = shared.poke.notified();
            match recheck {
                Some(at) => {
                    tokio::select! {
                        () = poked => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => poked.await,
            }
            continue;
        }
        // Spaced: under a stream of appends every commit notifies, and rounds
        // back to back would read `pg_locks` (every lock-manager partition
        // lock) without pause. A round that follows an idle spell starts at once.
        if let Some(at) = last_round
            && at + MIN_ROUND > Instant::now()
        {
            tokio::time::sleep_until(at + MIN_ROUND).await;
        }
        // Everything asked for or noted so far is covered by this round.
        notes_seen = *shared.notes.borrow();
        let requested = shared.requested.load(Ordering::Acquire);
        let first = last_round.is_none();
        let before = safe;
        last_round = Some(Instant::now());
        let failed = match round(&store, &mut safe, &mut pending).await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %e, "computing the writer horizon failed");
                true
            }
        };
        if shared.interested.load(Ordering::Acquire) < 2 {
            // Nobody to share it with: a tail left behind would only lag.
            tail.clear();
        } else {
            // Read on from where the tail ends (or, if there is none, from the
            // horizon before this round; the first round's jump from 0 is
            // catching up, not live).
            let end = tail.last().map_or(before, |c| c.up_to);
            if !first && safe > end {
                match read_tail(&store, end, safe).await {
                    Some(chunk) => {
                        tail.push(chunk);
                        let mut kept: usize = tail.iter().map(|c| c.events.len()).sum();
                        while kept > TAIL_KEEP && tail.len() > 1 {
                            kept -= tail.remove(0).events.len();
                        }
                    }
                    None => tail.clear(),
                }
            }
        }
        served = requested;
        // Published only if something moved: every publication wakes every
        // waiting subscription, and a round held back by writers in flight
        // (most rounds under a stream of appends) has nothing new to say.
        let tail_end = tail.last().map(|c| (c.after, c.up_to));
        shared.horizon.send_if_modified(|p| {
            let changed = p.safe != safe
                || p.served != served
                || p.failed != failed
                || p.tail.len() != tail.len()
                || p.tail.last().map(|c| (c.after, c.up_to)) != tail_end;
            if changed {
                *p = Published {
                    safe,
                    served,
                    failed,
                    tail: tail.as_slice().into(),
                };
            }
            changed
        });
    }
}

/// One step of the horizon, from one look at the writers (one `pg_locks`
/// query): the writers the candidate waits for are no longer among them (then
/// the candidate becomes safe), and a new candidate once none are awaited. The
/// look reads the sequence before the locks, as every candidate needs, so it is
/// both the check of the old candidate and the next one.
async fn round(
    store: &Store,
    safe: &mut i64,
    pending: &mut Option<(i64, Vec<String>)>,
) -> Result<()> {
    let (allocated, writers) = store.writer_horizon().await?;
    if let Some((candidate, waited)) = pending.as_ref()
        && !waited.iter().any(|w| writers.contains(w))
    {
        *safe = (*safe).max(*candidate);
        *pending = None;
    }
    if writers.is_empty() {
        *safe = (*safe).max(allocated);
        *pending = None;
    } else if pending.is_none() && allocated > *safe {
        *pending = Some((allocated, writers));
    }
    Ok(())
}

/// The events in `(after, up_to]`, at most [`TAIL_EVENTS`] of them (then the
/// chunk ends at the last one); `None` if the read failed (each subscription then
/// reads for itself).
async fn read_tail(store: &Store, after: i64, up_to: i64) -> Option<Arc<Chunk>> {
    let options = ReadOptions::default()
        .after(Position(after))
        .up_to(Position(up_to))
        .limit(TAIL_EVENTS);
    match store.read_all(&Query::all(), options).await {
        Ok(read) => {
            let events = read.events;
            let up_to = match events.last() {
                Some(last) if events.len() as u64 == TAIL_EVENTS => last.position.0,
                _ => up_to,
            };
            Some(Arc::new(Chunk {
                after,
                up_to,
                events,
            }))
        }
        Err(e) => {
            tracing::debug!(error = %e, "reading the shared tail failed");
            None
        }
    }
}

/// Opens the `LISTEN` connection (the first one before returning, so that a bad
/// configuration fails here) and spawns its task: notifications are counted in
/// `shared`. A lost connection is reopened with backoff, logged, and counted in
/// [`StoreStats::listen_reconnects`](super::StoreStats); meanwhile subscriptions poll.
async fn listen(
    store: &Store,
    config: tokio_postgres::Config,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>> {
    let channel = store.channel().to_owned();
    let key = store.listen_lock_key();
    let first = connect_listener(&config, &channel, key).await?;
    let span = tracing::debug_span!("dcbflow.listen", db.system.name = "postgresql", messaging.destination.name = %channel);
    let store = store.clone();
    Ok(tokio::spawn(tracing::Instrument::instrument(
        async move {
            let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            let mut next = Some(first);
            let mut failures = 0u32;
            loop {
                if let Some((client, connection)) = next.take() {
                    failures = 0;
                    // Counted as this handle's own while it lives: the writer's
                    // wake-ups need not reach it (see `wake`).
                    let own = store.own_listener();
                    drive(connection, &shared).await;
                    drop(own);
                    drop(client);
                    // Lost: polling goes on; look once so nobody waits a full interval.
                    shared.note();
                    tracing::warn!("LISTEN connection lost; reopening it");
                }
                failures += 1;
                tokio::time::sleep(backoff.delay(failures)).await;
                match connect_listener(&config, &channel, key).await {
                    Ok(c) => {
                        store.note_listen_reconnect();
                        tracing::info!(attempt = failures, "LISTEN connection reopened");
                        // Events may have been appended while it was down.
                        shared.note();
                        next = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!(attempt = failures, error = %e, "reopening the LISTEN connection failed")
                    }
                }
            }
        },
        span,
    )))
}

type ListenConnection =
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>;

/// Connects, `LISTEN`s on `channel` and holds the listen key `key` shared for
/// the session, so that writers send their wake-ups (see `wake`).
async fn connect_listener(
    config: &tokio_postgres::Config,
    channel: &str,
    key: i64,
) -> Result<(tokio_postgres::Client, ListenConnection)> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    {
        // The connection must be driven for LISTEN to complete. The lock only
        // waits for a writer's try-lock, which is released as it is granted.
        let sql = format!("LISTEN \"{channel}\"");
        let mut listen = std::pin::pin!(async {
            client.batch_execute(&sql).await?;
            client
                .execute("SELECT pg_advisory_lock_shared($1)", &[&key])
                .await
                .map(drop)
        });
        let mut messages = futures::stream::poll_fn(|cx| connection.poll_message(cx));
        loop {
            tokio::select! {
                r = &mut listen => { r?; break; }
                m = messages.next() => match m {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(Error::Timeout("opening the LISTEN connection")),
                },
            }
        }
    }
    Ok((client, connection))
}

/// Drives `connection` until it ends, counting every notification.
async fn drive(mut connection: ListenConnection, shared: &Shared) {
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(Ok(message)) = messages.next().await {
        if let tokio_postgres::AsyncMessage::Notification(_) = message {
            shared.note();
        }
    }
}
