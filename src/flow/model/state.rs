//! An instance's state, folded from its events (the projection every decision
//! and every read model starts from).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::events::{self, AwaitedEvent, FlowEvent, Phase, StepId};
use crate::store::{Position, SequencedEvent};

/// Where an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Tasks are running or due.
    Running,
    /// Completed tasks are being compensated.
    Compensating,
    /// An operator (or an exhausted task with `on_exhausted: pause`) paused it.
    Paused,
    /// Every task succeeded.
    Completed,
    /// Every completed task was compensated.
    Compensated,
    /// A compensation exhausted its retries: needs an operator.
    CompensationFailed,
    /// A task exhausted its retries with `on_exhausted: fail`.
    Failed,
}

impl InstanceStatus {
    /// Lower-case name, as stored in the read model.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Compensating => "compensating",
            InstanceStatus::Paused => "paused",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Compensated => "compensated",
            InstanceStatus::CompensationFailed => "compensation_failed",
            InstanceStatus::Failed => "failed",
        }
    }

    /// No step will run again without an operator.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed | InstanceStatus::Compensated | InstanceStatus::Failed
        )
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// An attempt is running.
    Running,
    /// The next attempt is due at `due_at`.
    RetryDue,
    /// Succeeded.
    Succeeded,
    /// Failed with no attempts left.
    Failed,
    /// Skipped by an operator, or by its condition.
    Skipped,
    /// A wait or signal task waiting for its time or its signal.
    Waiting,
}

/// Where a step's time went, as a per-stage profiler shows it: waiting in
/// the queue for a worker, running, backing off between attempts, and waiting
/// for a timer, a signal or an event. In milliseconds, from the events' record
/// times.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTimings {
    /// From due (ready, or a retry's due time) to the attempt's start, summed
    /// over attempts.
    pub queued_ms: u64,
    /// From each attempt's start to its outcome, summed.
    pub running_ms: u64,
    /// The delays before retries, summed.
    pub backoff_ms: u64,
    /// A wait, signal or await_event step's wait.
    pub waiting_ms: u64,
    /// When the running attempt or the wait began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
}

impl StepTimings {
    /// An attempt or a wait ended at `at` (the step was in `status`).
    fn end(&mut self, status: StepStatus, at: DateTime<Utc>) {
        if let Some(since) = self.since.take() {
            match status {
                StepStatus::Waiting => self.waiting_ms += millis(since, at),
                _ => self.running_ms += millis(since, at),
            }
        }
    }
}

/// Whole milliseconds from `from` to `to` (none if `to` is earlier).
fn millis(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    (to - from).num_milliseconds().max(0) as u64
}

/// A signal sent to an instance, as its state keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceivedSignal {
    /// Its name.
    pub name: String,
    /// The sender's id for it.
    pub signal_id: String,
    /// What it carries.
    pub payload: Value,
    /// When it was received.
    pub at: DateTime<Utc>,
    /// The task that consumed it, once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_by: Option<String>,
}

/// An operator's acknowledgement of a step's open incident: someone is handling
/// it (recorded by a `FlowIncidentAcknowledged` event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledgement {
    /// Who acknowledged it.
    pub actor: String,
    /// Their note.
    pub note: String,
    /// When (the event's record time).
    pub at: DateTime<Utc>,
    /// The kind of incident acknowledged (`exhausted`, `compensation_failed`,
    /// `timed_out`).
    pub kind: String,
    /// The error acknowledged.
    pub error: String,
}

