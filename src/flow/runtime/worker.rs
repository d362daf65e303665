//! Workers: claim instances that are due, plan, start steps, run them, record
//! their outcomes. Any number of workers (in any number of processes) share the
//! work; conditions on the instance's tag make every transition exactly-once.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tracing::Instrument;

use super::Scheduler;
use super::awaits::{self, EventWaker};
use super::engine::Flows;
use super::executor::{self, Effect, TaskContext};
use super::transition::TransitionError;
use crate::flow::FlowError;
use crate::flow::model::decide::{Lessee, failure_events, next_due, next_events, preview};
use crate::flow::model::definition::{FlowDefinition, TaskDefinition};
use crate::flow::model::events::{
    AmqpMessage, AwaitedEvent, FlowEvent, Message, ParentRef, Phase, StepFailed, StepId,
    StepSucceeded, StepWaiting, instance_tag, types,
};
use crate::flow::model::failure::TaskError;
use crate::flow::model::plan::plan;
use crate::flow::model::state::{InstanceState, InstanceStatus, StepStatus};
use crate::flow::model::template;
use crate::store::{SequencedEvent, sqlstate};

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

/// What a worker did after its stop signal fired (see [`Worker::run_until`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Steps whose results were recorded after the stop fired (they were
    /// running, or had just finished, and ended within the grace period).
    pub steps_finished: usize,
    /// Steps still running when the grace period ended: cancelled, their
    /// results never recorded. Their leases expire as usual, after which any
    /// worker times the attempt out and runs the next one.
    pub steps_abandoned: usize,
    /// Claimed instances released after the stop fired (every claim the worker
    /// held, unless the database refused a release; such a claim expires after
    /// `claim_ttl`).
    pub instances_released: usize,
}

/// The stop and abandon signals of one run, what the drain counted, and the
/// run's await_event waker.
#[derive(Clone, Default)]
struct Drain {
    /// Claim nothing more, start no step, record what finishes.
    stop: CancellationToken,
    /// The grace period is over: cancel the steps still running.
    abandon: CancellationToken,
    counts: Arc<DrainCounts>,
    /// Started when an await_event task waits.
    waker: Option<Arc<EventWaker>>,
}

#[derive(Debug, Default)]
struct DrainCounts {
    finished: AtomicUsize,
    abandoned: AtomicUsize,
    released: AtomicUsize,
}

impl DrainCounts {
    fn drained(&self) -> Drained {
        Drained {
            steps_finished: self.finished.load(Ordering::Relaxed),
            steps_abandoned: self.abandoned.load(Ordering::Relaxed),
            instances_released: self.released.load(Ordering::Relaxed),
        }
    }
}

/// When each step a transition started became due, by step key (feature `metrics`).
#[cfg(feature = "metrics")]
type DueTimes = std::sync::Mutex<std::collections::HashMap<String, chrono::DateTime<Utc>>>;

/// Notes in `due` when each step started by `events` became due, as seen in
/// `state`, the state they were decided on: the attempt's due time (a retry's
/// backoff, a delayed step) if it had one, or else the instance's last change,
/// the event that made the step ready (the start, a predecessor's success, an
/// operator's action).
#[cfg(feature = "metrics")]
fn note_due(due: &DueTimes, state: &InstanceState, events: &[FlowEvent]) {
    let mut due = due.lock().expect("due times lock");
    for e in events {
        if let FlowEvent::StepStarted(d) = e {
            let key = d.step.key();
            let at = state
                .steps
                .get(&key)
                .and_then(|s| s.due_at)
                .unwrap_or(state.updated_at);
            due.insert(key, at);
        }
    }
}

