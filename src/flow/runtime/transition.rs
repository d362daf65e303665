//! One transition of an instance, as a command of the command layer: under the
//! instance's scope lock, fold its events, decide the next events, run the
//! step's SQL, append with a condition on the instance, and write the read
//! models, in one transaction. The command executor's pessimistic mode is the
//! one implementation of "lock, decide, work, append"; the engine adds no second.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::engine::{Flows, sequenced, sync, sync_params};
use crate::command::{Command, CommandError, CommandExecutor, CommandRetry, Concurrency, Decided};
use crate::flow::FlowError;
use crate::flow::model::decide::{preview, to_events};
use crate::flow::model::definition::FlowDefinition;
use crate::flow::model::events::{FlowEvent, instance_tag};
use crate::flow::model::state::InstanceState;
use crate::projection::Projector;
use futures::TryStreamExt;

use crate::store::{AppendCondition, AppendResult, Cursor, Event, Query, QueryItem, ReadOptions};

/// SQL statements a transition runs in its transaction before appending, with
/// text parameters (a SQL step, exactly once with its completion event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SqlWork {
    /// The statements and their parameters (`None`: SQL `NULL`).
    pub(crate) statements: Vec<BoundStatement>,
    /// The step's timeout: the transaction's `statement_timeout`, in milliseconds.
    pub(crate) timeout_ms: u64,
}

/// One statement with its rendered parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BoundStatement {
    /// The SQL text.
    pub(crate) sql: String,
    /// `$1..` as text (`None`: `NULL`).
    pub(crate) params: Vec<Option<String>>,
}

/// Why a transition did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransitionError {
    /// The engine refused, or the store failed.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The step's SQL failed; the transaction was rolled back.
    #[error("SQL step failed")]
    Sql(#[source] tokio_postgres::Error),
    /// The definition the instance runs on is not in this process's cache yet
    /// (loaded outside the transaction, then the transition runs again).
    #[error("definition {0}@{1} not loaded")]
    NeedDefinition(String, String),
}

impl TransitionError {
    /// As a [`FlowError`] (a failed SQL step is a store error here).
    pub(crate) fn into_flow(self) -> FlowError {
        match self {
            TransitionError::Flow(e) => e,
            TransitionError::Sql(e) => FlowError::Store(e.into()),
            TransitionError::NeedDefinition(flow, version) => {
                FlowError::UnknownFlow(format!("{flow}@{version}"))
            }
        }
    }
}

impl From<crate::store::Error> for TransitionError {
    fn from(e: crate::store::Error) -> Self {
        TransitionError::Flow(e.into())
    }
}

/// How long a state kept in [`KnownStates`] is used: a catch-up read finds
/// the events of transactions its cursor's snapshot did not see by their ids,
/// and past a few seconds of a busy store those are more than a full read of
/// a small instance.
const KNOWN_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Steps above which an instance's catch-up read is planned per call: below,
/// the cached generic plan reads the instance's few events faster than a
/// planning would; above, it reads them all (ADR 0013).
const PLAN_EACH_ABOVE: usize = 64;

/// Tries of a transition after a transient store error.
const TRANSIENT_TRIES: u32 = 8;

/// States kept at most (older ones are dropped first).
const KNOWN_MOST: usize = 512;

/// An instance's state as a read left it, with the read's cursor.
#[derive(Debug)]
struct Known {
    /// The fold of exactly the events the cursor saw.
    state: InstanceState,
    cursor: Cursor,
    at: std::time::Instant,
}

/// The states of the instances this engine transitioned last, each with the
/// cursor of the read it came from, so that the next transition reads only
/// the events that cursor did not see (its own appends included) instead of
/// the instance's whole history (ADR 0013). An instance of a thousand steps
/// then costs each transition a few events, not a thousand. A late committer
/// below the cursor (a transaction its snapshot did not see) sends the
/// transition back to a full read.
#[derive(Debug, Default)]
pub(crate) struct KnownStates(Mutex<std::collections::HashMap<Uuid, Known>>);

