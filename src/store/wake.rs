//! Wake-ups for subscribers, sent after the appends' commits.
//!
//! A transaction that notifies takes a database-wide lock before it commits and
//! keeps it through its commit's WAL flush, so appends that notify in their own
//! transaction commit one at a time. Appends through the pool therefore commit
//! without notifying and ask this task for a wake-up instead: it sends one
//! `pg_notify` at a time on a pooled connection, and every append that finished
//! while one was in flight is covered by the next. A wake-up lost (the process
//! stopped between the commit and the notification) only delays subscribers until
//! their next poll.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

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
    /// Starts the sending task for the store in `schema`, on the current runtime.
    pub(crate) fn start(pool: Pool, schema: String) -> Waker {
        let stop = CancellationToken::new();
        let state = Arc::new(State {
            owed: AtomicBool::new(false),
            poke: Notify::new(),
        });
        let task_state = state.clone();
        let task_stop = stop.clone();
        tokio::spawn(async move {
            let state = task_state;
            loop {
                let stopping = tokio::select! {
                    () = state.poke.notified() => false,
                    () = task_stop.cancelled() => true,
                };
                if state.owed.swap(false, Ordering::AcqRel) {
                    send(&pool, &schema).await;
                }
                if stopping {
                    return;
                }
            }
        });
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
async fn send(pool: &Pool, schema: &str) {
    let sent = async {
        let client = pool.get().await.ok()?;
        let stmt = client
            .prepare_cached("SELECT pg_notify('dcbflow_' || left(md5($1), 16), '')")
            .await
            .ok()?;
        client.execute(&stmt, &[&schema]).await.ok()
    }
    .await;
    if sent.is_none() {
        tracing::debug!(schema, "could not send a wake-up; subscribers will poll");
    }
}
