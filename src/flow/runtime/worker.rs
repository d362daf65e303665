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

use tracing::Instrument;

use super::engine::Flows;
use super::executor::{self, Effect, TaskContext};
use super::transition::TransitionError;
use crate::flow::FlowError;
use crate::flow::model::decide::{Lessee, failure_events, next_events, preview};
use crate::flow::model::definition::{FlowDefinition, TaskDefinition};
use crate::flow::model::events::{FlowEvent, Message, StepId, StepSucceeded, types};
use crate::flow::model::failure::TaskError;
use crate::flow::model::plan::plan;
use crate::flow::model::state::{InstanceState, StepStatus};
use crate::flow::model::template;
use crate::projection::{Subscription, SubscriptionOptions};
use crate::store::{Query, sqlstate};

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
    ///
    /// Its concurrency never exceeds what the store's pool can serve: every
    /// instance in progress may need a connection, and the worker's own loop
    /// needs one, so a `concurrency` above the pool's size minus one is lowered to
    /// it (with a warning). Size the pool from the concurrency you want.
    pub fn worker(&self, mut options: WorkerOptions) -> Worker {
        let pool = self.store().pool().status().max_size;
        let most = pool.saturating_sub(1).max(1);
        if options.concurrency > most {
            tracing::warn!(
                worker = %options.id,
                concurrency = options.concurrency,
                pool,
                "worker concurrency lowered to what the pool can serve"
            );
            options.concurrency = most;
        }
        Worker {
            flows: self.clone(),
            options: Arc::new(options),
        }
    }
}

/// A finished attempt.
#[derive(Debug)]
struct Finished {
    step: StepId,
    attempt: u32,
    /// The task's timeout, in milliseconds.
    timeout_ms: u64,
    result: Result<Effect, Failure>,
}

/// A failed attempt.
#[derive(Debug)]
struct Failure {
    error: TaskError,
    /// It ran past its timeout.
    timed_out: bool,
}

impl Failure {
    fn new(error: TaskError) -> Self {
        Failure {
            error,
            timed_out: false,
        }
    }
}

/// The shortest time between two looks of a worker's wake-up subscription.
const WAKE_GAP: Duration = Duration::from_millis(5);

impl Worker {
    /// The concurrency this worker runs with (after [`Flows::worker`] fitted it
    /// to the pool).
    pub fn concurrency(&self) -> usize {
        self.options.concurrency
    }

