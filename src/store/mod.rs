//! The event store: conditional append, streaming read, schema migrations.
//!
//! The bottom layer. It knows nothing of the layers above; they use its public
//! API and a few crate-internal hooks (deferred wake-ups, the writer horizon,
//! lease keys, the migrator), all defined here.

mod append;
pub(crate) mod error;
mod event;
mod group_commit;
pub(crate) mod horizon;
mod locks;
pub(crate) mod migrate;
mod query;
mod read;
mod validate;
mod wake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

pub use append::AppendResult;
#[cfg(feature = "metrics")]
pub(crate) use append::{APPEND_DURATION_SECONDS, APPENDS_TOTAL};
pub use error::{Error, InvalidInput, Result, sqlstate};
pub use event::{Event, Position, SequencedEvent, TransactionId};
pub use migrate::{LayerStatus, MigrationStatus};
pub use query::{AppendCondition, Cursor, ParseCursorError, Query, QueryItem, Snapshot};
pub use read::{EventStream, ReadOptions, ReadResult};

/// How often [`Store::settled_head`] looks whether the writers it waits for have ended.
const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(2);

/// The largest group-commit batch of a store handle unless
/// [`StoreBuilder::group_commit`] says otherwise.
pub const DEFAULT_GROUP_COMMIT: usize = 128;

/// Default schema a store is installed into.
pub const DEFAULT_SCHEMA: &str = "dcbflow";

/// Input limits, checked before anything is sent to the database.
///
/// | limit | default |
/// |---|---|
/// | `max_events_per_append` | 10,000 |
/// | `max_payload_bytes` (serialized data + metadata of one event) | 1 MiB |
/// | `max_type_len` (bytes) | 256 |
/// | `max_tag_len` (bytes) | 512 |
/// | `max_tags_per_event` | 64 |
/// | `max_lock_keys` (scope locks one append takes before falling back to one store-wide exclusive lock) | 128 |
/// | `max_append_bytes` (serialized data, metadata, types and tags of all events of one append) | 32 MiB |
/// | `max_json_depth` (nesting of data and metadata; readers parse up to 128) | 64 |
/// | `max_query_items` (items of one query or condition) | 512 |
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Most events one append may carry.
    pub max_events_per_append: usize,
    /// Largest serialized data plus metadata of one event, in bytes.
    pub max_payload_bytes: usize,
    /// Longest event type, in bytes.
    pub max_type_len: usize,
    /// Longest tag, in bytes.
    pub max_tag_len: usize,
    /// Most tags on one event.
    pub max_tags_per_event: usize,
    /// Most scope locks one append takes; above this it takes one store-wide
    /// exclusive lock instead, so a large import cannot exhaust PostgreSQL's lock table.
    pub max_lock_keys: usize,
    /// Largest total of one append: serialized data and metadata, types and tags
    /// of all its events, in bytes.
    pub max_append_bytes: usize,
    /// Deepest nesting of an event's data or metadata. Whatever the store accepts
    /// it must be able to read back, and JSON parsers (serde_json's included) stop
    /// at 128 levels.
    pub max_json_depth: usize,
    /// Most items in one query or condition.
    pub max_query_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_events_per_append: 10_000,
            max_payload_bytes: 1 << 20,
            max_type_len: 256,
            max_tag_len: 512,
            max_tags_per_event: 64,
            max_lock_keys: 128,
            max_append_bytes: 32 << 20,
            max_json_depth: 64,
            max_query_items: 512,
        }
    }
}

/// A handle to one event store: a schema in a PostgreSQL database, reached through a
/// connection pool. Cheap to clone; clones share the pool and the in-flight limit.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    schema: String,
    limits: Limits,
    max_in_flight: usize,
    in_flight: Arc<Semaphore>,
    listen: Option<tokio_postgres::Config>,
    group_commit: Option<group_commit::GroupCommit>,
    waker: wake::Waker,
    sql: Sql,
    /// Whether `build` migrates (and so whether upper layers install their schema).
    migrate: bool,
    /// The longest a transaction that appended or locked a scope may stay idle (and
    /// its statements run, unless it set its own `statement_timeout`), in ms.
    hold_ms: i32,
    /// The longest one call to the database may take (see [`StoreBuilder::call_timeout`]).
    call_timeout: std::time::Duration,
    /// The layers whose schema this handle has installed or found current.
    layers: Mutex<HashMap<&'static str, Arc<OnceCell<()>>>>,
    /// The `NOTIFY` channel of this store (see [`Store::channel`]).
    channel: String,
    /// Times a subscription's `LISTEN` connection was reopened.
    listen_reconnects: std::sync::atomic::AtomicU64,
    /// The `LISTEN` connection and horizon watcher shared by this handle's
    /// subscriptions, while any exists (see [`horizon`]).
    feed: horizon::FeedSlot,
}

