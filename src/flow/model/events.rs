//! The events of the flow layer: every instance and step transition is one of
//! these, appended under a condition on the instance's tag.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::outbox::{Body, Envelope};
use crate::store::{Event, SequencedEvent};

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
    /// A message for the outbox (AMQP executor).
    pub const AMQP_MESSAGE: &str = "FlowAmqpMessage";
    /// An operator acknowledged a step's open incident (is handling it).
    pub const INCIDENT_ACKNOWLEDGED: &str = "FlowIncidentAcknowledged";
    /// A task's condition was false (or a task it requires was skipped): it is
    /// done, with no output.
    pub const TASK_SKIPPED: &str = "FlowTaskSkipped";
    /// A wait or signal task was reached: it waits until a time, for a signal,
    /// or both.
    pub const STEP_WAITING: &str = "FlowStepWaiting";
    /// A signal was sent to the instance (kept until a signal task consumes it).
    pub const SIGNAL_RECEIVED: &str = "FlowSignalReceived";
    /// A schedule was set (created or changed).
    pub const SCHEDULE_SET: &str = "FlowScheduleSet";
    /// A schedule was paused.
    pub const SCHEDULE_PAUSED: &str = "FlowSchedulePaused";
    /// A schedule was resumed.
    pub const SCHEDULE_RESUMED: &str = "FlowScheduleResumed";
}

/// The tag of a schedule's events and of the instances it started.
pub fn schedule_tag(name: &str) -> String {
    format!("flow_schedule:{name}")
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
    /// The item of a `for_each` task (from 0), if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
}

impl StepId {
    /// A task's action or compensation.
    pub fn new(task: &str, phase: Phase) -> Self {
        StepId {
            task: task.to_owned(),
            participant: None,
            phase,
            item: None,
        }
    }

    /// A TCC participant's phase.
    pub fn participant(task: &str, participant: &str, phase: Phase) -> Self {
        StepId {
            task: task.to_owned(),
            participant: Some(participant.to_owned()),
            phase,
            item: None,
        }
    }

    /// Item `item` of a `for_each` task: its action or its compensation.
    pub fn item(task: &str, item: u32, phase: Phase) -> Self {
        StepId {
            task: task.to_owned(),
            participant: None,
            phase,
            item: Some(item),
        }
    }

    /// `<task>[.<participant>]/<phase>`, or `<task>[<item>]/<phase>` for an
    /// item of a `for_each` task.
    pub fn key(&self) -> String {
        match (&self.participant, self.item) {
            (Some(p), _) => format!("{}.{p}/{}", self.task, self.phase.as_str()),
            (None, Some(i)) => format!("{}[{i}]/{}", self.task, self.phase.as_str()),
            (None, None) => format!("{}/{}", self.task, self.phase.as_str()),
        }
    }

    /// The step of a [`key`](Self::key) (`None` if it is not one).
    ///
    /// A key names its phase unambiguously, and only the TCC phases (`try`,
    /// `confirm`, `cancel`) have a participant. Since task and participant
    /// names may both contain `.`, a TCC key is split at its first `.`: the
    /// key of task `a.b`, participant `c` reads back as task `a`, participant
    /// `b.c`. Where that matters, take the step from the state
    /// ([`InstanceState::steps`](crate::flow::InstanceState::steps)) or from
    /// [`Incident::step`](crate::flow::Incident::step) instead.
    pub fn parse_key(key: &str) -> Option<StepId> {
        let (name, phase) = key.rsplit_once('/')?;
        let phase = match phase {
            "action" => Phase::Action,
            "compensate" => Phase::Compensate,
            "try" => Phase::Try,
            "confirm" => Phase::Confirm,
            "cancel" => Phase::Cancel,
            _ => return None,
        };
        if name.is_empty() || name.contains('/') {
            return None;
        }
        match phase {
            Phase::Action | Phase::Compensate => {
                // `<task>[<item>]`: an item of a for_each task (task names
                // have no brackets).
                if let Some(open) = name.strip_suffix(']').and_then(|n| n.rfind('['))
                    && let Ok(item) = name[open + 1..name.len() - 1].parse::<u32>()
                    && open > 0
                {
                    return Some(StepId::item(&name[..open], item, phase));
                }
                Some(StepId::new(name, phase))
            }
            Phase::Try | Phase::Confirm | Phase::Cancel => {
                let (task, participant) = name.split_once('.')?;
                (!task.is_empty() && !participant.is_empty())
                    .then(|| StepId::participant(task, participant, phase))
            }
        }
    }

