//! Workers: claim instances that are due, plan, start steps, run them, record
//! their outcomes. Any number of workers (in any number of processes) share the
//! work; conditions on the instance's tag make every transition exactly-once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::FlowError;
use super::definition::{Action, FlowDefinition, TaskDefinition};
use super::engine::{Flows, TransitionError, TxWork, failure_events, step_event};
use super::events::{self, Phase, StepEvent, StepId, types};
use super::executor::{self, Effect, TaskContext, TaskError};
use super::plan::plan;
use super::state::{InstanceState, StepStatus};
use super::template;
use crate::{Event, Query, SubscriptionOptions};

/// Worker settings.
///
/// | setting | default |
/// |---|---|
/// | `id` | `worker-<random>` |
/// | `concurrency` (instances handled at once) | 16 |
/// | `claim_ttl` (how long a claimed instance is reserved without a heartbeat) | 30 s |
/// | `lease_grace` (added to a step's timeout before others may time it out) | 2 s |
/// | `poll_interval` (longest sleep between looks for due work) | 1 s |
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// This worker's name (recorded in `FlowStepStarted`).
    pub id: String,
    /// Instances handled at once.
    pub concurrency: usize,
    /// Reservation of a claimed instance, renewed while it is being worked on.
    pub claim_ttl: Duration,
    /// Added to a step's timeout to form its lease.
    pub lease_grace: Duration,
    /// Longest sleep between looks for due work.
    pub poll_interval: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            id: format!("worker-{}", &Uuid::new_v4().simple().to_string()[..8]),
            concurrency: 16,
            claim_ttl: Duration::from_secs(30),
            lease_grace: Duration::from_secs(2),
            poll_interval: Duration::from_secs(1),
        }
    }
}

impl WorkerOptions {
    /// Sets the worker's name.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }
}

/// A flow worker; see [`Flows::worker`].
#[derive(Debug, Clone)]
pub struct Worker {
    flows: Flows,
    options: Arc<WorkerOptions>,
}

impl Flows {
    /// A worker running this engine's instances.
    pub fn worker(&self, options: WorkerOptions) -> Worker {
        Worker {
            flows: self.clone(),
            options: Arc::new(options),
        }
    }
}

/// A finished attempt: step, attempt, the task's timeout (ms), result.
type Outcome = (StepId, u32, u64, Result<Effect, (TaskError, bool)>);

/// The shortest time between two looks of a worker's wake-up subscription.
const WAKE_GAP: Duration = Duration::from_millis(5);

