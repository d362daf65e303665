//! Subscriptions: catch up from a position, then stay live, never skipping an event.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::horizon::{Feed, Published};
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
/// The subscriptions of one store handle (and its clones) share one `LISTEN`
/// connection (when the store has a [listen config](crate::store::StoreBuilder::listen_config))
/// and one watcher of the horizon, which looks at the store's writers once per
/// round whatever the number of subscriptions; both end with the last
/// subscription. New events wake the watcher through `LISTEN`/`NOTIFY`, and the
/// horizon it publishes wakes the subscriptions; they also poll, so a lost
/// notification only delays.
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
    /// The store handle's shared listener and horizon watcher.
    feed: Arc<Feed>,
    /// The notifications seen (for a [wake signal](Subscription::wake_signal)).
    notes: watch::Receiver<u64>,
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

impl Subscription {
    /// Subscribes to the events of `store` matching `query` with a position
    /// greater than `after` (`None`: from the start of the log). The first
    /// subscription of a store handle opens the shared `LISTEN` connection, when
    /// the store has a listen config.
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
        let feed = store.feed().await?;
        feed.horizon_interval(options.horizon_interval);
        let notes = feed.notes();
        Ok(Subscription {
            store: store.clone(),
            query,
            options,
            position: after.unwrap_or(Position(0)),
            feed,
            notes,
            gap_free: true,
        })
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
        self.poll(true).await
    }

    /// [`poll_batch`](Self::poll_batch); without `fresh`, a subscription that has
    /// caught up with the published horizon does not ask the watcher for a new
    /// one (it is about to wait for the next, which any notification brings).
    async fn poll(&mut self, fresh: bool) -> Result<Vec<SequencedEvent>> {
        let horizon = if self.gap_free {
            // While catching up below the published horizon, no need to ask for a new one.
            let mut published = self.feed.published();
            if fresh && self.position.0 >= published.safe {
                published = self.feed.fresh(&self.store).await?;
            }
            if let Some(events) = self.take_from_tail(&published)
                && (!events.is_empty() || self.position.0 >= published.safe)
            {
                return Ok(events);
            }
            published.safe
        } else {
            self.notes.borrow_and_update();
            self.store.head().await?.map_or(0, |p| p.0)
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

    /// The events after this subscription's position from the watcher's tail (see
    /// `src/store/horizon.rs`), if the position lies inside it: no read of our own.
    /// Moves the position to the end of the tail, or to the last event handed out
    /// when the batch is full.
    fn take_from_tail(&mut self, published: &Published) -> Option<Vec<SequencedEvent>> {
        let start = published
            .tail
            .iter()
            .position(|c| c.after <= self.position.0 && self.position.0 < c.up_to)?;
        let limit = usize::try_from(self.options.batch_size).unwrap_or(usize::MAX);
        let mut events = Vec::new();
        for chunk in &published.tail[start..] {
            if chunk.after > self.position.0 {
                break;
            }
            let from = chunk
                .events
                .partition_point(|e| e.position <= self.position);
            for e in &chunk.events[from..] {
                if self.query.matches_sequenced(e) {
                    events.push(e.clone());
                    if events.len() == limit {
                        self.position = e.position;
                        return Some(events);
                    }
                }
            }
            self.position = Position(chunk.up_to);
        }
        Some(events)
    }

    /// The next events, waiting until there is at least one.
    ///
    /// # Errors
    /// Database errors.
    pub async fn next_batch(&mut self) -> Result<Vec<SequencedEvent>> {
        // Between batches, a live subscription only waits for the horizon to
        // move: notifications (and this process's own appends) start the
        // watcher's rounds. Asking for a fresh round after every batch, as
        // `poll_batch` does, made 100 live subscriptions keep the watcher
        // busy and wait for its round before waiting for events. After a wait
        // that ended without the horizon moving (notifications lost, or none),
        // the next look asks for a fresh round, as polling.
        let mut fresh = false;
        loop {
            let events = self.poll(fresh).await?;
            if !events.is_empty() {
                return Ok(events);
            }
            fresh = !self.wait_moved().await;
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

    /// Waits until the horizon moves past this subscription's position (new
    /// events were announced and their writers have ended), or the poll interval.
    /// A [wake signal](Self::wake_signal) waits for a notification instead.
    pub async fn wait(&self) {
        self.wait_moved().await;
    }

    /// [`wait`](Self::wait): `true` if the horizon moved (or a notification
    /// came), `false` after the poll interval.
    async fn wait_moved(&self) -> bool {
        if self.gap_free {
            self.feed
                .wait_beyond(self.position.0, self.options.poll_interval)
                .await
        } else {
            let mut notes = self.notes.clone();
            matches!(
                tokio::time::timeout(self.options.poll_interval, notes.changed()).await,
                Ok(Ok(()))
            )
        }
    }
}
