//! Executing commands.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Command, RetryPolicy};
use crate::projection::union_queries;
use crate::{AppendCondition, DecisionModel, Error, Position, Store, TransactionId};

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
    /// The transaction that appended them and recorded the command.
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

/// Runs commands against a store: project the decision model, decide, append with
/// the condition and record the command, all or nothing; retry on conflict.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store, cmd: impl dcbflow::Command) {
/// use dcbflow::{CommandExecutor, Concurrency, RetryPolicy};
/// let executor = CommandExecutor::new(store)
///     .retry(RetryPolicy::attempts(5))
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
    retry: RetryPolicy,
    concurrency: Concurrency,
}

enum Attempt<E> {
    Done(CommandOutcome),
    Conflict,
    DuplicateKey,
    Failed(CommandError<E>),
}

impl CommandExecutor {
    /// An optimistic executor with the default [`RetryPolicy`].
    pub fn new(store: Store) -> Self {
        CommandExecutor {
            store,
            retry: RetryPolicy::default(),
            concurrency: Concurrency::Optimistic,
        }
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
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

    /// Executes `command`.
    ///
    /// # Errors
    /// [`CommandError::Rejected`] with the decision's domain error (at once, no
    /// retry); [`CommandError::Conflict`] when every attempt conflicted;
    /// [`CommandError::Store`] for store failures (retryable database errors such
    /// as deadlocks are retried first).
    #[tracing::instrument(name = "dcbflow.execute", level = "debug", skip_all, fields(command = command.command_type()))]
    pub async fn execute<C: Command>(
        &self,
        command: &C,
    ) -> Result<CommandOutcome, CommandError<C::Error>> {
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
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                Attempt::Conflict => return Err(CommandError::Conflict { attempts: attempt }),
                Attempt::Failed(CommandError::Store(e))
                    if attempt < max && e.is_retryable() && !e.is_conflict() =>
                {
                    tracing::debug!(attempt, error = %e, "retryable store error, retrying");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                Attempt::Failed(e) => return Err(e),
            }
        }
        Err(CommandError::Conflict { attempts: max })
    }

    async fn optimistic<C: Command>(&self, command: &C, attempt: u32) -> Attempt<C::Error> {
        let model = command.model();
        let decision = match self.store.project(&model).await {
            Ok(d) => d,
            Err(e) => return Attempt::Failed(e.into()),
        };
        let decided = match command.decide(decision.states) {
            Ok(d) => d,
            Err(e) => return Attempt::Failed(CommandError::Rejected(e)),
        };
        let condition = with_extra(decision.condition, decided.also_fail_if);
        let mut client = match self.store.pool().get().await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(Error::from(e).into()),
        };
        let result = async {
            let tx = client.transaction().await?;
            let outcome = self
                .append_and_record(&tx, command, decided.events, condition, attempt)
                .await?;
            tx.commit().await?;
            self.store.wake_subscribers();
            Ok::<_, Error>(outcome)
        }
        .await;
        classify(crate::store::release(client, result))
    }

    async fn pessimistic<C: Command>(&self, command: &C, attempt: u32) -> Attempt<C::Error> {
        let model = command.model();
        let mut client = match self.store.pool().get().await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(Error::from(e).into()),
        };
        let mut rejected = None;
        let result = async {
            let tx = client.transaction().await?;
            self.store.lock_scope_in_tx(&tx, &model.query()).await?;
            let decision = self.store.project_in_tx(&tx, &model).await?;
            let decided = match command.decide(decision.states) {
                Ok(d) => d,
                Err(e) => {
                    rejected = Some(e);
                    // Release the scope lock now, not when the dropped
                    // transaction's rollback gets through.
                    tx.rollback().await?;
                    return Ok(None);
                }
            };
            let condition = with_extra(decision.condition, decided.also_fail_if);
            let outcome = self
                .append_and_record(&tx, command, decided.events, condition, attempt)
                .await?;
            tx.commit().await?;
            self.store.wake_subscribers();
            Ok::<_, Error>(Some(outcome))
        }
        .await;
        if let Some(e) = rejected {
            return Attempt::Failed(CommandError::Rejected(e));
        }
        match crate::store::release(client, result) {
            Ok(Some(outcome)) => Attempt::Done(outcome),
            Ok(None) => unreachable!("no outcome only when rejected"),
            Err(e) => classify(Err(e)),
        }
    }

    async fn append_and_record<C: Command>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        command: &C,
        events: Vec<crate::Event>,
        condition: AppendCondition,
        attempt: u32,
    ) -> crate::Result<CommandOutcome> {
        let started = Instant::now();
        let (positions, transaction_id) = if events.is_empty() {
            let row = tx.query_one("SELECT pg_current_xact_id()", &[]).await?;
            (Vec::new(), row.get::<_, TransactionId>(0))
        } else {
            // The wake-up is sent after the commit, by the callers below.
            let r = self
                .store
                .append_in_tx_quiet(tx, events, Some(condition))
                .await?;
            (r.positions, r.transaction_id)
        };
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
        tracing::debug!(elapsed = ?started.elapsed(), "command appended");
        Ok(CommandOutcome {
            positions,
            transaction_id,
            attempts: attempt,
            replayed: false,
        })
    }

    async fn stored_outcome(&self, key: &str) -> crate::Result<Option<CommandOutcome>> {
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

fn with_extra(mut condition: AppendCondition, extra: Option<crate::Query>) -> AppendCondition {
    if let Some(extra) = extra {
        condition.fail_if_events_match = union_queries([condition.fail_if_events_match, extra]);
    }
    condition
}

fn classify<E>(result: crate::Result<CommandOutcome>) -> Attempt<E> {
    match result {
        Ok(outcome) => Attempt::Done(outcome),
        Err(Error::Conflict { .. }) => Attempt::Conflict,
        Err(e) if e.sql_state() == Some("23505") => Attempt::DuplicateKey,
        Err(e) => Attempt::Failed(CommandError::Store(e)),
    }
}