impl Worker {
    /// Runs until `cancel` fires. Woken by a subscription to the flow events that
    /// create work (starts, operator actions) and by the earliest due time.
    ///
    /// # Errors
    /// Store errors that persist (transient ones are logged and retried).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), FlowError> {
        let store = self.flows.store().clone();
        let wake = Arc::new(Notify::new());
        let listener = {
            let (wake, cancel) = (wake.clone(), cancel.clone());
            let q = Query::items_of(
                [
                    types::STARTED,
                    types::RETRY_REQUESTED,
                    types::RESUMED,
                    types::ABORTED,
                    types::STEP_SKIPPED,
                ],
                Vec::<String>::new(),
            );
            let after = store.head().await?;
            let mut options = SubscriptionOptions::default();
            options.poll_interval = self.options.poll_interval;
            // Only a hint: the work itself is claimed from `flow_wakeups`, which
            // the poll below finds even if a late-committing start is skipped here.
            let mut sub = store.subscribe(q, after, options).await?.wake_signal();
            tokio::spawn(async move {
                while let Ok(Some(batch)) = sub.next_batch_or_cancel(&cancel).await {
                    if !batch.is_empty() {
                        wake.notify_one();
                    }
                    // Every commit in the store notifies; a busy store would have
                    // each worker re-read the log after each one. Looking at most
                    // every WAKE_GAP lets a burst of commits count as one.
                    tokio::time::sleep(WAKE_GAP).await;
                }
            })
        };
        let slots = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut busy: HashSet<Uuid> = HashSet::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Uuid>();
        while !cancel.is_cancelled() {
            while let Ok(id) = done_rx.try_recv() {
                busy.remove(&id);
            }
            while tasks.try_join_next().is_some() {}
            let free = slots.available_permits();
            let claimed = if free > 0 {
                match self.claim(free).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(worker = %self.options.id, error = %e, "claiming flow work failed");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            for id in claimed {
                if !busy.insert(id) {
                    continue;
                }
                let permit = slots.clone().acquire_owned().await.expect("semaphore open");
                let (me, cancel, done) = (self.clone(), cancel.clone(), done_tx.clone());
                tasks.spawn(async move {
                    if let Err(e) = me.reconcile(id, &cancel).await {
                        tracing::warn!(worker = %me.options.id, instance = %id, error = %e, "flow instance step failed");
                    }
                    let _ = me.release(id).await;
                    let _ = done.send(id);
                    drop(permit);
                });
            }
            let sleep = self
                .until_next_due()
                .await
                .unwrap_or(self.options.poll_interval);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = wake.notified() => {}
                Some(id) = done_rx.recv() => { busy.remove(&id); }
                () = tokio::time::sleep(sleep.min(self.options.poll_interval)) => {}
            }
        }
        tasks.shutdown().await;
        listener.abort();
        Ok(())
    }

    /// Claims up to `n` due, unclaimed instances.
    async fn claim(&self, n: usize) -> Result<Vec<Uuid>, FlowError> {
        self.flows.inner.stats.statements(1);
        let client = self.flows.store().pool().get().await?;
        let table = self.flows.store().table("flow_wakeups");
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE {table} w SET claimed_by = $1, claimed_until = now() + $2 * interval '1 millisecond' \
                 WHERE w.instance IN (SELECT instance FROM {table} \
                     WHERE due_at <= now() AND (claimed_until IS NULL OR claimed_until < now()) \
                     ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING w.instance"
            ))
            .await?;
        let ttl = self.options.claim_ttl.as_millis() as f64;
        let rows = client
            .query(&stmt, &[&self.options.id, &ttl, &(n as i64)])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Renews the claim on `id`.
    async fn heartbeat(&self, id: Uuid) -> Result<(), FlowError> {
        self.flows.inner.stats.statements(1);
        let client = self.flows.store().pool().get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE {} SET claimed_until = now() + $3 * interval '1 millisecond' \
                 WHERE instance = $1 AND claimed_by = $2",
                self.flows.store().table("flow_wakeups")
            ))
            .await?;
        let ttl = self.options.claim_ttl.as_millis() as f64;
        client
            .execute(&stmt, &[&id, &self.options.id, &ttl])
            .await?;
        Ok(())
    }

    async fn release(&self, id: Uuid) -> Result<(), FlowError> {
        self.flows.inner.stats.statements(1);
        let client = self.flows.store().pool().get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE {} SET claimed_by = NULL, claimed_until = NULL \
                 WHERE instance = $1 AND claimed_by = $2",
                self.flows.store().table("flow_wakeups")
            ))
            .await?;
        client.execute(&stmt, &[&id, &self.options.id]).await?;
        Ok(())
    }

    /// Time until the earliest due wake-up.
    async fn until_next_due(&self) -> Option<Duration> {
        self.flows.inner.stats.statements(1);
        let client = self.flows.store().pool().get().await.ok()?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT extract(epoch FROM min(due_at) - now())::float8 FROM {} \
                 WHERE claimed_until IS NULL OR claimed_until < now()",
                self.flows.store().table("flow_wakeups")
            ))
            .await
            .ok()?;
        let row = client.query_one(&stmt, &[]).await.ok()?;
        let seconds: Option<f64> = row.get(0);
        seconds.map(|s| Duration::from_secs_f64(s.max(0.0)))
    }

    /// Works on one instance until it needs nothing for a while.
    async fn reconcile(&self, id: Uuid, cancel: &CancellationToken) -> Result<(), FlowError> {
        let mut running: JoinSet<Outcome> = JoinSet::new();
        let mut last_beat = tokio::time::Instant::now();
        let (mut state, mut appended) = self.advance(id).await?;
        loop {
            if cancel.is_cancelled() {
                running.shutdown().await;
                return Ok(());
            }
            if last_beat.elapsed() > self.options.claim_ttl / 3 {
                self.heartbeat(id).await?;
                last_beat = tokio::time::Instant::now();
            }
            let def = self
                .flows
                .definition(&state.flow, Some(&state.version))
                .await?;
            for e in &appended {
                if e.event_type != types::STEP_STARTED {
                    continue;
                }
                let Ok(d) = serde_json::from_value::<StepEvent>(e.data.clone()) else {
                    continue;
                };
                if let (Some(step), Some(attempt)) = (d.step, d.attempt) {
                    self.spawn_step(&mut running, &def, &state, step, attempt);
                }
            }
            let now = Utc::now();
            let next = plan(&def, &state, now).next_due;
            let wait = next.map(|at| (at - now).to_std().unwrap_or_default());
            if running.is_empty() {
                // Nothing in flight: keep the instance only for a due time that is near.
                match wait {
                    Some(w) if w <= self.options.poll_interval => {
                        tokio::select! {
                            () = tokio::time::sleep(w) => {
                                (state, appended) = self.advance(id).await?;
                                continue;
                            }
                            () = cancel.cancelled() => return Ok(()),
                        }
                    }
                    _ => return Ok(()),
                }
            }
            let beat = self.options.claim_ttl / 3;
            tokio::select! {
                Some(joined) = running.join_next() => {
                    match joined {
                        Ok(outcome) => (state, appended) = self.record(id, outcome).await?,
                        Err(e) => {
                            tracing::warn!(instance = %id, error = %e, "step task panicked");
                            appended = Vec::new();
                        }
                    }
                }
                () = tokio::time::sleep(wait.unwrap_or(beat).min(beat)) => {
                    (state, appended) = self.advance(id).await?;
                }
                () = cancel.cancelled() => { appended = Vec::new(); }
            }
        }
    }

    /// One planning round as one transition. Returns the state and what was appended.
    async fn advance(&self, id: Uuid) -> Result<(InstanceState, Vec<Event>), FlowError> {
        let result = self
            .flows
            .transition(id, TxWork::None, |state, def, now| {
                Ok(self.plan_events(id, def, state, now))
            })
            .await;
        flatten(result)
    }

    /// The events of planning rounds on `state` until steps start or nothing is
    /// left to do: timeouts, instance-level changes (compensating, completed, ...)
    /// and the steps to start now, all for one transition.
    fn plan_events(
        &self,
        id: Uuid,
        def: &FlowDefinition,
        state: &InstanceState,
        now: chrono::DateTime<Utc>,
    ) -> Vec<Event> {
        let mut all = Vec::new();
        let mut current = state.clone();
        for _ in 0..4 {
            let (events, complete) = self.plan_round(id, def, &current, now);
            if complete || events.is_empty() {
                all.extend(events);
                break;
            }
            current = preview(&current, &events, now);
            all.extend(events);
        }
        all
    }

    /// One planning round: timeouts, or else an instance-level change, or else
    /// the steps to start (`true`: nothing further to plan after these).
    fn plan_round(
        &self,
        id: Uuid,
        def: &FlowDefinition,
        state: &InstanceState,
        now: chrono::DateTime<Utc>,
    ) -> (Vec<Event>, bool) {
        let p = plan(def, state, now);
        let mut out = Vec::new();
        for step in &p.timeouts {
            let Some(task) = def.task(&step.task) else {
                continue;
            };
            let error = TaskError::retryable(format!(
                "attempt {} exceeded its lease (worker {:?} gone or late)",
                state.step(step).attempts,
                state.step(step).worker.clone().unwrap_or_default()
            ))
            .code("timeout");
            out.extend(failure_events(id, task, state, step, &error, true, now));
        }
        if !out.is_empty() {
            return (out, false);
        }
        if let Some((ty, reason)) = &p.instance {
            let event = events::event(
                id,
                ty,
                events::Operator {
                    actor: None,
                    reason: (!reason.is_empty()).then(|| reason.clone()),
                    step: None,
                },
            );
            return (vec![event], false);
        }
        for step in &p.start {
            let Some(task) = def.task(&step.task) else {
                continue;
            };
            let lease = now
                + chrono::Duration::milliseconds(task.timeout_ms as i64)
                + chrono::Duration::from_std(self.options.lease_grace).unwrap_or_default();
            out.push(step_event(
                id,
                types::STEP_STARTED,
                StepEvent {
                    step: Some(step.clone()),
                    attempt: Some(state.step(step).attempts + 1),
                    worker: Some(self.options.id.clone()),
                    lease_until: Some(lease),
                    ..Default::default()
                },
            ));
        }
        (out, true)
    }

    fn spawn_step(
        &self,
        running: &mut JoinSet<Outcome>,
        def: &FlowDefinition,
        state: &InstanceState,
        step: StepId,
        attempt: u32,
    ) {
        let Some(task) = def.task(&step.task).cloned() else {
            return;
        };
        let ctx = context(state, &task, &step, attempt);
        let action = action_of(&task, &step).cloned();
        let http = self.flows.inner.http.clone();
        let function = match &action {
            Some(Action::Rust { function }) => self
                .flows
                .inner
                .functions
                .read()
                .expect("functions lock")
                .get(function)
                .cloned(),
            _ => None,
        };
        running.spawn(async move {
            let result = match (ctx, action) {
                (Err(e), _) => Err((e, false)),
                (Ok(_), None) => Err((TaskError::fatal(format!("{step} has no action")), false)),
                (Ok(ctx), Some(action)) => {
                    let timeout = Duration::from_millis(task.timeout_ms);
                    match tokio::time::timeout(
                        timeout,
                        executor::run(&action, ctx, &http, function),
                    )
                    .await
                    {
                        Ok(Ok(effect)) => Ok(effect),
                        Ok(Err(e)) => Err((e, false)),
                        Err(_) => Err((
                            TaskError::retryable(format!("timed out after {} ms", task.timeout_ms))
                                .code("timeout"),
                            true,
                        )),
                    }
                }
            };
            (step, attempt, task.timeout_ms, result)
        });
    }

    /// Records an attempt's outcome, if the attempt is still the current one (a
    /// late worker whose lease expired loses here), together with the next
    /// planning round, in one transition. SQL runs in this transaction.
    async fn record(
        &self,
        id: Uuid,
        outcome: Outcome,
    ) -> Result<(InstanceState, Vec<Event>), FlowError> {
        let (step, attempt, timeout_ms, result) = outcome;
        let step = &step;
        let current = |state: &InstanceState| {
            let s = state.step(step);
            s.status == StepStatus::Running && s.attempts == attempt
        };
        let with_plan = |state: &InstanceState, def: &FlowDefinition, now, events: Vec<Event>| {
            let preview = preview(state, &events, now);
            let mut events = events;
            events.extend(self.plan_events(id, def, &preview, now));
            events
        };
        let failure = match result {
            Ok(effect) => {
                let (work, output, message) = match &effect {
                    Effect::Output(v) => (TxWork::None, v.clone(), None),
                    Effect::Sql(statements) => {
                        (TxWork::Sql(statements, timeout_ms), Value::Null, None)
                    }
                    Effect::Message { subject, payload } => (
                        TxWork::None,
                        Value::Null,
                        Some(serde_json::json!({"subject": subject, "payload": payload})),
                    ),
                };
                let key = step.idempotency_key(id);
                let outcome = self
                    .flows
                    .transition(id, work, |state, def, now| {
                        if !current(state) {
                            return Ok(Vec::new());
                        }
                        let mut out = vec![step_event(id, types::STEP_SUCCEEDED, StepEvent {
                            step: Some(step.clone()),
                            attempt: Some(attempt),
                            output: Some(output.clone()),
                            ..Default::default()
                        })];
                        if let Some(m) = &message {
                            out.push(
                                Event::new(
                                    types::MESSAGE,
                                    [events::instance_tag(id), "flow_outbox".to_owned()],
                                    m.clone(),
                                )
                                .with_metadata(serde_json::json!({"idempotency_key": key, "publish": "data.payload"})),
                            );
                        }
                        Ok(with_plan(state, def, now, out))
                    })
                    .await;
                match outcome {
                    Ok(r) => return Ok(r),
                    Err(TransitionError::Flow(e)) => return Err(e),
                    Err(TransitionError::Sql(e)) => sql_failure(&e),
                }
            }
            Err(f) => f,
        };
        let (error, timed_out) = failure;
        let result = self
            .flows
            .transition(id, TxWork::None, |state, def, now| {
                if !current(state) {
                    return Ok(Vec::new());
                }
                let Some(task) = def.task(&step.task) else {
                    return Ok(Vec::new());
                };
                let out = failure_events(id, task, state, step, &error, timed_out, now);
                Ok(with_plan(state, def, now, out))
            })
            .await;
        flatten(result)
    }
}