/// One step's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// The step.
    pub step: StepId,
    /// Where it is.
    pub status: StepStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts an operator's "retry now" wrote off (they no longer count).
    pub forgiven: u32,
    /// The running attempt's worker.
    pub worker: Option<String>,
    /// When the running attempt's lease ends.
    pub lease_until: Option<DateTime<Utc>>,
    /// When the next attempt is due.
    pub due_at: Option<DateTime<Utc>>,
    /// The last error.
    pub error: Option<String>,
    /// Whether the last failure was a timeout.
    pub timed_out: bool,
    /// First attempt's start.
    pub first_started: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The operator's acknowledgement of the step's incident. It stays through
    /// retries (automatic or "retry now") while the step fails again with the
    /// same kind and error; a failure of another kind or error clears it, and
    /// so does the step's success or skip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<Acknowledgement>,
    /// Why the task was skipped without running (its condition was false, or a
    /// task it requires was skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    /// The signal a waiting signal task waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The event a waiting await_event task waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<AwaitedEvent>,
    /// Where its time went.
    #[serde(default)]
    pub timings: StepTimings,
    /// A `flow` task's child instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<Uuid>,
}

impl StepState {
    fn new(step: StepId, at: DateTime<Utc>) -> Self {
        StepState {
            step,
            status: StepStatus::Pending,
            attempts: 0,
            forgiven: 0,
            worker: None,
            lease_until: None,
            due_at: None,
            error: None,
            timed_out: false,
            first_started: None,
            updated_at: at,
            acknowledged: None,
            skip_reason: None,
            signal: None,
            event: None,
            timings: StepTimings::default(),
            child: None,
        }
    }

    /// The kind of incident the step is in (`exhausted`, `compensation_failed`,
    /// `timed_out`), if any.
    pub fn incident_kind(&self) -> Option<&'static str> {
        match (self.status, self.step.phase) {
            (StepStatus::Failed, Phase::Compensate | Phase::Cancel) => Some("compensation_failed"),
            (StepStatus::Failed, _) => Some("exhausted"),
            (StepStatus::RetryDue, _) if self.timed_out => Some("timed_out"),
            _ => None,
        }
    }

    /// Attempts that count against the retry policy.
    pub fn counted_attempts(&self) -> u32 {
        self.attempts.saturating_sub(self.forgiven)
    }
}

/// A `for_each` task's progress: items start in order, at most
/// `max_parallel` of them are active at once, and each one's output is kept
/// until every item is done (then the task's output is all of them, in
/// order). Planning looks only at the active items, so an instance with many
/// items costs the same per transition as one with few.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FanOut {
    /// How many items the task has (known once the first ones started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u32>,
    /// Items started so far: `0..started`.
    pub started: u32,
    /// Items started and not yet succeeded or skipped.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub active: std::collections::BTreeSet<u32>,
    /// The outputs of the items done, by item.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<u32, Value>,
}

impl FanOut {
    /// Every item done (succeeded or skipped).
    pub fn is_done(&self) -> bool {
        self.items
            .is_some_and(|n| self.active.is_empty() && self.outputs.len() as u64 == u64::from(n))
    }

    /// The items' outputs in order (`null` for an item without one).
    pub fn ordered_outputs(&self) -> Value {
        let n = self.items.unwrap_or(0);
        Value::Array(
            (0..n)
                .map(|i| self.outputs.get(&i).cloned().unwrap_or(Value::Null))
                .collect(),
        )
    }
}

/// A flow instance, as its events tell it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    /// Instance id.
    pub id: Uuid,
    /// Flow name.
    pub flow: String,
    /// The definition version (content hash) it runs on.
    pub definition_version: String,
    /// Business key it was started with.
    pub business_key: Option<String>,
    /// Flow input.
    pub input: Value,
    /// Where it is.
    pub status: InstanceStatus,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When its deadline passes.
    pub deadline_at: Option<DateTime<Utc>>,
    /// The instance and task that started it, for a child instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<events::ParentRef>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Position of its newest event, the instance's concurrency token: pass it
    /// to manual operations as what you looked at (they refuse with
    /// [`FlowError::Moved`](crate::flow::FlowError::Moved) if it changed).
    pub last_position: Position,
    /// Why it is compensating, paused or failed.
    pub reason: Option<String>,
    /// Status to return to on resume.
    pub paused_from: Option<InstanceStatus>,
    /// Steps that have started at least once (by key).
    pub steps: BTreeMap<String, StepState>,
    /// Outputs of succeeded (or skipped) tasks.
    pub outputs: BTreeMap<String, Value>,
    /// The queries of the await_event steps waiting now, by step key (the
    /// read model keeps them in `flow_awaits`, where appended events are
    /// matched against them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub awaiting: BTreeMap<String, AwaitedEvent>,
    /// Signals received, oldest first, consumed or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<ReceivedSignal>,
    /// The progress of the `for_each` tasks that started, by task.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fan_out: BTreeMap<String, FanOut>,
    /// Events folded.
    pub events: u64,
}