    /// The idempotency key sent with every attempt: `<instance>/<task>[.<participant>]/<phase>`.
    pub fn idempotency_key(&self, instance: Uuid) -> String {
        format!("{instance}/{}", self.key())
    }

    /// The W3C `traceparent` of attempt `attempt` of this step: version 00,
    /// the instance as the trace id (one trace per instance, across services),
    /// a span id derived from the step and the attempt, sampled.
    pub fn traceparent(&self, instance: Uuid, attempt: u32) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{instance}/{}#{attempt}", self.key()).as_bytes());
        let mut span: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        if span == "0000000000000000" {
            span.replace_range(15..16, "1");
        }
        let mut trace = instance.simple().to_string();
        if trace == "00000000000000000000000000000000" {
            trace.replace_range(31..32, "1");
        }
        format!("00-{trace}-{span}-01")
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// `FlowStarted`: an instance began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    /// The instance id.
    pub instance: Uuid,
    /// The flow's name.
    pub flow: String,
    /// The definition version (content hash) it runs on.
    pub version: String,
    /// The business key it was started with.
    #[serde(default)]
    pub business_key: Option<String>,
    /// The flow input.
    pub input: Value,
    /// When its deadline passes.
    #[serde(default)]
    pub deadline_at: Option<DateTime<Utc>>,
    /// The instance and task that started it (a child of a `flow` task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

/// The parent of a child instance: the instance and its `flow` task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent instance.
    pub instance: Uuid,
    /// Its task that started the child.
    pub task: String,
}

/// `FlowStepStarted`: an attempt of a step began; `worker` holds it until
/// `lease_until`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStarted {
    /// The step.
    pub step: StepId,
    /// The attempt's number, from 1.
    pub attempt: u32,
    /// The worker running it.
    pub worker: String,
    /// Until when the worker holds it.
    pub lease_until: DateTime<Utc>,
    /// For the items of a `for_each` task started first: how many items the
    /// task has (its items template, rendered once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u32>,
}

/// `FlowStepSucceeded`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSucceeded {
    /// The step.
    pub step: StepId,
    /// The attempt that succeeded.
    pub attempt: u32,
    /// What the action returned.
    #[serde(default)]
    pub output: Value,
    /// The signal a signal task consumed (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_id: Option<String>,
}

/// `FlowTaskSkipped`: a task was not run because its condition was false, or a
/// task it requires was skipped. Its dependants treat it as done, with no output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSkipped {
    /// The task.
    pub task: String,
    /// Why, in words (`condition false: <expression>`).
    pub reason: String,
    /// The condition that was false, if that is why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
}

/// `FlowStepWaiting`: a wait or signal task was reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepWaiting {
    /// The step (the task's action step).
    pub step: StepId,
    /// A timer's due time, or a signal's timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// The signal waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The event waited for (an `await_event` task's query, its tags rendered;
    /// a `flow` task's child's final event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<AwaitedEvent>,
    /// A `flow` task's child instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<Uuid>,
}

/// The query of an `await_event` task, with its tags rendered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwaitedEvent {
    /// Any of these types (empty: any type).
    #[serde(default)]
    pub types: Vec<String>,
    /// All of these tags.
    pub tags: Vec<String>,
}

/// `FlowSignalReceived`: a signal sent to an instance. The event's id is
/// derived from the instance and `signal_id`, so sending it again changes
/// nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalReceived {
    /// The signal's name.
    pub name: String,
    /// The sender's id for it (idempotency).
    pub signal_id: String,
    /// What it carries (the consuming task's output).
    #[serde(default)]
    pub payload: Value,
    /// Who sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Why (a human approver's note).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `FlowStepFailed` / `FlowStepTimedOut`: an attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepFailed {
    /// The step.
    pub step: StepId,
    /// The attempt that failed.
    pub attempt: u32,
    /// The error.
    pub error: String,
    /// The error's code (for `retry_on`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// No attempts left (or the error was not retryable).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exhausted: bool,
}

