//! Wake-ups for subscribers, sent after the appends' commits.
//!
//! A transaction that notifies takes a database-wide lock before it commits and
//! keeps it through its commit's WAL flush, so appends that notify in their own
//! transaction commit one at a time. Appends through the pool therefore commit
//! without notifying and ask this task for a wake-up instead: it sends one
//! `pg_notify` at a time on a pooled connection, at most one per [`MIN_GAP`],
//! and every append that finished while one was in flight, or within the gap,
//! is covered by the next. A wake-up lost (the process stopped between the
//! commit and the notification) only delays subscribers until their next poll.
//!
//! The notifying transaction commits with `synchronous_commit` off. A
//! notification needs a transaction id, so it writes a commit record, and with
//! the default setting every wake-up waited for its own WAL flush: a second
//! flush per append for a lone writer. Asynchronous commit is safe here: the
//! notification is delivered when the commit is visible, which does not wait
//! for the flush, and what a crash could lose (the wake-up) is what the
//! subscribers' polling already covers.
//!
//! A wake-up nobody else listens to is not sent. Every connection that
//! `LISTEN`s on the channel holds a shared session advisory lock on the store's
//! listen key ([`Store::listen_lock_key`](super::Store::listen_lock_key));
//! before a wake-up, the task asks whether a listener other than this handle's
//! own holds it, and keeps the answer for [`PRESENCE_TTL`]. This handle's own
//! subscriptions need no notification: the append wakes them in memory. With
//! no listener of its own, the question is an exclusive try-lock, which fails
//! while any listener holds the key (it assigns no transaction id and writes
//! nothing); with one, it is a count of the key's holders in `pg_locks`, at
//! most once per TTL. A store whose subscribers all run in the writing handle,
//! or nowhere, thus spends no transaction on wake-ups; a listener that starts
//! within a TTL of a look that found none misses wake-ups for at most that long
//! (its subscriptions poll meanwhile).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The shortest gap between two wake-ups of one store handle: a lone writer
/// appending back to back sends one notification per gap, not one per append
/// (each costs the server a transaction), and a subscriber learns of an append
/// at most this much later.
const MIN_GAP: Duration = Duration::from_millis(1);

/// How long the answer to "does anyone listen?" is kept.
const PRESENCE_TTL: Duration = Duration::from_millis(250);

/// Requests wake-ups. The sending task ends, after sending any wake-up still
/// owed, when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct Waker {
    state: Arc<State>,
    _stop: Arc<DropGuard>,
}

struct State {
    /// A wake-up is owed.
    owed: AtomicBool,
    poke: Notify,
    /// Wake-ups sent, and skipped because no one listened.
    sent: AtomicU64,
    skipped: AtomicU64,
    /// Until when (nanoseconds after `born`) no one is taken to listen: a
    /// wake-up asked for before then is skipped without waking the task.
    quiet_until: AtomicU64,
    born: std::time::Instant,
    /// This handle's own open `LISTEN` connections.
    own_listeners: AtomicU64,
}