impl KnownStates {
    fn take(&self, id: Uuid) -> Option<Known> {
        let mut map = self.0.lock().expect("known states lock");
        map.remove(&id).filter(|k| k.at.elapsed() < KNOWN_FOR)
    }

    fn put(&self, id: Uuid, state: InstanceState, cursor: Cursor) {
        let mut map = self.0.lock().expect("known states lock");
        if map.len() >= KNOWN_MOST {
            map.retain(|_, k| k.at.elapsed() < KNOWN_FOR);
            if map.len() >= KNOWN_MOST {
                map.clear();
            }
        }
        map.insert(
            id,
            Known {
                state,
                cursor,
                at: std::time::Instant::now(),
            },
        );
    }

    fn forget(&self, id: Uuid) {
        self.0.lock().expect("known states lock").remove(&id);
    }
}

/// The query of every event of instance `id`.
pub(crate) fn instance_query(id: Uuid) -> Query {
    Query::from_items([QueryItem::new().tags([instance_tag(id)])])
}

/// The instance's state as a decision model.
fn instance_model(id: Uuid) -> Projector<Option<InstanceState>> {
    Projector::new(instance_query(id), None, |state, e| match state {
        None => *state = InstanceState::fold([e]),
        Some(s) => s.apply(e),
    })
}

/// What a decided transition leaves behind for its caller.
struct Decision {
    state: InstanceState,
    definition: Arc<FlowDefinition>,
    events: Vec<FlowEvent>,
    now: DateTime<Utc>,
}

/// A transition as a command.
struct Transition<'a, D> {
    flows: &'a Flows,
    id: Uuid,
    work: Option<&'a SqlWork>,
    decide: D,
    decided: Mutex<Option<Decision>>,
    next: Mutex<Option<InstanceState>>,
}

impl<D> Command for Transition<'_, D>
where
    D: Fn(&InstanceState, &FlowDefinition, DateTime<Utc>) -> Result<Vec<FlowEvent>, FlowError>
        + Send
        + Sync,
{
    type Model = Projector<Option<InstanceState>>;
    type Error = TransitionError;

    fn command_type(&self) -> &str {
        "FlowTransition"
    }

    fn logged(&self) -> bool {
        false
    }

    fn model(&self) -> Self::Model {
        instance_model(self.id)
    }

    fn decide(&self, state: Option<InstanceState>) -> Result<Decided, TransitionError> {
        let state = state.ok_or(FlowError::UnknownInstance(self.id))?;
        let definition = self
            .flows
            .cached_definition(&state.flow, &state.definition_version)
            .ok_or_else(|| {
                TransitionError::NeedDefinition(
                    state.flow.clone(),
                    state.definition_version.clone(),
                )
            })?;
        let now = Utc::now();
        let events = (self.decide)(&state, &definition, now)?;
        // BEGIN, lock, read, and COMMIT or ROLLBACK.
        self.flows.inner.stats.statements(4);
        let decided = to_events(self.id, &events);
        *self.decided.lock().expect("transition lock") = Some(Decision {
            state,
            definition,
            events,
            now,
        });
        Ok(decided.into())
    }

    async fn before_append(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), TransitionError> {
        let Some(work) = self.work.filter(|_| !events.is_empty()) else {
            return Ok(());
        };
        self.flows
            .inner
            .stats
            .statements(1 + work.statements.len() as u64);
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            work.timeout_ms
        ))
        .await
        .map_err(TransitionError::Sql)?;
        for statement in &work.statements {
            let types = vec![tokio_postgres::types::Type::TEXT; statement.params.len()];
            let stmt = tx
                .prepare_typed(&statement.sql, &types)
                .await
                .map_err(TransitionError::Sql)?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = statement
                .params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            tx.execute(&stmt, &refs)
                .await
                .map_err(TransitionError::Sql)?;
        }
        Ok(())
    }

    async fn after_append(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: &[Event],
        appended: &AppendResult,
    ) -> Result<(), TransitionError> {
        let (mut next, definition, now) = {
            let guard = self.decided.lock().expect("transition lock");
            let d = guard.as_ref().expect("decided before appending");
            (d.state.clone(), d.definition.clone(), d.now)
        };
        for e in &sequenced(events.to_vec(), appended, now) {
            next.apply(e);
        }
        sync(tx, self.flows.store(), &definition, &next, now).await?;
        let stats = &self.flows.inner.stats;
        stats.statements(2); // append, read models
        stats.transitions.fetch_add(1, Ordering::Relaxed);
        stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        *self.next.lock().expect("transition lock") = Some(next);
        Ok(())
    }
}

