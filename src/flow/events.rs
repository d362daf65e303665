//! The events of the flow layer: every instance and step transition is one of
//! these, appended under a condition on the instance's tag.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Event;

/// Event types (all start with `Flow`).
pub mod types {
    /// A definition version was registered.
    pub const DEFINITION_REGISTERED: &str = "FlowDefinitionRegistered";
    /// An instance started.
    pub const STARTED: &str = "FlowStarted";
    /// An attempt of a step started (a worker holds it until `lease_until`).
    pub const STEP_STARTED: &str = "FlowStepStarted";
    /// A step succeeded.
    pub const STEP_SUCCEEDED: &str = "FlowStepSucceeded";
    /// An attempt failed.
    pub const STEP_FAILED: &str = "FlowStepFailed";
    /// An attempt ran past its timeout (or its worker's lease expired).
    pub const STEP_TIMED_OUT: &str = "FlowStepTimedOut";
    /// The next attempt is due at a time.
    pub const STEP_RETRY_SCHEDULED: &str = "FlowStepRetryScheduled";
    /// An operator skipped a task with a given output.
    pub const STEP_SKIPPED: &str = "FlowStepSkipped";
    /// An operator asked for an immediate retry.
    pub const RETRY_REQUESTED: &str = "FlowRetryRequested";
    /// Compensation began.
    pub const COMPENSATING: &str = "FlowCompensating";
    /// Every completed task was compensated.
    pub const COMPENSATED: &str = "FlowCompensated";
    /// A compensation exhausted its retries.
    pub const COMPENSATION_FAILED: &str = "FlowCompensationFailed";
    /// The instance was paused.
    pub const PAUSED: &str = "FlowPaused";
    /// The instance was resumed.
    pub const RESUMED: &str = "FlowResumed";
    /// An operator aborted the instance (compensation follows).
    pub const ABORTED: &str = "FlowAborted";
    /// Every task succeeded.
    pub const COMPLETED: &str = "FlowCompleted";
    /// A task exhausted its retries with `on_exhausted: fail`.
    pub const FAILED: &str = "FlowFailed";
    /// A message for the outbox (NATS executor).
    pub const MESSAGE: &str = "FlowMessage";
}

/// The tag every event of an instance carries.
pub fn instance_tag(id: Uuid) -> String {
    format!("flow_instance:{id}")
}

/// The tag of a flow's instances and definitions.
pub fn flow_tag(flow: &str) -> String {
    format!("flow:{flow}")
}

/// The tag of an instance started with a business key.
pub fn business_key_tag(flow: &str, key: &str) -> String {
    format!("flow_key:{flow}:{key}")
}

/// The tag of a flow's definitions.
pub fn definition_tag(flow: &str) -> String {
    format!("flow_definition:{flow}")
}

/// What a step does: a task's action, its compensation, or one phase of a TCC
/// participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The task's action.
    Action,
    /// The task's compensation.
    Compensate,
    /// TCC try.
    Try,
    /// TCC confirm.
    Confirm,
    /// TCC cancel.
    Cancel,
}

impl Phase {
    /// Lower-case name, as in idempotency keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensate => "compensate",
            Phase::Try => "try",
            Phase::Confirm => "confirm",
            Phase::Cancel => "cancel",
        }
    }
}

/// One runnable unit of an instance: `<task>[.<participant>]/<phase>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StepId {
    /// The task.
    pub task: String,
    /// The TCC participant, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<String>,
    /// The phase.
    pub phase: Phase,
}

impl StepId {
    /// A task's action or compensation.
    pub fn new(task: &str, phase: Phase) -> Self {
        StepId {
            task: task.to_owned(),
            participant: None,
            phase,
        }
    }

    /// A TCC participant's phase.
    pub fn participant(task: &str, participant: &str, phase: Phase) -> Self {
        StepId {
            task: task.to_owned(),
            participant: Some(participant.to_owned()),
            phase,
        }
    }

    /// `<task>[.<participant>]/<phase>`.
    pub fn key(&self) -> String {
        match &self.participant {
            Some(p) => format!("{}.{p}/{}", self.task, self.phase.as_str()),
            None => format!("{}/{}", self.task, self.phase.as_str()),
        }
    }

    /// The idempotency key sent with every attempt: `<instance>/<task>[.<participant>]/<phase>`.
    pub fn idempotency_key(&self, instance: Uuid) -> String {
        format!("{instance}/{}", self.key())
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Payloads, by event type.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Payload {
    Started(Started),
    Step(StepEvent),
    Operator(Operator),
}

/// `FlowStarted`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub instance: Uuid,
    pub flow: String,
    pub version: String,
    #[serde(default)]
    pub business_key: Option<String>,
    pub input: Value,
    #[serde(default)]
    pub deadline_at: Option<DateTime<Utc>>,
}

/// The step events (started, succeeded, failed, timed out, retry scheduled, skipped).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StepEvent {
    pub step: Option<StepId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `FlowStepFailed`/`FlowStepTimedOut`: no attempts left (or not retryable).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exhausted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Instance-level events (compensating, paused, resumed, aborted, completed, ...).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Operator {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepId>,
}

/// An instance event of `event_type` with `data`.
pub(crate) fn event(instance: Uuid, event_type: &str, data: impl Serialize) -> Event {
    Event::new(
        event_type,
        [instance_tag(instance)],
        serde_json::to_value(data).expect("flow events serialize"),
    )
}
