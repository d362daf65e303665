//! Named, checkpointed consumers: the projection runner and the lease that keeps
//! competing processes from consuming one subscription at once.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use super::SubscriptionOptions;
use crate::{Error, Position, Query, ReadOptions, Result, SequencedEvent, Store};

/// A boxed error from user code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Applies batches of events to a read model, inside the transaction that also
/// stores the subscription's checkpoint: the read model sees every event exactly once.
///
/// ```
/// use dcbflow::{ProjectionHandler, SequencedEvent, BoxError};
/// struct CountOrders;
/// impl ProjectionHandler for CountOrders {
///     async fn apply(&self, tx: &dcbflow::deadpool_postgres::Transaction<'_>, events: &[SequencedEvent]) -> Result<(), BoxError> {
///         tx.execute("UPDATE order_count SET n = n + $1", &[&(events.len() as i64)]).await?;
///         Ok(())
///     }
/// }
/// ```
pub trait ProjectionHandler: Send + Sync {
    /// Applies `events` (in position order, possibly after a crash again from the
    /// last checkpoint) within `tx`.
    fn apply(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: &[SequencedEvent],
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Why a runner stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The handler failed; the batch was rolled back and the checkpoint kept.
    #[error("projection handler failed at positions {first}..={last}")]
    Handler {
        /// First position of the failed batch.
        first: Position,
        /// Last position of the failed batch.
        last: Position,
        /// The handler's error.
        #[source]
        source: BoxError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] Error),
}

/// An exclusive lease on a named subscription: a session-level advisory lock on a
/// connection of its own. If the process dies, PostgreSQL ends the session and the
/// lease passes to a waiting process.
pub(crate) struct Lease {
    client: LeaseClient,
}

enum LeaseClient {
    Dedicated(tokio_postgres::Client, tokio::task::JoinHandle<()>),
    Detached(deadpool_postgres::ClientWrapper),
}

impl Lease {
    /// Waits for the lease of `name`, or `None` when `cancel` fires.
    pub(crate) async fn acquire(
        store: &Store,
        name: &str,
        retry: Duration,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        let client = match store.listen_config() {
            Some(config) => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                let task = tokio::spawn(async move {
                    let _ = connection.await;
                });
                LeaseClient::Dedicated(client, task)
            }
            None => {
                LeaseClient::Detached(deadpool_postgres::Object::take(store.pool().get().await?))
            }
        };
        let lease = Lease { client };
        let key = store.lease_key(name);
        loop {
            let row = lease
                .client()
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await?;
            if row.get::<_, bool>(0) {
                tracing::info!(subscription = name, "lease acquired");
                return Ok(Some(lease));
            }
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = cancel.cancelled() => return Ok(None),
            }
        }
    }

    fn client(&self) -> &tokio_postgres::Client {
        match &self.client {
            LeaseClient::Dedicated(c, _) => c,
            LeaseClient::Detached(c) => c,
        }
    }

    /// `false` once the lease's session is gone (and with it the lock).
    pub(crate) fn is_held(&self) -> bool {
        !self.client().is_closed()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let LeaseClient::Dedicated(_, task) = &self.client {
            task.abort();
        }
    }
}

/// Runs a [`ProjectionHandler`] over a named subscription: one active process per
/// name (others wait for the lease), checkpoint and read model committed together.
pub struct ProjectionRunner<H> {
    store: Store,
    name: String,
    query: Query,
    handler: H,
    options: SubscriptionOptions,
    lease_retry: Duration,
}

impl<H: ProjectionHandler> ProjectionRunner<H> {
    /// A runner for subscription `name` over `query`.
    pub fn new(store: Store, name: impl Into<String>, query: Query, handler: H) -> Self {
        ProjectionRunner {
            store,
            name: name.into(),
            query,
            handler,
            options: SubscriptionOptions::default(),
            lease_retry: Duration::from_secs(1),
        }
    }

    /// Subscription settings.
    #[must_use]
    pub fn options(mut self, options: SubscriptionOptions) -> Self {
        self.options = options;
        self
    }

    /// How often a waiting process tries to take over the lease (default 1 s).
    #[must_use]
    pub fn lease_retry(mut self, every: Duration) -> Self {
        self.lease_retry = every;
        self
    }