/// Counters of a store handle (and its clones), for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StoreStats {
    /// Times a subscription's dedicated `LISTEN` connection was lost and reopened.
    pub listen_reconnects: u64,
    /// Wake-up notifications sent after appends (one covers every append that
    /// finished while it was in flight).
    pub wakeups_sent: u64,
    /// Wake-ups not sent because no connection listened on the channel.
    pub wakeups_skipped: u64,
}

/// SQL texts with the schema name filled in, built once per store.
struct Sql {
    append: String,
    append_plain: String,
    /// `append_one[n - 1]`: the unconditional append of one event whose scope
    /// locks are `n` shared locks (see [`append::ONE_EVENT_MAX_LOCKS`]).
    append_one: Vec<String>,
    head: String,
    events: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("schema", &self.inner.schema)
            .field("limits", &self.inner.limits)
            .field("max_in_flight", &self.inner.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `url` (a `postgres://` URL or key=value string) with a pool of
    /// default size, installs or upgrades the schema [`DEFAULT_SCHEMA`], and returns the store.
    ///
    /// ```no_run
    /// # async fn demo() -> dcbflow::Result<()> {
    /// let store = dcbflow::Store::connect("postgres://postgres@localhost/postgres").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// A malformed URL ([`Error::Config`]), an unreachable server, or a failed migration.
    pub async fn connect(url: &str) -> Result<Store> {
        Store::builder_for_url(url, None)?.build().await
    }

    /// A builder with a pool of `pool_size` connections to `url` (default size:
    /// deadpool's) and the same URL for the dedicated connection subscriptions use
    /// to `LISTEN` for new events.
    ///
    /// # Errors
    /// [`Error::Config`] for a malformed URL.
    pub fn builder_for_url(url: &str, pool_size: Option<usize>) -> Result<StoreBuilder> {
        Ok(Store::builder(pool_from_url(url, pool_size)?).listen_config(hardened(parse_url(url)?)))
    }

    /// A builder for a store on an existing pool.
    pub fn builder(pool: Pool) -> StoreBuilder {
        StoreBuilder {
            pool,
            schema: DEFAULT_SCHEMA.to_owned(),
            limits: Limits::default(),
            max_in_flight: None,
            migrate: true,
            listen: None,
            group_commit: Some(DEFAULT_GROUP_COMMIT),
            group_commit_writers: 2,
            lock_hold_timeout: std::time::Duration::from_secs(60),
            call_timeout: std::time::Duration::from_secs(15),
        }
    }

    /// The schema this store lives in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The input limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Connection settings for dedicated (non-pooled) connections, if configured.
    pub(crate) fn listen_config(&self) -> Option<&tokio_postgres::Config> {
        self.inner.listen.as_ref()
    }

    /// The `NOTIFY` channel on which this store announces new events:
    /// `dcbflow_` and 16 hex digits of the SHA-256 of the schema name (channel
    /// names are database-wide, so every store has its own). Built once, here;
    /// appends, the wake-up task and subscribers all use it.
    /// A connection that `LISTEN`s on it directly (rather than through a
    /// [`Subscription`](crate::Subscription)) must also hold
    /// [`listen_lock_key`](Self::listen_lock_key) for its session.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The advisory lock key that every connection listening on
    /// [`channel`](Self::channel) holds shared for its session:
    /// `SELECT pg_advisory_lock_shared(key)` after `LISTEN`. Wake-ups are only
    /// sent while some connection other than this handle's own listener holds
    /// it (a store whose subscribers all run in this handle, or nowhere, spends
    /// no transaction on them: its own subscriptions are woken in memory); a
    /// listener that does not hold it may miss wake-ups, never events.
    pub fn listen_lock_key(&self) -> i64 {
        locks::key(&self.inner.schema, locks::Kind::Listen, "")
    }

    /// Counts one of this handle's own `LISTEN` connections while the guard
    /// lives (see `wake`).
    pub(crate) fn own_listener(&self) -> wake::OwnListener {
        self.inner.waker.own_listener()
    }

    /// Counters of this store handle and its clones.
    pub fn stats(&self) -> StoreStats {
        let (wakeups_sent, wakeups_skipped) = self.inner.waker.counts();
        StoreStats {
            listen_reconnects: self
                .inner
                .listen_reconnects
                .load(std::sync::atomic::Ordering::Relaxed),
            wakeups_sent,
            wakeups_skipped,
        }
    }

    /// `call`, failing with [`Error::Timeout`] if it has not ended by `deadline`
    /// (the caller then drops the connection, see [`release`]).
    pub(crate) async fn bounded<T>(
        &self,
        deadline: tokio::time::Instant,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout_at(deadline, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(error::CALL_TIMED_OUT)),
        }
    }