impl InstanceState {
    /// Folds an instance's events, oldest first; `None` if there is no `FlowStarted`.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a SequencedEvent>) -> Option<Self> {
        let mut state: Option<InstanceState> = None;
        for e in events {
            match &mut state {
                None => {
                    if let Some(Ok(FlowEvent::Started(s))) = events::decode(e) {
                        state = Some(InstanceState::started(s, e));
                    }
                }
                Some(s) => s.apply(e),
            }
        }
        state
    }

    fn started(s: events::Started, e: &SequencedEvent) -> Self {
        InstanceState {
            id: s.instance,
            flow: s.flow,
            definition_version: s.version,
            business_key: s.business_key,
            input: s.input,
            status: InstanceStatus::Running,
            started_at: e.recorded_at,
            deadline_at: s.deadline_at,
            parent: s.parent,
            updated_at: e.recorded_at,
            last_position: e.position,
            reason: None,
            paused_from: None,
            steps: BTreeMap::new(),
            outputs: BTreeMap::new(),
            signals: Vec::new(),
            awaiting: BTreeMap::new(),
            fan_out: BTreeMap::new(),
            events: 1,
        }
    }

    /// The step's state (a pending one if it never started).
    pub fn step(&self, step: &StepId) -> StepState {
        self.steps
            .get(&step.key())
            .cloned()
            .unwrap_or_else(|| StepState::new(step.clone(), self.updated_at))
    }

    fn step_mut(&mut self, step: &StepId, at: DateTime<Utc>) -> &mut StepState {
        self.steps
            .entry(step.key())
            .or_insert_with(|| StepState::new(step.clone(), at))
    }

    /// Applies one event (events of other types, and payloads that do not
    /// decode, only move `last_position`).
    pub fn apply(&mut self, e: &SequencedEvent) {
        let at = e.recorded_at;
        // The instance's last change before this event: when a step it starts
        // became ready (unless a retry's due time says otherwise).
        let before = self.updated_at;
        self.updated_at = at;
        self.last_position = e.position;
        self.events += 1;
        let Some(Ok(event)) = events::decode(e) else {
            return;
        };
        let by_incident = self.paused_by_incident();
        match &event {
            FlowEvent::StepSucceeded(d) => {
                self.awaiting.remove(&d.step.key());
            }
            FlowEvent::StepFailed(d) | FlowEvent::StepTimedOut(d) => {
                self.awaiting.remove(&d.step.key());
            }
            FlowEvent::StepSkipped(d) | FlowEvent::RetryRequested(d) => {
                self.awaiting.remove(&d.step.key());
            }
            _ => {}
        }
        match event {
            FlowEvent::Started(_) | FlowEvent::Message(_) | FlowEvent::AmqpMessage(_) => {}
            FlowEvent::IncidentAcknowledged(d) => {
                let step = self.step_mut(&d.step, at);
                step.acknowledged = Some(Acknowledgement {
                    actor: d.actor,
                    note: d.note,
                    at,
                    kind: d.kind,
                    error: d.error,
                });
            }
            FlowEvent::StepStarted(d) => {
                let step = self.step_mut(&d.step, at);
                let ready = match (step.status, step.due_at) {
                    (StepStatus::RetryDue, Some(due)) => due,
                    _ => before,
                };
                step.timings.queued_ms += millis(ready, at);
                step.timings.since = Some(at);
                step.updated_at = at;
                step.status = StepStatus::Running;
                step.attempts = d.attempt;
                step.worker = Some(d.worker);
                step.lease_until = Some(d.lease_until);
                step.due_at = None;
                step.first_started.get_or_insert(at);
                if let (Some(i), Phase::Action) = (d.step.item, d.step.phase) {
                    let f = self.fan_out.entry(d.step.task.clone()).or_default();
                    f.active.insert(i);
                    f.started = f.started.max(i + 1);
                    if d.items.is_some() {
                        f.items = d.items;
                    }
                }
            }
            FlowEvent::StepSucceeded(d) => {
                let step = self.step_mut(&d.step, at);
                step.timings.end(step.status, at);
                step.updated_at = at;
                step.status = StepStatus::Succeeded;
                step.worker = None;
                step.lease_until = None;
                step.error = None;
                step.timed_out = false;
                step.acknowledged = None;
                step.due_at = None;
                if let Some(id) = &d.signal_id
                    && let Some(sig) = self.signals.iter_mut().find(|s| &s.signal_id == id)
                {
                    sig.consumed_by = Some(d.step.task.clone());
                }
                if d.step.phase == Phase::Action {
                    match d.step.item {
                        Some(i) => {
                            let f = self.fan_out.entry(d.step.task.clone()).or_default();
                            f.active.remove(&i);
                            f.outputs.insert(i, d.output);
                        }
                        None => {
                            self.outputs.insert(d.step.task.clone(), d.output);
                        }
                    }
                }
            }
            FlowEvent::TaskSkipped(d) => {
                let step = self.step_mut(&StepId::new(&d.task, Phase::Action), at);
                step.updated_at = at;
                step.status = StepStatus::Skipped;
                step.skip_reason = Some(d.reason);
            }
            FlowEvent::StepWaiting(d) => {
                let step = self.step_mut(&d.step, at);
                step.updated_at = at;
                step.timings.since = Some(at);
                step.status = StepStatus::Waiting;
                step.worker = None;
                step.lease_until = None;
                // A child's wait follows its task's attempt, which counted.
                if d.child.is_none() {
                    step.attempts += 1;
                }
                step.due_at = d.until;
                step.signal = d.signal;
                step.event = d.event.clone();
                if d.child.is_some() {
                    step.child = d.child;
                }
                step.error = None;
                step.first_started.get_or_insert(at);
                if let Some(q) = d.event {
                    self.awaiting.insert(d.step.key(), q);
                }
            }
            FlowEvent::SignalReceived(d) => {
                if !self.signals.iter().any(|s| s.signal_id == d.signal_id) {
                    self.signals.push(ReceivedSignal {
                        name: d.name,
                        signal_id: d.signal_id,
                        payload: d.payload,
                        at,
                        consumed_by: None,
                    });
                }
            }
            FlowEvent::StepFailed(d) | FlowEvent::StepTimedOut(d) => {
                let timed_out = e.event_type() == events::types::STEP_TIMED_OUT;
                let step = self.step_mut(&d.step, at);
                step.timings.end(step.status, at);
                step.updated_at = at;
                step.status = if d.exhausted {
                    StepStatus::Failed
                } else {
                    StepStatus::RetryDue
                };
                step.worker = None;
                step.lease_until = None;
                step.error = Some(d.error);
                step.timed_out = timed_out;
                // Still the problem that was acknowledged (the same error, and
                // no incident of another kind), or a new one?
                let same = step.acknowledged.as_ref().is_some_and(|a| {
                    step.error.as_deref() == Some(a.error.as_str())
                        && step.incident_kind().is_none_or(|k| k == a.kind)
                });
                if !same {
                    step.acknowledged = None;
                }
            }
            FlowEvent::RetryScheduled(d) => {
                let step = self.step_mut(&d.step, at);
                step.timings.backoff_ms += millis(at, d.due_at);
                step.updated_at = at;
                step.status = StepStatus::RetryDue;
                step.due_at = Some(d.due_at);
            }
            FlowEvent::RetryRequested(d) => {
                let step = self.step_mut(&d.step, at);
                step.updated_at = at;
                step.status = StepStatus::RetryDue;
                step.due_at = Some(at);
                step.forgiven = step.attempts;
                step.worker = None;
                step.lease_until = None;
                match self.status {
                    InstanceStatus::CompensationFailed => {
                        self.status = InstanceStatus::Compensating
                    }
                    InstanceStatus::Failed => self.status = InstanceStatus::Running,
                    InstanceStatus::Paused if by_incident => {
                        self.status = self.paused_from.take().unwrap_or(InstanceStatus::Running)
                    }
                    _ => {}
                }
            }
            FlowEvent::StepSkipped(d) => {
                let step = self.step_mut(&d.step, at);
                step.updated_at = at;
                step.status = StepStatus::Skipped;
                step.worker = None;
                step.lease_until = None;
                step.acknowledged = None;
                match (d.step.phase, d.step.item) {
                    (Phase::Action, Some(i)) => {
                        let f = self.fan_out.entry(d.step.task.clone()).or_default();
                        f.active.remove(&i);
                        f.outputs.insert(i, d.output.unwrap_or(Value::Null));
                    }
                    (Phase::Action | Phase::Try, _) => {
                        self.outputs
                            .insert(d.step.task.clone(), d.output.unwrap_or(Value::Null));
                    }
                    _ => {}
                }
                match self.status {
                    InstanceStatus::Failed => self.status = InstanceStatus::Running,
                    InstanceStatus::Paused if by_incident => {
                        self.status = self.paused_from.take().unwrap_or(InstanceStatus::Running)
                    }
                    _ => {}
                }
            }
            FlowEvent::Compensating(c) | FlowEvent::Aborted(c) => {
                self.status = InstanceStatus::Compensating;
                self.paused_from = None;
                self.reason = c.reason;
            }
            FlowEvent::Compensated(_) => {
                self.status = InstanceStatus::Compensated;
                self.awaiting.clear();
            }
            FlowEvent::CompensationFailed(c) => {
                self.status = InstanceStatus::CompensationFailed;
                self.reason = c.reason;
            }
            FlowEvent::Paused(c) => {
                if self.status != InstanceStatus::Paused {
                    self.paused_from = Some(self.status);
                }
                self.status = InstanceStatus::Paused;
                self.reason = c.reason;
            }
            FlowEvent::Resumed(_) => {
                self.status = self.paused_from.take().unwrap_or(InstanceStatus::Running);
                self.reason = None;
            }
            FlowEvent::Completed(_) => {
                self.status = InstanceStatus::Completed;
                self.awaiting.clear();
            }
            FlowEvent::Failed(c) => {
                self.status = InstanceStatus::Failed;
                self.reason = c.reason;
            }
        }
    }

    /// The context templates of this instance are rendered in: its input,
    /// outputs and business key, with `instance` and `idempotency_key` as given
    /// (the caller owns their text).
    pub(crate) fn template_context<'a>(
        &'a self,
        instance: &'a str,
        idempotency_key: &'a str,
    ) -> super::template::Context<'a> {
        super::template::Context {
            flow_input: &self.input,
            outputs: &self.outputs,
            input: None,
            instance,
            idempotency_key,
            business_key: self.business_key.as_deref(),
            item: None,
        }
    }

    /// The oldest signal named `name` no task has consumed.
    pub fn pending_signal(&self, name: &str) -> Option<&ReceivedSignal> {
        self.signals
            .iter()
            .find(|s| s.name == name && s.consumed_by.is_none())
    }

    /// Paused because a task exhausted its retries (not by an operator).
    fn paused_by_incident(&self) -> bool {
        self.steps.values().any(|s| s.status == StepStatus::Failed)
    }
}
