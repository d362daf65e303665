//! Streaming reads.

use std::fmt::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{Stream, TryStreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, RowStream};

use super::error::{Error, InvalidInput, Result};
use super::{Cursor, Event, Position, Query, SequencedEvent, Snapshot, Store, validate};

/// Options of a [`read`](Store::read).
///
/// ```
/// use dcbflow::{Position, ReadOptions};
/// let latest_ten = ReadOptions::default().backwards().limit(10);
/// let after_100 = ReadOptions::default().after(Position(100));
/// # let _ = (latest_ten, after_100);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// Only events with a greater position (exclusive).
    pub after: Option<Position>,
    /// Only events with this position or a smaller one (inclusive).
    pub up_to: Option<Position>,
    /// At most this many events.
    pub limit: Option<u64>,
    /// Newest first.
    pub backwards: bool,
    /// Also the events below `after` that this snapshot did not see (late
    /// committers): with `after`, "every event a reader holding this cursor
    /// has not seen". Set it with [`unseen_by`](Self::unseen_by).
    pub(crate) unseen_by: Option<String>,
    /// Plan the statement for its own parameters (an unnamed statement)
    /// instead of using the connection's cached plan.
    pub(crate) plan_each: bool,
}

impl ReadOptions {
    /// Only events after `position` (exclusive).
    #[must_use]
    pub fn after(mut self, position: Position) -> Self {
        self.after = Some(position);
        self
    }

    /// Only events up to `position` (inclusive).
    #[must_use]
    pub fn up_to(mut self, position: Position) -> Self {
        self.up_to = Some(position);
        self
    }

    /// At most `n` events.
    #[must_use]
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Newest first.
    #[must_use]
    pub fn backwards(mut self) -> Self {
        self.backwards = true;
        self
    }

    /// Every event a reader holding `cursor` has not seen: those after its
    /// position, and those below it of transactions its snapshot did not see
    /// (late committers). A catch-up read for a state folded up to `cursor`
    /// (ADR 0013): fold what it returns onto that state, and its cursor covers
    /// both. Late committers come first, below `cursor`'s position, so out of
    /// position order: a fold whose result depends on order should read again
    /// from the start when it meets an event at or below `cursor.position`.
    /// A cursor without a snapshot ([`Cursor::at`]) gives the events after its
    /// position only.
    ///
    /// ```no_run
    /// # async fn demo(store: dcbflow::Store, query: dcbflow::Query) -> dcbflow::Result<()> {
    /// use dcbflow::ReadOptions;
    ///
    /// let first = store.read_all(&query, ReadOptions::default()).await?;
    /// // Later: only what that read did not see, late committers included.
    /// let rest = store
    ///     .read_all(&query, ReadOptions::default().unseen_by(&first.cursor))
    ///     .await?;
    /// let late = rest
    ///     .events
    ///     .iter()
    ///     .any(|e| first.cursor.position.is_some_and(|p| e.position <= p));
    /// # let _ = late; Ok(()) }
    /// ```
    #[must_use]
    pub fn unseen_by(mut self, cursor: &Cursor) -> Self {
        self.after = cursor.position;
        self.unseen_by = cursor.snapshot.as_ref().map(ToString::to_string);
        self
    }

    /// Plans this read for its own parameters (one round trip still, but a
    /// planning per call): for a catch-up read of a tag with many events,
    /// where the cached generic plan would read all of them (ADR 0013).
    #[must_use]
    #[cfg_attr(not(feature = "flow"), allow(dead_code))]
    pub(crate) fn plan_each(mut self) -> Self {
        self.plan_each = true;
        self
    }
}

/// The events of a [`read_all`](Store::read_all) and the cursor to append after.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadResult {
    /// The events, in read order.
    pub events: Vec<SequencedEvent>,
    /// What the read saw; use it as [`AppendCondition::after`](crate::AppendCondition::after).
    pub cursor: Cursor,
}