#[cfg(feature = "metrics")]
impl Worker {
    /// Counter of finished step attempts, by `flow`, `task` and `outcome`.
    pub(crate) const STEP_ATTEMPTS_TOTAL: &'static str = "dcbflow_step_attempts_total";
    /// Histogram of step attempt durations, by `flow` and `task`.
    pub(crate) const STEP_DURATION_SECONDS: &'static str = "dcbflow_step_duration_seconds";
    /// Histogram of how long due steps waited for a worker, by `flow`.
    ///
    /// A step becomes due when the event that makes it runnable is recorded (the
    /// instance's start, its predecessor's success, an operator's retry), or at
    /// its retry time if it has one; the wait ends when a worker starts running
    /// it. Both ends are read from the instance's own state (its last change, or
    /// the step's due time, in the state the starting transition decided on),
    /// so the wait covers everything in between: waiting for a free worker slot,
    /// for a claim, for the poll or wake-up, and the starting transition itself.
    /// The time the due work sat in `flow_wakeups` would miss the part before
    /// its row was written and after it was claimed.
    pub(crate) const STEP_QUEUE_WAIT_SECONDS: &'static str = "dcbflow_step_queue_wait_seconds";
    /// Histogram of the delays before step retries (the backoff a failure
    /// scheduled), by `flow` and `task`.
    pub(crate) const STEP_RETRY_BACKOFF_SECONDS: &'static str =
        "dcbflow_step_retry_backoff_seconds";
}

/// Counts a finished attempt and records how long it took.
#[cfg(feature = "metrics")]
fn count_attempt(flow: &str, task: &str, outcome: &'static str, took: Duration) {
    let (flow, task) = (flow.to_owned(), task.to_owned());
    ::metrics::counter!(
        Worker::STEP_ATTEMPTS_TOTAL,
        "flow" => flow.clone(),
        "task" => task.clone(),
        "outcome" => outcome
    )
    .increment(1);
    ::metrics::histogram!(Worker::STEP_DURATION_SECONDS, "flow" => flow, "task" => task)
        .record(took.as_secs_f64());
}

/// A finished attempt.
#[derive(Debug)]
struct Finished {
    step: StepId,
    attempt: u32,
    /// The task's timeout, in milliseconds.
    timeout_ms: u64,
    result: Result<Effect, Failure>,
    /// The instance's flow (a metric label).
    #[cfg(feature = "metrics")]
    flow: String,
    /// How long the action ran.
    #[cfg(feature = "metrics")]
    ran: Duration,
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

/// What is left of a worker's claim on an instance it has worked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The wake-up row is there, claimed by this worker: release it.
    Held,
    /// The instance's last transition deleted its wake-up row (nothing is due).
    Gone,
}

/// How often an instance with steps running is worked on again after a
/// transient store error, and the first pause (doubling up to 1 s).
const RETRIES_WHILE_RUNNING: u32 = 20;
const RETRY_PAUSE: Duration = Duration::from_millis(20);

impl Worker {
    /// The concurrency this worker runs with (after [`Flows::worker`] fitted it
    /// to the pool).
    pub fn concurrency(&self) -> usize {
        self.options.concurrency
    }

