//! Dead letters: events a relay gave up on, to list, replay or discard.

use chrono::{DateTime, Utc};

use super::{OutboxMessage, Publisher};
use crate::{Error, Position, Query, ReadOptions, Result, Store};

/// An event the relay of `subscription` could not publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id, for [`Store::replay_dead_letter`] and [`Store::discard_dead_letter`].
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

impl Store {
    /// The dead letters of relay `subscription`, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn dead_letters(&self, subscription: &str) -> Result<Vec<DeadLetter>> {
        let client = self.pool().get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, subscription, position, message_id, error, attempts, created_at \
                     FROM {} WHERE subscription = $1 ORDER BY position",
                    self.table("dead_letters")
                ),
                &[&subscription],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                id: r.get(0),
                subscription: r.get(1),
                position: Position(r.get(2)),
                message_id: r.get(3),
                error: r.get(4),
                attempts: r.get(5),
                created_at: r.get(6),
            })
            .collect())
    }

    /// Publishes dead letter `id` again with `publisher`; on success it is removed.
    /// Returns `false` if there is no such dead letter.
    ///
    /// # Errors
    /// The publish error (the dead letter stays, with this error recorded), or
    /// database errors.
    pub async fn replay_dead_letter(&self, id: i64, publisher: &impl Publisher) -> Result<bool> {
        let client = self.pool().get().await?;
        let table = self.table("dead_letters");
        let Some(row) = client
            .query_opt(
                &format!("SELECT position FROM {table} WHERE id = $1"),
                &[&id],
            )
            .await?
        else {
            return Ok(false);
        };
        let position = Position(row.get(0));
        let options = ReadOptions::default()
            .after(Position(position.0 - 1))
            .up_to(position);
        let Some(event) = self.read_all(&Query::all(), options).await?.events.pop() else {
            return Ok(false);
        };
        let message = OutboxMessage::new(self.schema(), event);
        if let Err(f) = publisher.publish(std::slice::from_ref(&message)).await {
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
    pub async fn discard_dead_letter(&self, id: i64) -> Result<bool> {
        let client = self.pool().get().await?;
        let n = client
            .execute(
                &format!("DELETE FROM {} WHERE id = $1", self.table("dead_letters")),
                &[&id],
            )
            .await?;
        Ok(n > 0)
    }

    /// Consumer-side deduplication: records `message_id` as processed by `consumer`
    /// inside the consumer's own transaction. Returns `false` if it was processed
    /// before (skip the message); the record commits or rolls back with the work.
    ///
    /// ```no_run
    /// # async fn demo(store: dcbflow::Store, id: &str) -> dcbflow::Result<()> {
    /// let mut client = store.pool().get().await?;
    /// let tx = client.transaction().await?;
    /// if store.mark_processed(&tx, "billing", id).await? {
    ///     // ... apply the message ...
    /// }
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_processed(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool> {
        let n = tx
            .execute(
                &format!(
                    "INSERT INTO {} (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    self.table("processed_messages")
                ),
                &[&consumer, &message_id],
            )
            .await?;
        Ok(n == 1)
    }
}
