//! Subscriptions: catch up from a position, then stay live, never skipping an event.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::store::{InvalidInput, Position, Query, ReadOptions, Result, SequencedEvent, Store};

/// Settings of a subscription.
///
/// | setting | default |
/// |---|---|
/// | `batch_size` | 500 events |
/// | `poll_interval` (fallback when no notification arrives) | 500 ms |
/// | `horizon_interval` (re-check while in-flight writers hold the horizon back) | 10 ms |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionOptions {
    /// Most events per batch.
    pub batch_size: u64,
    /// How long to wait for a notification before looking anyway.
    pub poll_interval: Duration,
    /// How soon to look again while writers in flight hold the horizon back.
    pub horizon_interval: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            horizon_interval: Duration::from_millis(10),
        }
    }
}

/// A live, gap-free feed of the events matching a query, in position order.
///
/// Events are handed out only up to a **horizon** below which every writer of the
/// store has finished: an append that drew an early position and commits late is
/// delivered in its place, never skipped. The horizon waits only for this store's
/// own writers, so a transaction left open elsewhere does not hold it back.
///
/// New events wake the subscription through `LISTEN`/`NOTIFY` on a dedicated
/// connection (when the store has a [listen config](crate::store::StoreBuilder::listen_config));
/// it also polls, so a lost notification only delays.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store) -> dcbflow::Result<()> {
/// use dcbflow::{Query, Subscription, SubscriptionOptions};
/// let mut sub = Subscription::connect(&store, Query::all(), None, SubscriptionOptions::default()).await?;
/// loop {
///     for event in sub.next_batch().await? {
///         println!("{} {}", event.position, event.event_type());
///     }
/// }
/// # }
/// ```
pub struct Subscription {
    store: Store,
    query: Query,
    options: SubscriptionOptions,
    position: Position,
    horizon: Horizon,
    wake: Arc<Notify>,
    listener: Option<Listener>,
    /// Whether events are handed out only below the writer horizon (always, for
    /// users; see [`Subscription::wake_signal`]).
    gap_free: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("query", &self.query)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(l) = self.listener.take() {
            l.task.abort();
        }
    }
}

/// Tracks the delivery horizon (see `writer_horizon` in `sql/store/0003_horizon.sql`).
struct Horizon {
    safe: i64,
    pending: Option<(i64, Vec<String>)>,
}

impl Subscription {
    /// Subscribes to the events of `store` matching `query` with a position
    /// greater than `after` (`None`: from the start of the log). Opens the
    /// dedicated `LISTEN` connection when the store has a listen config.
    ///
    /// # Errors
    /// Invalid query items; database errors while opening the listening connection.
    #[tracing::instrument(name = "dcbflow.subscribe", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %store.schema()))]
    pub async fn connect(
        store: &Store,
        query: Query,
        after: Option<Position>,
        options: SubscriptionOptions,
    ) -> Result<Subscription> {
        store.check_query(&query)?;
        if let Some(after) = after {
            if after.0 < 0 {
                return Err(InvalidInput::Cursor(format!("negative position {after}")).into());
            }
            let head = store.allocated_head().await?;
            if after > head {
                return Err(InvalidInput::BeyondHead {
                    position: after,
                    head,
                }
                .into());
            }
        }
        let wake = Arc::new(Notify::new());
        let listener = match store.listen_config() {
            Some(config) => Some(listen(store, config.clone(), wake.clone()).await?),
            None => None,
        };
        Ok(Subscription {
            store: store.clone(),
            query,
            options,
            position: after.unwrap_or(Position(0)),
            horizon: Horizon {
                safe: 0,
                pending: None,
            },
            wake,
            listener,
            gap_free: true,
        })
    }
}

/// The dedicated `LISTEN` connection's task: it holds the connection, and opens
/// a new one (with backoff) whenever it is lost.
struct Listener {
    task: tokio::task::JoinHandle<()>,
}

/// Opens the dedicated `LISTEN` connection (the first one before returning, so
/// that a bad configuration fails here); notifications poke `wake`. A lost
/// connection is reopened with backoff, logged, and counted in
/// [`StoreStats::listen_reconnects`](crate::store::StoreStats); meanwhile the
/// subscription polls.
async fn listen(
    store: &Store,
    config: tokio_postgres::Config,
    wake: Arc<Notify>,
) -> Result<Listener> {
    let channel = store.channel().to_owned();
    let first = connect_listener(&config, &channel).await?;
    let span = tracing::debug_span!("dcbflow.listen", db.system.name = "postgresql", messaging.destination.name = %channel);
    let store = store.clone();
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move {
            let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            let mut next = Some(first);
            let mut failures = 0u32;
            loop {
                if let Some((client, connection)) = next.take() {
                    failures = 0;
                    drive(connection, &wake).await;
                    drop(client);
                    // Lost: polling goes on; wake once so nobody waits a full interval.
                    wake.notify_one();
                    tracing::warn!("LISTEN connection lost; reopening it");
                }
                failures += 1;
                tokio::time::sleep(backoff.delay(failures)).await;
                match connect_listener(&config, &channel).await {
                    Ok(c) => {
                        store.note_listen_reconnect();
                        tracing::info!(attempt = failures, "LISTEN connection reopened");
                        // Events may have been appended while it was down.
                        wake.notify_one();
                        next = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!(attempt = failures, error = %e, "reopening the LISTEN connection failed")
                    }
                }
            }
        },
        span,
    ));
    Ok(Listener { task })
}