/// `FlowStepRetryScheduled`: the next attempt is due at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryScheduled {
    /// The step.
    pub step: StepId,
    /// The number the next attempt will have.
    pub attempt: u32,
    /// When it is due.
    pub due_at: DateTime<Utc>,
}

/// `FlowStepSkipped` (an operator skipped a step, giving its output) and
/// `FlowRetryRequested` (an operator asked for an immediate retry; no output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepIntervention {
    /// The step.
    pub step: StepId,
    /// The output a skipped step stands in with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Who did it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `FlowIncidentAcknowledged`: an operator acknowledged the open incident of a
/// step (they are handling it). It changes nothing but the incident's
/// acknowledgement, which a later failure of the step with another kind or
/// error clears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentAcknowledged {
    /// The step whose incident it is.
    pub step: StepId,
    /// Who acknowledged it.
    pub actor: String,
    /// Their note (the operator's reason).
    #[serde(default)]
    pub note: String,
    /// The incident's kind when it was acknowledged (`exhausted`,
    /// `compensation_failed`, `timed_out`).
    pub kind: String,
    /// The incident's error when it was acknowledged.
    #[serde(default)]
    pub error: String,
}

/// Instance-level events (compensating, compensated, compensation failed, paused,
/// resumed, aborted, completed, failed): who (an operator, or nobody when the
/// engine decided) and why.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstanceChange {
    /// The operator, if one acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `FlowMessage`: a message a NATS step produced, relayed by the outbox. The
/// event carries an outbox [`Envelope`](crate::outbox::Envelope) with the
/// message id, the subject and the payload as the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The step's idempotency key: the message id (`Nats-Msg-Id`).
    pub message_id: String,
    /// The subject to publish on.
    pub subject: String,
    /// The message body.
    pub payload: Value,
    /// The step's W3C trace context, sent as the `traceparent` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// `FlowAmqpMessage`: a message an AMQP step produced, relayed by the outbox
/// to RabbitMQ. The event carries an outbox envelope with the message id and
/// the routing key as its subject, and the payload as the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AmqpMessage {
    /// The step's idempotency key: the AMQP `message_id`.
    pub message_id: String,
    /// The exchange (`""`: the default exchange).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The message body.
    pub payload: Value,
    /// The step's W3C trace context, sent as the `traceparent` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// An event of an instance, decoded by its type.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FlowEvent {
    /// `FlowStarted`.
    Started(Started),
    /// `FlowStepStarted`.
    StepStarted(StepStarted),
    /// `FlowStepSucceeded`.
    StepSucceeded(StepSucceeded),
    /// `FlowStepFailed`.
    StepFailed(StepFailed),
    /// `FlowStepTimedOut`.
    StepTimedOut(StepFailed),
    /// `FlowStepRetryScheduled`.
    RetryScheduled(RetryScheduled),
    /// `FlowStepSkipped`.
    StepSkipped(StepIntervention),
    /// `FlowRetryRequested`.
    RetryRequested(StepIntervention),
    /// `FlowCompensating`.
    Compensating(InstanceChange),
    /// `FlowCompensated`.
    Compensated(InstanceChange),
    /// `FlowCompensationFailed`.
    CompensationFailed(InstanceChange),
    /// `FlowPaused`.
    Paused(InstanceChange),
    /// `FlowResumed`.
    Resumed(InstanceChange),
    /// `FlowAborted`.
    Aborted(InstanceChange),
    /// `FlowCompleted`.
    Completed(InstanceChange),
    /// `FlowFailed`.
    Failed(InstanceChange),
    /// `FlowMessage`.
    Message(Message),
    /// `FlowAmqpMessage`.
    AmqpMessage(AmqpMessage),
    /// `FlowIncidentAcknowledged`.
    IncidentAcknowledged(IncidentAcknowledged),
    /// `FlowTaskSkipped`.
    TaskSkipped(TaskSkipped),
    /// `FlowStepWaiting`.
    StepWaiting(StepWaiting),
    /// `FlowSignalReceived`.
    SignalReceived(SignalReceived),
}

