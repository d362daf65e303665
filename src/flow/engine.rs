//! [`Flows`]: registering definitions, starting instances, transitions, queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::definition::{FlowDefinition, TaskDefinition};
use super::events::{self, Phase, Started, StepEvent, StepId, types};
use super::executor::{Erased, TaskError, TaskExecutor};
use super::plan::{Plan, plan};
use super::state::{InstanceState, InstanceStatus, StepStatus};
use super::{FlowError, validate};
use crate::{
    AppendCondition, Event, Query, QueryItem, ReadOptions, SequencedEvent, Store, TransactionId,
};

/// The flow engine's entry point: register definitions and functions, start
/// instances, operate on them, query them, and run [`Worker`](super::Worker)s.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store) -> Result<(), dcbflow::FlowError> {
/// use dcbflow::{Action, FlowDefinition, Flows, TaskDefinition, TaskError};
/// use serde_json::json;
///
/// let flows = Flows::new(store);
/// flows.function("reserve", |ctx: dcbflow::TaskContext| async move {
///     Ok::<_, TaskError>(json!({"reserved": ctx.input["sku"]}))
/// });
/// let order = FlowDefinition::builder("order")
///     .task(TaskDefinition::new("reserve", Action::rust("reserve")).input("sku", json!("{{flow.input.sku}}")))
///     .build();
/// flows.register(&order).await?;
/// let started = flows.start("order", Some("order-1"), json!({"sku": "A-1"})).await?;
/// println!("instance {}", started.instance);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Flows {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) functions: RwLock<HashMap<String, Arc<dyn Erased>>>,
    definitions: RwLock<HashMap<(String, String), Arc<FlowDefinition>>>,
    pub(crate) http: reqwest::Client,
    pub(crate) stats: Counters,
}

/// Counters behind [`Flows::stats`].
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) transitions: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) statements: AtomicU64,
}

impl Counters {
    pub(crate) fn statements(&self, n: u64) {
        self.statements.fetch_add(n, Ordering::Relaxed);
    }
}

/// What this engine (all its workers, in this process) has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowStats {
    /// Transitions committed (each one transaction appending one or more events).
    pub transitions: u64,
    /// Events those transitions appended.
    pub events: u64,
    /// SQL statements sent for flows: transactions' BEGIN/COMMIT/ROLLBACK, locks,
    /// reads, appends, read-model writes, SQL steps, and the workers' claims,
    /// heartbeats and releases.
    pub statements: u64,
}

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flows")
            .field("schema", &self.inner.store.schema())
            .finish_non_exhaustive()
    }
}

/// An instance that [`Flows::start`] started or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedInstance {
    /// The instance id.
    pub instance: Uuid,
    /// The definition version it runs on.
    pub version: String,
    /// `false` if an instance with the business key already existed (and is returned).
    pub created: bool,
}

/// Work a transition does in its transaction besides appending.
pub(crate) enum TxWork<'a> {
    None,
    /// Statements with text parameters, and the task's timeout in milliseconds
    /// (the transaction's `statement_timeout`).
    Sql(&'a [(String, Vec<Option<String>>)], u64),
}

/// A transition that did not happen because its SQL failed (rolled back).
pub(crate) enum TransitionError {
    Flow(FlowError),
    Sql(tokio_postgres::Error),
}

impl<E: Into<FlowError>> From<E> for TransitionError {
    fn from(e: E) -> Self {
        TransitionError::Flow(e.into())
    }
}

pub(crate) fn instance_query(id: Uuid) -> Query {
    Query::from_items([QueryItem::new().tags([events::instance_tag(id)])])
}