    /// When a call starting now must have ended (the store's call timeout): the
    /// wait for a pooled connection and the statement share it.
    pub(crate) fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.inner.call_timeout
    }

    /// A pooled connection, waiting at most until `deadline`.
    pub(crate) async fn checkout(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<deadpool_postgres::Object> {
        match tokio::time::timeout_at(deadline, self.inner.pool.get()).await {
            Ok(client) => Ok(client?),
            Err(_) => Err(Error::Timeout("waiting for a pooled connection")),
        }
    }

    /// Counts a reopened `LISTEN` connection.
    pub(crate) fn note_listen_reconnect(&self) {
        self.inner
            .listen_reconnects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The last position allocated in the log (0 before the first append): no
    /// read can have seen a position beyond it.
    ///
    /// # Errors
    /// Database errors.
    pub async fn allocated_head(&self) -> Result<Position> {
        let sql = format!("SELECT \"{}\".allocated_head()", self.inner.schema);
        Ok(Position(self.query_one(&sql, &[]).await?.get(0)))
    }

    /// The advisory lock key every append holds shared until it ends.
    fn store_key(&self) -> i64 {
        locks::key(&self.inner.schema, locks::Kind::Store, "")
    }

    /// An advisory lock key of this store for `name` (leases of named subscriptions).
    pub(crate) fn lease_key(&self, name: &str) -> i64 {
        locks::key(&self.inner.schema, locks::Kind::Lease, name)
    }

    /// Installs or upgrades this store's schema. [`StoreBuilder::build`] does this
    /// unless told not to; it is safe to run from several processes at once.
    ///
    /// # Errors
    /// Database errors, or a migration applied earlier whose file has changed.
    #[tracing::instrument(name = "dcbflow.migrate", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema))]
    pub async fn migrate(&self) -> Result<()> {
        let mut client = self.inner.pool.get().await?;
        migrate::run(&mut client, &self.inner.schema, &migrate::STORE).await
    }

    /// Whether this store's schema is what this binary expects, layer by layer:
    /// for a readiness probe ("migrations current"). Runs one query, no DDL and no
    /// lock, within the store's call timeout.
    ///
    /// [`MigrationStatus::current`] is `false` if a layer that is installed has
    /// fewer (or more) migrations applied than this binary knows, or a recorded
    /// checksum differs from this binary's file. The store layer always counts
    /// as installed; an upper layer with nothing recorded is current, because it
    /// installs itself on first use (on a handle that migrates).
    ///
    /// The store layer is always known. An upper layer is known to this process
    /// once it has installed or checked its schema on some store: its
    /// `migrate()` (`Checkpoints::migrate`, `CommandExecutor::migrate`,
    /// `DeadLetters::migrate`, `Flows::migrate`) or its first use. A service
    /// that probes readiness calls those at start-up; layers recorded in the
    /// schema but not known are listed with `known: 0` and left out of `current`.
    ///
    /// # Errors
    /// Database, pool or timeout errors (a missing schema is not one: nothing is
    /// installed, and the store layer is then not current).
    #[tracing::instrument(name = "dcbflow.migration_status", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema))]
    pub async fn migration_status(&self) -> Result<MigrationStatus> {
        let deadline = self.deadline();
        let client = self.checkout(deadline).await?;
        let result = self
            .bounded(deadline, migrate::status(&client, &self.inner.schema))
            .await;
        release(client, result)
    }

    /// Installs or upgrades the schema of an upper `layer` once per store handle
    /// (clones share it): the first call migrates, the others return at once. A
    /// store built with [`StoreBuilder::migrate`]`(false)` runs no DDL: it checks
    /// that the layer is installed and current, and fails with
    /// [`Error::SchemaNotInstalled`] if not.
    pub(crate) async fn ensure_layer(&self, layer: &'static migrate::Layer) -> Result<()> {
        migrate::register(layer);
        let cell = self
            .inner
            .layers
            .lock()
            .expect("layers lock")
            .entry(layer.name)
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let mut client = self.inner.pool.get().await?;
            if self.inner.migrate {
                migrate::run(&mut client, &self.inner.schema, layer).await
            } else if migrate::is_current(&client, &self.inner.schema, layer).await {
                Ok(())
            } else {
                Err(Error::SchemaNotInstalled {
                    schema: self.inner.schema.clone(),
                    layer: layer.name,
                })
            }
        })
        .await?;
        Ok(())
    }

    /// A candidate delivery horizon: every position allocated so far, and the
    /// (virtual) transaction ids of this store's writers still holding the store
    /// lock. Once they have all ended, no event with a position up to the first
    /// can still appear (see `sql/store/0003_horizon.sql`).
    pub(crate) async fn writer_horizon(&self) -> Result<(i64, Vec<String>)> {
        let sql = format!(
            "SELECT allocated, writers FROM \"{}\".writer_horizon($1)",
            self.inner.schema
        );
        let row = self.query_one(&sql, &[&self.store_key()]).await?;
        Ok((row.get(0), row.get(1)))
    }

    /// The highest position `P` such that every event with a position up to `P`
    /// that will ever exist is committed, and visible to any read that starts
    /// after this call returns (`Position(0)` for an empty log).
    ///
    /// It reads the last allocated position and this store's writers still
    /// holding the store lock (the [writer horizon](crate::Subscription)), and,
    /// if there are any, waits until all of them have ended (committed or rolled
    /// back), looking every 2 ms. Writers that start after the first look draw
    /// positions above it and are not waited for, so the wait is bounded by the
    /// longest transaction in flight at the call.
    ///
    /// Use it to hand out bare positions: a position no greater than the settled
    /// head can later serve as `AppendCondition::after(Cursor::at(p))` without
    /// missing a late committer, because none can appear below it any more (see
    /// "The settled head" in `docs/architecture.md`). A read up to it
    /// ([`ReadOptions::up_to`]) returns a prefix of the log that will never change.
    ///
    /// Events written around the store's functions (a plain `INSERT` into the
    /// `events` table) take no store lock and are not waited for. Do not call it
    /// while holding an open transaction that appended to this store: it would
    /// wait for that transaction until it times out.
    ///
    /// # Errors
    /// [`Error::Timeout`] if the writers have not all ended within the store's
    /// [call timeout](StoreBuilder::call_timeout) (a transaction kept open that
    /// long is bounded by [`StoreBuilder::lock_hold_timeout`]); database, pool
    /// or overload errors.
    #[tracing::instrument(name = "dcbflow.settled_head", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema))]
    pub async fn settled_head(&self) -> Result<Position> {
        let deadline = self.deadline();
        let horizon = format!(
            "SELECT allocated, writers FROM \"{}\".writer_horizon($1)",
            self.inner.schema
        );
        let row = {
            let _permit = self.permit()?;
            self.query_one_by(deadline, &horizon, &[&self.store_key()])
                .await?
        };
        let (allocated, writers): (i64, Vec<String>) = (row.get(0), row.get(1));
        if writers.is_empty() {
            return Ok(Position(allocated));
        }
        let finished = format!("SELECT \"{}\".writers_finished($1, $2)", self.inner.schema);
        loop {
            if tokio::time::Instant::now() + SETTLE_POLL >= deadline {
                return Err(Error::Timeout(
                    "waiting for the writers in flight to finish",
                ));
            }
            tokio::time::sleep(SETTLE_POLL).await;
            // No permit is held while sleeping: a long wait must not use up the
            // in-flight capacity of appends.
            let _permit = self.permit()?;
            let row = self
                .query_one_by(deadline, &finished, &[&self.store_key(), &writers])
                .await?;
            if row.get::<_, bool>(0) {
                return Ok(Position(allocated));
            }
        }
    }

    /// One row of `sql` (prepared once per connection) on a pooled connection,
    /// within the call timeout; the connection is dropped if the call broke it.
    async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row> {
        self.query_one_by(self.deadline(), sql, params).await
    }

    /// [`query_one`](Self::query_one), ending by `deadline`.
    async fn query_one_by(
        &self,
        deadline: tokio::time::Instant,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row> {
        let client = self.checkout(deadline).await?;
        let result = self
            .bounded(deadline, async {
                let stmt = client.prepare_cached(sql).await?;
                Ok(client.query_one(&stmt, params).await?)
            })
            .await;
        release(client, result)
    }

    /// The position of the last event in the log, if any.
    ///
    /// # Errors
    /// Database, pool or overload errors.
    #[tracing::instrument(name = "dcbflow.head", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.schema))]
    pub async fn head(&self) -> Result<Option<Position>> {
        let _permit = self.permit()?;
        let row = self.query_one(&self.inner.sql.head, &[]).await?;
        Ok(row.get::<_, Option<i64>>(0).map(Position))
    }

    /// The schema-qualified name of one of the store's tables.
    pub(crate) fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.inner.schema)
    }

    /// Takes an in-flight permit, or fails at once with [`Error::Overloaded`].
    fn permit(&self) -> Result<OwnedSemaphorePermit> {
        self.inner
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded {
                limit: self.inner.max_in_flight,
            })
    }
}