    /// Runs until `cancel` fires. Woken by a subscription to the flow events that
    /// create work (starts, operator actions) and by the earliest due time.
    ///
    /// The same as [`run_until`](Self::run_until) with no grace period: steps
    /// still running when `cancel` fires are abandoned at once (their leases
    /// expire as usual), and the claims are released.
    ///
    /// # Errors
    /// Store errors that persist (transient ones are logged and retried).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), FlowError> {
        self.run_until(cancel, Duration::ZERO).await.map(|_| ())
    }

    /// Runs until `stop` fires, then drains: claims no new instance and starts
    /// no new step; steps already running go on, and their results are recorded
    /// as usual (completion events appended, without planning the steps after
    /// them, which the next worker to claim the instance starts), for up to
    /// `grace`. Steps still running after `grace` are abandoned (cancelled;
    /// their leases expire normally and another worker times them out). Every
    /// claim is released; the returned [`Drained`] counts what happened after
    /// `stop`.
    ///
    /// A transition already in flight when `stop` fires still completes, and a
    /// step it started is run like the others.
    ///
    /// # Errors
    /// Store errors that persist (transient ones are logged and retried).
    #[tracing::instrument(name = "dcbflow.worker.run", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.flows.store().schema(), worker = %self.options.id, concurrency = self.options.concurrency))]
    pub async fn run_until(
        self,
        stop: CancellationToken,
        grace: Duration,
    ) -> Result<Drained, FlowError> {
        self.flows.ready().await?;
        let store = self.flows.store().clone();
        let wake = Arc::new(Notify::new());
        let slots = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        // One subscription per engine wakes its workers here, one at a time.
        let hub = self.flows.inner.wakeups.clone();
        let membership = hub
            .join(
                &store,
                self.options.poll_interval,
                wake.clone(),
                slots.clone(),
            )
            .await?;
        let waker = EventWaker::new(self.flows.clone(), wake.clone(), stop.clone());
        if EventWaker::any_waiting(&self.flows).await? {
            waker.ensure();
        }
        let drain = Drain {
            stop: stop.clone(),
            waker: Some(waker),
            ..Drain::default()
        };
        let mut tasks = JoinSet::new();
        let mut busy: HashSet<Uuid> = HashSet::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Uuid>();
        let mut scheduler = Scheduler::default();
        while !stop.is_cancelled() {
            while let Ok(id) = done_rx.try_recv() {
                busy.remove(&id);
            }
            // Cron schedules: start the instances of due ticks (idempotent
            // by the tick, whichever worker gets there first).
            let next_tick = match scheduler.run_due(&self.flows).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(worker = %self.options.id, error = %e, "running schedules failed");
                    None
                }
            };
            while tasks.try_join_next().is_some() {}
            // The claim also says when the next unclaimed wake-up is due: one
            // statement per round. With every slot busy there is nothing to
            // claim and no statement: a slot freed (`done_rx`) brings the next
            // round.
            let free = slots.available_permits();
            let (claimed, next_due) = if free == 0 {
                (Vec::new(), None)
            } else {
                match self.claim(free).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(worker = %self.options.id, error = %e, "claiming flow work failed");
                        (Vec::new(), None)
                    }
                }
            };
            // A claim that filled every free slot may have left due work behind:
            // the wake-up goes on to the worker with the most free slots now.
            let more = free > 0 && claimed.len() == free;
            for id in claimed {
                if !busy.insert(id) {
                    // Already in hand: its row was deleted by one of our
                    // transitions and made due again (an event waker's match
                    // or sweep) while we work on it. The claim just taken is
                    // let go, or it would hold the instance for `claim_ttl`
                    // after our work on it ends; the row stays due, and is
                    // claimed again once we are done.
                    if let Err(e) = self.release(id).await {
                        tracing::warn!(worker = %self.options.id, instance = %id, error = %e, "releasing a claim failed");
                    }
                    continue;
                }
                let permit = slots.clone().acquire_owned().await.expect("semaphore open");
                let (me, drain, done) = (self.clone(), drain.clone(), done_tx.clone());
                tasks.spawn(
                    async move {
                        // An instance left with nothing due has no wake-up row
                        // (its last transition deleted it, claim included).
                        let released = match me.reconcile(id, &drain).await {
                            Ok(Claim::Gone) => Ok(()),
                            Ok(Claim::Held) => me.release(id).await,
                            Err(e) => {
                                tracing::warn!(worker = %me.options.id, instance = %id, error = %e, "flow instance step failed");
                                me.release(id).await
                            }
                        };
                        if drain.stop.is_cancelled() && released.is_ok() {
                            drain.counts.released.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = done.send(id);
                        drop(permit);
                    }
                    .instrument(tracing::debug_span!("dcbflow.worker.instance", instance = %id)),
                );
            }
            if more {
                hub.wake_one();
            }
            let sleep = next_due
                .unwrap_or(self.options.poll_interval)
                .min(next_tick.unwrap_or(Duration::MAX));
            tokio::select! {
                () = stop.cancelled() => break,
                () = wake.notified() => {}
                Some(id) = done_rx.recv() => { busy.remove(&id); }
                () = tokio::time::sleep(sleep.min(self.options.poll_interval)) => {}
            }
        }
        // A draining worker claims nothing: the wake-ups go to the others.
        drop(membership);
        // Drain: the instances' tasks record what finishes, then release.
        let all_ended = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_ended).await.is_err() {
            drain.abandon.cancel();
            while tasks.join_next().await.is_some() {}
        }
        let drained = drain.counts.drained();
        tracing::debug!(worker = %self.options.id, ?drained, "worker drained");
        Ok(drained)
    }

    /// Claims up to `n` due, unclaimed instances (none for `n` = 0), and tells
    /// how long until the earliest wake-up that is left unclaimed is due.
    async fn claim(&self, n: usize) -> Result<(Vec<Uuid>, Option<Duration>), FlowError> {
        self.flows.inner.stats.statements(1);
        let client = self.flows.store().pool().get().await?;
        let table = self.flows.store().table("flow_wakeups");
        // The statement's snapshot still shows the rows it claims as unclaimed:
        // the next due time leaves them out by name.
        let stmt = client
            .prepare_cached(&format!(
                "WITH c AS (UPDATE {table} w \
                               SET claimed_by = $1, claimed_until = now() + $2 * interval '1 millisecond' \
                             WHERE w.instance IN (SELECT instance FROM {table} \
                                 WHERE due_at <= now() AND (claimed_until IS NULL OR claimed_until < now()) \
                                 ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                             RETURNING w.instance) \
                 SELECT ARRAY(SELECT instance FROM c), \
                        (SELECT extract(epoch FROM min(due_at) - now())::float8 FROM {table} \
                          WHERE (claimed_until IS NULL OR claimed_until < now()) \
                            AND instance NOT IN (SELECT instance FROM c))"
            ))
            .await?;
        let ttl = self.options.claim_ttl.as_millis() as f64;
        let row = client
            .query_one(&stmt, &[&self.options.id, &ttl, &(n as i64)])
            .await?;
        let seconds: Option<f64> = row.get(1);
        Ok((
            row.get(0),
            seconds.map(|s| Duration::from_secs_f64(s.max(0.0))),
        ))
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

    /// Deletes the wake-up row of `id` this worker claimed (nothing is due).
    async fn forget(&self, id: Uuid) -> Result<(), FlowError> {
        self.flows.inner.stats.statements(1);
        let client = self.flows.store().pool().get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "DELETE FROM {} WHERE instance = $1 AND claimed_by = $2",
                self.flows.store().table("flow_wakeups")
            ))
            .await?;
        client.execute(&stmt, &[&id, &self.options.id]).await?;
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

    /// Works on one instance until it needs nothing for a while, or the worker
    /// stops (then until its running steps have been recorded or abandoned).
    async fn reconcile(&self, id: Uuid, drain: &Drain) -> Result<Claim, FlowError> {
        if drain.stop.is_cancelled() {
            return Ok(Claim::Held);
        }
        let mut running: JoinSet<Finished> = JoinSet::new();
        let mut result = self.reconcile_with(id, drain, &mut running).await;
        // A transient store error (overload, no connection in time, a lost
        // connection) while steps run would abandon them: their attempts would
        // sit, recorded as running, until their leases expire (a step's
        // timeout, 30 s by default). Keep the claim and go on after a pause
        // instead, so that their outcomes are recorded.
        let mut pause = RETRY_PAUSE;
        for _ in 0..RETRIES_WHILE_RUNNING {
            match &result {
                Err(FlowError::Store(e))
                    if e.is_retryable() && !running.is_empty() && !drain.abandon.is_cancelled() =>
                {
                    tracing::debug!(worker = %self.options.id, instance = %id, error = %e, "transient error with steps running: going on");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = drain.abandon.cancelled() => break,
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                    result = self.reconcile_with(id, drain, &mut running).await;
                }
                _ => break,
            }
        }
        if !running.is_empty() {
            if drain.stop.is_cancelled() {
                drain
                    .counts
                    .abandoned
                    .fetch_add(running.len(), Ordering::Relaxed);
            }
            running.shutdown().await;
        }
        result
    }

    async fn reconcile_with(
        &self,
        id: Uuid,
        drain: &Drain,
        running: &mut JoinSet<Finished>,
    ) -> Result<Claim, FlowError> {
        #[cfg(feature = "metrics")]
        let due = DueTimes::default();
        let mut last_beat = tokio::time::Instant::now();
        let (mut state, mut appended) = self
            .advance(
                id,
                #[cfg(feature = "metrics")]
                &due,
            )
            .await?;
        loop {
            if drain.abandon.is_cancelled() {
                // The caller cancels what is still running.
                return Ok(Claim::Held);
            }
            let draining = drain.stop.is_cancelled();
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
                    #[cfg(feature = "metrics")]
                    let due_at = due.lock().expect("due times lock").remove(&d.step.key());
                    self.spawn_step(
                        running,
                        &def,
                        &state,
                        d.step.clone(),
                        d.attempt,
                        #[cfg(feature = "metrics")]
                        due_at,
                    );
                }
            }
            // An await_event task waiting: the event may be in the log already.
            if !state.awaiting.is_empty() && !draining {
                if let Some(w) = &drain.waker {
                    w.ensure();
                }
                if let Some(next) = self.take_awaited(id, &state).await? {
                    (state, appended) = next;
                    continue;
                }
            }
            if running.is_empty() {
                if draining {
                    return Ok(Claim::Held);
                }
                // Nothing in flight: keep the instance only for a due time that is near.
                let now = Utc::now();
                let planned = plan(&def, &state, now);
                let wait = planned
                    .next_due
                    .map(|at| (at - now).to_std().unwrap_or_default());
                match wait {
                    Some(w) if w <= self.options.poll_interval => {
                        tokio::select! {
                            () = tokio::time::sleep(w) => {
                                (state, appended) = self.advance(
                                    id,
                                    #[cfg(feature = "metrics")]
                                    &due,
                                ).await?;
                                continue;
                            }
                            () = drain.stop.cancelled() => return Ok(Claim::Held),
                        }
                    }
                    // Nothing due at all: the last transition's read models
                    // have no wake-up row left, nor so a claim to release. One
                    // that appended nothing wrote nothing: the row this claim
                    // came from (made due by an event waker's match or sweep)
                    // is deleted here, and the log read again, so that an
                    // event the waker matched meanwhile is not lost with it.
                    _ if next_due(&planned, now).is_none() => {
                        if appended.is_empty() {
                            self.forget(id).await?;
                            if let Some(next) = self.take_awaited(id, &state).await? {
                                (state, appended) = next;
                                continue;
                            }
                        }
                        return Ok(Claim::Gone);
                    }
                    _ => return Ok(Claim::Held),
                }
            }
            let beat = self.options.claim_ttl / 3;
            let now = Utc::now();
            let wait = plan(&def, &state, now)
                .next_due
                .map(|at| (at - now).to_std().unwrap_or_default());
            tokio::select! {
                Some(joined) = running.join_next() => {
                    match joined {
                        Ok(outcome) => {
                            // Once stopped, record the outcome without planning
                            // (and so starting) the steps after it.
                            let stopped = drain.stop.is_cancelled();
                            (state, appended) = self.record(
                                id,
                                outcome,
                                !stopped,
                                #[cfg(feature = "metrics")]
                                &due,
                            ).await?;
                            if stopped {
                                drain.counts.finished.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(instance = %id, error = %e, "step task panicked");
                            appended = Vec::new();
                        }
                    }
                }
                () = tokio::time::sleep(wait.unwrap_or(beat).min(beat)), if !draining => {
                    (state, appended) = self.advance(
                        id,
                        #[cfg(feature = "metrics")]
                        &due,
                    ).await?;
                }
                // Draining: only keep the claim alive (the heartbeat above).
                () = tokio::time::sleep(beat), if draining => { appended = Vec::new(); }
                () = drain.stop.cancelled(), if !draining => { appended = Vec::new(); }
                () = drain.abandon.cancelled() => { appended = Vec::new(); }
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
    async fn advance(
        &self,
        id: Uuid,
        #[cfg(feature = "metrics")] due: &DueTimes,
    ) -> Result<(InstanceState, Vec<FlowEvent>), FlowError> {
        let result = self
            .flows
            .transition(id, None, |state, def, now| {
                let events = next_events(def, state, now, self.lessee());
                #[cfg(feature = "metrics")]
                note_due(due, state, &events);
                Ok(events)
            })
            .await;
        flatten(result)
    }

    /// Records `event` as the output of the await_event step `step`, if it
    /// still waits, with the next planning round, in one transition.
    async fn deliver(
        &self,
        id: Uuid,
        step: &StepId,
        outcome: Result<Value, String>,
    ) -> Result<(InstanceState, Vec<FlowEvent>), FlowError> {
        let result = self
            .flows
            .transition(id, None, |state, def, now| {
                let s = state.step(step);
                if s.status != StepStatus::Waiting || state.status != InstanceStatus::Running {
                    return Ok(Vec::new());
                }
                let mut events = vec![match &outcome {
                    Ok(output) => FlowEvent::StepSucceeded(StepSucceeded {
                        step: step.clone(),
                        attempt: s.attempts,
                        output: output.clone(),
                        signal_id: None,
                    }),
                    Err(error) => FlowEvent::StepFailed(StepFailed {
                        step: step.clone(),
                        attempt: s.attempts,
                        error: error.clone(),
                        code: Some("child_failed".into()),
                        exhausted: true,
                    }),
                }];
                let next = preview(state, &events, now);
                events.extend(next_events(def, &next, now, self.lessee()));
                Ok(events)
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
        #[cfg(feature = "metrics")] due_at: Option<chrono::DateTime<Utc>>,
    ) {
        let Some(task) = def.task(&step.task).cloned() else {
            return;
        };
        #[cfg(feature = "metrics")]
        let flow = state.flow.clone();
        #[cfg(feature = "metrics")]
        if let Some(due_at) = due_at {
            let waited = (Utc::now() - due_at).to_std().unwrap_or_default();
            ::metrics::histogram!(Self::STEP_QUEUE_WAIT_SECONDS, "flow" => flow.clone())
                .record(waited.as_secs_f64());
        }
        if task.flow.is_some() {
            self.spawn_child_step(running, state, task, step, attempt);
            return;
        }
        let ctx = context(state, &task, &step, attempt);
        let action = task.action_for(&step).cloned();
        #[cfg(feature = "http")]
        let http = self.flows.inner.http.clone();
        #[cfg(feature = "grpc")]
        let (grpc, policy) = (
            self.flows.inner.grpc.clone(),
            self.flows.inner.http_policy.clone(),
        );
        let function = match &action {
            Some(crate::flow::model::definition::Action::Rust { function }) => {
                self.flows.registered_function(function)
            }
            _ => None,
        };
        let span = tracing::debug_span!("dcbflow.step", step = %step, attempt);
        running.spawn(
            async move {
                #[cfg(feature = "metrics")]
                let started = std::time::Instant::now();
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
                            #[cfg(feature = "grpc")]
                            (&grpc, &policy, timeout),
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
                    #[cfg(feature = "metrics")]
                    flow,
                    #[cfg(feature = "metrics")]
                    ran: started.elapsed(),
                }
            }
            .instrument(span),
        );
    }

    /// A `flow` task's step: its action starts the child (idempotent by parent
    /// and task), its compensation aborts a child still running.
    fn spawn_child_step(
        &self,
        running: &mut JoinSet<Finished>,
        state: &InstanceState,
        task: TaskDefinition,
        step: StepId,
        attempt: u32,
    ) {
        let flows = self.flows.clone();
        let parent = state.id;
        let child = state.step(&StepId::new(&task.name, Phase::Action)).child;
        let instance = parent.to_string();
        let key = step.idempotency_key(parent);
        let rendered = task.flow.as_ref().map(|sub| {
            let ctx = state.template_context(&instance, &key);
            template::render(
                &Value::Object(sub.input.clone().into_iter().collect()),
                &ctx,
            )
        });
        #[cfg(feature = "metrics")]
        let flow = state.flow.clone();
        running.spawn(
            async move {
                #[cfg(feature = "metrics")]
                let started = std::time::Instant::now();
                let result = match (step.phase, task.flow.as_ref(), rendered) {
                    (Phase::Action, Some(sub), Some(Ok(input))) => flows
                        .start_with_parent(
                            &sub.name,
                            Some(&format!("parent:{parent}:{}", task.name)),
                            input,
                            Some(ParentRef {
                                instance: parent,
                                task: task.name.clone(),
                            }),
                            Vec::new(),
                        )
                        .await
                        .map(|s| Effect::Child(s.instance))
                        .map_err(|e| {
                            let error = match &e {
                                FlowError::UnknownFlow(_) | FlowError::InputMismatch(_) => {
                                    TaskError::fatal(e.to_string()).code("child_start")
                                }
                                _ => TaskError::retryable(e.to_string()).code("child_start"),
                            };
                            Failure::new(error)
                        }),
                    (Phase::Action, _, Some(Err(e))) => {
                        Err(Failure::new(TaskError::fatal(e).code("template")))
                    }
                    (Phase::Compensate, _, _) => match child {
                        Some(c) => abort_child(&flows, c, parent).await.map_err(Failure::new),
                        None => Ok(Effect::Output(Value::Null)),
                    },
                    _ => Err(Failure::new(TaskError::fatal(format!(
                        "{step} is not a step of a flow task"
                    )))),
                };
                Finished {
                    step,
                    attempt,
                    timeout_ms: task.timeout_ms,
                    result,
                    #[cfg(feature = "metrics")]
                    flow,
                    #[cfg(feature = "metrics")]
                    ran: started.elapsed(),
                }
            }
            .instrument(tracing::debug_span!("dcbflow.step.child")),
        );
    }

    /// If the log holds the event a waiting await_event or `flow` step of
    /// `state` waits for, records it (with the next planning round): the state
    /// after, and what was appended.
    async fn take_awaited(
        &self,
        id: Uuid,
        state: &InstanceState,
    ) -> Result<Option<(InstanceState, Vec<FlowEvent>)>, FlowError> {
        let Some((step, event)) = awaits::awaited(&self.flows, state).await? else {
            return Ok(None);
        };
        let outcome = self.outcome_of(state, &step, &event).await?;
        self.deliver(id, &step, outcome).await.map(Some)
    }

    /// What a waiting await_event or `flow` step gets from the event found: the
    /// event itself, or a child's outputs (or why the child did not complete).
    async fn outcome_of(
        &self,
        state: &InstanceState,
        step: &StepId,
        event: &SequencedEvent,
    ) -> Result<Result<Value, String>, FlowError> {
        let Some(child) = state.step(step).child else {
            return Ok(Ok(awaits::output(event)));
        };
        let child_state = self
            .flows
            .instance(child)
            .await?
            .ok_or(FlowError::UnknownInstance(child))?;
        Ok(match child_state.status {
            InstanceStatus::Completed => {
                Ok(serde_json::to_value(&child_state.outputs).unwrap_or_default())
            }
            other => Err(format!(
                "child instance {child} of flow {:?} is {}: {}",
                child_state.flow,
                other.as_str(),
                child_state.reason.clone().unwrap_or_default()
            )),
        })
    }

    /// Records an attempt's outcome, if the attempt is still the current one (a
    /// late worker whose lease expired loses here), together with the next
    /// planning round (with `plan`), in one transition. SQL runs in this transaction.
    async fn record(
        &self,
        id: Uuid,
        finished: Finished,
        plan: bool,
        #[cfg(feature = "metrics")] due: &DueTimes,
    ) -> Result<(InstanceState, Vec<FlowEvent>), FlowError> {
        #[cfg(feature = "metrics")]
        let (flow, ran) = (finished.flow.clone(), finished.ran);
        let Finished {
            step,
            attempt,
            timeout_ms,
            result,
            ..
        } = finished;
        let step = &step;
        let current = |state: &InstanceState| {
            let s = state.step(step);
            s.status == StepStatus::Running && s.attempts == attempt
        };
        let with_plan =
            |state: &InstanceState, def: &FlowDefinition, now, events: Vec<FlowEvent>| {
                if !plan {
                    return events;
                }
                let preview = preview(state, &events, now);
                let planned = next_events(def, &preview, now, self.lessee());
                #[cfg(feature = "metrics")]
                note_due(due, &preview, &planned);
                let mut events = events;
                events.extend(planned);
                events
            };
        if let Ok(Effect::Child(child)) = &result {
            let child = *child;
            let outcome = self
                .flows
                .transition(id, None, |state, def, now| {
                    if !current(state) {
                        return Ok(Vec::new());
                    }
                    let wait = FlowEvent::StepWaiting(StepWaiting {
                        step: step.clone(),
                        until: None,
                        signal: None,
                        event: Some(AwaitedEvent {
                            types: FINAL_TYPES.iter().map(|t| (*t).to_owned()).collect(),
                            tags: vec![instance_tag(child)],
                        }),
                        child: Some(child),
                    });
                    Ok(with_plan(state, def, now, vec![wait]))
                })
                .await;
            return flatten(outcome);
        }
        let failure = match result {
            Ok(effect) => {
                let work = effect.sql_work(timeout_ms);
                let (output, message) = match effect {
                    Effect::Output(v) => (v, None),
                    Effect::Sql(_) | Effect::Child(_) => (Value::Null, None),
                    Effect::AmqpMessage {
                        exchange,
                        routing_key,
                        payload,
                    } => (
                        Value::Null,
                        Some(FlowEvent::AmqpMessage(AmqpMessage {
                            message_id: step.idempotency_key(id),
                            exchange,
                            routing_key,
                            payload,
                            traceparent: Some(step.traceparent(id, attempt)),
                        })),
                    ),
                    Effect::Message { subject, payload } => (
                        Value::Null,
                        Some(FlowEvent::Message(Message {
                            message_id: step.idempotency_key(id),
                            subject,
                            payload,
                            traceparent: Some(step.traceparent(id, attempt)),
                        })),
                    ),
                };
                #[cfg(feature = "metrics")]
                let transaction = std::time::Instant::now();
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
                            signal_id: None,
                        })];
                        if let Some(m) = &message {
                            out.push(m.clone());
                        }
                        Ok(with_plan(state, def, now, out))
                    })
                    .await;
                // A SQL step's action is its transaction.
                #[cfg(feature = "metrics")]
                let ran = match &work {
                    Some(_) => ran + transaction.elapsed(),
                    None => ran,
                };
                match outcome {
                    Err(TransitionError::Sql(e)) => {
                        #[cfg(feature = "metrics")]
                        count_attempt(&flow, &step.task, "failed", ran);
                        sql_failure(&e)
                    }
                    other => {
                        #[cfg(feature = "metrics")]
                        if other.is_ok() {
                            count_attempt(&flow, &step.task, "succeeded", ran);
                        }
                        return flatten(other);
                    }
                }
            }
            Err(f) => {
                #[cfg(feature = "metrics")]
                count_attempt(
                    &flow,
                    &step.task,
                    if f.timed_out { "timed_out" } else { "failed" },
                    ran,
                );
                f
            }
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
        #[cfg(feature = "metrics")]
        if let Ok((_, appended)) = &result {
            for e in appended {
                if let FlowEvent::RetryScheduled(r) = e {
                    let delay = (r.due_at - Utc::now()).to_std().unwrap_or_default();
                    ::metrics::histogram!(
                        Self::STEP_RETRY_BACKOFF_SECONDS,
                        "flow" => flow.clone(),
                        "task" => r.step.task.clone()
                    )
                    .record(delay.as_secs_f64());
                }
            }
        }
        flatten(result)
    }
}