type ListenConnection =
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>;

/// Connects and `LISTEN`s on `channel`.
async fn connect_listener(
    config: &tokio_postgres::Config,
    channel: &str,
) -> Result<(tokio_postgres::Client, ListenConnection)> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    {
        // The connection must be driven for LISTEN to complete.
        let sql = format!("LISTEN \"{channel}\"");
        let mut listen = std::pin::pin!(client.batch_execute(&sql));
        let mut messages = futures::stream::poll_fn(|cx| connection.poll_message(cx));
        loop {
            tokio::select! {
                r = &mut listen => { r?; break; }
                m = messages.next() => match m {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(crate::store::Error::Timeout("opening the LISTEN connection")),
                },
            }
        }
    }
    Ok((client, connection))
}

/// Drives `connection` until it ends, poking `wake` on every notification.
async fn drive(mut connection: ListenConnection, wake: &Notify) {
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(Ok(message)) = messages.next().await {
        if let tokio_postgres::AsyncMessage::Notification(_) = message {
            wake.notify_one();
        }
    }
}

impl Subscription {
    /// Turns this subscription into a wake-up signal: it reads up to the head of
    /// the log, without waiting for writers in flight, so an event that commits
    /// late may be skipped. For callers that only use the events as a hint to look
    /// elsewhere (flow workers, which claim their work from a table), this saves
    /// the horizon checks a gap-free subscription repeats while writers are busy.
    #[cfg(feature = "flow")]
    pub(crate) fn wake_signal(mut self) -> Self {
        self.gap_free = false;
        self
    }

    /// The position up to which this subscription has handed out events (or found
    /// none matching): resume from here.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The events available now, at most `batch_size`, possibly none. Never waits.
    ///
    /// # Errors
    /// Database errors.
    pub async fn poll_batch(&mut self) -> Result<Vec<SequencedEvent>> {
        // While catching up below a known horizon, no need to ask for a new one.
        let horizon = if !self.gap_free {
            self.store.head().await?.map_or(0, |p| p.0)
        } else if self.position.0 < self.horizon.safe {
            self.horizon.safe
        } else {
            self.advance_horizon().await?
        };
        if horizon <= self.position.0 {
            return Ok(Vec::new());
        }
        let options = ReadOptions::default()
            .after(self.position)
            .up_to(Position(horizon))
            .limit(self.options.batch_size);
        let events = self.store.read_all(&self.query, options).await?.events;
        self.position = match events.last() {
            Some(last) if events.len() as u64 == self.options.batch_size => last.position,
            _ => Position(horizon),
        };
        Ok(events)
    }

    /// The next events, waiting until there is at least one.
    ///
    /// # Errors
    /// Database errors.
    pub async fn next_batch(&mut self) -> Result<Vec<SequencedEvent>> {
        loop {
            let events = self.poll_batch().await?;
            if !events.is_empty() {
                return Ok(events);
            }
            self.wait().await;
        }
    }

    /// Like [`next_batch`](Self::next_batch), or `None` once `cancel` fires.
    ///
    /// # Errors
    /// Database errors.
    pub async fn next_batch_or_cancel(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<SequencedEvent>>> {
        tokio::select! {
            r = self.next_batch() => r.map(Some),
            () = cancel.cancelled() => Ok(None),
        }
    }

    /// The subscription as a stream of single events.
    pub fn into_stream(self) -> impl Stream<Item = Result<SequencedEvent>> + Send {
        futures::stream::unfold(self, |mut sub| async move {
            let batch = sub.next_batch().await;
            Some((batch, sub))
        })
        .flat_map(|batch| {
            futures::stream::iter(match batch {
                Ok(events) => events.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
        })
    }

    /// Waits for a notification of new events, or the poll interval (shorter while
    /// in-flight writers hold the horizon back).
    pub async fn wait(&self) {
        let timeout = if self.horizon.pending.is_some() {
            self.options.horizon_interval
        } else {
            self.options.poll_interval
        };
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
    }

    async fn advance_horizon(&mut self) -> Result<i64> {
        if let Some((allocated, writers)) = &self.horizon.pending
            && self.store.writers_finished(writers).await?
        {
            self.horizon.safe = self.horizon.safe.max(*allocated);
            self.horizon.pending = None;
        }
        if self.horizon.pending.is_none() {
            let (allocated, writers) = self.store.writer_horizon().await?;
            if writers.is_empty() {
                self.horizon.safe = self.horizon.safe.max(allocated);
            } else if allocated > self.horizon.safe {
                self.horizon.pending = Some((allocated, writers));
            }
        }
        Ok(self.horizon.safe)
    }
}