impl Flows {
    /// The flow engine on `store` (its tables come with the store's migrations).
    pub fn new(store: Store) -> Self {
        Flows {
            inner: Arc::new(Inner {
                store,
                functions: RwLock::default(),
                definitions: RwLock::default(),
                http: reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build()
                    .expect("HTTP client"),
                stats: Counters::default(),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Counters of what this engine did (for benchmarks and metrics).
    pub fn stats(&self) -> FlowStats {
        let c = &self.inner.stats;
        FlowStats {
            transitions: c.transitions.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            statements: c.statements.load(Ordering::Relaxed),
        }
    }

    /// Registers a Rust function for `executor: rust` actions named `name`. Register
    /// functions before the definitions that use them, in every worker process.
    pub fn function(&self, name: impl Into<String>, executor: impl TaskExecutor) -> &Self {
        self.inner
            .functions
            .write()
            .expect("functions lock")
            .insert(name.into(), Arc::new(executor));
        self
    }

    fn function_names(&self) -> Vec<String> {
        self.inner
            .functions
            .read()
            .expect("functions lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Validates and registers a definition; returns its version (content hash).
    /// Registering the same content again is a no-op returning the same version;
    /// new content under the same name is a new version, used by new instances,
    /// while running ones keep theirs.
    ///
    /// # Errors
    /// [`FlowError::Definition`] listing every problem; store errors.
    pub async fn register(&self, definition: &FlowDefinition) -> Result<String, FlowError> {
        let names = self.function_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        validate(definition, &names)?;
        let version = definition.version();
        // A stable event id per (name, version): registering again is a replay.
        let digest = <sha2::Sha256 as sha2::Digest>::digest(
            format!("dcbflow-definition:{}:{version}", definition.name).as_bytes(),
        );
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        let id = Uuid::from_bytes(bytes);
        let event = Event::new(
            types::DEFINITION_REGISTERED,
            [
                events::definition_tag(&definition.name),
                format!("flow_version:{}:{version}", definition.name),
            ],
            json!({"name": definition.name, "version": version, "definition": definition}),
        )
        .with_id(id);
        self.inner.store.append(vec![event], None).await?;
        self.inner
            .definitions
            .write()
            .expect("definitions lock")
            .insert(
                (definition.name.clone(), version.clone()),
                Arc::new(definition.clone()),
            );
        Ok(version)
    }

    /// The definition of `flow` at `version` (`None`: the latest registered).
    ///
    /// # Errors
    /// [`FlowError::UnknownFlow`]; store errors.
    pub async fn definition(
        &self,
        flow: &str,
        version: Option<&str>,
    ) -> Result<Arc<FlowDefinition>, FlowError> {
        if let Some(v) = version
            && let Some(d) = self
                .inner
                .definitions
                .read()
                .expect("definitions lock")
                .get(&(flow.to_owned(), v.to_owned()))
        {
            return Ok(d.clone());
        }
        let tag = match version {
            Some(v) => format!("flow_version:{flow}:{v}"),
            None => events::definition_tag(flow),
        };
        let q = Query::items_of([types::DEFINITION_REGISTERED], [tag]);
        let Some(e) = self.inner.store.read_last(&q).await? else {
            return Err(FlowError::UnknownFlow(match version {
                Some(v) => format!("{flow}@{v}"),
                None => flow.to_owned(),
            }));
        };
        let def: FlowDefinition = serde_json::from_value(e.data()["definition"].clone())
            .map_err(|err| FlowError::NotAllowed(format!("stored definition unreadable: {err}")))?;
        let version = def.version();
        let def = Arc::new(def);
        self.inner
            .definitions
            .write()
            .expect("definitions lock")
            .insert((flow.to_owned(), version), def.clone());
        Ok(def)
    }

    /// Starts an instance of the latest version of `flow`. With a business key, a
    /// second start with the same key returns the existing instance
    /// (`created: false`) instead of starting another.
    ///
    /// # Errors
    /// [`FlowError::UnknownFlow`]; [`FlowError::InvalidInput`] when `input` does
    /// not match the definition's input fields (nothing is written); store errors.
    pub async fn start(
        &self,
        flow: &str,
        business_key: Option<&str>,
        input: Value,
    ) -> Result<StartedInstance, FlowError> {
        let def = self.definition(flow, None).await?;
        check_input(&def, &input)?;
        let version = def.version();
        let store = &self.inner.store;
        let key_query = business_key
            .map(|k| Query::items_of([types::STARTED], [events::business_key_tag(flow, k)]));
        for _ in 0..3 {
            let mut client = store.pool().get().await?;
            let tx = client.transaction().await?;
            let mut condition = None;
            if let Some(q) = &key_query {
                let found = store
                    .read_in_tx(&tx, q, ReadOptions::default())
                    .await?
                    .collect_all()
                    .await?;
                if let Some(e) = found.events.first() {
                    let s: Started = serde_json::from_value(e.data().clone())
                        .map_err(|err| FlowError::NotAllowed(err.to_string()))?;
                    return Ok(StartedInstance {
                        instance: s.instance,
                        version: s.version,
                        created: false,
                    });
                }
                condition = Some(AppendCondition::new(q.clone()).after(found.cursor));
            }
            let id = Uuid::new_v4();
            let now = Utc::now();
            let started = Started {
                instance: id,
                flow: flow.to_owned(),
                version: version.clone(),
                business_key: business_key.map(str::to_owned),
                input: input.clone(),
                deadline_at: def
                    .deadline_ms
                    .map(|ms| now + chrono::Duration::milliseconds(ms as i64)),
            };
            let mut tags = vec![events::instance_tag(id), events::flow_tag(flow)];
            if let Some(k) = business_key {
                tags.push(events::business_key_tag(flow, k));
            }
            let event = Event::new(
                types::STARTED,
                tags,
                serde_json::to_value(&started).expect("serializes"),
            );
            match store
                .append_in_tx(&tx, vec![event.clone()], condition)
                .await
            {
                Ok(r) => {
                    let appended = sequenced(vec![event], &r.positions, r.transaction_id, now);
                    let state = InstanceState::fold(&appended).expect("a start folds");
                    sync(&tx, store, &def, &state, now).await?;
                    tx.commit().await?;
                    let stats = &self.inner.stats;
                    stats.statements(4 + u64::from(key_query.is_some()));
                    stats.transitions.fetch_add(1, Ordering::Relaxed);
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    return Ok(StartedInstance {
                        instance: id,
                        version,
                        created: true,
                    });
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FlowError::NotAllowed("start kept conflicting".into()))
    }

    /// Rebuilds the read models (instances, wake-ups, incidents) from the log.
    ///
    /// # Errors
    /// Store errors.
    pub async fn rebuild_read_models(&self) -> Result<u64, FlowError> {
        let store = &self.inner.store;
        let starts = store
            .read_all(
                &Query::items_of([types::STARTED], Vec::<String>::new()),
                ReadOptions::default(),
            )
            .await?;
        let mut n = 0;
        for e in starts.events {
            let Ok(s) = serde_json::from_value::<Started>(e.data().clone()) else {
                continue;
            };
            let mut client = store.pool().get().await?;
            let tx = client.transaction().await?;
            let events = store
                .read_in_tx(&tx, &instance_query(s.instance), ReadOptions::default())
                .await?
                .collect_all()
                .await?;
            if let Some(state) = InstanceState::fold(&events.events) {
                let def = self.definition(&state.flow, Some(&state.version)).await?;
                sync(&tx, store, &def, &state, Utc::now()).await?;
                n += 1;
            }
            tx.commit().await?;
        }
        Ok(n)
    }

    /// Runs one transition of instance `id`: under the instance's lock, fold its
    /// events, let `decide` choose the events, run `work`, append them with a
    /// condition on the instance, update the read models, commit.
    pub(crate) async fn transition<D>(
        &self,
        id: Uuid,
        work: TxWork<'_>,
        decide: D,
    ) -> Result<(InstanceState, Vec<Event>), TransitionError>
    where
        D: Fn(&InstanceState, &FlowDefinition, DateTime<Utc>) -> Result<Vec<Event>, FlowError>,
    {
        let store = &self.inner.store;
        let q = instance_query(id);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result: Result<_, TransitionError> = async {
                let mut client = store.pool().get().await.map_err(FlowError::from)?;
                let tx = client.transaction().await?;
                store.lock_scope_in_tx(&tx, &q).await?;
                let read = store
                    .read_in_tx(&tx, &q, ReadOptions::default())
                    .await?
                    .collect_all()
                    .await?;
                let state =
                    InstanceState::fold(&read.events).ok_or(FlowError::UnknownInstance(id))?;
                let def = self.definition(&state.flow, Some(&state.version)).await?;
                let now = Utc::now();
                let events = decide(&state, &def, now)?;
                // BEGIN, lock, read, and COMMIT or ROLLBACK.
                self.inner.stats.statements(4);
                if events.is_empty() {
                    return Ok((state, events));
                }
                if let TxWork::Sql(statements, timeout_ms) = &work {
                    self.inner.stats.statements(1 + statements.len() as u64);
                    tx.batch_execute(&format!("SET LOCAL statement_timeout = {timeout_ms}"))
                        .await
                        .map_err(TransitionError::Sql)?;
                    for (sql, params) in statements.iter() {
                        let types = vec![tokio_postgres::types::Type::TEXT; params.len()];
                        let stmt = tx
                            .prepare_typed(sql, &types)
                            .await
                            .map_err(TransitionError::Sql)?;
                        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                            .iter()
                            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                            .collect();
                        tx.execute(&stmt, &refs)
                            .await
                            .map_err(TransitionError::Sql)?;
                    }
                }
                // The condition is checked after the log's head as a bare
                // position, without the read's snapshot. The same guarantee: this
                // transaction holds the instance's scope lock since before its
                // read, so no event of the instance was in flight then or can be
                // appended by anyone else until it commits. But the check is the
                // cheapest one, a short scan after the head, where the snapshot
                // would add a probe per transaction in flight (many, when many
                // instances run at once).
                let after = read
                    .cursor
                    .position
                    .map_or(read.cursor.clone(), crate::Cursor::at);
                let condition = AppendCondition::new(q.clone()).after(after);
                let r = store
                    .append_in_tx_quiet(&tx, events.clone(), Some(condition))
                    .await?;
                let appended = sequenced(events.clone(), &r.positions, r.transaction_id, now);
                let mut next = state;
                for e in &appended {
                    next.apply(e);
                }
                sync(&tx, store, &def, &next, now).await?;
                tx.commit().await?;
                store.wake_subscribers();
                let stats = &self.inner.stats;
                stats.statements(2); // append, read models
                stats.transitions.fetch_add(1, Ordering::Relaxed);
                stats
                    .events
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                Ok((next, events))
            }
            .await;
            match result {
                Err(TransitionError::Flow(FlowError::Store(e)))
                    if attempt < 5 && e.is_retryable() =>
                {
                    tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                }
                other => return other,
            }
        }
    }
}

fn check_input(def: &FlowDefinition, input: &Value) -> Result<(), FlowError> {
    if def.input.is_empty() {
        return Ok(());
    }
    let Some(obj) = input.as_object() else {
        return Err(FlowError::InvalidInput(vec![
            "the input must be a JSON object".into(),
        ]));
    };
    let problems: Vec<String> = def
        .input
        .iter()
        .filter_map(|(name, ty)| match obj.get(name) {
            None => Some(format!("missing field {name:?}")),
            Some(v) if !ty.admits(v) => Some(format!("field {name:?} must be {ty:?}, got {v}")),
            _ => None,
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(FlowError::InvalidInput(problems))
    }
}

pub(crate) fn step_event(id: Uuid, ty: &str, data: StepEvent) -> Event {
    events::event(id, ty, data)
}

/// Appended events as the log will return them.
fn sequenced(
    events: Vec<Event>,
    positions: &[crate::Position],
    transaction_id: TransactionId,
    now: DateTime<Utc>,
) -> Vec<SequencedEvent> {
    events
        .into_iter()
        .zip(positions)
        .map(|(event, position)| SequencedEvent {
            position: *position,
            transaction_id,
            recorded_at: now,
            event,
        })
        .collect()
}

/// The events recording a failed attempt: failed (or timed out), and a retry if
/// the policy allows one.
pub(crate) fn failure_events(
    id: Uuid,
    task: &TaskDefinition,
    state: &InstanceState,
    step: &StepId,
    error: &TaskError,
    timed_out: bool,
    now: DateTime<Utc>,
) -> Vec<Event> {
    let s = state.step(step);
    let policy = &task.retry;
    let listed = policy
        .retry_on
        .as_ref()
        .is_none_or(|codes| error.code.as_ref().is_some_and(|c| codes.contains(c)));
    let forward_while_compensating = state.status == InstanceStatus::Compensating
        && matches!(step.phase, Phase::Action | Phase::Try);
    let exhausted = !error.retryable
        || !listed
        || forward_while_compensating
        || s.counted_attempts() >= policy.max_attempts;
    let ty = if timed_out {
        types::STEP_TIMED_OUT
    } else {
        types::STEP_FAILED
    };
    let mut out = vec![step_event(
        id,
        ty,
        StepEvent {
            step: Some(step.clone()),
            attempt: Some(s.attempts),
            error: Some(error.message.clone()),
            code: error.code.clone(),
            exhausted,
            ..Default::default()
        },
    )];
    if !exhausted {
        let mut delay = policy.delay(s.counted_attempts());
        if let Some(after) = error.retry_after {
            delay = delay.max(after);
        }
        out.push(step_event(
            id,
            types::STEP_RETRY_SCHEDULED,
            StepEvent {
                step: Some(step.clone()),
                attempt: Some(s.attempts + 1),
                due_at: Some(now + chrono::Duration::from_std(delay).unwrap_or_default()),
                ..Default::default()
            },
        ));
    }
    out
}

/// The incidents of an instance in its current state.
fn incidents(state: &InstanceState) -> Value {
    let mut out = Vec::new();
    // A completed or fully compensated instance has nothing left to fix.
    if matches!(
        state.status,
        InstanceStatus::Completed | InstanceStatus::Compensated
    ) {
        return Value::Array(out);
    }
    for s in state.steps.values() {
        let kind = match (s.status, s.step.phase) {
            (StepStatus::Failed, Phase::Compensate | Phase::Cancel) => "compensation_failed",
            (StepStatus::Failed, _) => "exhausted",
            (StepStatus::RetryDue, _) if s.timed_out => "timed_out",
            _ => continue,
        };
        out.push(json!({
            "step": s.step.key(), "task": s.step.task, "kind": kind,
            "error": s.error.clone().unwrap_or_default(), "occurrences": s.attempts,
        }));
    }
    if state.status == InstanceStatus::Paused && out.is_empty() {
        out.push(json!({
            "step": "", "task": "", "kind": "paused",
            "error": state.reason.clone().unwrap_or_default(), "occurrences": 1,
        }));
    }
    Value::Array(out)
}

/// When the instance next needs a worker.
pub(crate) fn next_due(p: &Plan, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if p.is_idle() { p.next_due } else { Some(now) }
}

/// Writes the instance's read models in the transition's transaction.
async fn sync(
    tx: &deadpool_postgres::Transaction<'_>,
    store: &Store,
    def: &FlowDefinition,
    state: &InstanceState,
    now: DateTime<Utc>,
) -> Result<(), FlowError> {
    let p = plan(def, state, now);
    let due = next_due(&p, now);
    let stmt = tx
        .prepare_cached(&format!("SELECT {}($1, $2, $3)", store.table("flow_sync")))
        .await?;
    let row = serde_json::to_value(state).expect("state serializes");
    tx.execute(&stmt, &[&row, &due, &incidents(state)]).await?;
    Ok(())
}