/// The final events of an instance, which a `flow` task's wait for its child
/// ends on.
pub(crate) const FINAL_TYPES: [&str; 3] = [types::COMPLETED, types::COMPENSATED, types::FAILED];

/// Aborts child instance `child` of `parent` if it still runs (a parent
/// compensating takes its running children with it); done if it is over.
async fn abort_child(flows: &Flows, child: Uuid, parent: Uuid) -> Result<Effect, TaskError> {
    let by = crate::flow::Operator::new(
        "dcbflow",
        format!("parent instance {parent} is compensating"),
    );
    for _ in 0..5 {
        let state = flows
            .instance(child)
            .await
            .map_err(|e| TaskError::retryable(e.to_string()))?
            .ok_or_else(|| TaskError::fatal(format!("child instance {child} is gone")))?;
        if !matches!(
            state.status,
            InstanceStatus::Running | InstanceStatus::Paused | InstanceStatus::Failed
        ) {
            return Ok(Effect::Output(
                json!({"child": child, "status": state.status.as_str()}),
            ));
        }
        match flows.abort(child, state.last_position, &by).await {
            Ok(_) => return Ok(Effect::Output(json!({"child": child, "aborted": true}))),
            Err(FlowError::Moved { .. }) => continue,
            Err(e) => return Err(TaskError::retryable(e.to_string())),
        }
    }
    Err(TaskError::retryable(format!(
        "child instance {child} kept moving"
    )))
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
    let mut t = state.template_context(&instance, &key);
    // A for_each item: `{{item}}` and `{{item_index}}`.
    let item = match (step.item, &task.for_each) {
        (Some(i), Some(each)) => {
            let items = crate::flow::model::plan::items_value(each, state)
                .map_err(|e| TaskError::fatal(e).code("for_each"))?;
            let value = match items {
                Value::Array(mut a) if (i as usize) < a.len() => a.swap_remove(i as usize),
                _ => {
                    return Err(TaskError::fatal(format!(
                        "for_each item {i} of {:?} is gone",
                        each.items
                    ))
                    .code("for_each"));
                }
            };
            Some((value, i))
        }
        _ => None,
    };
    t.item = item.as_ref().map(|(v, i)| (v, *i));
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
        traceparent: step.traceparent(state.id, attempt),
        item,
    })
}