impl FlowEvent {
    /// The event type it is stored under.
    pub fn event_type(&self) -> &'static str {
        match self {
            FlowEvent::Started(_) => types::STARTED,
            FlowEvent::StepStarted(_) => types::STEP_STARTED,
            FlowEvent::StepSucceeded(_) => types::STEP_SUCCEEDED,
            FlowEvent::StepFailed(_) => types::STEP_FAILED,
            FlowEvent::StepTimedOut(_) => types::STEP_TIMED_OUT,
            FlowEvent::RetryScheduled(_) => types::STEP_RETRY_SCHEDULED,
            FlowEvent::StepSkipped(_) => types::STEP_SKIPPED,
            FlowEvent::RetryRequested(_) => types::RETRY_REQUESTED,
            FlowEvent::Compensating(_) => types::COMPENSATING,
            FlowEvent::Compensated(_) => types::COMPENSATED,
            FlowEvent::CompensationFailed(_) => types::COMPENSATION_FAILED,
            FlowEvent::Paused(_) => types::PAUSED,
            FlowEvent::Resumed(_) => types::RESUMED,
            FlowEvent::Aborted(_) => types::ABORTED,
            FlowEvent::Completed(_) => types::COMPLETED,
            FlowEvent::Failed(_) => types::FAILED,
            FlowEvent::Message(_) => types::MESSAGE,
            FlowEvent::AmqpMessage(_) => types::AMQP_MESSAGE,
            FlowEvent::IncidentAcknowledged(_) => types::INCIDENT_ACKNOWLEDGED,
            FlowEvent::TaskSkipped(_) => types::TASK_SKIPPED,
            FlowEvent::StepWaiting(_) => types::STEP_WAITING,
            FlowEvent::SignalReceived(_) => types::SIGNAL_RECEIVED,
        }
    }

    /// An instance-level event of type `event_type` (one of the
    /// [`InstanceChange`] types), or `None` for another type.
    pub fn instance_change(event_type: &str, change: InstanceChange) -> Option<FlowEvent> {
        Some(match event_type {
            types::COMPENSATING => FlowEvent::Compensating(change),
            types::COMPENSATED => FlowEvent::Compensated(change),
            types::COMPENSATION_FAILED => FlowEvent::CompensationFailed(change),
            types::PAUSED => FlowEvent::Paused(change),
            types::RESUMED => FlowEvent::Resumed(change),
            types::ABORTED => FlowEvent::Aborted(change),
            types::COMPLETED => FlowEvent::Completed(change),
            types::FAILED => FlowEvent::Failed(change),
            _ => return None,
        })
    }

    /// Decodes a stored event: `None` for another type, `Err` for a payload of
    /// the right type that does not decode.
    ///
    /// # Errors
    /// The payload's deserialization error.
    pub fn decode(event: &Event) -> Option<Result<FlowEvent, serde_json::Error>> {
        fn de<T: serde::de::DeserializeOwned>(e: &Event) -> Result<T, serde_json::Error> {
            T::deserialize(&e.data)
        }
        let e = event;
        Some(match e.event_type.as_str() {
            types::STARTED => de(e).map(FlowEvent::Started),
            types::STEP_STARTED => de(e).map(FlowEvent::StepStarted),
            types::STEP_SUCCEEDED => de(e).map(FlowEvent::StepSucceeded),
            types::STEP_FAILED => de(e).map(FlowEvent::StepFailed),
            types::STEP_TIMED_OUT => de(e).map(FlowEvent::StepTimedOut),
            types::STEP_RETRY_SCHEDULED => de(e).map(FlowEvent::RetryScheduled),
            types::STEP_SKIPPED => de(e).map(FlowEvent::StepSkipped),
            types::RETRY_REQUESTED => de(e).map(FlowEvent::RetryRequested),
            types::MESSAGE => de(e).map(FlowEvent::Message),
            types::AMQP_MESSAGE => de(e).map(FlowEvent::AmqpMessage),
            types::INCIDENT_ACKNOWLEDGED => de(e).map(FlowEvent::IncidentAcknowledged),
            types::TASK_SKIPPED => de(e).map(FlowEvent::TaskSkipped),
            types::STEP_WAITING => de(e).map(FlowEvent::StepWaiting),
            types::SIGNAL_RECEIVED => de(e).map(FlowEvent::SignalReceived),
            other => {
                let change = de::<InstanceChange>(e);
                match change {
                    Ok(c) => Ok(FlowEvent::instance_change(other, c)?),
                    Err(err) => {
                        FlowEvent::instance_change(other, InstanceChange::default())?;
                        Err(err)
                    }
                }
            }
        })
    }

    /// The event to append for instance `instance` (tagged with its instance tag).
    pub fn to_event(&self, instance: Uuid) -> Event {
        let data = match self {
            FlowEvent::Started(d) => serde_json::to_value(d),
            FlowEvent::StepStarted(d) => serde_json::to_value(d),
            FlowEvent::StepSucceeded(d) => serde_json::to_value(d),
            FlowEvent::StepFailed(d) | FlowEvent::StepTimedOut(d) => serde_json::to_value(d),
            FlowEvent::RetryScheduled(d) => serde_json::to_value(d),
            FlowEvent::StepSkipped(d) | FlowEvent::RetryRequested(d) => serde_json::to_value(d),
            FlowEvent::Compensating(d)
            | FlowEvent::Compensated(d)
            | FlowEvent::CompensationFailed(d)
            | FlowEvent::Paused(d)
            | FlowEvent::Resumed(d)
            | FlowEvent::Aborted(d)
            | FlowEvent::Completed(d)
            | FlowEvent::Failed(d) => serde_json::to_value(d),
            FlowEvent::Message(d) => serde_json::to_value(d),
            FlowEvent::AmqpMessage(d) => serde_json::to_value(d),
            FlowEvent::IncidentAcknowledged(d) => serde_json::to_value(d),
            FlowEvent::TaskSkipped(d) => serde_json::to_value(d),
            FlowEvent::StepWaiting(d) => serde_json::to_value(d),
            FlowEvent::SignalReceived(d) => serde_json::to_value(d),
        }
        .expect("flow events serialize");
        let event = Event::new(self.event_type(), [instance_tag(instance)], data);
        match self {
            // Sending a signal twice appends nothing the second time.
            FlowEvent::SignalReceived(r) => event.with_id(signal_event_id(instance, &r.signal_id)),
            FlowEvent::AmqpMessage(m) => Envelope::new()
                .message_id(&m.message_id)
                .subject(&m.routing_key)
                .body(Body::Pointer("/payload".into()))
                .attach(event),
            FlowEvent::Message(m) => Envelope::new()
                .message_id(&m.message_id)
                .subject(&m.subject)
                .body(Body::Pointer("/payload".into()))
                .attach(event),
            _ => event,
        }
    }
}

