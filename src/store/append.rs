//! Conditional append.

use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::error::{Error, Result};
use super::{AppendCondition, Event, Position, Query, Store, TransactionId, locks, validate};

/// What an append wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    /// Positions of the appended events, in the order they were given.
    pub positions: Vec<Position>,
    /// The transaction that wrote them.
    pub transaction_id: TransactionId,
    /// `true` if the events' ids were already stored: nothing was written, and
    /// `positions` and `transaction_id` are those of the original append.
    pub replayed: bool,
}

impl AppendResult {
    /// Position of the last appended event.
    pub fn last_position(&self) -> Position {
        *self
            .positions
            .last()
            .expect("an append writes at least one event")
    }
}

/// The most shared scope locks of a one-event unconditional append sent as
/// direct calls (one prepared statement per count); above, or with more
/// events, the locks go as arrays (`append_plain`).
pub(crate) const ONE_EVENT_MAX_LOCKS: usize = 8;

impl Store {
    /// Appends `events` atomically, if `condition` (when given) does not match any
    /// event its cursor did not see.
    ///
    /// One round trip and one statement: either all events are written or none, also
    /// when this future is dropped or the connection is lost midway. Events carrying
    /// ids make the append idempotent: re-sending it after a lost response returns the
    /// original positions with [`AppendResult::replayed`] set.
    ///
    /// ```no_run
    /// # async fn demo(store: dcbflow::Store) -> dcbflow::Result<()> {
    /// use dcbflow::{AppendCondition, Event, Query, ReadOptions};
    /// use futures::TryStreamExt;
    /// use serde_json::json;
    ///
    /// let query = Query::items_of(["SeatBooked"], ["seat:A1"]);
    /// let mut stream = store.read(&query, ReadOptions::default()).await?;
    /// let booked = stream.try_next().await?.is_some();
    /// let cursor = stream.drain_cursor().await?;
    /// if !booked {
    ///     let booking = Event::new("SeatBooked", ["seat:A1"], json!({"by": "ada"}));
    ///     store.append(vec![booking], Some(AppendCondition::new(query).after(cursor))).await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// - [`Error::Conflict`] if the condition matched; nothing was written.
    /// - [`Error::InvalidInput`] for a refused request; nothing was written.
    /// - [`Error::Overloaded`] when too many operations are in flight.
    /// - [`Error::Database`] / [`Error::Pool`] for infrastructure failures.
    #[tracing::instrument(name = "dcbflow.append", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema, db.operation.name = "append", events = events.len(), conditional = condition.is_some()))]
    pub async fn append(
        &self,
        events: Vec<Event>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendResult> {
        observed(self.append_now(events, condition)).await
    }

    async fn append_now(
        &self,
        events: Vec<Event>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendResult> {
        let _permit = self.permit()?;
        let prepared = self.prepare_append(events, condition)?;
        // With group commit, an append that is alone runs at once, below.
        let _entry = match &self.inner.group_commit {
            Some(group) => {
                let entry = group.enter();
                if !entry.alone {
                    // The batch's writer sends the notification. Bounded like any
                    // call: past the deadline the outcome is unknown, as when a
                    // single append's statement times out.
                    let result = self.bounded(self.deadline(), group.append(prepared)).await;
                    if matches!(&result, Ok(r) if !r.replayed) {
                        self.wake_local();
                    }
                    return result;
                }
                Some(entry)
            }
            None => None,
        };
        let deadline = self.deadline();
        let client = self.checkout(deadline).await?;
        // Committed by the statement itself: no notification inside it (see
        // `wake`), the wake-up is sent after the commit; and no bound on holding
        // the store lock, which the statement's own commit releases.
        let result = self
            .bounded(deadline, async {
                if prepared.is_plain() {
                    self.append_plain(&client, &prepared).await
                } else {
                    self.append_prepared(&client, &prepared, false, 0).await
                }
            })
            .await;
        if matches!(&result, Ok(r) if !r.replayed) {
            self.wake_subscribers();
        }
        super::release(client, result)
    }

    /// Like [`append`](Self::append), inside the caller's transaction: the events
    /// become visible when, and only if, the caller commits. The scope locks are held
    /// until then, so keep the transaction short.
    ///
    /// The transaction must be READ COMMITTED (PostgreSQL's default).
    ///
    /// # Errors
    /// As [`append`](Self::append), plus [`InvalidInput::IsolationLevel`](super::InvalidInput::IsolationLevel).
    /// After an error, the caller's transaction is aborted unless the error is a
    /// [`Conflict`](Error::Conflict) or was found before reaching the database.
    #[tracing::instrument(name = "dcbflow.append_in_tx", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema, db.operation.name = "append", events = events.len(), conditional = condition.is_some()))]
    pub async fn append_in_tx(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: Vec<Event>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendResult> {
        observed(async {
            let _permit = self.permit()?;
            self.append_with(tx, events, condition, true).await
        })
        .await
    }

    /// Like [`append_in_tx`](Self::append_in_tx), but the caller wakes the
    /// subscribers after committing ([`wake_subscribers`](Self::wake_subscribers)),
    /// so that its commit does not take PostgreSQL's notification lock.
    pub(crate) async fn append_in_tx_quiet(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: Vec<Event>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendResult> {
        observed(async {
            let _permit = self.permit()?;
            self.append_with(tx, events, condition, false).await
        })
        .await
    }

    /// Asks for a wake-up of the store's subscribers, sent after this call on
    /// another connection and coalesced with other requests.
    pub(crate) fn wake_subscribers(&self) {
        self.inner.waker.wake();
        self.wake_local();
    }

    /// Wakes this handle's own subscriptions at once: they need not wait for
    /// the notification's round trip (nor for the waker's gap between two).
    fn wake_local(&self) {
        if let Some(feed) = self.live_feed() {
            feed.appended();
        }
    }

    /// Takes, inside the caller's transaction, the exclusive scope locks an append
    /// condition on `query` would take, so that no event matching `query` can be
    /// appended by anyone else until the transaction ends. This is the pessimistic
    /// way to decide: lock, then read, decide and append without conflicts.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad query; database errors.
    #[tracing::instrument(name = "dcbflow.lock_scope_in_tx", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema))]
    pub async fn lock_scope_in_tx(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        query: &Query,
    ) -> Result<()> {
        validate::query(query, &self.inner.limits)?;
        let condition = AppendCondition::new(query.clone());
        let (keys, modes) = locks::plan(
            &self.inner.schema,
            &[],
            &[],
            Some(&condition),
            self.inner.limits.max_lock_keys,
        );
        // The store key is held shared by every append; keep it so the lock order
        // matches the append's own, exclusive only if the plan says so.
        // The same bound on holding the store lock as an append's.
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.key) \
                 ELSE pg_advisory_xact_lock_shared(l.key) END \
                 FROM \"{}\".guard_transaction(NULL, $3), \
                      unnest($1::bigint[], $2::bool[]) AS l(key, exclusive)",
                self.inner.schema
            ))
            .await?;
        tx.execute(&stmt, &[&keys, &modes, &self.inner.hold_ms])
            .await?;
        Ok(())
    }

    async fn append_with<C: GenericClient>(
        &self,
        client: &C,
        events: Vec<Event>,
        condition: Option<AppendCondition>,
        notify: bool,
    ) -> Result<AppendResult> {
        let prepared = self.prepare_append(events, condition)?;
        self.append_prepared(client, &prepared, notify, self.inner.hold_ms)
            .await
    }

    /// One call of `append_checked`: notifying on commit if `notify`, bounding
    /// the time the caller's transaction may hold the store lock by `hold_ms`
    /// (0: no bound).
    async fn append_prepared<C: GenericClient>(
        &self,
        client: &C,
        prepared: &PreparedAppend,
        notify: bool,
        hold_ms: i32,
    ) -> Result<AppendResult> {
        let stmt = client.prepare_cached(&self.inner.sql.append).await?;
        let channel = notify.then_some(self.channel());
        let row = client
            .query_one(&stmt, &prepared.params(true, &channel, &hold_ms))
            .await?;
        decode(&row)
    }

    /// An append on the store's own connection whose statement, when the
    /// append stores its events (no conflict, no replay), also calls `then`: an
    /// expression of the store's schema over `a` (the append's row: `positions`,
    /// `transaction_id`) and the parameters `$17..` (`extra`). One statement,
    /// so one implicit transaction: the two commit together or not at all. A
    /// layer writes its read models with its events this way (the flow engine's
    /// transitions) without a transaction block around them.
    ///
    /// # Errors
    /// As [`append`](Self::append), with the condition of `prepared`.
    #[cfg(feature = "flow")]
    pub(crate) async fn append_and_then(
        &self,
        prepared: &PreparedAppend,
        then: &str,
        extra: &[&(dyn ToSql + Sync)],
    ) -> Result<AppendResult> {
        observed(async {
            let _permit = self.permit()?;
            let client = self.inner.pool.get().await?;
            let result = async {
                let sql = format!(
                    "WITH a AS ({}) \
                     SELECT a.positions, a.transaction_id, a.conflict, a.replayed, \
                            (SELECT true FROM (SELECT {then}) t \
                              WHERE a.conflict IS NULL AND NOT a.replayed) \
                       FROM a",
                    self.inner.sql.append
                );
                let stmt = client.prepare_cached(&sql).await?;
                let channel = None;
                let mut params = prepared.params(true, &channel, &0).to_vec();
                params.extend_from_slice(extra);
                decode(&client.query_one(&stmt, &params).await?)
            }
            .await;
            let appended = super::release(client, result)?;
            self.wake_subscribers();
            Ok(appended)
        })
        .await
    }

    /// An append with no condition, no cursor and no event ids on the store's
    /// own connection: one plain `INSERT` that takes the scope locks and
    /// commits with its statement.
    async fn append_plain<C: GenericClient>(
        &self,
        client: &C,
        prepared: &PreparedAppend,
    ) -> Result<AppendResult> {
        let c = &prepared.cols;
        let locks = prepared.lock_keys.len();
        if c.types.len() == 1
            && (1..=ONE_EVENT_MAX_LOCKS).contains(&locks)
            && prepared.lock_modes.iter().all(|exclusive| !exclusive)
        {
            let stmt = client
                .prepare_cached(&self.inner.sql.append_one[locks - 1])
                .await?;
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(4 + locks);
            params.extend([
                &c.types[0] as &(dyn ToSql + Sync),
                &c.tags,
                &c.data[0],
                &c.metadata[0],
            ]);
            params.extend(prepared.lock_keys.iter().map(|k| k as &(dyn ToSql + Sync)));
            let row = client.query_opt(&stmt, &params).await?;
            // No row: the filter on the isolation level held the event back.
            let Some(row) = row else {
                return Err(super::InvalidInput::IsolationLevel.into());
            };
            return Ok(AppendResult {
                transaction_id: row.get(1),
                positions: vec![Position(row.get(0))],
                replayed: false,
            });
        }
        let stmt = client.prepare_cached(&self.inner.sql.append_plain).await?;
        let rows = client
            .query(
                &stmt,
                &[
                    &prepared.lock_keys,
                    &prepared.lock_modes,
                    &c.types,
                    &c.tags,
                    &c.tag_starts,
                    &c.tag_counts,
                    &c.data,
                    &c.metadata,
                ],
            )
            .await?;
        // No row: the filter on the isolation level held the events back.
        let Some(first) = rows.first() else {
            return Err(super::InvalidInput::IsolationLevel.into());
        };
        Ok(AppendResult {
            transaction_id: first.get(1),
            positions: rows.iter().map(|r| Position(r.get(0))).collect(),
            replayed: false,
        })
    }

    /// Validates an append and turns it into the parameters of `append_events`.
    pub(crate) fn prepare_append(
        &self,
        events: Vec<Event>,
        condition: Option<AppendCondition>,
    ) -> Result<PreparedAppend> {
        let limits = &self.inner.limits;
        let cols = validate::columns(events, limits)?;
        if let Some(c) = &condition {
            validate::query(&c.fail_if_events_match, limits)?;
            if let Some(cursor) = &c.after {
                validate::cursor(cursor)?;
            }
        }
        let (lock_keys, lock_modes) = locks::plan(
            &self.inner.schema,
            &cols.types,
            &cols.tags,
            condition.as_ref(),
            limits.max_lock_keys,
        );
        let query = condition
            .as_ref()
            .filter(|c| !c.fail_if_events_match.is_empty())
            .map(|c| c.fail_if_events_match.clone());
        let (condition, after, snapshot) = match &condition {
            // A query with no items matches nothing: no condition to check.
            Some(c) if !c.fail_if_events_match.is_empty() => {
                let items: Vec<_> = c
                    .fail_if_events_match
                    .items()
                    .iter()
                    .map(|i| json!({"types": i.types, "tags": i.tags}))
                    .collect();
                let cursor = c.after.as_ref();
                (
                    Some(serde_json::Value::Array(items)),
                    cursor.and_then(|c| c.position).map(|p| p.0),
                    cursor
                        .and_then(|c| c.snapshot.as_ref())
                        .map(|s| s.to_string()),
                )
            }
            // No items: nothing to check, but a cursor beyond the head is still
            // refused (by the guard), never passed silently.
            Some(c) => (
                None,
                c.after.as_ref().and_then(|c| c.position).map(|p| p.0),
                None,
            ),
            None => (None, None, None),
        };
        // The condition's only item, when it has tags: `append_checked` decides
        // it by the window of events after a near cursor without decoding the
        // condition.
        let (item_types, item_tags) = match query.as_ref().map(|q| q.items()) {
            Some([item]) if !item.tags.is_empty() => {
                (Some(item.types.clone()), Some(item.tags.clone()))
            }
            _ => (None, None),
        };
        let has_ids = cols.ids.iter().any(Option::is_some);
        Ok(PreparedAppend {
            lock_keys,
            lock_modes,
            cols,
            has_ids,
            query,
            condition,
            after,
            snapshot,
            item_types,
            item_tags,
        })
    }
}

/// Counter of appends by `result` (`ok`, `conflict`, `invalid`, `error`).
#[cfg(feature = "metrics")]
pub(crate) const APPENDS_TOTAL: &str = "dcbflow_appends_total";
/// Histogram of append durations, in seconds.
#[cfg(feature = "metrics")]
pub(crate) const APPEND_DURATION_SECONDS: &str = "dcbflow_append_duration_seconds";

/// Runs one append, and with feature `metrics` counts its result and records
/// its duration: the one place every append path (plain, group commit, in the
/// caller's transaction, the command executor's) goes through. Without the
/// feature it only awaits `append`.
async fn observed(
    append: impl std::future::Future<Output = Result<AppendResult>>,
) -> Result<AppendResult> {
    #[cfg(feature = "metrics")]
    let started = std::time::Instant::now();
    let result = append.await;
    #[cfg(feature = "metrics")]
    {
        let label = match &result {
            Ok(_) => "ok",
            Err(Error::Conflict { .. }) => "conflict",
            Err(Error::InvalidInput(_)) => "invalid",
            Err(_) => "error",
        };
        ::metrics::counter!(APPENDS_TOTAL, "result" => label).increment(1);
        ::metrics::histogram!(APPEND_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
    }
    result
}

/// The parameters of one call of `append_events`.
#[derive(Debug)]
pub(crate) struct PreparedAppend {
    lock_keys: Vec<i64>,
    lock_modes: Vec<bool>,
    pub(crate) cols: validate::Columns,
    /// Whether any event carries an id (otherwise `p_ids` is sent as NULL).
    has_ids: bool,
    /// The condition's query, for checks in memory (group commit).
    pub(crate) query: Option<Query>,
    pub(crate) condition: Option<serde_json::Value>,
    pub(crate) after: Option<i64>,
    pub(crate) snapshot: Option<String>,
    /// The condition's only item's types and tags, if it has exactly one item
    /// and that item has tags.
    pub(crate) item_types: Option<Vec<String>>,
    pub(crate) item_tags: Option<Vec<String>>,
}

const NO_KEYS: &[i64] = &[];
const NO_MODES: &[bool] = &[];
const NO_IDS: Option<&[Option<uuid::Uuid>]> = None;

impl PreparedAppend {
    /// The scope locks this append takes: (key, exclusive), sorted by key.
    pub(crate) fn locks(&self) -> impl Iterator<Item = (i64, bool)> + '_ {
        self.lock_keys
            .iter()
            .copied()
            .zip(self.lock_modes.iter().copied())
    }

    /// Whether the plain `INSERT` can write this append: no condition, no
    /// cursor, no event ids.
    pub(crate) fn is_plain(&self) -> bool {
        self.condition.is_none() && self.after.is_none() && !self.has_ids
    }

    /// The statement parameters; without `locks`, the scope locks are left to the
    /// caller (group commit holds the store lock exclusively instead); without
    /// a `channel`, waking subscribers is left to the caller, after the commit.
    pub(crate) fn params<'a>(
        &'a self,
        locks: bool,
        channel: &'a Option<&'a str>,
        hold_ms: &'a i32,
    ) -> [&'a (dyn ToSql + Sync); 16] {
        let (keys, modes): (&(dyn ToSql + Sync), &(dyn ToSql + Sync)) = if locks {
            (&self.lock_keys, &self.lock_modes)
        } else {
            (&NO_KEYS, &NO_MODES)
        };
        [
            keys,
            modes,
            &self.cols.types,
            &self.cols.tags,
            &self.cols.tag_starts,
            &self.cols.tag_counts,
            &self.cols.data,
            &self.cols.metadata,
            if self.has_ids {
                &self.cols.ids
            } else {
                &NO_IDS
            },
            &self.condition,
            &self.after,
            &self.snapshot,
            channel,
            hold_ms,
            &self.item_types,
            &self.item_tags,
        ]
    }
}

pub(crate) fn decode(row: &Row) -> Result<AppendResult> {
    if let Some(position) = row.get::<_, Option<i64>>(2) {
        return Err(Error::Conflict {
            position: Position(position),
        });
    }
    let positions: Vec<i64> = row.get(0);
    Ok(AppendResult {
        positions: positions.into_iter().map(Position).collect(),
        transaction_id: row.get(1),
        replayed: row.get(3),
    })
}