impl Flows {
    /// A transition without SQL work in two statements and no transaction
    /// block: read the instance's events (with the read's snapshot), decide,
    /// then append under the condition "no event of this instance that the read
    /// did not see, late committers included" and write the read models in the
    /// same statement ([`Store::append_and_then`]). `None` when the condition
    /// failed: the caller runs the transition as a pessimistic command, which
    /// queues on the instance's lock instead of conflicting again (ADR 0011).
    async fn transition_in_one<D>(
        &self,
        id: Uuid,
        decide: &D,
    ) -> Result<Option<(InstanceState, Vec<FlowEvent>)>, TransitionError>
    where
        D: Fn(&InstanceState, &FlowDefinition, DateTime<Utc>) -> Result<Vec<FlowEvent>, FlowError>
            + Send
            + Sync,
    {
        let store = self.store();
        let stats = &self.inner.stats;
        stats.statements(1);
        let (state, cursor) = self.read_state(id).await?;
        let state = state.ok_or(FlowError::UnknownInstance(id))?;
        self.inner.known.put(id, state.clone(), cursor.clone());
        let condition = AppendCondition::new(instance_query(id)).after(cursor);
        let definition = self
            .definition(&state.flow, Some(&state.definition_version))
            .await?;
        let now = Utc::now();
        let decided = decide(&state, &definition, now)?;
        if decided.is_empty() {
            return Ok(Some((state, decided)));
        }
        // The state after the events, but for the positions, which the append
        // assigns: the statement sets `last_position` from them.
        let mut next = preview(&state, &decided, now);
        let events = to_events(id, &decided);
        let (row, due, incidents) = sync_params(&definition, &next, now);
        let count = events.len() as u64;
        let prepared = store.prepare_append(events, Some(condition))?;
        let then = format!(
            "{}(jsonb_set($17, '{{last_position}}', to_jsonb(a.positions[cardinality(a.positions)])), $18, $19)",
            store.table("flow_sync")
        );
        stats.statements(1);
        match store
            .append_and_then(&prepared, &then, &[&row, &due, &incidents])
            .await
        {
            Ok(appended) => {
                next.last_position = appended.last_position();
                stats.transitions.fetch_add(1, Ordering::Relaxed);
                stats.events.fetch_add(count, Ordering::Relaxed);
                Ok(Some((next, decided)))
            }
            Err(crate::store::Error::Conflict { .. }) => {
                self.inner.known.forget(id);
                Ok(None)
            }
            Err(e) => {
                self.inner.known.forget(id);
                Err(e.into())
            }
        }
    }

    /// The instance's state and the cursor of the read it comes from: from the
    /// state kept of the last read plus the events its cursor did not see,
    /// or, without one (or with a late committer below its cursor), from all
    /// of the instance's events.
    async fn read_state(
        &self,
        id: Uuid,
    ) -> Result<(Option<InstanceState>, Cursor), TransitionError> {
        let store = self.store();
        let query = instance_query(id);
        if let Some(known) = self.inner.known.take(id) {
            let below = known.cursor.position;
            let mut options = ReadOptions::default().unseen_by(&known.cursor);
            if known.state.steps.len() > PLAN_EACH_ABOVE {
                options = options.plan_each();
            }
            let mut stream = store.read(&query, options).await?;
            let mut state = known.state;
            let mut late = false;
            while let Some(e) = stream.try_next().await? {
                if below.is_some_and(|p| e.position <= p) {
                    late = true;
                    break;
                }
                state.apply(&e);
            }
            if !late {
                let cursor = stream.drain_cursor().await?;
                return Ok((Some(state), cursor));
            }
            self.inner.stats.statements(1);
        }
        let mut stream = store.read(&query, ReadOptions::default()).await?;
        let mut state: Option<InstanceState> = None;
        while let Some(e) = stream.try_next().await? {
            match &mut state {
                None => state = InstanceState::fold([&e]),
                Some(s) => s.apply(&e),
            }
        }
        let cursor = stream.drain_cursor().await?;
        Ok((state, cursor))
    }