    /// Runs until `cancel` fires. Woken by a subscription to the flow events that
    /// create work (starts, operator actions) and by the earliest due time.
    ///
    /// # Errors
    /// Store errors that persist (transient ones are logged and retried).
    #[tracing::instrument(name = "dcbflow.worker.run", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.flows.store().schema(), worker = %self.options.id, concurrency = self.options.concurrency))]
    pub async fn run(self, cancel: CancellationToken) -> Result<(), FlowError> {
        self.flows.ready().await?;
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
            let mut sub = Subscription::connect(&store, q, after, options)
                .await?
                .wake_signal();
            tokio::spawn(
                async move {
                    while let Ok(Some(batch)) = sub.next_batch_or_cancel(&cancel).await {
                        if !batch.is_empty() {
                            wake.notify_one();
                        }
                        // Every commit in the store notifies; a busy store would have
                        // each worker re-read the log after each one. Looking at most
                        // every WAKE_GAP lets a burst of commits count as one.
                        tokio::time::sleep(WAKE_GAP).await;
                    }
                }
                .instrument(tracing::debug_span!("dcbflow.worker.wakeups")),
            )
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
                tasks.spawn(
                    async move {
                        if let Err(e) = me.reconcile(id, &cancel).await {
                            tracing::warn!(worker = %me.options.id, instance = %id, error = %e, "flow instance step failed");
                        }
                        let _ = me.release(id).await;
                        let _ = done.send(id);
                        drop(permit);
                    }
                    .instrument(tracing::debug_span!("dcbflow.worker.instance", instance = %id)),
                );
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
        let mut running: JoinSet<Finished> = JoinSet::new();
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
                .definition(&state.flow, Some(&state.definition_version))
                .await?;
            for e in &appended {
                if let FlowEvent::StepStarted(d) = e {
                    self.spawn_step(&mut running, &def, &state, d.step.clone(), d.attempt);
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

    /// Who starts steps in this worker's transitions.
    fn lessee(&self) -> Lessee<'_> {
        Lessee {
            worker: &self.options.id,
            lease_grace: self.options.lease_grace,
        }
    }

    /// One planning round as one transition. Returns the state and what was appended.
    async fn advance(&self, id: Uuid) -> Result<(InstanceState, Vec<FlowEvent>), FlowError> {
        let result = self
            .flows
            .transition(id, None, |state, def, now| {
                Ok(next_events(def, state, now, self.lessee()))
            })
            .await;
        flatten(result)
    }

    fn spawn_step(
        &self,
        running: &mut JoinSet<Finished>,
        def: &FlowDefinition,
        state: &InstanceState,
        step: StepId,
        attempt: u32,
    ) {
        let Some(task) = def.task(&step.task).cloned() else {
            return;
        };
        let ctx = context(state, &task, &step, attempt);
        let action = task.action_for(&step).cloned();
        #[cfg(feature = "http")]
        let http = self.flows.inner.http.clone();
        let function = match &action {
            Some(crate::flow::model::definition::Action::Rust { function }) => {
                self.flows.registered_function(function)
            }
            _ => None,
        };
        let span = tracing::debug_span!("dcbflow.step", step = %step, attempt);
        running.spawn(
            async move {
                let result = match (ctx, action) {
                    (Err(e), _) => Err(Failure::new(e)),
                    (Ok(_), None) => Err(Failure::new(TaskError::fatal(format!(
                        "{step} has no action"
                    )))),
                    (Ok(ctx), Some(action)) => {
                        let timeout = Duration::from_millis(task.timeout_ms);
                        let run = executor::run(
                            &action,
                            ctx,
                            #[cfg(feature = "http")]
                            &http,
                            function,
                        );
                        match tokio::time::timeout(timeout, run).await {
                            Ok(Ok(effect)) => Ok(effect),
                            Ok(Err(e)) => Err(Failure::new(e)),
                            Err(_) => Err(Failure {
                                error: TaskError::retryable(format!(
                                    "timed out after {} ms",
                                    task.timeout_ms
                                ))
                                .code("timeout"),
                                timed_out: true,
                            }),
                        }
                    }
                };
                Finished {
                    step,
                    attempt,
                    timeout_ms: task.timeout_ms,
                    result,
                }
            }
            .instrument(span),
        );
    }

    /// Records an attempt's outcome, if the attempt is still the current one (a
    /// late worker whose lease expired loses here), together with the next
    /// planning round, in one transition. SQL runs in this transaction.
    async fn record(
        &self,
        id: Uuid,
        finished: Finished,
    ) -> Result<(InstanceState, Vec<FlowEvent>), FlowError> {
        let Finished {
            step,
            attempt,
            timeout_ms,
            result,
        } = finished;
        let step = &step;
        let current = |state: &InstanceState| {
            let s = state.step(step);
            s.status == StepStatus::Running && s.attempts == attempt
        };
        let with_plan =
            |state: &InstanceState, def: &FlowDefinition, now, events: Vec<FlowEvent>| {
                let preview = preview(state, &events, now);
                let mut events = events;
                events.extend(next_events(def, &preview, now, self.lessee()));
                events
            };
        let failure = match result {
            Ok(effect) => {
                let work = effect.sql_work(timeout_ms);
                let (output, message) = match effect {
                    Effect::Output(v) => (v, None),
                    Effect::Sql(_) => (Value::Null, None),
                    Effect::Message { subject, payload } => (
                        Value::Null,
                        Some(Message {
                            message_id: step.idempotency_key(id),
                            subject,
                            payload,
                        }),
                    ),
                };
                let outcome = self
                    .flows
                    .transition(id, work.as_ref(), |state, def, now| {
                        if !current(state) {
                            return Ok(Vec::new());
                        }
                        let mut out = vec![FlowEvent::StepSucceeded(StepSucceeded {
                            step: step.clone(),
                            attempt,
                            output: output.clone(),
                        })];
                        if let Some(m) = &message {
                            out.push(FlowEvent::Message(m.clone()));
                        }
                        Ok(with_plan(state, def, now, out))
                    })
                    .await;
                match outcome {
                    Err(TransitionError::Sql(e)) => sql_failure(&e),
                    other => return flatten(other),
                }
            }
            Err(f) => f,
        };
        let result = self
            .flows
            .transition(id, None, |state, def, now| {
                if !current(state) {
                    return Ok(Vec::new());
                }
                let Some(task) = def.task(&step.task) else {
                    return Ok(Vec::new());
                };
                let out = failure_events(task, state, step, &failure.error, failure.timed_out, now);
                Ok(with_plan(state, def, now, out))
            })
            .await;
        flatten(result)
    }
}

/// A failed SQL step: what [`sqlstate::is_transient`] calls transient
/// (serialization failures, deadlocks, lost connections, statement timeouts)
/// may pass on another attempt; other errors are fatal.
fn sql_failure(e: &tokio_postgres::Error) -> Failure {
    let retryable = sqlstate::is_transient(e);
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
    Failure::new(err.code(code))
}

fn flatten<T>(r: Result<T, TransitionError>) -> Result<T, FlowError> {
    r.map_err(TransitionError::into_flow)
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