/// Builds a [`Store`]: schema, limits, in-flight cap, migration on start.
#[must_use]
pub struct StoreBuilder {
    pool: Pool,
    schema: String,
    limits: Limits,
    max_in_flight: Option<usize>,
    migrate: bool,
    listen: Option<tokio_postgres::Config>,
    group_commit: Option<usize>,
    group_commit_writers: usize,
    lock_hold_timeout: std::time::Duration,
    call_timeout: std::time::Duration,
}

impl StoreBuilder {
    /// The schema to install into (default [`DEFAULT_SCHEMA`]). Lower-case letters,
    /// digits and `_`, at most 63 bytes, not starting with a digit.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Input limits (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Most store operations in flight at once (default: 4 × the pool's max size).
    /// Beyond it, operations fail at once with [`Error::Overloaded`] instead of queueing.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n);
        self
    }

    /// Connection settings for the dedicated connection subscriptions use to
    /// `LISTEN` for new events and to hold their leases. Without them,
    /// subscriptions poll and leases are held on a connection taken out of the pool.
    pub fn listen_config(mut self, config: tokio_postgres::Config) -> Self {
        self.listen = Some(config);
        self
    }

    /// Batches concurrent [`Store::append`] calls of this handle into shared
    /// transactions of up to `max_batch` appends (group commit): far more appends per
    /// second under concurrency, each still with its own condition and its own
    /// result. An append that finds no other append of this handle in flight runs
    /// at once, unbatched, so a lone writer pays nothing for it. A batch takes the
    /// union of its appends' scope locks, so batches of disjoint scopes (in this
    /// process or others) run side by side; `append_in_tx` is never batched.
    ///
    /// On by default, with batches of up to 128 ([`DEFAULT_GROUP_COMMIT`]);
    /// `group_commit(0)` turns it off (every append its own transaction).
    pub fn group_commit(mut self, max_batch: usize) -> Self {
        self.group_commit = (max_batch > 1).then_some(max_batch);
        self
    }

    /// How many batches of one handle may be in flight at once with
    /// [`group_commit`](Self::group_commit): while one waits for its commit's
    /// flush, the next is taken (default 2; at least 1).
    pub fn group_commit_writers(mut self, writers: usize) -> Self {
        self.group_commit_writers = writers.max(1);
        self
    }

    /// The longest a transaction that appended to this store, or locked one of its
    /// scopes, may sit idle, and (unless it set its own `statement_timeout`) the
    /// longest any of its later statements may run (default 60 s; zero: no bound).
    /// Such a transaction holds the store lock until it ends, and every
    /// subscriber of the store waits for it: the bound keeps one stuck process
    /// (a crashed client, a leaked transaction) from stalling them all. Past it,
    /// PostgreSQL ends the transaction (and, for idleness, the session).
    pub fn lock_hold_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.lock_hold_timeout = timeout;
        self
    }

    /// The longest one call to the database may wait for its answer (an append,
    /// the start of a read, a head or horizon query; default 15 s). Past it the
    /// call fails with [`Error::Timeout`] and its connection is dropped, so a
    /// network that swallows packets cannot hang a caller, and the store recovers
    /// with fresh connections once it heals. Rows of a read that has started
    /// stream without this bound.
    pub fn call_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Whether [`build`](Self::build) installs or upgrades the schema (default `true`).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Builds the store, migrating the schema unless disabled.
    ///
    /// # Errors
    /// An invalid schema name or limit ([`Error::Config`]), or a failed migration.
    #[tracing::instrument(name = "dcbflow.store.build", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.schema))]
    pub async fn build(self) -> Result<Store> {
        validate_schema_name(&self.schema)?;
        if self.limits.max_events_per_append == 0
            || self.limits.max_lock_keys == 0
            || self.limits.max_query_items == 0
        {
            return Err(Error::Config(
                "max_events_per_append, max_lock_keys and max_query_items must be at least 1"
                    .into(),
            ));
        }
        if !(1..=128).contains(&self.limits.max_json_depth) {
            return Err(Error::Config(
                "max_json_depth must be 1 to 128 (what readers can parse back)".into(),
            ));
        }
        let max_in_flight = self
            .max_in_flight
            .unwrap_or_else(|| self.pool.status().max_size.saturating_mul(4).max(1));
        if max_in_flight == 0 {
            return Err(Error::Config("max_in_flight must be at least 1".into()));
        }
        let s = &self.schema;
        let sql = Sql {
            append: format!(
                "SELECT positions, transaction_id, conflict, replayed FROM \"{s}\".append_checked($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::text::pg_snapshot, $13, $14, $15, $16)"
            ),
            // The unconditional append on the store's own connection: one
            // plain statement, no function. The scope locks are taken (in the
            // aggregate, before any row is formed and so before any position is
            // drawn), then the events go in; in a transaction that is not READ
            // COMMITTED nothing is inserted and no row comes back.
            append_plain: format!(
                "INSERT INTO \"{s}\".events (transaction_id, type, tags, data, metadata) \
                 SELECT pg_current_xact_id(), e.type, ($4::text[])[e.tag_start : e.tag_start + e.tag_count - 1], \
                        e.data, e.metadata \
                   FROM (SELECT count(CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.key) \
                                           ELSE pg_advisory_xact_lock_shared(l.key) END) AS n \
                           FROM unnest($1::bigint[], $2::bool[]) AS l(key, exclusive)) locks, \
                        unnest($3::text[], $5::int[], $6::int[], $7::jsonb[], $8::jsonb[]) \
                        WITH ORDINALITY AS e(type, tag_start, tag_count, data, metadata, ord) \
                  WHERE locks.n >= 0 AND current_setting('transaction_isolation') = 'read committed' \
                  ORDER BY e.ord \
                 RETURNING position, transaction_id"
            ),
            // The same for one event whose locks are all shared, the common
            // case: the event as scalar parameters and the locks as direct
            // calls, no arrays to unnest. In pgbench at 16 clients this is 10%
            // more appends per second than `append_plain` (docs/performance.md).
            // The calls run left to right, in the plan's sorted order, in a
            // subquery kept apart (`OFFSET 0`, the calls are volatile) and so
            // before the row, and its position, is formed.
            append_one: (1..=append::ONE_EVENT_MAX_LOCKS)
                .map(|n| {
                    let lock_calls = (0..n)
                        .map(|i| format!("pg_advisory_xact_lock_shared(${}::bigint)", i + 5))
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!(
                        "INSERT INTO \"{s}\".events (transaction_id, type, tags, data, metadata) \
                         SELECT pg_current_xact_id(), $1::text, $2::text[], $3::jsonb, $4::jsonb \
                           FROM (SELECT {lock_calls} OFFSET 0) locks \
                          WHERE current_setting('transaction_isolation') = 'read committed' \
                         RETURNING position, transaction_id"
                    )
                })
                .collect(),
            head: format!("SELECT max(position) FROM \"{s}\".events"),
            events: format!("\"{s}\".events"),
        };
        let channel = channel_name(&self.schema);
        let waker = wake::Waker::start(
            self.pool.clone(),
            channel.clone(),
            locks::key(&self.schema, locks::Kind::Listen, ""),
        );
        let group_commit = self.group_commit.map(|max| {
            group_commit::GroupCommit::start(
                group_commit::Writer {
                    pool: self.pool.clone(),
                    schema: self.schema.clone(),
                    append_sql: sql.append.clone(),
                    plain_sql: sql.append_plain.clone(),
                    waker: waker.clone(),
                    store_key: locks::key(&self.schema, locks::Kind::Store, ""),
                    max_batch: max,
                },
                self.group_commit_writers,
            )
        });
        let store = Store {
            inner: Arc::new(Inner {
                pool: self.pool,
                schema: self.schema,
                limits: self.limits,
                max_in_flight,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                listen: self.listen,
                group_commit,
                waker,
                sql,
                migrate: self.migrate,
                hold_ms: i32::try_from(self.lock_hold_timeout.as_millis()).unwrap_or(i32::MAX),
                call_timeout: self.call_timeout,
                layers: Mutex::default(),
                channel,
                listen_reconnects: std::sync::atomic::AtomicU64::new(0),
                feed: horizon::FeedSlot::default(),
            }),
        };
        if self.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }
}

