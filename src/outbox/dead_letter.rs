//! Dead letters: events a relay gave up on, to list, replay or discard.

use chrono::{DateTime, Utc};

use super::{Error, OutboxMessage, Publisher, Result};
use crate::store::{Position, Query, ReadOptions, Store};

/// An event the relay of `subscription` could not publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id, for [`DeadLetters::replay`] and [`DeadLetters::discard`].
    pub id: i64,
    /// The relay's subscription name.
    pub subscription: String,
    /// The event's position.
    pub position: Position,
    /// The message id it was published with.
    pub message_id: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
    /// When it was given up on.
    pub created_at: DateTime<Utc>,
}

/// The dead letters of a store's relays: list, replay, discard.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store, publisher: impl dcbflow::outbox::Publisher) -> dcbflow::outbox::Result<()> {
/// use dcbflow::outbox::DeadLetters;
/// let dead = DeadLetters::new(store);
/// for letter in dead.list("orders-to-nats").await? {
///     println!("{} failed {} times: {}", letter.position, letter.attempts, letter.error);
///     dead.replay(letter.id, &publisher).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetters {
    store: Store,
}

impl DeadLetters {
    /// The dead letters of `store`.
    pub fn new(store: Store) -> Self {
        DeadLetters { store }
    }

    /// Installs or upgrades the outbox layer's schema now, instead of on first
    /// use (on a store built with `migrate(false)`: checks that it is installed
    /// and current).
    ///
    /// # Errors
    /// [`SchemaNotInstalled`](crate::store::Error::SchemaNotInstalled) on a
    /// non-migrating handle; database errors.
    pub async fn migrate(&self) -> Result<()> {
        Ok(self.store.ensure_layer(&super::SCHEMA).await?)
    }

