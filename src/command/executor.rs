//! Executing commands.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Command, CommandRetry};
use crate::projection::{DecisionModel, project, project_in_tx, union_queries};
use crate::store::{
    AppendCondition, Cursor, Error, Event, Position, Query, Result, Store, TransactionId,
};

/// The constraint that makes an idempotency key unique in the command log.
const IDEMPOTENCY_KEY_CONSTRAINT: &str = "commands_idempotency_key_key";

/// How the executor keeps concurrent commands on one scope apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Concurrency {
    /// Read, decide, append with a condition; on conflict re-read and re-decide
    /// (default). Best when commands on one scope rarely collide.
    #[default]
    Optimistic,
    /// Lock the scope first, then read, decide and append in one transaction:
    /// contending commands queue instead of retrying. Best for hot scopes.
    Pessimistic,
}

/// What an executed command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    /// Positions of the appended events (empty if it decided to append nothing).
    pub positions: Vec<Position>,
    /// The transaction that appended them and recorded the command
    /// (`TransactionId(0)` when a command that is not [logged](Command::logged)
    /// appended nothing: no transaction wrote anything).
    pub transaction_id: TransactionId,
    /// Attempts it took (1 without conflicts).
    pub attempts: u32,
    /// `true` if the idempotency key had been executed before: this is the stored
    /// outcome and nothing was appended now.
    pub replayed: bool,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E> {
    /// The decision rejected the command (a domain error). Nothing was appended.
    #[error("command rejected")]
    Rejected(#[source] E),
    /// The command's own work inside its transaction
    /// ([`Command::before_append`] / [`Command::after_append`]) failed; the
    /// transaction was rolled back and nothing was appended.
    #[error("command aborted by its work in the transaction")]
    Aborted(#[source] E),
    /// Every attempt conflicted with concurrent appends.
    #[error("command still conflicted after {attempts} attempts")]
    Conflict {
        /// Attempts made.
        attempts: u32,
    },
    /// The store failed (infrastructure, bad input, overload).
    #[error(transparent)]
    Store(#[from] Error),
}

impl<E> CommandError<E> {
    /// The domain error, if the command was rejected.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

/// Runs commands against a store: project the decision model, decide, do the
/// command's extra work, append with the condition and record the command, all
/// or nothing, in one transaction; retry on conflict.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store, cmd: impl dcbflow::Command) {
/// use dcbflow::{CommandExecutor, CommandRetry, Concurrency};
/// let executor = CommandExecutor::new(store)
///     .retry(CommandRetry::attempts(5))
///     .concurrency(Concurrency::Optimistic);
/// match executor.execute(&cmd).await {
///     Ok(outcome) => println!("appended at {:?}", outcome.positions),
///     Err(dcbflow::CommandError::Rejected(e)) => println!("rejected: {e}"),
///     Err(e) => println!("failed: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CommandExecutor {
    store: Store,
    retry: CommandRetry,
    concurrency: Concurrency,
}

enum Attempt<E> {
    Done(CommandOutcome),
    Conflict,
    DuplicateKey,
    Failed(CommandError<E>),
}

/// A failure inside an attempt's transaction: the store's, or the command's own.
enum TxError<E> {
    Store(Error),
    Rejected(E),
    Aborted(E),
}

impl<E> From<Error> for TxError<E> {
    fn from(e: Error) -> Self {
        TxError::Store(e)
    }
}

impl<E> From<tokio_postgres::Error> for TxError<E> {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Store(e.into())
    }
}

impl CommandExecutor {
    /// An optimistic executor with the default [`CommandRetry`].
    pub fn new(store: Store) -> Self {
        CommandExecutor {
            store,
            retry: CommandRetry::default(),
            concurrency: Concurrency::Optimistic,
        }
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn retry(mut self, retry: CommandRetry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the concurrency mode.
    #[must_use]
    pub fn concurrency(mut self, concurrency: Concurrency) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Installs or upgrades the command layer's tables (the command log) now;
    /// otherwise the first [`execute`](Self::execute) does it.
    ///
    /// # Errors
    /// Store errors, or a failed migration.
    pub async fn migrate(&self) -> Result<()> {
        self.store.ensure_layer(&super::SCHEMA).await
    }

    /// Executes `command`.
    ///
    /// # Errors
    /// [`CommandError::Rejected`] with the decision's domain error (at once, no
    /// retry); [`CommandError::Aborted`] when the command's work in the
    /// transaction failed; [`CommandError::Conflict`] when every attempt
    /// conflicted; [`CommandError::Store`] for store failures (retryable ones,
    /// such as deadlocks, are retried first).
    #[tracing::instrument(name = "dcbflow.execute", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store.schema(), command = command.command_type()))]
    pub async fn execute<C: Command>(
        &self,
        command: &C,
    ) -> Result<CommandOutcome, CommandError<C::Error>> {
        if command.logged() {
            self.store.ensure_layer(&super::SCHEMA).await?;
        }
        let key = command.idempotency_key();
        if let Some(key) = &key
            && let Some(outcome) = self.stored_outcome(key).await?
        {
            return Ok(outcome);
        }
        let max = self.retry.max_attempts.max(1);
        for attempt in 1..=max {
            let result = match self.concurrency {
                Concurrency::Optimistic => self.optimistic(command, attempt).await,
                Concurrency::Pessimistic => self.pessimistic(command, attempt).await,
            };
            match result {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::DuplicateKey => {
                    let key = key.as_deref().unwrap_or_default();
                    return match self.stored_outcome(key).await? {
                        Some(outcome) => Ok(outcome),
                        None => Err(CommandError::Conflict { attempts: attempt }),
                    };
                }
                Attempt::Conflict if attempt < max => {
                    tracing::debug!(attempt, "conflict, retrying");
                    tokio::time::sleep(self.retry.backoff.delay(attempt)).await;
                }
                Attempt::Conflict => return Err(CommandError::Conflict { attempts: attempt }),
                Attempt::Failed(CommandError::Store(e))
                    if attempt < max && e.is_retryable() && !e.is_conflict() =>
                {
                    tracing::debug!(attempt, error = %e, "retryable store error, retrying");
                    tokio::time::sleep(self.retry.backoff.delay(attempt)).await;
                }
                Attempt::Failed(e) => return Err(e),
            }
        }
        Err(CommandError::Conflict { attempts: max })
    }

    /// Project (outside any transaction), decide, then append in a transaction of
    /// its own with the projection's condition.
    async fn optimistic<C: Command>(&self, command: &C, attempt: u32) -> Attempt<C::Error> {
        let model = command.model();
        let projected = match project(&self.store, &model).await {
            Ok(d) => d,
            Err(e) => return Attempt::Failed(e.into()),
        };
        let decided = match command.decide(projected.states) {
            Ok(d) => d,
            Err(e) => return Attempt::Failed(CommandError::Rejected(e)),
        };
        let mut client = match self.store.pool().get().await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(Error::from(e).into()),
        };
        let result = async {
            let tx = client.transaction().await?;
            let condition = with_extra(projected.condition, decided.also_fail_if);
            let outcome = self
                .append_and_record(&tx, command, decided.events, condition, attempt)
                .await?;
            tx.commit().await?;
            Ok(outcome)
        }
        .await;
        self.finish(client, result)
    }

    /// Lock the scope, project and decide inside the transaction, append: the
    /// decision cannot be overtaken, so contenders queue instead of conflicting.
    async fn pessimistic<C: Command>(&self, command: &C, attempt: u32) -> Attempt<C::Error> {
        let model = command.model();
        let mut client = match self.store.pool().get().await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(Error::from(e).into()),
        };
        let result = async {
            let tx = client.transaction().await?;
            let query = model.query();
            self.store.lock_scope_in_tx(&tx, &query).await?;
            let projected = project_in_tx(&self.store, &tx, &model).await?;
            let decided = match command.decide(projected.states) {
                Ok(d) => d,
                Err(e) => {
                    // Release the scope lock now, not when the dropped
                    // transaction's rollback gets through.
                    tx.rollback().await?;
                    return Err(TxError::Rejected(e));
                }
            };
            let condition = match decided.also_fail_if {
                // The condition after the read's head as a bare position, without
                // the read's snapshot: this transaction holds the scope's lock
                // since before its read, so no event matching the query was in
                // flight then or can be appended by anyone else until it commits.
                // The guarantee is the same; the check is the cheapest one (a short
                // scan after the head, where the snapshot would add a probe per
                // transaction in flight). Extra items are not locked, so with
                // them the snapshot stays.
                None => {
                    let cursor = projected.condition.after.clone();
                    let after = match cursor.as_ref().and_then(|c| c.position) {
                        Some(p) => Some(Cursor::at(p)),
                        None => cursor,
                    };
                    AppendCondition {
                        fail_if_events_match: query,
                        after,
                    }
                }
                extra => with_extra(projected.condition, extra),
            };
            let outcome = self
                .append_and_record(&tx, command, decided.events, condition, attempt)
                .await?;
            tx.commit().await?;
            Ok(outcome)
        }
        .await;
        self.finish(client, result)
    }

    /// Classifies an attempt's result, wakes subscribers after a commit that
    /// appended, and hands the connection back (or drops it if it broke).
    fn finish<E>(
        &self,
        client: deadpool_postgres::Object,
        result: Result<CommandOutcome, TxError<E>>,
    ) -> Attempt<E> {
        let result = match result {
            Ok(outcome) => Ok(outcome),
            Err(TxError::Store(e)) => Err(e),
            // The command's own failures leave the connection usable: it goes
            // back to the pool when dropped.
            Err(TxError::Rejected(e)) => return Attempt::Failed(CommandError::Rejected(e)),
            Err(TxError::Aborted(e)) => return Attempt::Failed(CommandError::Aborted(e)),
        };
        match crate::store::release(client, result) {
            Ok(outcome) => {
                if !outcome.positions.is_empty() {
                    self.store.wake_subscribers();
                }
                Attempt::Done(outcome)
            }
            Err(Error::Conflict { .. }) => Attempt::Conflict,
            Err(e) if e.is_unique_violation(IDEMPOTENCY_KEY_CONSTRAINT) => Attempt::DuplicateKey,
            Err(e) => Attempt::Failed(CommandError::Store(e)),
        }
    }

    async fn append_and_record<C: Command>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        command: &C,
        events: Vec<Event>,
        condition: AppendCondition,
        attempt: u32,
    ) -> Result<CommandOutcome, TxError<C::Error>> {
        let started = Instant::now();
        command
            .before_append(tx, &events)
            .await
            .map_err(TxError::Aborted)?;
        let (positions, transaction_id) = if events.is_empty() {
            if command.logged() {
                let row = tx.query_one("SELECT pg_current_xact_id()", &[]).await?;
                (Vec::new(), row.get::<_, TransactionId>(0))
            } else {
                (Vec::new(), TransactionId(0))
            }
        } else {
            // Subscribers are woken after the commit (see `finish`), so that
            // the commit does not take PostgreSQL's notification lock.
            let r = self
                .store
                .append_in_tx_quiet(tx, events.clone(), Some(condition))
                .await?;
            command
                .after_append(tx, &events, &r)
                .await
                .map_err(TxError::Aborted)?;
            (r.positions, r.transaction_id)
        };
        if command.logged() {
            let raw: Vec<i64> = positions.iter().map(|p| p.0).collect();
            let stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO {} (type, payload, idempotency_key, positions, outcome, attempts) \
                     VALUES ($1, $2, $3, $4, 'succeeded', $5)",
                    self.store.table("commands")
                ))
                .await?;
            tx.execute(
                &stmt,
                &[
                    &command.command_type(),
                    &command.payload(),
                    &command.idempotency_key(),
                    &raw,
                    &(attempt as i32),
                ],
            )
            .await?;
        }
        tracing::debug!(elapsed = ?started.elapsed(), "command appended");
        Ok(CommandOutcome {
            positions,
            transaction_id,
            attempts: attempt,
            replayed: false,
        })
    }

    async fn stored_outcome(&self, key: &str) -> Result<Option<CommandOutcome>> {
        let client = self.store.pool().get().await?;
        let result = async {
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT positions, transaction_id, attempts FROM {} WHERE idempotency_key = $1",
                    self.store.table("commands")
                ))
                .await?;
            Ok(client.query_opt(&stmt, &[&key]).await?.map(|row| {
                let positions: Vec<i64> = row.get(0);
                CommandOutcome {
                    positions: positions.into_iter().map(Position).collect(),
                    transaction_id: row.get(1),
                    attempts: row.get::<_, i32>(2) as u32,
                    replayed: true,
                }
            }))
        }
        .await;
        crate::store::release(client, result)
    }
}

fn with_extra(mut condition: AppendCondition, extra: Option<Query>) -> AppendCondition {
    if let Some(extra) = extra {
        condition.fail_if_events_match = union_queries([condition.fail_if_events_match, extra]);
    }
    condition
}
