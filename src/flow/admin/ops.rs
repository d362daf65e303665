//! Manual operations on flow instances: retry now, skip, abort, pause, resume,
//! acknowledge an incident. Each is an event recording who and why, refused if
//! the instance moved since the operator looked.

use serde_json::Value;
use uuid::Uuid;

use crate::flow::FlowError;
use crate::flow::model::decide::incidents;
use crate::flow::model::definition::FlowDefinition;
use crate::flow::model::events::{
    FlowEvent, IncidentAcknowledged, InstanceChange, Phase, SignalReceived, StepId,
    StepIntervention,
};
use crate::flow::model::state::{InstanceState, InstanceStatus, StepStatus};
use crate::flow::runtime::Flows;
use crate::store::Position;

/// Who does a manual operation, and why (recorded in its event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

impl Operator {
    /// `actor` because of `reason`.
    pub fn new(actor: impl Into<String>, reason: impl Into<String>) -> Self {
        Operator {
            actor: actor.into(),
            reason: reason.into(),
        }
    }
}

impl Flows {
    /// A manual operation: refused with [`FlowError::Moved`] unless the instance
    /// is still at `seen` (its `last_position` when the operator looked; `None`:
    /// not checked).
    #[tracing::instrument(name = "dcbflow.flow.operate", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema(), operation = operation, instance = %id))]
    async fn operate<D>(
        &self,
        operation: &'static str,
        id: Uuid,
        seen: Option<Position>,
        decide: D,
    ) -> Result<InstanceState, FlowError>
    where
        D: Fn(&InstanceState, &FlowDefinition) -> Result<FlowEvent, FlowError> + Send + Sync,
    {
        tracing::info!("operator action");
        self.ready().await?;
        let result = self
            .transition(id, None, |state, def, _| {
                if let Some(seen) = seen.filter(|p| *p != state.last_position) {
                    return Err(FlowError::Moved {
                        expected: seen,
                        actual: state.last_position,
                    });
                }
                Ok(vec![decide(state, def)?])
            })
            .await;
        if result.is_ok() {
            // What the action made due is claimed now by this engine's workers.
            self.wake_workers();
        }
        result.map(|(state, _)| state).map_err(|e| e.into_flow())
    }

    /// Retries `step` now (a failed, exhausted or waiting step), with a fresh
    /// budget of attempts; resumes an instance paused or failed by it, and goes
    /// back to compensating after a failed compensation.
    ///
    /// # Errors
    /// [`FlowError::Moved`], [`FlowError::NotAllowed`], store errors.
    pub async fn retry_now(
        &self,
        id: Uuid,
        step: &StepId,
        seen: Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate("retry_now", id, Some(seen), |state, _| {
            // A completed or compensated instance is over: a retry would
            // leave a step due that nothing ever runs.
            if matches!(
                state.status,
                InstanceStatus::Completed | InstanceStatus::Compensated
            ) {
                return Err(FlowError::NotAllowed(format!(
                    "the instance is {}: nothing runs again",
                    state.status.as_str()
                )));
            }
            let s = state.step(step);
            if !matches!(s.status, StepStatus::Failed | StepStatus::RetryDue) {
                return Err(FlowError::NotAllowed(format!(
                    "step {step} is {:?}, not failed or waiting for a retry",
                    s.status
                )));
            }
            Ok(FlowEvent::RetryRequested(StepIntervention {
                step: step.clone(),
                output: None,
                actor: Some(by.actor.clone()),
                reason: Some(by.reason.clone()),
            }))
        })
        .await
    }