    /// Runs until `cancel` fires (then returns `Ok`) or the handler fails.
    ///
    /// # Errors
    /// [`RunnerError::Handler`] when the handler fails (its batch is rolled back);
    /// [`RunnerError::Store`] for store failures.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), RunnerError> {
        loop {
            let Some(lease) =
                Lease::acquire(&self.store, &self.name, self.lease_retry, &cancel).await?
            else {
                return Ok(());
            };
            match self.run_with(&lease, &cancel).await? {
                Flow::Cancelled => return Ok(()),
                Flow::LeaseLost => {
                    tracing::warn!(subscription = %self.name, "lease lost, waiting to take it again");
                }
            }
        }
    }

    async fn run_with(
        &self,
        lease: &Lease,
        cancel: &CancellationToken,
    ) -> Result<Flow, RunnerError> {
        let mut checkpoint = self.store.checkpoint(&self.name).await?;
        let mut sub = self
            .store
            .subscribe(self.query.clone(), Some(checkpoint), self.options.clone())
            .await?;
        loop {
            if cancel.is_cancelled() {
                return Ok(Flow::Cancelled);
            }
            let events = sub.poll_batch().await?;
            if events.is_empty() && sub.position() == checkpoint {
                tokio::select! {
                    () = sub.wait() => {}
                    () = cancel.cancelled() => return Ok(Flow::Cancelled),
                }
                continue;
            }
            if !lease.is_held() {
                return Ok(Flow::LeaseLost);
            }
            match self.commit(&events, checkpoint, sub.position()).await? {
                true => checkpoint = sub.position(),
                false => return Ok(Flow::LeaseLost),
            }
        }
    }

    /// Applies `events` and moves the checkpoint from `from` to `to`, atomically;
    /// `false` if the checkpoint was not at `from` (another process moved it).
    async fn commit(
        &self,
        events: &[SequencedEvent],
        from: Position,
        to: Position,
    ) -> Result<bool, RunnerError> {
        let mut client = self.store.pool().get().await.map_err(Error::from)?;
        let tx = client.transaction().await.map_err(Error::from)?;
        let moved = tx
            .execute(
                &format!(
                    "UPDATE {} SET position = $3, updated_at = now() WHERE name = $1 AND position = $2",
                    self.store.table("subscriptions")
                ),
                &[&self.name, &from.0, &to.0],
            )
            .await
            .map_err(Error::from)?;
        if moved == 0 {
            return Ok(false);
        }
        if !events.is_empty() {
            self.handler
                .apply(&tx, events)
                .await
                .map_err(|source| RunnerError::Handler {
                    first: events[0].position,
                    last: events[events.len() - 1].position,
                    source,
                })?;
        }
        tx.commit().await.map_err(Error::from)?;
        Ok(true)
    }
}

enum Flow {
    Cancelled,
    LeaseLost,
}

/// How far a named subscription is behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    /// Its checkpoint.
    pub checkpoint: Position,
    /// The newest position in the log.
    pub head: Option<Position>,
    /// Matching events after the checkpoint.
    pub events_behind: i64,
    /// When the oldest matching event after the checkpoint was recorded.
    pub oldest_undelivered: Option<DateTime<Utc>>,
}

impl Lag {
    /// How long the oldest undelivered event has been waiting (zero if none).
    pub fn oldest_age(&self) -> Duration {
        self.oldest_undelivered
            .and_then(|t| (Utc::now() - t).to_std().ok())
            .unwrap_or_default()
    }
}

impl Store {
    /// The checkpoint of subscription `name`, created at 0 if new.
    ///
    /// # Errors
    /// Database errors.
    pub async fn checkpoint(&self, name: &str) -> Result<Position> {
        let client = self.pool().get().await?;
        let result = async {
            let table = self.table("subscriptions");
            client
                .execute(
                    &format!("INSERT INTO {table} (name) VALUES ($1) ON CONFLICT DO NOTHING"),
                    &[&name],
                )
                .await?;
            let row = client
                .query_one(
                    &format!("SELECT position FROM {table} WHERE name = $1"),
                    &[&name],
                )
                .await?;
            Ok(Position(row.get(0)))
        }
        .await;
        crate::store::release(client, result)
    }

    /// Waits until subscription `name` has processed everything up to `position`
    /// (read-your-writes after an append); `false` on timeout.
    ///
    /// # Errors
    /// Database errors.
    pub async fn wait_until_processed(
        &self,
        name: &str,
        position: Position,
        timeout: Duration,
    ) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.checkpoint(name).await? >= position {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How far subscription `name` over `query` is behind the log.
    ///
    /// # Errors
    /// Database errors.
    pub async fn lag(&self, name: &str, query: &Query) -> Result<Lag> {
        let checkpoint = self.checkpoint(name).await?;
        let head = self.head().await?;
        let (filter, params) =
            crate::store::filter_sql(query, &ReadOptions::default().after(checkpoint));
        let client = self.pool().get().await?;
        let result = async {
            let row = client
                .query_one(
                    &format!(
                        "SELECT count(*), min(recorded_at) FROM {} WHERE {filter}",
                        self.table("events")
                    ),
                    &params.iter().map(|p| &**p as _).collect::<Vec<_>>(),
                )
                .await?;
            Ok(Lag {
                checkpoint,
                head,
                events_behind: row.get(0),
                oldest_undelivered: row.get(1),
            })
        }
        .await;
        crate::store::release(client, result)
    }
}
