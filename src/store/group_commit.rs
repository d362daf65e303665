//! Group commit: concurrent appends of one process batched into shared
//! transactions.
//!
//! An append that finds no other append of this handle in flight runs at once,
//! the ordinary way: a lone writer pays nothing for batching. Otherwise it
//! queues, and one of the writer tasks (two by default) takes the requests
//! waiting (up to `max_batch`) and commits them together:
//!
//! 1. It takes the union of the requests' scope locks, in key order, in one
//!    statement: shared on the store key and on every type and tag written,
//!    exclusive on what each condition locks, exactly as the requests would one
//!    by one. Batches and single appends of disjoint scopes therefore run side
//!    by side, in this process and in others, and share their commits' WAL
//!    flushes; a writer of a matching event waits for the batch as it would for
//!    a single append. A union above [`MAX_BATCH_LOCKS`] keys takes the store
//!    lock exclusively instead, which waits for every writer in flight.
//! 2. Requests whose event ids are stored already are replays; ids repeated inside
//!    the batch make the later request a replay of the earlier one. (A writer of
//!    the same ids racing the batch makes the insert fail on the unique index:
//!    the batch is retried one by one, below.)
//! 3. Each condition is checked against the log (`condition_conflict`, one pipelined
//!    statement per conditional request) after the locks are granted and, in
//!    memory with the store's matching rules, against the events of the requests
//!    accepted before it in this batch. A failing condition fails its request alone.
//! 4. All accepted events go in with **one** multi-row `INSERT`, one commit, one
//!    wake-up after it. The `BEGIN` and the locks, the checks, and the insert and
//!    the commit are each one round trip (pipelined). A batch with no condition,
//!    cursor or id anywhere is one statement: the plain `INSERT` of a single
//!    append, with all the events and the union of the locks.
//!
//! While one writer waits for its commit's flush, the next takes the following
//! batch. If anything fails with an error, the batch is rolled back and its
//! requests run one by one the ordinary way, so a bad request fails alone.

/// Most lock keys a batch takes one by one before it takes the store lock
/// exclusively instead (PostgreSQL's lock table is shared by all sessions).
pub(crate) const MAX_BATCH_LOCKS: usize = 512;

/// A cursor at most this many positions behind the head is near: the events
/// after it are scanned (the same bound as `append_checked`'s).
const NEAR: i64 = 64;
/// Most events after a near cursor that the scan looks at; with more, the
/// planned check decides.
const WINDOW: i64 = 128;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::join_all;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::append::{PreparedAppend, decode};
use super::error::{Error, InvalidInput, Result};
use super::wake::Waker;
use super::{AppendResult, Event, Pool, Position, TransactionId};

struct Request {
    append: PreparedAppend,
    reply: oneshot::Sender<Result<AppendResult>>,
}

/// The queue to the writer task; the task ends when the store is dropped.
pub(crate) struct GroupCommit {
    sender: mpsc::Sender<Request>,
    /// Appends of this handle in flight, run at once or queued.
    active: Arc<AtomicUsize>,
}