/// `state` as it will be once `events` are appended (for planning ahead).
fn preview(state: &InstanceState, events: &[Event], now: chrono::DateTime<Utc>) -> InstanceState {
    let mut next = state.clone();
    for e in events {
        next.apply(&crate::SequencedEvent {
            position: state.version_position,
            transaction_id: crate::TransactionId(0),
            recorded_at: now,
            event: e.clone(),
        });
    }
    next
}

/// A failed SQL step: serialization failures, deadlocks, lost connections and
/// statement timeouts (57014) may pass on another attempt; other errors are fatal.
fn sql_failure(e: &tokio_postgres::Error) -> (TaskError, bool) {
    let retryable = e.is_closed()
        || e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("40") || c.starts_with("08") || c == "57014"
        });
    let message = match e.as_db_error() {
        Some(db) => format!("SQL error {}: {}", db.code().code(), db.message()),
        None => format!("SQL error: {e}"),
    };
    let err = if retryable {
        TaskError::retryable(message)
    } else {
        TaskError::fatal(message)
    };
    let code = e
        .code()
        .map(|c| format!("sql_{}", c.code()))
        .unwrap_or_else(|| "sql".into());
    (err.code(code), false)
}

fn flatten<T>(r: Result<T, TransitionError>) -> Result<T, FlowError> {
    match r {
        Ok(v) => Ok(v),
        Err(TransitionError::Flow(e)) => Err(e),
        Err(TransitionError::Sql(e)) => Err(e.into()),
    }
}