/// The event id of signal `signal_id` sent to `instance`: the first 16 bytes of
/// a SHA-256 of both, as a UUID (version 8, "custom").
pub fn signal_event_id(instance: Uuid, signal_id: &str) -> Uuid {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"dcbflow.signal\0");
    h.update(instance.as_bytes());
    h.update(signal_id.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Decodes a sequenced event (see [`FlowEvent::decode`]).
pub(crate) fn decode(e: &SequencedEvent) -> Option<Result<FlowEvent, serde_json::Error>> {
    FlowEvent::decode(&e.event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_key_reads_back_as_its_step() {
        for step in [
            StepId::new("ship", Phase::Action),
            StepId::new("ship-it", Phase::Compensate),
            StepId::new("a.b", Phase::Action),
            StepId::participant("book", "hotel", Phase::Try),
            StepId::participant("book", "car", Phase::Confirm),
            StepId::participant("book", "car_2", Phase::Cancel),
        ] {
            assert_eq!(StepId::parse_key(&step.key()), Some(step.clone()), "{step}");
        }
        // A dotted TCC key splits at its first dot.
        assert_eq!(
            StepId::parse_key("a.b.c/try"),
            Some(StepId::participant("a", "b.c", Phase::Try))
        );
        for bad in [
            "",
            "ship",
            "ship/",
            "/action",
            "ship/run",
            "a/b/action",
            "book/try",
            ".x/try",
            "x./cancel",
        ] {
            assert_eq!(StepId::parse_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_acknowledgement_round_trips() {
        let id = Uuid::new_v4();
        let e = FlowEvent::IncidentAcknowledged(IncidentAcknowledged {
            step: StepId::new("ship", Phase::Action),
            actor: "ada".into(),
            note: "calling the carrier".into(),
            kind: "exhausted".into(),
            error: "refused".into(),
        });
        let stored = e.to_event(id);
        assert_eq!(stored.event_type, types::INCIDENT_ACKNOWLEDGED);
        assert_eq!(FlowEvent::decode(&stored).unwrap().unwrap(), e);
    }
}
