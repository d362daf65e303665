//! Named, checkpointed consumers: the projection runner and the lease that keeps
//! competing processes from consuming one subscription at once.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use super::{Checkpoints, Subscription, SubscriptionOptions};
use crate::store::{Error, Position, Query, Result, SequencedEvent, Store};

/// A boxed error from user code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Applies batches of events to a read model, inside the transaction that also
/// stores the subscription's checkpoint: the read model sees every event exactly once.
///
/// ```
/// use dcbflow::{BoxError, ProjectionHandler, SequencedEvent};
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
    #[tracing::instrument(name = "dcbflow.projection.run", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), subscription = %self.name))]
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), RunnerError> {
        super::checkpoint::check_name(&self.name)?;
        self.store.ensure_layer(&super::SCHEMA).await?;
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
        let mut checkpoint = Checkpoints::new(self.store.clone()).get(&self.name).await?;
        let mut sub = Subscription::connect(
            &self.store,
            self.query.clone(),
            Some(checkpoint),
            self.options.clone(),
        )
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
        if !Checkpoints::advance_in_tx(&self.store, &tx, &self.name, from, to).await? {
            return Ok(false);
        }
        if !events.is_empty()
            && let Err(source) = self.handler.apply(&tx, events).await
        {
            // A handler that failed because the connection did (killed,
            // network) is a store failure, not the read model's.
            if let Err(e) = tx.rollback().await {
                let e = Error::from(e);
                if e.breaks_connection() {
                    return Err(RunnerError::Store(e));
                }
            }
            return Err(RunnerError::Handler {
                first: events[0].position,
                last: events[events.len() - 1].position,
                source,
            });
        }
        tx.commit().await.map_err(Error::from)?;
        Ok(true)
    }
}

enum Flow {
    Cancelled,
    LeaseLost,
}