    /// Marks `task` done with `output` without running it (again).
    ///
    /// # Errors
    /// [`FlowError::Moved`], [`FlowError::NotAllowed`] (unknown task, already
    /// done, running, or the instance is not running, paused or failed), store errors.
    pub async fn skip(
        &self,
        id: Uuid,
        task: &str,
        output: Value,
        seen: Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate("skip", id, Some(seen), |state, def| {
            if def.task(task).is_none() {
                return Err(FlowError::NotAllowed(format!(
                    "no task {task:?} in flow {:?}",
                    def.name
                )));
            }
            require(
                state,
                &[
                    InstanceStatus::Running,
                    InstanceStatus::Paused,
                    InstanceStatus::Failed,
                ],
            )?;
            let step = StepId::new(task, Phase::Action);
            let busy = state
                .steps
                .values()
                .any(|s| s.step.task == task && s.status == StepStatus::Running);
            let s = state.step(&step);
            if busy || matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped) {
                return Err(FlowError::NotAllowed(format!(
                    "task {task:?} is running or done"
                )));
            }
            Ok(FlowEvent::StepSkipped(StepIntervention {
                step,
                output: Some(output.clone()),
                actor: Some(by.actor.clone()),
                reason: Some(by.reason.clone()),
            }))
        })
        .await
    }

    /// Aborts the instance: no new task starts, completed ones are compensated.
    ///
    /// # Errors
    /// [`FlowError::Moved`], [`FlowError::NotAllowed`] (already finished or
    /// compensating), store errors.
    pub async fn abort(
        &self,
        id: Uuid,
        seen: Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate("abort", id, Some(seen), |state, _| {
            require(
                state,
                &[
                    InstanceStatus::Running,
                    InstanceStatus::Paused,
                    InstanceStatus::Failed,
                ],
            )?;
            Ok(FlowEvent::Aborted(change(by)))
        })
        .await
    }

    /// Pauses the instance: no new step starts (running ones finish).
    ///
    /// # Errors
    /// [`FlowError::Moved`], [`FlowError::NotAllowed`], store errors.
    pub async fn pause(
        &self,
        id: Uuid,
        seen: Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate("pause", id, Some(seen), |state, _| {
            require(
                state,
                &[InstanceStatus::Running, InstanceStatus::Compensating],
            )?;
            Ok(FlowEvent::Paused(change(by)))
        })
        .await
    }

    /// Resumes a paused instance.
    ///
    /// # Errors
    /// [`FlowError::Moved`], [`FlowError::NotAllowed`], store errors.
    pub async fn resume(
        &self,
        id: Uuid,
        seen: Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate("resume", id, Some(seen), |state, _| {
            require(state, &[InstanceStatus::Paused])?;
            Ok(FlowEvent::Resumed(change(by)))
        })
        .await
    }

    /// Acknowledges the open incident of `step`: records that `by.actor` is
    /// handling it, with `by.reason` as the note (a `FlowIncidentAcknowledged`
    /// event; nothing else changes). The acknowledgement shows in
    /// [`Flows::incident`], [`Flows::group_incidents`] and the groups'
    /// [`acknowledged`](crate::flow::IncidentGroup::acknowledged) counts until
    /// the incident is resolved or the step fails again with another kind or
    /// error. Acknowledging again replaces it. `seen`: the instance's
    /// `last_position` the operator looked at (`None`: not checked).
    ///
    /// # Errors
    /// [`FlowError::Moved`], [`FlowError::NotAllowed`] (the step has no open
    /// incident), [`FlowError::UnknownInstance`], store errors.
    pub async fn acknowledge(
        &self,
        instance: Uuid,
        step: &StepId,
        seen: Option<Position>,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate("acknowledge", instance, seen, |state, _| {
            let key = step.key();
            let Some(open) = incidents(state).into_iter().find(|i| i.step == key) else {
                return Err(FlowError::NotAllowed(format!(
                    "step {step} has no open incident"
                )));
            };
            Ok(FlowEvent::IncidentAcknowledged(IncidentAcknowledged {
                step: step.clone(),
                actor: by.actor.clone(),
                note: by.reason.clone(),
                kind: open.kind.to_owned(),
                error: open.error,
            }))
        })
        .await
    }
}

/// A signal for [`Flows::signal`]: its name, the sender's id for it (sending
/// the same id again changes nothing), its payload and who sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// The name a `signal` task waits for.
    pub name: String,
    /// The sender's id for this signal: idempotency.
    pub id: String,
    /// What it carries: the consuming task's output.
    pub payload: Value,
    /// Who sent it.
    pub actor: Option<String>,
    /// Why (a human approver's note).
    pub reason: Option<String>,
}