/// Hands a pooled connection back, or drops it for good if `result` says the
/// connection is broken (so the next caller does not get a dead connection).
pub(crate) fn release<T>(client: deadpool_postgres::Object, result: Result<T>) -> Result<T> {
    if let Err(e) = &result
        && e.breaks_connection()
    {
        drop(deadpool_postgres::Object::take(client));
    }
    result
}

/// The `NOTIFY` channel of the store in `schema`.
fn channel_name(schema: &str) -> String {
    let digest = Sha256::digest(schema.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("dcbflow_{hex}")
}

fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    url.parse()
        .map_err(|e| Error::Config(format!("bad database URL: {e}")))
}

fn validate_schema_name(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "schema name {s:?} must be 1-63 bytes of a-z, 0-9 and _, not starting with a digit"
        )))
    }
}

/// A connection pool for `url` with `max_size` connections (default: deadpool's,
/// 4 × the number of CPUs). Connections are plain TCP or Unix sockets (no TLS).
///
/// Dead connections are found and a stuck call ends, whatever the network does:
///
/// | setting | default (unless the URL sets it) |
/// |---|---|
/// | `connect_timeout` | 10 s |
/// | TCP keepalives (idle, interval, probes) | 15 s, 5 s, 3 |
/// | `tcp_user_timeout` (unacknowledged writes) | 30 s |
/// | waiting for a pooled connection | 30 s, then [`Error::Timeout`] |
/// | creating / checking a connection | 10 s / 5 s, then [`Error::Timeout`] |
///
/// A connection that failed at the network level is dropped, not handed out again.
///
/// # Errors
/// [`Error::Config`] for a malformed URL.
pub fn pool_from_url(url: &str, max_size: Option<usize>) -> Result<Pool> {
    let config = hardened(parse_url(url)?);
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut builder = Pool::builder(manager)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(30)))
        .create_timeout(Some(std::time::Duration::from_secs(10)))
        .recycle_timeout(Some(std::time::Duration::from_secs(5)));
    if let Some(n) = max_size {
        builder = builder.max_size(n);
    }
    builder
        .build()
        .map_err(|e| Error::Config(format!("cannot build pool: {e}")))
}

/// `config` with the timeouts and keepalives of [`pool_from_url`] where it sets none.
fn hardened(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    use std::time::Duration;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    // tokio-postgres's defaults: keepalives on, first probe after 2 hours.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
    }
    config
}

#[cfg(test)]
mod tests {
    #[test]
    fn schema_names() {
        for ok in ["dcbflow", "t_1", "_x"] {
            assert!(super::validate_schema_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "A", "a\"b", "a;drop", &"x".repeat(64)] {
            assert!(super::validate_schema_name(bad).is_err(), "{bad}");
        }
    }
}
