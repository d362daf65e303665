//! Named checkpoints: how far a named consumer (a projection runner, an outbox
//! relay) got, and how far behind the log it is.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::{InvalidInput, Position, Query, Result, Store};

/// The checkpoints of named subscriptions in one store (the `subscriptions`
/// table of the projection layer's schema).
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store) -> dcbflow::Result<()> {
/// use dcbflow::{Checkpoints, Query};
/// let checkpoints = Checkpoints::new(store);
/// let lag = checkpoints.lag("orders-to-nats", &Query::items_of(["OrderPlaced"], Vec::<String>::new())).await?;
/// println!("{} events behind, oldest waiting {:?}", lag.events_behind, lag.oldest_age());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Checkpoints {
    store: Store,
}

/// The checkpoint of one named subscription (see [`Checkpoints::list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checkpoint {
    /// The subscription's name (a projection runner's or an outbox relay's).
    pub name: String,
    /// Every matching event up to here has been processed.
    pub position: Position,
    /// When the checkpoint was created or last moved.
    pub updated_at: DateTime<Utc>,
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

impl Checkpoints {
    /// The checkpoints of `store`.
    pub fn new(store: Store) -> Self {
        Checkpoints { store }
    }

    /// Installs or upgrades the projection layer's schema now, instead of on
    /// first use (on a store built with `migrate(false)`: checks that it is
    /// installed and current).
    ///
    /// # Errors
    /// [`Error::SchemaNotInstalled`](crate::store::Error::SchemaNotInstalled) on
    /// a non-migrating handle; database errors.
    pub async fn migrate(&self) -> Result<()> {
        self.store.ensure_layer(&super::SCHEMA).await
    }

    /// Every named checkpoint of the store, by name.
    ///
    /// # Errors
    /// Database, pool or timeout errors.
    #[tracing::instrument(name = "dcbflow.checkpoints.list", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema()))]
    pub async fn list(&self) -> Result<Vec<Checkpoint>> {
        self.store.ensure_layer(&super::SCHEMA).await?;
        let deadline = self.store.deadline();
        let client = self.store.checkout(deadline).await?;
        let result = self
            .store
            .bounded(deadline, async {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT name, position, updated_at FROM {} ORDER BY name",
                        self.store.table("subscriptions")
                    ))
                    .await?;
                let rows = client.query(&stmt, &[]).await?;
                Ok(rows
                    .iter()
                    .map(|r| Checkpoint {
                        name: r.get(0),
                        position: Position(r.get(1)),
                        updated_at: r.get(2),
                    })
                    .collect())
            })
            .await;
        crate::store::release(client, result)
    }

    /// The checkpoint of subscription `name`, created at 0 if new.
    ///
    /// # Errors
    /// Database errors.
    #[tracing::instrument(name = "dcbflow.checkpoint", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), subscription = name))]
    pub async fn get(&self, name: &str) -> Result<Position> {
        check_name(name)?;
        self.store.ensure_layer(&super::SCHEMA).await?;
        let client = self.store.pool().get().await?;
        let result = async {
            let table = self.store.table("subscriptions");
            // Two statements: a single one could not see a row a concurrent
            // creator committed while this one's INSERT waited for it.
            let create = client
                .prepare_cached(&format!(
                    "INSERT INTO {table} (name) VALUES ($1) ON CONFLICT DO NOTHING"
                ))
                .await?;
            client.execute(&create, &[&name]).await?;
            let select = client
                .prepare_cached(&format!("SELECT position FROM {table} WHERE name = $1"))
                .await?;
            let row = client.query_one(&select, &[&name]).await?;
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
    #[tracing::instrument(name = "dcbflow.wait_until_processed", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), subscription = name))]
    pub async fn wait_until_processed(
        &self,
        name: &str,
        position: Position,
        timeout: Duration,
    ) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.get(name).await? >= position {
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
    /// Invalid query items; database errors.
    #[tracing::instrument(name = "dcbflow.lag", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), subscription = name))]
    pub async fn lag(&self, name: &str, query: &Query) -> Result<Lag> {
        let checkpoint = self.get(name).await?;
        let head = self.store.head().await?;
        let (events_behind, oldest_undelivered) = self.store.backlog(query, checkpoint).await?;
        Ok(Lag {
            checkpoint,
            head,
            events_behind,
            oldest_undelivered,
        })
    }

    /// Moves the checkpoint of `name` from `from` to `to` inside `tx`; `false` if
    /// it was not at `from` (another process moved it: the caller lost its lease).
    pub(crate) async fn advance_in_tx(
        store: &Store,
        tx: &deadpool_postgres::Transaction<'_>,
        name: &str,
        from: Position,
        to: Position,
    ) -> Result<bool> {
        let stmt = tx
            .prepare_cached(&format!(
                "UPDATE {} SET position = $3, updated_at = now() WHERE name = $1 AND position = $2",
                store.table("subscriptions")
            ))
            .await?;
        Ok(tx.execute(&stmt, &[&name, &from.0, &to.0]).await? == 1)
    }
}

/// The longest name of a subscription, projection or relay, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 200;

/// Checks the name of a subscription, projection or relay.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(InvalidInput::Name(format!(
            "a subscription name must be 1 to {MAX_NAME_LEN} bytes without NUL, got {} bytes",
            name.len()
        ))
        .into());
    }
    Ok(())
}