/// An append's place: alone (run it the ordinary way) or behind others (queue
/// it). Counted in [`GroupCommit::active`] until dropped.
pub(crate) struct Entry {
    active: Arc<AtomicUsize>,
    pub(crate) alone: bool,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every writer task of a store handle uses.
pub(crate) struct Writer {
    pub(crate) pool: Pool,
    pub(crate) schema: String,
    /// The statement of a single append (`append_checked`).
    pub(crate) append_sql: String,
    /// The plain `INSERT` of an unconditional append.
    pub(crate) plain_sql: String,
    pub(crate) waker: Waker,
    /// The store lock's key.
    pub(crate) store_key: i64,
    pub(crate) max_batch: usize,
}

impl GroupCommit {
    /// Starts `writers` writer tasks sharing one queue.
    pub(crate) fn start(writer: Writer, writers: usize) -> Self {
        let (sender, receiver) = mpsc::channel(writer.max_batch * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let max_batch = writer.max_batch;
        let writer = Arc::new(writer);
        for n in 0..writers.max(1) {
            let span = tracing::debug_span!("dcbflow.group_commit", db.system.name = "postgresql", db.namespace = %writer.schema, max_batch, writer = n);
            tokio::spawn(tracing::Instrument::instrument(
                writer.clone().run(receiver.clone()),
                span,
            ));
        }
        GroupCommit {
            sender,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Counts an append in, and says whether it is alone.
    pub(crate) fn enter(&self) -> Entry {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        Entry {
            active: self.active.clone(),
            alone: before == 0,
        }
    }

    pub(crate) async fn append(&self, append: PreparedAppend) -> Result<AppendResult> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Config("the group-commit writer has stopped".into());
        self.sender
            .send(Request { append, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// What became of one request of a batch.
enum Fate {
    /// Its events are inserted at `start..start + len` of the batch insert.
    Insert { start: usize, len: usize },
    /// A replay of stored events.
    Stored(AppendResult),
    /// A replay of request `0` of this batch.
    SameAs(usize),
    /// Its condition matched a stored event.
    Conflict(Position),
    /// Its condition matched event `.0` of the batch insert.
    ConflictWithBatch(usize),
    /// Refused.
    Invalid(InvalidInput),
}

impl Writer {
    async fn run(self: Arc<Self>, receiver: Arc<Mutex<mpsc::Receiver<Request>>>) {
        loop {
            // One writer at a time takes a batch; the others meanwhile commit theirs.
            let batch = {
                let mut receiver = receiver.lock().await;
                let Some(first) = receiver.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                // Take what is queued; yield a few times so appenders woken by the
                // previous batch's replies can queue their next request too.
                for _ in 0..4 {
                    while batch.len() < self.max_batch {
                        match receiver.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    if batch.len() >= self.max_batch {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                batch
            };
            tracing::trace!(size = batch.len(), "group commit");
            match self.together(&batch).await {
                Ok(results) => {
                    for (r, result) in batch.into_iter().zip(results) {
                        let _ = r.reply.send(result);
                    }
                }
                Err(Failed::Unknown(message)) => {
                    for r in batch {
                        let _ = r.reply.send(Err(Error::CommitUnknown(message.clone())));
                    }
                }
                Err(Failed::Retry(e)) => {
                    tracing::debug!(error = %e, "group commit failed, appending one by one");
                    self.one_by_one(batch).await;
                }
            }
        }
    }

    /// Runs the batch on one connection; on failure the connection is rolled back,
    /// or dropped if even that fails.
    async fn together(
        &self,
        batch: &[Request],
    ) -> std::result::Result<Vec<Result<AppendResult>>, Failed> {
        let client = self.pool.get().await.map_err(Failed::retry)?;
        if batch.iter().all(|r| r.append.is_plain()) {
            return self.plain(&client, batch).await;
        }
        let result = self.in_transaction(&client, batch).await;
        if result.is_err() && client.batch_execute("ROLLBACK").await.is_err() {
            drop(deadpool_postgres::Object::take(client));
        }
        result
    }

    async fn in_transaction(
        &self,
        tx: &deadpool_postgres::Object,
        batch: &[Request],
    ) -> std::result::Result<Vec<Result<AppendResult>>, Failed> {
        // One round trip: begin, and take the batch's scope locks.
        //
        // The batch's own statements are client-side prepared and cached per
        // connection, so PostgreSQL plans them generically after a few calls
        // and keeps that plan until the table's statistics change. Planned
        // while the store is small (a new store, autovacuum off or not yet
        // run), the window after the cursor became a sequential scan and a
        // sort, kept as the table grew: every conditional batch then read the
        // whole log. With sequential scans off for the transaction, as for
        // the append functions (migration 6), each statement takes its index
        // at any size; where no index applies the planner still scans.
        let (keys, modes) = union_of_locks(batch, self.store_key);
        let lock = tx
            .prepare_cached(
                "SELECT count(CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.key) \
                                   ELSE pg_advisory_xact_lock_shared(l.key) END) \
                   FROM unnest($1::bigint[], $2::bool[]) AS l(key, exclusive)",
            )
            .await
            .map_err(Failed::retry)?;
        let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&keys, &modes];
        let (begun, locked) = futures::join!(
            tx.batch_execute("BEGIN; SET LOCAL enable_seqscan = off"),
            tx.execute(&lock, &lock_params)
        );
        begun.map_err(Failed::retry)?;
        locked.map_err(Failed::retry)?;
        let events = format!("\"{}\".events", self.schema);

        // 2. Replays of stored events.
        let ids: Vec<Uuid> = batch
            .iter()
            .flat_map(|r| r.append.cols.ids.iter().flatten().copied())
            .collect();
        let mut stored: HashMap<Uuid, (i64, TransactionId)> = HashMap::new();
        if !ids.is_empty() {
            let sql =
                format!("SELECT id, position, transaction_id FROM {events} WHERE id = ANY($1)");
            for row in tx.query(&sql, &[&ids]).await.map_err(Failed::retry)? {
                stored.insert(row.get(0), (row.get(1), row.get(2)));
            }
        }

        let match_events = format!(
            "SELECT \"{}\".stored_events_match($1, $2, $3, $4, $5, $6, $7)",
            self.schema
        );

        // 3a. Conditions against the log, pipelined.
        let check = tx
            .prepare_cached(&format!(
                "SELECT \"{0}\".condition_conflict($1, $2, $3::text::pg_snapshot), \"{0}\".allocated_head()",
                self.schema
            ))
            .await
            .map_err(Failed::retry)?;
        // The common case first, as plain SQL: one item with tags, a cursor
        // without a snapshot, few events after it. The events after the cursor
        // (at most WINDOW, by primary key) decide if they are all of them, as
        // in `append_checked`; otherwise `condition_conflict` does.
        let window = tx
            .prepare_cached(&format!(
                "SELECT h.head, h.head - $1 <= {NEAR}, w.conflict, w.full \
                   FROM (SELECT coalesce(pg_sequence_last_value('\"{0}\".events_position_seq'::regclass), 0) AS head) h, \
                        LATERAL (SELECT min(x.position) FILTER (WHERE x.tags @> $2 \
                                         AND (cardinality($3::text[]) = 0 OR x.type = ANY($3))) AS conflict, \
                                        count(*) >= {WINDOW} AS full \
                                   FROM (SELECT e.position, e.type, e.tags FROM \"{0}\".events e \
                                          WHERE e.position > $1 AND h.head - $1 <= {NEAR} \
                                          ORDER BY e.position LIMIT {WINDOW}) x) w",
                self.schema
            ))
            .await
            .map_err(Failed::retry)?;
        let beyond = |after: Option<i64>, head: i64| match after {
            // Read after the locks: a cursor beyond it cannot come from a read.
            Some(after) if after > head => Some(InvalidInput::BeyondHead {
                position: Position(after),
                head: Position(head),
            }),
            _ => None,
        };
        let checks = join_all(batch.iter().map(|r| {
            let a = &r.append;
            let (check, window, tx) = (&check, &window, &tx);
            async move {
                if a.condition.is_none() && a.after.is_none() {
                    return Ok::<_, tokio_postgres::Error>(None);
                }
                if let (Some(tags), Some(types), None, Some(after)) =
                    (&a.item_tags, &a.item_types, &a.snapshot, a.after)
                {
                    let row = tx.query_one(window, &[&after, tags, types]).await?;
                    let head: i64 = row.get(0);
                    if let Some(invalid) = beyond(a.after, head) {
                        return Ok(Some(Err(invalid)));
                    }
                    let (near, full): (bool, bool) = (row.get(1), row.get(3));
                    if near && !full {
                        return Ok(row.get::<_, Option<i64>>(2).map(Ok));
                    }
                }
                let row = tx
                    .query_one(check, &[&a.condition, &a.after, &a.snapshot])
                    .await?;
                Ok(match beyond(a.after, row.get(1)) {
                    Some(invalid) => Some(Err(invalid)),
                    None => row.get::<_, Option<i64>>(0).map(Ok),
                })
            }
        }))
        .await;

        // 3b. In order: decide each request's fate.
        let mut fates = Vec::with_capacity(batch.len());
        let mut accepted: Vec<(usize, usize)> = Vec::new(); // (request, first event index)
        let mut batch_ids: HashMap<Uuid, usize> = HashMap::new();
        let mut inserted = 0;
        for (i, (r, check)) in batch.iter().zip(checks).enumerate() {
            let a = &r.append;
            let own_ids: Vec<Uuid> = a.cols.ids.iter().flatten().copied().collect();
            if !own_ids.is_empty() {
                let in_store = own_ids.iter().filter(|id| stored.contains_key(id)).count();
                let in_batch: Vec<usize> = own_ids
                    .iter()
                    .filter_map(|id| batch_ids.get(id).copied())
                    .collect();
                if in_store == own_ids.len() {
                    // The same comparison as a single append's (jsonb equality,
                    // so 10 and 10.0 are the same number).
                    let c = &a.cols;
                    let differs: i32 = tx
                        .query_one(
                            &match_events,
                            &[
                                &c.types,
                                &c.tags,
                                &c.tag_starts,
                                &c.tag_counts,
                                &c.data,
                                &c.metadata,
                                &c.ids,
                            ],
                        )
                        .await
                        .map_err(Failed::retry)?
                        .get(0);
                    if differs > 0 {
                        fates.push(Fate::Invalid(InvalidInput::IdReused {
                            index: differs as usize - 1,
                        }));
                        continue;
                    }
                    let mut found: Vec<(i64, TransactionId)> =
                        own_ids.iter().map(|id| stored[id]).collect();
                    found.sort();
                    fates.push(Fate::Stored(AppendResult {
                        positions: found.iter().map(|(p, _)| Position(*p)).collect(),
                        transaction_id: found[0].1,
                        replayed: true,
                    }));
                    continue;
                }
                if in_batch.len() == own_ids.len() && in_batch.iter().all(|j| *j == in_batch[0]) {
                    fates.push(Fate::SameAs(in_batch[0]));
                    continue;
                }
                if in_store > 0 || !in_batch.is_empty() {
                    fates.push(Fate::Invalid(InvalidInput::IdsAlreadyStored));
                    continue;
                }
            }
            match check.map_err(Failed::retry)? {
                Some(Ok(p)) => {
                    fates.push(Fate::Conflict(Position(p)));
                    continue;
                }
                Some(Err(invalid)) => {
                    fates.push(Fate::Invalid(invalid));
                    continue;
                }
                None => {}
            }
            if let Some(q) = &a.query
                && let Some(hit) = accepted.iter().find_map(|&(j, first)| {
                    let b = &batch[j].append.cols;
                    (0..b.types.len())
                        .find(|&k| q.matches(&event_shape(b, k)))
                        .map(|k| first + k)
                })
            {
                fates.push(Fate::ConflictWithBatch(hit));
                continue;
            }
            for id in &own_ids {
                batch_ids.insert(*id, i);
            }
            accepted.push((i, inserted));
            fates.push(Fate::Insert {
                start: inserted,
                len: a.cols.types.len(),
            });
            inserted += a.cols.types.len();
        }

        // 4. One insert, one notification, one commit.
        let mut positions = Vec::new();
        let mut xid = TransactionId(0);
        if inserted > 0 {
            let cols = concat(accepted.iter().map(|&(j, _)| &batch[j].append.cols));
            let insert = tx
                .prepare_cached(&format!(
                    "INSERT INTO {events} (transaction_id, type, tags, data, metadata, id) \
                     SELECT pg_current_xact_id(), e.type, ($2::text[])[e.tag_start : e.tag_start + e.tag_count - 1], \
                            e.data, e.metadata, e.id \
                       FROM unnest($1::text[], $3::int[], $4::int[], $5::jsonb[], $6::jsonb[], $7::uuid[]) \
                            WITH ORDINALITY AS e(type, tag_start, tag_count, data, metadata, id, ord) \
                      ORDER BY e.ord \
                     RETURNING position, transaction_id"
                ))
                .await
                .map_err(Failed::retry)?;
            // The insert and the commit in one round trip: if the insert
            // fails, the server turns the COMMIT into a rollback.
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                &cols.types,
                &cols.tags,
                &cols.tag_starts,
                &cols.tag_counts,
                &cols.data,
                &cols.metadata,
                &cols.ids,
            ];
            let (rows, commit) =
                futures::join!(tx.query(&insert, &params), tx.batch_execute("COMMIT"));
            let rows = rows.map_err(unless_lost)?;
            commit.map_err(|e| Failed::Unknown(describe(&e)))?;
            positions = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
            positions.sort_unstable();
            xid = rows[0].get(1);
        } else {
            tx.batch_execute("COMMIT")
                .await
                .map_err(|e| Failed::Unknown(describe(&e)))?;
        }
        // Subscribers are woken after the commit (see `wake`).
        if inserted > 0 {
            self.waker.wake();
        }

        let result_of = |fate: &Fate| -> Result<AppendResult> {
            match fate {
                Fate::Insert { start, len } => Ok(AppendResult {
                    positions: positions[*start..start + len]
                        .iter()
                        .map(|p| Position(*p))
                        .collect(),
                    transaction_id: xid,
                    replayed: false,
                }),
                Fate::Stored(r) => Ok(r.clone()),
                Fate::Conflict(p) => Err(Error::Conflict { position: *p }),
                Fate::ConflictWithBatch(k) => Err(Error::Conflict {
                    position: Position(positions[*k]),
                }),
                Fate::Invalid(e) => Err(e.clone().into()),
                Fate::SameAs(_) => unreachable!("resolved below"),
            }
        };
        Ok(fates
            .iter()
            .map(|f| match f {
                Fate::SameAs(j) => result_of(&fates[*j]).map(|r| AppendResult {
                    replayed: true,
                    ..r
                }),
                f => result_of(f),
            })
            .collect())
    }

    /// A batch of appends without conditions, cursors or ids: nothing to
    /// decide, so it is one plain `INSERT` of all their events under the union
    /// of their scope locks, committed with its statement.
    async fn plain(
        &self,
        client: &deadpool_postgres::Object,
        batch: &[Request],
    ) -> std::result::Result<Vec<Result<AppendResult>>, Failed> {
        let (keys, modes) = union_of_locks(batch, self.store_key);
        let cols = concat(batch.iter().map(|r| &r.append.cols));
        let stmt = client
            .prepare_cached(&self.plain_sql)
            .await
            .map_err(Failed::retry)?;
        let rows = client
            .query(
                &stmt,
                &[
                    &keys,
                    &modes,
                    &cols.types,
                    &cols.tags,
                    &cols.tag_starts,
                    &cols.tag_counts,
                    &cols.data,
                    &cols.metadata,
                ],
            )
            .await
            .map_err(unless_lost)?;
        if rows.is_empty() {
            // Not READ COMMITTED: nothing was written.
            return Ok(batch
                .iter()
                .map(|_| Err(InvalidInput::IsolationLevel.into()))
                .collect());
        }
        self.waker.wake();
        let xid: TransactionId = rows[0].get(1);
        let mut positions = rows.iter().map(|r| Position(r.get::<_, i64>(0)));
        Ok(batch
            .iter()
            .map(|r| {
                Ok(AppendResult {
                    positions: positions.by_ref().take(r.append.cols.types.len()).collect(),
                    transaction_id: xid,
                    replayed: false,
                })
            })
            .collect())
    }

    async fn one_by_one(&self, batch: Vec<Request>) {
        for r in batch {
            let result = async {
                let client = self.pool.get().await?;
                let stmt = client.prepare_cached(&self.append_sql).await?;
                let row = client
                    .query_one(&stmt, &r.append.params(true, &None, &0))
                    .await?;
                decode(&row)
            }
            .await;
            if matches!(&result, Ok(r) if !r.replayed) {
                self.waker.wake();
            }
            let _ = r.reply.send(result);
        }
    }
}

/// The scope locks of a batch: every request's, exclusive where any request's
/// is, sorted by key; or the store lock alone, exclusive, above
/// [`MAX_BATCH_LOCKS`] keys or when a request falls back to it.
fn union_of_locks(batch: &[Request], store_key: i64) -> (Vec<i64>, Vec<bool>) {
    let mut locks: BTreeMap<i64, bool> = BTreeMap::new();
    for r in batch {
        for (key, exclusive) in r.append.locks() {
            *locks.entry(key).or_insert(exclusive) |= exclusive;
        }
    }
    if locks.len() > MAX_BATCH_LOCKS || locks.get(&store_key) == Some(&true) {
        return (vec![store_key], vec![true]);
    }
    locks.into_iter().unzip()
}

/// Event `k` of a request, as far as matching needs it (type and tags).
fn event_shape(c: &super::validate::Columns, k: usize) -> Event {
    let start = (c.tag_starts[k] - 1) as usize;
    let tags = c.tags[start..start + c.tag_counts[k] as usize].to_vec();
    Event::new(c.types[k].clone(), tags, serde_json::Value::Null)
}

/// The columns of several requests as one insert (tag offsets renumbered).
fn concat<'a>(parts: impl Iterator<Item = &'a super::validate::Columns>) -> ConcatColumns<'a> {
    let mut out = ConcatColumns::default();
    for c in parts {
        for k in 0..c.types.len() {
            out.tag_starts.push(out.tags.len() as i32 + 1);
            out.tag_counts.push(c.tag_counts[k]);
            let start = (c.tag_starts[k] - 1) as usize;
            out.tags.extend(
                c.tags[start..start + c.tag_counts[k] as usize]
                    .iter()
                    .map(String::as_str),
            );
            out.types.push(c.types[k].as_str());
            out.data.push(&c.data[k]);
            out.metadata.push(c.metadata[k].as_ref());
            out.ids.push(c.ids[k]);
        }
    }
    out
}

#[derive(Default)]
struct ConcatColumns<'a> {
    types: Vec<&'a str>,
    tags: Vec<&'a str>,
    tag_starts: Vec<i32>,
    tag_counts: Vec<i32>,
    data: Vec<&'a super::validate::RawJson>,
    metadata: Vec<Option<&'a super::validate::RawJson>>,
    ids: Vec<Option<Uuid>>,
}

/// An error's text with its SQLSTATE and the server's message, if any.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", e, db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

enum Failed {
    /// The batch did not commit: retry its requests one by one.
    Retry(Error),
    /// The commit failed; whether it happened is unknown.
    Unknown(String),
}

impl Failed {
    fn retry(e: impl Into<Error>) -> Failed {
        Failed::Retry(e.into())
    }
}

/// A statement that may have committed failed: an error the server reported
/// means it did not (retry one by one); a lost connection leaves it unknown.
fn unless_lost(e: tokio_postgres::Error) -> Failed {
    if e.as_db_error().is_some() {
        Failed::retry(e)
    } else {
        Failed::Unknown(describe(&e))
    }
}
