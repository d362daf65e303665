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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The shortest gap between two wake-ups of one store handle: a lone writer
/// appending back to back sends one notification per gap, not one per append
/// (each costs the server a transaction), and a subscriber learns of an append
/// at most this much later.
const MIN_GAP: Duration = Duration::from_millis(1);

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
}

impl Waker {
    /// Starts the sending task for the store whose channel is `channel`, on the
    /// current runtime.
    pub(crate) fn start(pool: Pool, channel: String) -> Waker {
        let stop = CancellationToken::new();
        let state = Arc::new(State {
            owed: AtomicBool::new(false),
            poke: Notify::new(),
        });
        let task_state = state.clone();
        let task_stop = stop.clone();
        let span = tracing::debug_span!("dcbflow.wake", db.system.name = "postgresql", messaging.destination.name = %channel);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let state = task_state;
                loop {
                    let stopping = tokio::select! {
                        () = state.poke.notified() => false,
                        () = task_stop.cancelled() => true,
                    };
                    if state.owed.swap(false, Ordering::AcqRel) {
                        send(&pool, &channel).await;
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

    /// Asks for a wake-up, after a commit that wrote events.
    pub(crate) fn wake(&self) {
        self.state.owed.store(true, Ordering::Release);
        self.state.poke.notify_one();
    }
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