/// The longest signal id accepted, in bytes.
pub const MAX_SIGNAL_ID: usize = 200;

impl Signal {
    /// Signal `name` with the sender's id `id` and a `null` payload.
    pub fn new(name: impl Into<String>, id: impl Into<String>) -> Self {
        Signal {
            name: name.into(),
            id: id.into(),
            payload: Value::Null,
            actor: None,
            reason: None,
        }
    }

    /// Sets the payload.
    #[must_use]
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets who sends it.
    #[must_use]
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets why (recorded with the signal).
    #[must_use]
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

impl Flows {
    /// Sends `signal` to instance `id`. A `signal` task waiting for its name
    /// consumes it and completes with its payload; one not reached yet consumes
    /// it when it is. Sending the same signal id again changes nothing and
    /// returns the instance as it is (with another name or payload it is
    /// refused).
    ///
    /// # Errors
    /// [`FlowError::NotAllowed`]: an empty or overlong id; no task of the flow
    /// waits for a signal of this name, or every one of them is done; the
    /// instance is no longer running or paused; the id was used for another
    /// signal. [`FlowError::UnknownInstance`], store errors.
    #[tracing::instrument(name = "dcbflow.flow.signal", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema(), instance = %id, signal = %signal.name))]
    pub async fn signal(&self, id: Uuid, signal: Signal) -> Result<InstanceState, FlowError> {
        if signal.id.trim().is_empty() || signal.id.len() > MAX_SIGNAL_ID {
            return Err(FlowError::NotAllowed(format!(
                "a signal id must be 1 to {MAX_SIGNAL_ID} bytes, not {}",
                signal.id.len()
            )));
        }
        self.ready().await?;
        let result = self
            .transition(id, None, |state, def, _| {
                if let Some(earlier) = state.signals.iter().find(|s| s.signal_id == signal.id) {
                    if earlier.name != signal.name || earlier.payload != signal.payload {
                        return Err(FlowError::NotAllowed(format!(
                            "signal id {:?} was already sent as signal {:?} with another payload",
                            signal.id, earlier.name
                        )));
                    }
                    return Ok(Vec::new());
                }
                let waiting: Vec<&str> = def
                    .tasks
                    .iter()
                    .filter(|t| t.signal.as_ref().is_some_and(|s| s.name == signal.name))
                    .map(|t| t.name.as_str())
                    .collect();
                if waiting.is_empty() {
                    return Err(FlowError::NotAllowed(format!(
                        "no task of flow {:?} waits for signal {:?}",
                        def.name, signal.name
                    )));
                }
                let open = waiting.iter().any(|t| {
                    !matches!(
                        state.step(&StepId::new(t, Phase::Action)).status,
                        StepStatus::Succeeded | StepStatus::Skipped
                    )
                });
                if !open {
                    return Err(FlowError::NotAllowed(format!(
                        "every task waiting for signal {:?} is done",
                        signal.name
                    )));
                }
                require(state, &[InstanceStatus::Running, InstanceStatus::Paused])?;
                Ok(vec![FlowEvent::SignalReceived(SignalReceived {
                    name: signal.name.clone(),
                    signal_id: signal.id.clone(),
                    payload: signal.payload.clone(),
                    actor: signal.actor.clone(),
                    reason: signal.reason.clone(),
                })])
            })
            .await;
        if result.is_ok() {
            // What the action made due is claimed now by this engine's workers.
            self.wake_workers();
        }
        result.map(|(state, _)| state).map_err(|e| e.into_flow())
    }
}

fn change(by: &Operator) -> InstanceChange {
    InstanceChange {
        actor: Some(by.actor.clone()),
        reason: Some(by.reason.clone()),
    }
}

/// Refuses an operation unless the instance is in one of `allowed`.
fn require(state: &InstanceState, allowed: &[InstanceStatus]) -> Result<(), FlowError> {
    if allowed.contains(&state.status) {
        return Ok(());
    }
    Err(FlowError::NotAllowed(format!(
        "the instance is {}",
        state.status.as_str()
    )))
}
