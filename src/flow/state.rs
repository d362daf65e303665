//! An instance's state, folded from its events (the projection every decision
//! and every read model starts from).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::events::{Operator, Phase, Started, StepEvent, StepId, types};
use crate::{Position, SequencedEvent};

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
    /// Skipped by an operator.
    Skipped,
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
        }
    }

    /// Attempts that count against the retry policy.
    pub fn counted_attempts(&self) -> u32 {
        self.attempts.saturating_sub(self.forgiven)
    }
}

/// A flow instance, as its events tell it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    /// Instance id.
    pub id: Uuid,
    /// Flow name.
    pub flow: String,
    /// Definition version it runs on.
    pub version: String,
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
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Position of its newest event: pass it to manual operations as the version
    /// you looked at.
    pub version_position: Position,
    /// Why it is compensating, paused or failed.
    pub reason: Option<String>,
    /// Status to return to on resume.
    pub paused_from: Option<InstanceStatus>,
    /// Steps that have started at least once (by key).
    pub steps: BTreeMap<String, StepState>,
    /// Outputs of succeeded (or skipped) tasks.
    pub outputs: BTreeMap<String, Value>,
    /// Events folded.
    pub events: u64,
}

impl InstanceState {
    /// Folds an instance's events, oldest first; `None` if there is no `FlowStarted`.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a SequencedEvent>) -> Option<Self> {
        let mut state: Option<InstanceState> = None;
        for e in events {
            match &mut state {
                None if e.event_type() == types::STARTED => {
                    let s: Started = serde_json::from_value(e.data().clone()).ok()?;
                    state = Some(InstanceState {
                        id: s.instance,
                        flow: s.flow,
                        version: s.version,
                        business_key: s.business_key,
                        input: s.input,
                        status: InstanceStatus::Running,
                        started_at: e.recorded_at,
                        deadline_at: s.deadline_at,
                        updated_at: e.recorded_at,
                        version_position: e.position,
                        reason: None,
                        paused_from: None,
                        steps: BTreeMap::new(),
                        outputs: BTreeMap::new(),
                        events: 1,
                    });
                }
                None => {}
                Some(s) => s.apply(e),
            }
        }
        state
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

    /// Applies one event.
    pub fn apply(&mut self, e: &SequencedEvent) {
        let at = e.recorded_at;
        self.updated_at = at;
        self.version_position = e.position;
        self.events += 1;
        let ty = e.event_type();
        if ty.starts_with("FlowStep") || ty == types::RETRY_REQUESTED {
            let Ok(d) = serde_json::from_value::<StepEvent>(e.data().clone()) else {
                return;
            };
            let Some(id) = d.step.clone() else { return };
            let by_incident = self.paused_by_incident();
            let step = self.step_mut(&id, at);
            step.updated_at = at;
            match ty {
                types::STEP_STARTED => {
                    step.status = StepStatus::Running;
                    step.attempts = d.attempt.unwrap_or(step.attempts + 1);
                    step.worker = d.worker;
                    step.lease_until = d.lease_until;
                    step.due_at = None;
                    step.first_started.get_or_insert(at);
                }
                types::STEP_SUCCEEDED => {
                    step.status = StepStatus::Succeeded;
                    step.worker = None;
                    step.lease_until = None;
                    step.error = None;
                    step.timed_out = false;
                    if id.phase == Phase::Action {
                        self.outputs
                            .insert(id.task.clone(), d.output.unwrap_or(Value::Null));
                    }
                }
                types::STEP_FAILED | types::STEP_TIMED_OUT => {
                    step.status = if d.exhausted {
                        StepStatus::Failed
                    } else {
                        StepStatus::RetryDue
                    };
                    step.worker = None;
                    step.lease_until = None;
                    step.error = d.error;
                    step.timed_out = ty == types::STEP_TIMED_OUT;
                }
                types::STEP_RETRY_SCHEDULED => {
                    step.status = StepStatus::RetryDue;
                    step.due_at = d.due_at;
                }
                types::RETRY_REQUESTED => {
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
                types::STEP_SKIPPED => {
                    step.status = StepStatus::Skipped;
                    step.worker = None;
                    step.lease_until = None;
                    if id.phase == Phase::Action || id.phase == Phase::Try {
                        self.outputs
                            .insert(id.task.clone(), d.output.unwrap_or(Value::Null));
                    }
                    match self.status {
                        InstanceStatus::Failed => self.status = InstanceStatus::Running,
                        InstanceStatus::Paused if by_incident => {
                            self.status = self.paused_from.take().unwrap_or(InstanceStatus::Running)
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            return;
        }
        let op: Operator = serde_json::from_value(e.data().clone()).unwrap_or_default();
        match ty {
            types::COMPENSATING | types::ABORTED => {
                self.status = InstanceStatus::Compensating;
                self.paused_from = None;
                self.reason = op.reason;
            }
            types::COMPENSATED => self.status = InstanceStatus::Compensated,
            types::COMPENSATION_FAILED => {
                self.status = InstanceStatus::CompensationFailed;
                self.reason = op.reason;
            }
            types::PAUSED => {
                if self.status != InstanceStatus::Paused {
                    self.paused_from = Some(self.status);
                }
                self.status = InstanceStatus::Paused;
                self.reason = op.reason;
            }
            types::RESUMED => {
                self.status = self.paused_from.take().unwrap_or(InstanceStatus::Running);
                self.reason = None;
            }
            types::COMPLETED => self.status = InstanceStatus::Completed,
            types::FAILED => {
                self.status = InstanceStatus::Failed;
                self.reason = op.reason;
            }
            _ => {}
        }
    }

    /// Paused because a task exhausted its retries (not by an operator).
    fn paused_by_incident(&self) -> bool {
        self.steps.values().any(|s| s.status == StepStatus::Failed)
    }
}