/// A stream of events read from the store, row by row (constant memory).
///
/// It holds a pooled connection and an in-flight permit until dropped. Once it has
/// started, [`cursor`](Self::cursor) tells what the caller has seen so far: the last
/// position it was handed plus the snapshot the read ran in. That cursor is what an
/// append condition protecting a decision based on these events needs.
#[must_use = "streams do nothing unless polled"]
pub struct EventStream {
    rows: Pin<Box<RowStream>>,
    client: Option<deadpool_postgres::Object>,
    _permit: OwnedSemaphorePermit,
    snapshot: Option<Snapshot>,
    position: Option<Position>,
    backwards: bool,
    finished: bool,
    /// The read covers every matching event up to the log's head as of its
    /// snapshot (forward, no limit, no upper bound).
    whole: bool,
    /// The last position allocated when the read ran (the visible head, or past it
    /// by positions of transactions the read's snapshot does not see).
    head: Option<i64>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("position", &self.position)
            .field("snapshot", &self.snapshot)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl EventStream {
    fn new(
        rows: RowStream,
        client: Option<deadpool_postgres::Object>,
        permit: OwnedSemaphorePermit,
        options: &ReadOptions,
    ) -> Self {
        EventStream {
            rows: Box::pin(rows),
            client,
            _permit: permit,
            snapshot: None,
            position: options.after,
            backwards: options.backwards,
            finished: false,
            whole: !options.backwards && options.limit.is_none() && options.up_to.is_none(),
            head: None,
        }
    }

    /// The cursor covering what this stream has yielded so far, or `None` before the
    /// read's snapshot has arrived (it comes ahead of the first event, and at the
    /// latest when the stream ends).
    ///
    /// For a forward read this is the last yielded position; for a backwards read the
    /// first (newest) one. With nothing yielded it is the read's `after` option.
    /// Once a forward read without `limit` or `up_to` has ended, it is the last
    /// position allocated when the read ran: every matching event up to there that
    /// the snapshot sees was yielded, and those it does not see (in flight, or
    /// written later) are caught by the snapshot itself. An append
    /// condition after a cursor close to the head is the cheapest to check.
    pub fn cursor(&self) -> Option<Cursor> {
        self.snapshot.as_ref().map(|s| Cursor {
            position: self.position,
            snapshot: Some(s.clone()),
        })
    }

    /// `true` once the stream has returned its last event.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Reads the remaining events into a `Vec` and returns them with the final cursor.
    ///
    /// # Errors
    /// Database errors while reading.
    pub async fn collect_all(mut self) -> Result<ReadResult> {
        let mut events = Vec::new();
        while let Some(e) = self.try_next().await? {
            events.push(e);
        }
        let cursor = self.final_cursor();
        Ok(ReadResult { events, cursor })
    }

    /// Consumes the rest of the stream, **counting it as seen**, and returns the
    /// final cursor. Use it when the remaining events cannot change the decision
    /// (for example "does any such event exist?" after the first one).
    ///
    /// # Errors
    /// Database errors while reading.
    pub async fn drain_cursor(&mut self) -> Result<Cursor> {
        while self.try_next().await?.is_some() {}
        Ok(self.final_cursor())
    }

    fn final_cursor(&self) -> Cursor {
        self.cursor()
            .expect("the snapshot row arrives before the end of the stream")
    }
}

impl Stream for EventStream {
    type Item = Result<SequencedEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            let row = match ready!(self.rows.as_mut().poll_next(cx)) {
                None => {
                    self.finished = true;
                    if self.whole
                        && let Some(head) = self.head
                        && self.position.is_none_or(|p| p.0 < head)
                    {
                        self.position = Some(Position(head));
                    }
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    self.finished = true;
                    let e = Error::from_db(e);
                    if e.breaks_connection()
                        && let Some(client) = self.client.take()
                    {
                        drop(deadpool_postgres::Object::take(client));
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Ok(row)) => row,
            };
            match decode(&row) {
                Ok(Decoded::Snapshot(s, head)) => {
                    self.snapshot = Some(s);
                    self.head = head;
                }
                Ok(Decoded::Event(e)) => {
                    if !self.backwards || self.position.is_none_or(|p| e.position > p) {
                        self.position = Some(e.position);
                    }
                    return Poll::Ready(Some(Ok(e)));
                }
                Err(e) => {
                    self.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

enum Decoded {
    /// The read's snapshot and the log's head in it.
    Snapshot(Snapshot, Option<i64>),
    Event(SequencedEvent),
}

fn decode(row: &Row) -> Result<Decoded> {
    let position: Option<i64> = row.try_get(0)?;
    let Some(position) = position else {
        let text: String = row.try_get(2)?;
        let snapshot = text.parse().map_err(|e: super::ParseCursorError| {
            Error::Config(format!("unexpected snapshot from the server: {e}"))
        })?;
        // The head travels in the snapshot row's `data` column (see `read_sql`).
        let head: Option<serde_json::Value> = row.try_get(4)?;
        return Ok(Decoded::Snapshot(
            snapshot,
            head.as_ref().and_then(serde_json::Value::as_i64),
        ));
    };
    // Payloads the store refused to write (nested past what JSON parsers read)
    // can only come from around its checks; name the event instead of failing
    // with a bare driver error.
    let unreadable = |field: &'static str| {
        move |e: tokio_postgres::Error| Error::Unreadable {
            position: Position(position),
            reason: format!(
                "{field}: {}",
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string)
            ),
        }
    };
    Ok(Decoded::Event(SequencedEvent {
        position: Position(position),
        transaction_id: row.try_get(1)?,
        recorded_at: row.try_get(7)?,
        event: Event {
            event_type: row.try_get(2)?,
            tags: row.try_get(3)?,
            data: row.try_get(4).map_err(unreadable("data"))?,
            metadata: row.try_get(5).map_err(unreadable("metadata"))?,
            id: row.try_get(6)?,
        },
    }))
}

impl Store {
    /// Streams the events matching `query`, in position order (or newest first).
    ///
    /// The rows come from the server as the stream is polled: memory stays constant
    /// however many events match. One statement, one snapshot: the events and the
    /// cursor are consistent with each other.
    ///
    /// ```no_run
    /// # async fn demo(store: dcbflow::Store) -> dcbflow::Result<()> {
    /// use dcbflow::{Query, ReadOptions};
    /// use futures::TryStreamExt;
    ///
    /// let mut stream = store.read(&Query::all(), ReadOptions::default()).await?;
    /// while let Some(event) = stream.try_next().await? {
    ///     println!("{} {}", event.position, event.event_type());
    /// }
    /// let cursor = stream.cursor();
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for empty types or tags in the query or a zero limit;
    /// [`Error::Overloaded`]; database and pool errors. Errors while streaming come
    /// as stream items.
    #[tracing::instrument(name = "dcbflow.read", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema, db.operation.name = "read", items = query.items().len()))]
    pub async fn read(&self, query: &Query, options: ReadOptions) -> Result<EventStream> {
        self.check_read(query, &options)?;
        let permit = self.permit()?;
        let deadline = self.deadline();
        let client = self.checkout(deadline).await?;
        let (sql, params) = self.read_sql(query, &options);
        let started = self
            .bounded(deadline, async {
                let stmt = client.prepare_cached(&sql).await?;
                if options.plan_each {
                    // An unnamed statement, planned for its own bounds: for a
                    // catch-up read of a large instance (ADR 0013), a cached
                    // generic plan does not know that the position bound leaves
                    // a few rows, so it reads every event of the tag (2,000 for
                    // a 1,000-item fan-out) and filters them; the custom plan
                    // intersects the tag index with the position and
                    // transaction ranges. Same round trips: the types come from
                    // the cached statement.
                    let typed = params
                        .iter()
                        .zip(stmt.params())
                        .map(|(p, t)| (&**p as &(dyn ToSql + Sync), t.clone()));
                    return Ok(client.query_typed_raw(&sql, typed).await?);
                }
                Ok(client
                    .query_raw(&stmt, params.iter().map(|p| &**p as &(dyn ToSql + Sync)))
                    .await?)
            })
            .await;
        let rows = match started {
            Ok(rows) => rows,
            Err(e) => return super::release(client, Err(e)),
        };
        Ok(EventStream::new(rows, Some(client), permit, &options))
    }

    /// Like [`read`](Self::read), inside the caller's transaction: the read sees the
    /// transaction's own writes, and under READ COMMITTED a snapshot taken now.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    #[tracing::instrument(name = "dcbflow.read_in_tx", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema, db.operation.name = "read", items = query.items().len()))]
    pub async fn read_in_tx(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        query: &Query,
        options: ReadOptions,
    ) -> Result<EventStream> {
        self.check_read(query, &options)?;
        let permit = self.permit()?;
        let (sql, params) = self.read_sql(query, &options);
        let stmt = tx.prepare_cached(&sql).await?;
        let rows = tx
            .query_raw(&stmt, params.iter().map(|p| &**p as &(dyn ToSql + Sync)))
            .await?;
        Ok(EventStream::new(rows, None, permit, &options))
    }

    /// Checks a query's types and tags against the limits.
    pub(crate) fn check_query(&self, query: &Query) -> Result<()> {
        Ok(validate::query(query, &self.inner.limits)?)
    }

    fn check_read(&self, query: &Query, options: &ReadOptions) -> Result<()> {
        self.check_query(query)?;
        match options.limit {
            Some(0) => return Err(InvalidInput::Option("a read limit must be at least 1").into()),
            Some(n) if n > i64::MAX as u64 => {
                return Err(InvalidInput::Option("a read limit must be at most 2^63 - 1").into());
            }
            _ => {}
        }
        if options.after.is_some_and(|p| p.0 < 0) || options.up_to.is_some_and(|p| p.0 < 0) {
            return Err(InvalidInput::Option("read positions must not be negative").into());
        }
        if let (Some(after), Some(up_to)) = (options.after, options.up_to)
            && up_to < after
        {
            return Err(InvalidInput::Option("a read's up_to must not be below its after").into());
        }
        if options.backwards && options.unseen_by.is_some() {
            return Err(
                InvalidInput::Option("an unseen_by read reads forwards, not backwards").into(),
            );
        }
        Ok(())
    }

    /// Reads all matching events into memory. Prefer [`read`](Self::read) for large results.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub async fn read_all(&self, query: &Query, options: ReadOptions) -> Result<ReadResult> {
        self.read(query, options).await?.collect_all().await
    }

    /// The newest event matching `query`, if any.
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub async fn read_last(&self, query: &Query) -> Result<Option<SequencedEvent>> {
        let mut stream = self
            .read(query, ReadOptions::default().backwards().limit(1))
            .await?;
        stream.try_next().await
    }

    /// How many events match `query` after `after`, and when the oldest of them
    /// was recorded (a subscription's backlog).
    pub(crate) async fn backlog(
        &self,
        query: &Query,
        after: Position,
    ) -> Result<(i64, Option<chrono::DateTime<chrono::Utc>>)> {
        self.check_query(query)?;
        let (filter, params) = filter_sql(query, &ReadOptions::default().after(after));
        let deadline = self.deadline();
        let client = self.checkout(deadline).await?;
        let result = self
            .bounded(deadline, async {
                let row = client
                    .query_one(
                        &format!(
                            "SELECT count(*), min(recorded_at) FROM {} WHERE {filter}",
                            self.inner.sql.events
                        ),
                        &params.iter().map(|p| &**p as _).collect::<Vec<_>>(),
                    )
                    .await?;
                Ok((row.get(0), row.get(1)))
            })
            .await;
        super::release(client, result)
    }

    fn read_sql(
        &self,
        query: &Query,
        options: &ReadOptions,
    ) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let (filter, mut params) = filter_sql(query, options);
        let order = if options.backwards { "DESC" } else { "ASC" };
        // A parameter, not text: one prepared statement serves every limit (a
        // limit in the text would grow the per-connection statement cache without
        // bound).
        let limit = match options.limit {
            Some(n) => {
                params.push(Box::new(n as i64));
                format!(" LIMIT ${}", params.len())
            }
            None => String::new(),
        };
        let sql = format!(
            "(SELECT NULL::bigint, NULL::xid8, pg_current_snapshot()::text, NULL::text[], \
                     to_jsonb(pg_sequence_last_value('\"{1}\".events_position_seq'::regclass)), \
                     NULL::jsonb, NULL::uuid, NULL::timestamptz) \
             UNION ALL \
             (SELECT position, transaction_id, type, tags, data, metadata, id, recorded_at FROM {0} \
              WHERE {filter} ORDER BY position {order}{limit})",
            self.inner.sql.events, self.inner.schema
        );
        (sql, params)
    }
}

/// Parameters of a generated statement.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// The `WHERE` clause (and its parameters, numbered from `$1`) selecting the events
/// that match `query` within the position bounds of `options`.
fn filter_sql(query: &Query, options: &ReadOptions) -> (String, Params) {
    let mut params: Params = Vec::new();
    let mut filter = String::new();
    // Only the bound a read starts from is indexable (`+ 0` hides the other): with
    // both, a generic plan bitmap-scans the whole range and sorts it to return the
    // first rows of a LIMIT, instead of walking the index from the start bound.
    let (after_col, up_to_col) = if options.backwards {
        ("position + 0", "position")
    } else {
        ("position", "position + 0")
    };
    match (options.after, &options.unseen_by) {
        (Some(after), Some(snapshot)) => {
            // Transactions not visible in the snapshot all have ids at or
            // above its xmin: the transaction index finds their events.
            params.push(Box::new(after.0));
            params.push(Box::new(snapshot.clone()));
            let _ = write!(
                filter,
                "({after_col} > $1 OR (transaction_id >= pg_snapshot_xmin($2::text::pg_snapshot) \
                 AND NOT pg_visible_in_snapshot(transaction_id, $2::text::pg_snapshot))) AND "
            );
        }
        (Some(after), None) => {
            params.push(Box::new(after.0));
            let _ = write!(filter, "{after_col} > $1 AND ");
        }
        _ => {}
    }
    if let Some(up_to) = options.up_to {
        params.push(Box::new(up_to.0));
        let _ = write!(filter, "{up_to_col} <= ${} AND ", params.len());
    }
    if query.is_empty() {
        filter.push_str("false");
    } else if query.is_all() {
        filter.push_str("true");
    } else {
        filter.push('(');
        for (i, item) in query.items().iter().enumerate() {
            if i > 0 {
                filter.push_str(" OR ");
            }
            filter.push('(');
            // With tags, the tag index leads and the type is a filter
            // (`type || ''` is not indexable): see sql/store/0002_append.sql.
            if !item.tags.is_empty() {
                params.push(Box::new(item.tags.clone()));
                let _ = write!(filter, "tags @> ${}::text[]", params.len());
            }
            if !item.types.is_empty() {
                params.push(Box::new(item.types.clone()));
                if item.tags.is_empty() {
                    let _ = write!(filter, "type = ANY(${})", params.len());
                } else {
                    let _ = write!(filter, " AND type || '' = ANY(${})", params.len());
                }
            }
            filter.push(')');
        }
        filter.push(')');
    }
    (filter, params)
}
