//! Manual operations on flow instances: retry now, skip, abort, pause, resume.
//! Each is an event recording who and why, refused if the instance moved since
//! the operator looked.

use serde_json::Value;
use uuid::Uuid;

use super::FlowError;
use super::definition::FlowDefinition;
use super::engine::{Flows, TransitionError, TxWork, step_event};
use super::events::{self, Phase, StepEvent, StepId, types};
use super::state::{InstanceState, InstanceStatus, StepStatus};
use crate::Event;

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
    /// is still at `seen` (its `version_position` when the operator looked).
    async fn operate<D>(
        &self,
        id: Uuid,
        seen: crate::Position,
        decide: D,
    ) -> Result<InstanceState, FlowError>
    where
        D: Fn(&InstanceState, &FlowDefinition) -> Result<Vec<Event>, FlowError>,
    {
        let result = self
            .transition(id, TxWork::None, |state, def, _| {
                if state.version_position != seen {
                    return Err(FlowError::Moved {
                        expected: seen,
                        actual: state.version_position,
                    });
                }
                decide(state, def)
            })
            .await;
        match result {
            Ok((state, _)) => Ok(state),
            Err(TransitionError::Flow(e)) => Err(e),
            Err(TransitionError::Sql(e)) => Err(e.into()),
        }
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
        seen: crate::Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate(id, seen, |state, _| {
            let s = state.step(step);
            if !matches!(s.status, StepStatus::Failed | StepStatus::RetryDue) {
                return Err(FlowError::NotAllowed(format!(
                    "step {step} is {:?}, not failed or waiting for a retry",
                    s.status
                )));
            }
            Ok(vec![step_event(
                id,
                types::RETRY_REQUESTED,
                StepEvent {
                    step: Some(step.clone()),
                    actor: Some(by.actor.clone()),
                    reason: Some(by.reason.clone()),
                    ..Default::default()
                },
            )])
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
        seen: crate::Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate(id, seen, |state, def| {
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
            Ok(vec![step_event(
                id,
                types::STEP_SKIPPED,
                StepEvent {
                    step: Some(step),
                    output: Some(output.clone()),
                    actor: Some(by.actor.clone()),
                    reason: Some(by.reason.clone()),
                    ..Default::default()
                },
            )])
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
        seen: crate::Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate(id, seen, |state, _| {
            require(
                state,
                &[
                    InstanceStatus::Running,
                    InstanceStatus::Paused,
                    InstanceStatus::Failed,
                ],
            )?;
            Ok(vec![operator_event(id, types::ABORTED, by)])
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
        seen: crate::Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate(id, seen, |state, _| {
            require(
                state,
                &[InstanceStatus::Running, InstanceStatus::Compensating],
            )?;
            Ok(vec![operator_event(id, types::PAUSED, by)])
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
        seen: crate::Position,
        by: &Operator,
    ) -> Result<InstanceState, FlowError> {
        self.operate(id, seen, |state, _| {
            require(state, &[InstanceStatus::Paused])?;
            Ok(vec![operator_event(id, types::RESUMED, by)])
        })
        .await
    }
}

fn operator_event(id: Uuid, ty: &str, by: &Operator) -> Event {
    events::event(
        id,
        ty,
        events::Operator {
            actor: Some(by.actor.clone()),
            reason: Some(by.reason.clone()),
            step: None,
        },
    )
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