/// The action a step runs.
fn action_of<'a>(task: &'a TaskDefinition, step: &StepId) -> Option<&'a Action> {
    match step.phase {
        Phase::Action => task.action.as_ref(),
        Phase::Compensate => task.compensate.as_ref(),
        phase => {
            let p = task
                .tcc
                .as_ref()?
                .participants
                .iter()
                .find(|p| Some(&p.name) == step.participant.as_ref())?;
            Some(match phase {
                Phase::Try => &p.try_action,
                Phase::Confirm => &p.confirm,
                _ => &p.cancel,
            })
        }
    }
}

/// The attempt's context, with the task's input resolved.
fn context(
    state: &InstanceState,
    task: &TaskDefinition,
    step: &StepId,
    attempt: u32,
) -> Result<TaskContext, TaskError> {
    let instance = state.id.to_string();
    let key = step.idempotency_key(state.id);
    let t = template::Context {
        flow_input: &state.input,
        outputs: &state.outputs,
        input: None,
        instance: &instance,
        idempotency_key: &key,
        business_key: state.business_key.as_deref(),
    };
    let input = template::render(&Value::Object(task.input.clone().into_iter().collect()), &t)
        .map_err(|e| TaskError::fatal(e).code("template"))?;
    Ok(TaskContext {
        instance: state.id,
        flow: state.flow.clone(),
        step: step.clone(),
        attempt,
        idempotency_key: key,
        input,
        flow_input: state.input.clone(),
        outputs: state.outputs.clone().into_iter().collect(),
        business_key: state.business_key.clone(),
    })
}