    /// The dead letters of every relay, by id, at most `limit` of them with an id
    /// greater than `after_id` (keyset pagination: pass the last id of a page to
    /// get the next one; `None` for the first page).
    ///
    /// # Errors
    /// Database, pool or timeout errors.
    #[tracing::instrument(name = "dcbflow.dead_letters.list_all", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), after_id, limit))]
    pub async fn list_all(&self, after_id: Option<i64>, limit: u32) -> Result<Vec<DeadLetter>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE id > $1 ORDER BY id LIMIT $2",
            self.store.table("dead_letters")
        );
        let (after, limit) = (after_id.unwrap_or(i64::MIN), i64::from(limit));
        let rows = self.query(&sql, &[&after, &limit]).await?;
        Ok(rows.iter().map(letter).collect())
    }

    /// How many dead letters there are, over every relay.
    ///
    /// # Errors
    /// Database, pool or timeout errors.
    #[tracing::instrument(name = "dcbflow.dead_letters.count", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema()))]
    pub async fn count(&self) -> Result<i64> {
        let sql = format!("SELECT count(*) FROM {}", self.store.table("dead_letters"));
        Ok(self.query(&sql, &[]).await?[0].get(0))
    }

    /// Dead letter `id`, if there is one.
    ///
    /// # Errors
    /// Database, pool or timeout errors.
    #[tracing::instrument(name = "dcbflow.dead_letters.get", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), id))]
    pub async fn get(&self, id: i64) -> Result<Option<DeadLetter>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE id = $1",
            self.store.table("dead_letters")
        );
        Ok(self.query(&sql, &[&id]).await?.first().map(letter))
    }

    /// The rows of `sql` (prepared once per connection), within the store's
    /// call timeout; the connection is dropped if the call broke it.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        self.store.ensure_layer(&super::SCHEMA).await?;
        let deadline = self.store.deadline();
        let client = self.store.checkout(deadline).await?;
        let result = self
            .store
            .bounded(deadline, async {
                let stmt = client.prepare_cached(sql).await?;
                Ok(client.query(&stmt, params).await?)
            })
            .await;
        Ok(crate::store::release(client, result)?)
    }

    /// The dead letters of relay `subscription`, oldest first.
    ///
    /// # Errors
    /// Database errors.
    #[tracing::instrument(name = "dcbflow.dead_letters.list", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), relay = subscription))]
    pub async fn list(&self, subscription: &str) -> Result<Vec<DeadLetter>> {
        self.store.ensure_layer(&super::SCHEMA).await?;
        let client = self.store.pool().get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM {} WHERE subscription = $1 ORDER BY position",
                    self.store.table("dead_letters")
                ),
                &[&subscription],
            )
            .await?;
        Ok(rows.iter().map(letter).collect())
    }

    /// Publishes dead letter `id` again with `publisher`; on success it is removed.
    /// Returns `false` if there is no such dead letter.
    ///
    /// # Errors
    /// [`Error::Publish`] when the publisher refuses it again (the dead letter
    /// stays, with this error recorded), or store errors.
    #[tracing::instrument(name = "dcbflow.dead_letters.replay", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), id))]
    pub async fn replay(&self, id: i64, publisher: &impl Publisher) -> Result<bool> {
        self.store.ensure_layer(&super::SCHEMA).await?;
        let table = self.store.table("dead_letters");
        // One connection at a time: never hold one while waiting for another.
        let position = {
            let client = self.store.pool().get().await?;
            let row = client
                .query_opt(
                    &format!("SELECT position FROM {table} WHERE id = $1"),
                    &[&id],
                )
                .await?;
            match row {
                Some(row) => Position(row.get(0)),
                None => return Ok(false),
            }
        };
        let options = ReadOptions::default()
            .after(Position(position.0 - 1))
            .up_to(position);
        let Some(event) = self
            .store
            .read_all(&Query::all(), options)
            .await?
            .events
            .pop()
        else {
            return Ok(false);
        };
        let message = OutboxMessage::new(self.store.schema(), event);
        let published = publisher.publish(std::slice::from_ref(&message)).await;
        let client = self.store.pool().get().await?;
        if let Err(f) = published {
            client
                .execute(
                    &format!(
                        "UPDATE {table} SET error = $2, attempts = attempts + 1 WHERE id = $1"
                    ),
                    &[&id, &f.error],
                )
                .await?;
            return Err(Error::Publish(f.error));
        }
        client
            .execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id])
            .await?;
        Ok(true)
    }

    /// Drops dead letter `id` without publishing it. Returns `false` if there was none.
    ///
    /// # Errors
    /// Database errors.
    #[tracing::instrument(name = "dcbflow.dead_letters.discard", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), id))]
    pub async fn discard(&self, id: i64) -> Result<bool> {
        self.store.ensure_layer(&super::SCHEMA).await?;
        let client = self.store.pool().get().await?;
        let n = client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE id = $1",
                    self.store.table("dead_letters")
                ),
                &[&id],
            )
            .await?;
        Ok(n > 0)
    }
}

/// The columns [`letter`] decodes.
const COLUMNS: &str = "id, subscription, position, message_id, error, attempts, created_at";

/// A row of [`COLUMNS`].
fn letter(r: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        id: r.get(0),
        subscription: r.get(1),
        position: Position(r.get(2)),
        message_id: r.get(3),
        error: r.get(4),
        attempts: r.get(5),
        created_at: r.get(6),
    }
}

/// Consumer-side deduplication: records `message_id` as processed by `consumer`
/// inside the consumer's own transaction `tx` on `store`'s database. Returns
/// `false` if it was processed before (skip the message); the record commits or
/// rolls back with the work.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store, id: &str) -> dcbflow::outbox::Result<()> {
/// let mut client = store.pool().get().await?;
/// let tx = client.transaction().await?;
/// if dcbflow::outbox::mark_processed(&store, &tx, "billing", id).await? {
///     // ... apply the message ...
/// }
/// tx.commit().await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// Database errors.
#[tracing::instrument(name = "dcbflow.mark_processed", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %store.schema(), consumer))]
pub async fn mark_processed(
    store: &Store,
    tx: &deadpool_postgres::Transaction<'_>,
    consumer: &str,
    message_id: &str,
) -> Result<bool> {
    store.ensure_layer(&super::SCHEMA).await?;
    let stmt = tx
        .prepare_cached(&format!(
            "INSERT INTO {} (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            store.table("processed_messages")
        ))
        .await?;
    Ok(tx.execute(&stmt, &[&consumer, &message_id]).await? == 1)
}