impl State {
    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Waker {
    /// Starts the sending task for the store whose channel is `channel`, on the
    /// current runtime; `listen_key` is the store's listen key.
    pub(crate) fn start(pool: Pool, channel: String, listen_key: i64) -> Waker {
        let stop = CancellationToken::new();
        let state = Arc::new(State {
            owed: AtomicBool::new(false),
            poke: Notify::new(),
            sent: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            quiet_until: AtomicU64::new(0),
            born: std::time::Instant::now(),
            own_listeners: AtomicU64::new(0),
        });
        let task_state = state.clone();
        let task_stop = stop.clone();
        let span = tracing::debug_span!("dcbflow.wake", db.system.name = "postgresql", messaging.destination.name = %channel);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let state = task_state;
                // Until when a listener is taken to be there.
                let mut listened_until: Option<tokio::time::Instant> = None;
                loop {
                    let stopping = tokio::select! {
                        () = state.poke.notified() => false,
                        () = task_stop.cancelled() => true,
                    };
                    if state.owed.swap(false, Ordering::AcqRel) {
                        let now = tokio::time::Instant::now();
                        if listened_until.is_none_or(|until| now >= until) {
                            let own = state.own_listeners.load(Ordering::Acquire);
                            if others_listen(&pool, listen_key, own).await {
                                listened_until = Some(now + PRESENCE_TTL);
                            } else {
                                listened_until = None;
                                let ttl =
                                    u64::try_from(PRESENCE_TTL.as_nanos()).unwrap_or(u64::MAX);
                                state
                                    .quiet_until
                                    .store(state.now().saturating_add(ttl), Ordering::Release);
                                state.skipped.fetch_add(1, Ordering::Relaxed);
                                if stopping {
                                    return;
                                }
                                continue;
                            }
                        }
                        send(&pool, &channel).await;
                        state.sent.fetch_add(1, Ordering::Relaxed);
                        if !stopping {
                            // Wake-ups asked for meanwhile ride on the next one.
                            tokio::select! {
                                () = tokio::time::sleep(MIN_GAP) => {}
                                () = task_stop.cancelled() => {}
                            }
                        }
                    }
                    if stopping {
                        return;
                    }
                }
            },
            span,
        ));
        Waker {
            state,
            _stop: Arc::new(stop.drop_guard()),
        }
    }

    /// Counts one of this handle's own `LISTEN` connections (holding the
    /// listen key) while the returned guard lives.
    pub(crate) fn own_listener(&self) -> OwnListener {
        self.state.own_listeners.fetch_add(1, Ordering::AcqRel);
        OwnListener(self.state.clone())
    }

    /// Wake-ups sent and skipped (no listener) so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.state.sent.load(Ordering::Relaxed),
            self.state.skipped.load(Ordering::Relaxed),
        )
    }

    /// Asks for a wake-up, after a commit that wrote events.
    pub(crate) fn wake(&self) {
        if self.state.now() < self.state.quiet_until.load(Ordering::Acquire) {
            self.state.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.state.owed.store(true, Ordering::Release);
        self.state.poke.notify_one();
    }
}

/// One of this handle's own `LISTEN` connections, counted while it lives.
pub(crate) struct OwnListener(Arc<State>);

impl Drop for OwnListener {
    fn drop(&mut self) {
        self.0.own_listeners.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a connection other than this handle's `own` listeners holds the
/// listen key. With none of its own: an exclusive try-lock in its own implicit
/// transaction, granted (and released at once) only while no listener holds
/// the key. With some: the key's granted holders in `pg_locks` (an advisory
/// key of 64 bits is `classid` = high half, `objid` = low half, `objsubid` =
/// 1). When the question cannot be asked, the answer is yes.
async fn others_listen(pool: &Pool, listen_key: i64, own: u64) -> bool {
    let answer = async {
        let client = pool.get().await.ok()?;
        if own == 0 {
            let stmt = client
                .prepare_cached("SELECT pg_try_advisory_xact_lock($1)")
                .await
                .ok()?;
            let free: bool = client.query_one(&stmt, &[&listen_key]).await.ok()?.try_get(0).ok()?;
            return Some(!free);
        }
        let stmt = client
            .prepare_cached(
                "SELECT count(*) FROM pg_locks \
                  WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                    AND classid::bigint = ($1::bigint >> 32) & 4294967295 \
                    AND objid::bigint = $1::bigint & 4294967295",
            )
            .await
            .ok()?;
        let holders: i64 = client.query_one(&stmt, &[&listen_key]).await.ok()?.try_get(0).ok()?;
        Some(u64::try_from(holders).unwrap_or(0) > own)
    }
    .await;
    answer != Some(false)
}

/// One notification on the store's channel; a failure only delays subscribers.
async fn send(pool: &Pool, channel: &str) {
    let sent = async {
        let client = pool.get().await.ok()?;
        let stmt = client
            .prepare_cached(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')",
            )
            .await
            .ok()?;
        client.execute(&stmt, &[&channel]).await.ok()
    }
    .await;
    if sent.is_none() {
        tracing::debug!(channel, "could not send a wake-up; subscribers will poll");
    }
}