    /// Runs one transition of instance `id`: under the instance's lock, fold its
    /// events, let `decide` choose the events, run `work`, append them with a
    /// condition on the instance, update the read models, commit. Returns the
    /// state after it and what was appended (nothing: the state as read).
    ///
    /// A transient store error (the store overloaded, no connection in time, a
    /// transient database error) is tried again, after 20 ms doubling up to
    /// 1 s, up to 8 times: a transition is decided again from what its read
    /// finds, so a second try cannot apply anything twice. A worker recording a
    /// step's outcome would otherwise lose it to a passing overload, and the
    /// step would wait out its lease. An unknown commit is not tried again (its
    /// SQL work may have committed).
    pub(crate) async fn transition<D>(
        &self,
        id: Uuid,
        work: Option<&SqlWork>,
        decide: D,
    ) -> Result<(InstanceState, Vec<FlowEvent>), TransitionError>
    where
        D: Fn(&InstanceState, &FlowDefinition, DateTime<Utc>) -> Result<Vec<FlowEvent>, FlowError>
            + Send
            + Sync,
    {
        let mut pause = std::time::Duration::from_millis(20);
        let mut tries = 0;
        loop {
            match self.transition_once(id, work, &decide).await {
                Err(TransitionError::Flow(FlowError::Store(e)))
                    if tries < TRANSIENT_TRIES
                        && e.is_retryable()
                        && !e.is_conflict()
                        && !matches!(e, crate::store::Error::CommitUnknown(_)) =>
                {
                    tries += 1;
                    tracing::debug!(instance = %id, error = %e, tries, "transient store error in a transition: trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    async fn transition_once<D>(
        &self,
        id: Uuid,
        work: Option<&SqlWork>,
        decide: &D,
    ) -> Result<(InstanceState, Vec<FlowEvent>), TransitionError>
    where
        D: Fn(&InstanceState, &FlowDefinition, DateTime<Utc>) -> Result<Vec<FlowEvent>, FlowError>
            + Send
            + Sync,
    {
        if work.is_none()
            && let Some(done) = self.transition_in_one(id, decide).await?
        {
            return Ok(done);
        }
        self.inner.known.forget(id);
        let executor = CommandExecutor::new(self.store().clone())
            .concurrency(Concurrency::Pessimistic)
            .retry(CommandRetry::attempts(5));
        // At most one definition load per transition: the first attempt finds the
        // cache empty, the second finds it filled.
        for _ in 0..2 {
            let command = Transition {
                flows: self,
                id,
                work,
                decide,
                decided: Mutex::new(None),
                next: Mutex::new(None),
            };
            match executor.execute(&command).await {
                Ok(_) => {
                    let decided = command.decided.into_inner().expect("transition lock");
                    let next = command.next.into_inner().expect("transition lock");
                    let Decision { state, events, .. } = decided.expect("a transition decides");
                    return Ok(match next {
                        Some(next) => (next, events),
                        None => (state, Vec::new()),
                    });
                }
                Err(CommandError::Rejected(TransitionError::NeedDefinition(flow, version))) => {
                    self.definition(&flow, Some(&version)).await?;
                }
                Err(CommandError::Rejected(e) | CommandError::Aborted(e)) => return Err(e),
                Err(CommandError::Store(e)) => return Err(FlowError::Store(e).into()),
                Err(CommandError::Conflict { attempts }) => {
                    return Err(FlowError::Contended(format!(
                        "instance {id} still conflicted after {attempts} attempts"
                    ))
                    .into());
                }
            }
        }
        Err(FlowError::Contended(format!("instance {id}: definition did not load")).into())
    }
}
