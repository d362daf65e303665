//! The relay loop.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{OutboxMessage, Publisher, Result};
use crate::backoff::Backoff;
use crate::projection::{Checkpoints, Lease, Subscription, SubscriptionOptions};
use crate::store::{Position, Query, SequencedEvent, Store};

/// Relay settings.
///
/// | setting | default |
/// |---|---|
/// | `subscription` | [`SubscriptionOptions::default`](crate::SubscriptionOptions) (batches of 500) |
/// | `max_attempts` per event before it becomes a dead letter | 10 |
/// | `backoff` between attempts | 50 ms doubling to 5 s, full jitter |
/// | `lease_retry` | 1 s |
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Batching and wake-ups.
    pub subscription: SubscriptionOptions,
    /// Attempts per event before it goes to the dead letters. Only refusals
    /// count ([`PublishFailure::transient`](super::PublishFailure) `false`); while
    /// the destination is unreachable the relay waits, backing off, indefinitely.
    pub max_attempts: u32,
    /// Delay between attempts, and between looks at an unreachable destination.
    pub backoff: Backoff,
    /// How often a standby relay tries to take over.
    pub lease_retry: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            subscription: SubscriptionOptions::default(),
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            lease_retry: Duration::from_secs(1),
        }
    }
}

/// Publishes the events matching a query, at least once and in order, through a
/// [`Publisher`]. The position it reached is a named checkpoint, moved only after
/// the publisher accepted the events; one relay per name is active at a time.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store) -> Result<(), Box<dyn std::error::Error>> {
/// use dcbflow::{CancellationToken, Query};
/// use dcbflow::outbox::{NatsPublisher, OutboxRelay};
/// let nats = async_nats::connect("127.0.0.1:4222").await?;
/// let publisher = NatsPublisher::new(nats, "orders", std::time::Duration::from_secs(5));
/// let relay = OutboxRelay::new(store, "orders-to-nats", Query::items_of(["OrderPlaced"], Vec::<String>::new()), publisher);
/// relay.run(CancellationToken::new()).await?;
/// # Ok(()) }
/// ```
pub struct OutboxRelay<P> {
    store: Store,
    name: String,
    query: Query,
    publisher: P,
    options: RelayOptions,
}

impl<P: Publisher> OutboxRelay<P> {
    /// A relay named `name` (its checkpoint and lease) for the events matching `query`.
    pub fn new(store: Store, name: impl Into<String>, query: Query, publisher: P) -> Self {
        OutboxRelay {
            store,
            name: name.into(),
            query,
            publisher,
            options: RelayOptions::default(),
        }
    }

    /// Sets the options.
    #[must_use]
    pub fn options(mut self, options: RelayOptions) -> Self {
        self.options = options;
        self
    }

    /// Runs until `cancel` fires.
    ///
    /// # Errors
    /// Store errors (publish errors are retried, then dead-lettered).
    #[tracing::instrument(name = "dcbflow.relay.run", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), messaging.system = self.publisher.system(), relay = %self.name))]
    pub async fn run(&self, cancel: CancellationToken) -> Result<()> {
        crate::projection::checkpoint::check_name(&self.name)?;
        self.store.ensure_layer(&crate::projection::SCHEMA).await?;
        self.store.ensure_layer(&super::SCHEMA).await?;
        loop {
            let Some(lease) =
                Lease::acquire(&self.store, &self.name, self.options.lease_retry, &cancel).await?
            else {
                return Ok(());
            };
            if self.run_with(&lease, &cancel).await? {
                return Ok(());
            }
            tracing::warn!(relay = %self.name, "lease lost, waiting to take it again");
        }
    }

    /// `true` when cancelled, `false` when the lease was lost.
    async fn run_with(&self, lease: &Lease, cancel: &CancellationToken) -> Result<bool> {
        let mut checkpoint = Checkpoints::new(self.store.clone()).get(&self.name).await?;
        let mut sub = Subscription::connect(
            &self.store,
            self.query.clone(),
            Some(checkpoint),
            self.options.subscription.clone(),
        )
        .await?;
        loop {
            if cancel.is_cancelled() {
                return Ok(true);
            }
            let events = sub.poll_batch().await?;
            if events.is_empty() && sub.position() == checkpoint {
                tokio::select! {
                    () = sub.wait() => {}
                    () = cancel.cancelled() => return Ok(true),
                }
                continue;
            }
            let Some(dead) = self.publish(events, cancel).await else {
                return Ok(true);
            };
            if !lease.is_held() || !self.commit(checkpoint, sub.position(), &dead).await? {
                return Ok(false);
            }
            checkpoint = sub.position();
        }
    }

    /// Publishes a batch, retrying from the first unaccepted message; returns the
    /// messages given up on (`None` if cancelled meanwhile).
    async fn publish(
        &self,
        events: Vec<SequencedEvent>,
        cancel: &CancellationToken,
    ) -> Option<Vec<(OutboxMessage, String, u32)>> {
        let schema = self.store.schema();
        let messages: Vec<_> = events
            .into_iter()
            .map(|e| OutboxMessage::new(schema, e))
            .collect();
        let mut dead = Vec::new();
        let (mut next, mut attempts, mut outage) = (0, 0, 0);
        while next < messages.len() {
            match self.publisher.publish(&messages[next..]).await {
                Ok(()) => next = messages.len(),
                Err(failure) => {
                    if failure.delivered > 0 {
                        next += failure.delivered;
                        attempts = 0;
                    }
                    let message = &messages[next];
                    if failure.transient {
                        // The destination is down, not refusing this message: wait
                        // for it without spending the message's attempts.
                        outage = (outage + 1).min(30);
                        tracing::warn!(relay = %self.name, id = %message.id, error = %failure.error, "destination unreachable");
                        tokio::select! {
                            () = tokio::time::sleep(self.options.backoff.delay(outage)) => {}
                            () = cancel.cancelled() => return None,
                        }
                        continue;
                    }
                    outage = 0;
                    attempts += 1;
                    tracing::warn!(relay = %self.name, id = %message.id, attempts, error = %failure.error, "publish failed");
                    if attempts >= self.options.max_attempts {
                        dead.push((message.clone(), failure.error, attempts));
                        next += 1;
                        attempts = 0;
                        continue;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(self.options.backoff.delay(attempts)) => {}
                        () = cancel.cancelled() => return None,
                    }
                }
            }
        }
        Some(dead)
    }

    /// Moves the checkpoint and records dead letters in one transaction; `false` if
    /// the checkpoint was moved by someone else.
    async fn commit(
        &self,
        from: Position,
        to: Position,
        dead: &[(OutboxMessage, String, u32)],
    ) -> Result<bool> {
        let mut client = self.store.pool().get().await?;
        let tx = client.transaction().await?;
        if !Checkpoints::advance_in_tx(&self.store, &tx, &self.name, from, to).await? {
            return Ok(false);
        }
        for (message, error, attempts) in dead {
            tx.execute(
                &format!(
                    "INSERT INTO {} (subscription, position, message_id, error, attempts) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (subscription, position) \
                     DO UPDATE SET error = EXCLUDED.error, attempts = EXCLUDED.attempts",
                    self.store.table("dead_letters")
                ),
                &[
                    &self.name,
                    &message.event.position.0,
                    &message.id,
                    error,
                    &(*attempts as i32),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}
