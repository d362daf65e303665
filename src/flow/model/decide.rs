//! The events of a transition: what the engine appends for an instance, given
//! its definition and state. With [`plan`](super::plan) this is every decision
//! the engine takes; both are pure and tested without a database.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::definition::{FlowDefinition, TaskDefinition};
use super::events::{
    FlowEvent, InstanceChange, Phase, RetryScheduled, StepFailed, StepId, StepStarted,
    StepSucceeded, StepWaiting, TaskSkipped,
};
use super::failure::TaskError;
use super::plan::{Plan, plan};
use super::state::{Acknowledgement, InstanceState, InstanceStatus};
use crate::store::{Event, SequencedEvent, TransactionId};

/// Who starts the steps a transition starts, and for how long they hold them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lessee<'a> {
    /// The worker's name.
    pub(crate) worker: &'a str,
    /// Added to a step's timeout to form its lease.
    pub(crate) lease_grace: Duration,
}

/// Planning rounds in one transition at most (a longer chain of skips and
/// waits takes further transitions: the instance stays due).
const MAX_ROUNDS: usize = 8;

/// The events of planning rounds on `state` until steps start or nothing is
/// left to do: timeouts, instance-level changes (compensating, completed, ...)
/// and the steps to start now, all for one transition.
pub(crate) fn next_events(
    def: &FlowDefinition,
    state: &InstanceState,
    now: DateTime<Utc>,
    lessee: Lessee<'_>,
) -> Vec<FlowEvent> {
    let mut all = Vec::new();
    let mut current = state.clone();
    for _ in 0..MAX_ROUNDS {
        let (events, complete) = round(def, &current, now, lessee);
        if complete || events.is_empty() {
            all.extend(events);
            break;
        }
        current = preview(&current, &events, now);
        all.extend(events);
    }
    all
}

/// One planning round: timeouts, or else an instance-level change, or else the
/// steps to start (`true`: nothing further to plan after these).
fn round(
    def: &FlowDefinition,
    state: &InstanceState,
    now: DateTime<Utc>,
    lessee: Lessee<'_>,
) -> (Vec<FlowEvent>, bool) {
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
        out.extend(failure_events(task, state, step, &error, true, now));
    }
    if !out.is_empty() {
        return (out, false);
    }
    if let Some((ty, reason)) = &p.instance {
        let change = InstanceChange {
            actor: None,
            reason: (!reason.is_empty()).then(|| reason.clone()),
        };
        if let Some(event) = FlowEvent::instance_change(ty, change) {
            return (vec![event], false);
        }
    }
    // Decisions that need no worker: skips, waits reached, waits over, and
    // failures without an attempt. The next round plans what they unblock.
    for (task, reason, condition) in &p.skip {
        out.push(FlowEvent::TaskSkipped(TaskSkipped {
            task: task.clone(),
            reason: reason.clone(),
            condition: condition.clone(),
        }));
    }
    for w in &p.wait {
        out.push(FlowEvent::StepWaiting(StepWaiting {
            step: w.step.clone(),
            until: w.until,
            signal: w.signal.clone(),
            event: w.event.clone(),
            child: None,
        }));
    }
    for (step, output, signal_id) in &p.finish {
        out.push(FlowEvent::StepSucceeded(StepSucceeded {
            step: step.clone(),
            attempt: state.step(step).attempts,
            output: output.clone(),
            signal_id: signal_id.clone(),
        }));
    }
    for (step, error, code) in &p.fail {
        out.push(FlowEvent::StepFailed(StepFailed {
            step: step.clone(),
            attempt: state.step(step).attempts,
            error: error.clone(),
            code: Some((*code).to_owned()),
            exhausted: true,
        }));
    }
    if !out.is_empty() {
        return (out, false);
    }
    for step in &p.start {
        let Some(task) = def.task(&step.task) else {
            continue;
        };
        let lease = now
            + chrono::Duration::milliseconds(task.timeout_ms as i64)
            + chrono::Duration::from_std(lessee.lease_grace).unwrap_or_default();
        let items = step.item.and_then(|_| {
            p.items
                .iter()
                .find(|(t, _)| *t == step.task)
                .map(|(_, n)| *n)
        });
        out.push(FlowEvent::StepStarted(StepStarted {
            step: step.clone(),
            attempt: state.step(step).attempts + 1,
            worker: lessee.worker.to_owned(),
            lease_until: lease,
            items,
        }));
    }
    (out, true)
}

/// The events recording a failed attempt: failed (or timed out), and a retry if
/// the policy allows one.
pub(crate) fn failure_events(
    task: &TaskDefinition,
    state: &InstanceState,
    step: &StepId,
    error: &TaskError,
    timed_out: bool,
    now: DateTime<Utc>,
) -> Vec<FlowEvent> {
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
    let failed = StepFailed {
        step: step.clone(),
        attempt: s.attempts,
        error: error.message.clone(),
        code: error.code.clone(),
        exhausted,
    };
    let mut out = vec![if timed_out {
        FlowEvent::StepTimedOut(failed)
    } else {
        FlowEvent::StepFailed(failed)
    }];
    if !exhausted {
        let mut delay = policy.delay(s.counted_attempts());
        if let Some(after) = error.retry_after {
            delay = delay.max(after);
        }
        out.push(FlowEvent::RetryScheduled(RetryScheduled {
            step: step.clone(),
            attempt: s.attempts + 1,
            due_at: now + chrono::Duration::from_std(delay).unwrap_or_default(),
        }));
    }
    out
}

/// `state` as it will be once `events` are appended (for planning ahead).
pub(crate) fn preview(
    state: &InstanceState,
    events: &[FlowEvent],
    now: DateTime<Utc>,
) -> InstanceState {
    let mut next = state.clone();
    for e in events {
        next.apply(&SequencedEvent {
            position: state.last_position,
            transaction_id: TransactionId(0),
            recorded_at: now,
            event: e.to_event(state.id),
        });
    }
    next
}

/// The store events of `events` for instance `id`.
pub(crate) fn to_events(id: uuid::Uuid, events: &[FlowEvent]) -> Vec<Event> {
    events.iter().map(|e| e.to_event(id)).collect()
}

/// When the instance next needs a worker.
pub(crate) fn next_due(p: &Plan, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if p.is_idle() { p.next_due } else { Some(now) }
}

/// A step that needs an operator (or an instance paused by one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Incident {
    /// The step's key (empty for a paused instance).
    pub(crate) step: String,
    /// The task (empty for a paused instance).
    pub(crate) task: String,
    /// `exhausted`, `compensation_failed`, `timed_out` or `paused`.
    pub(crate) kind: &'static str,
    /// The last error (or the pause's reason).
    pub(crate) error: String,
    /// Attempts made.
    pub(crate) occurrences: u32,
    /// The operator's acknowledgement, if the incident has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) acknowledged: Option<Acknowledgement>,
}

/// The incidents of an instance in its current state.
pub(crate) fn incidents(state: &InstanceState) -> Vec<Incident> {
    let mut out = Vec::new();
    // A completed or fully compensated instance has nothing left to fix.
    if matches!(
        state.status,
        InstanceStatus::Completed | InstanceStatus::Compensated
    ) {
        return out;
    }
    for s in state.steps.values() {
        let Some(kind) = s.incident_kind() else {
            continue;
        };
        let error = s.error.clone().unwrap_or_default();
        let acknowledged = s
            .acknowledged
            .clone()
            .filter(|a| a.kind == kind && a.error == error);
        out.push(Incident {
            step: s.step.key(),
            task: s.step.task.clone(),
            kind,
            error,
            occurrences: s.attempts,
            acknowledged,
        });
    }
    if state.status == InstanceStatus::Paused && out.is_empty() {
        out.push(Incident {
            step: String::new(),
            task: String::new(),
            kind: "paused",
            error: state.reason.clone().unwrap_or_default(),
            occurrences: 1,
            acknowledged: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::{DateTime, SubsecRound, Utc};
    use serde_json::json;

    use super::*;
    use crate::flow::model::definition::{Action, TaskRetry};
    use crate::flow::model::events::Started;
    use crate::flow::model::plan::plan;
    use crate::flow::model::state::StepStatus;
    use crate::store::Position;

    const WORKER: Lessee<'static> = Lessee {
        worker: "w1",
        lease_grace: Duration::from_secs(2),
    };

    fn serial() -> FlowDefinition {
        FlowDefinition::builder("order")
            .task(
                TaskDefinition::new("reserve", Action::rust("reserve"))
                    .retry(TaskRetry::attempts(2)),
            )
            .task(TaskDefinition::new("ship", Action::rust("ship")).after(["reserve"]))
            .build()
    }

    fn started(def: &FlowDefinition, now: DateTime<Utc>) -> InstanceState {
        let id = uuid::Uuid::new_v4();
        let e = FlowEvent::Started(Started {
            instance: id,
            flow: def.name.clone(),
            version: def.version(),
            business_key: None,
            input: json!({}),
            deadline_at: None,
            parent: None,
        });
        let seq = SequencedEvent {
            position: Position(1),
            transaction_id: TransactionId(1),
            recorded_at: now,
            event: e.to_event(id),
        };
        InstanceState::fold([&seq]).expect("a start folds")
    }

    fn apply(state: &InstanceState, events: &[FlowEvent], now: DateTime<Utc>) -> InstanceState {
        preview(state, events, now)
    }

    #[test]
    fn a_new_instance_starts_only_the_tasks_without_dependencies() {
        let (def, now) = (serial(), Utc::now());
        let state = started(&def, now);
        let events = next_events(&def, &state, now, WORKER);
        assert_eq!(events.len(), 1, "{events:?}");
        let FlowEvent::StepStarted(s) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(s.step.key(), "reserve/action");
        assert_eq!((s.attempt, s.worker.as_str()), (1, "w1"));
        assert!(s.lease_until > now + chrono::Duration::seconds(2));
    }

    #[test]
    fn success_starts_the_dependant_and_the_last_success_completes() {
        let (def, now) = (serial(), Utc::now());
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        let done = |task: &str| {
            FlowEvent::StepSucceeded(StepSucceeded {
                step: StepId::new(task, Phase::Action),
                attempt: 1,
                output: json!({"ok": task}),
                signal_id: None,
            })
        };
        state = apply(&state, &[done("reserve")], now);
        let events = next_events(&def, &state, now, WORKER);
        assert!(
            matches!(&events[..], [FlowEvent::StepStarted(s)] if s.step.task == "ship"),
            "{events:?}"
        );
        state = apply(&state, &events, now);
        state = apply(&state, &[done("ship")], now);
        let events = next_events(&def, &state, now, WORKER);
        assert!(
            matches!(&events[..], [FlowEvent::Completed(_)]),
            "{events:?}"
        );
        assert_eq!(state.outputs["reserve"], json!({"ok": "reserve"}));
    }

    #[test]
    fn a_retryable_failure_schedules_a_retry_until_attempts_run_out() {
        let (def, now) = (serial(), Utc::now());
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        let step = StepId::new("reserve", Phase::Action);
        let task = def.task("reserve").unwrap();
        let error = TaskError::retryable("503").code("http_503");
        let first = failure_events(task, &state, &step, &error, false, now);
        assert!(
            matches!(&first[..], [FlowEvent::StepFailed(f), FlowEvent::RetryScheduled(r)]
                if !f.exhausted && r.attempt == 2 && r.due_at >= now),
            "{first:?}"
        );
        state = apply(&state, &first, now);
        // The retry is due at once or soon; a second attempt, which fails too.
        let later = now + chrono::Duration::seconds(60);
        state = apply(&state, &next_events(&def, &state, later, WORKER), later);
        assert_eq!(state.step(&step).attempts, 2);
        let second = failure_events(task, &state, &step, &error, false, later);
        assert!(
            matches!(&second[..], [FlowEvent::StepFailed(f)] if f.exhausted),
            "{second:?}"
        );
        // A fatal error is exhausted at once.
        let fatal = failure_events(task, &state, &step, &TaskError::fatal("no"), false, later);
        assert!(matches!(&fatal[..], [FlowEvent::StepFailed(f)] if f.exhausted));
        state = apply(&state, &second, later);
        let incidents = incidents(&state);
        assert_eq!(incidents.len(), 1);
        assert_eq!(
            (incidents[0].kind, incidents[0].occurrences),
            ("exhausted", 2)
        );
    }

    #[test]
    fn an_expired_lease_times_the_attempt_out() {
        let (def, now) = (serial(), Utc::now());
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        let late = now + chrono::Duration::hours(1);
        let events = next_events(&def, &state, late, WORKER);
        assert!(
            matches!(events.first(), Some(FlowEvent::StepTimedOut(f)) if f.code.as_deref() == Some("timeout")),
            "{events:?}"
        );
    }
    fn acknowledged(step: &StepId, kind: &str, error: &str) -> FlowEvent {
        FlowEvent::IncidentAcknowledged(crate::flow::model::events::IncidentAcknowledged {
            step: step.clone(),
            actor: "ada".into(),
            note: "on it".into(),
            kind: kind.into(),
            error: error.into(),
        })
    }

    #[test]
    fn an_acknowledgement_lasts_while_the_incident_is_the_same() {
        let (def, now) = (serial(), Utc::now());
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        let step = StepId::new("reserve", Phase::Action);
        let task = def.task("reserve").unwrap();
        let fatal = TaskError::fatal("no stock");
        state = apply(
            &state,
            &failure_events(task, &state, &step, &fatal, false, now),
            now,
        );
        state = apply(&state, &[acknowledged(&step, "exhausted", "no stock")], now);
        let ack = state.step(&step).acknowledged.expect("acknowledged");
        assert_eq!((ack.actor.as_str(), ack.note.as_str()), ("ada", "on it"));
        assert_eq!(incidents(&state)[0].acknowledged.as_ref(), Some(&ack));
        // The same failure again keeps it; another error clears it.
        state = apply(
            &state,
            &failure_events(task, &state, &step, &fatal, false, now),
            now,
        );
        assert!(state.step(&step).acknowledged.is_some());
        let other = TaskError::fatal("warehouse on fire");
        state = apply(
            &state,
            &failure_events(task, &state, &step, &other, false, now),
            now,
        );
        assert_eq!(state.step(&step).acknowledged, None);
        assert_eq!(incidents(&state)[0].acknowledged, None);
        // Success clears it too.
        state = apply(
            &state,
            &[acknowledged(&step, "exhausted", "warehouse on fire")],
            now,
        );
        assert!(state.step(&step).acknowledged.is_some());
        state = apply(
            &state,
            &[FlowEvent::StepSucceeded(StepSucceeded {
                step: step.clone(),
                attempt: 2,
                output: json!({}),
                signal_id: None,
            })],
            now,
        );
        assert_eq!(state.step(&step).acknowledged, None);
        assert!(incidents(&state).is_empty());
    }

    fn succeeded(task: &str, attempt: u32, output: serde_json::Value) -> FlowEvent {
        FlowEvent::StepSucceeded(StepSucceeded {
            step: StepId::new(task, Phase::Action),
            attempt,
            output,
            signal_id: None,
        })
    }

    /// score, then `auto` when the score is high or `manual` otherwise, then `join`.
    fn branching() -> FlowDefinition {
        FlowDefinition::builder("loan")
            .task(TaskDefinition::new("score", Action::rust("score")))
            .task(
                TaskDefinition::new("auto", Action::rust("auto"))
                    .after(["score"])
                    .when("tasks.score.output.value >= 700"),
            )
            .task(
                TaskDefinition::new("manual", Action::rust("manual"))
                    .after(["score"])
                    .when("tasks.score.output.value < 700"),
            )
            .task(TaskDefinition::new("join", Action::rust("join")).after(["auto", "manual"]))
            .build()
    }

    #[test]
    fn a_false_condition_skips_the_task_and_its_join_still_runs() {
        let (def, now) = (branching(), Utc::now());
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        state = apply(&state, &[succeeded("score", 1, json!({"value": 720}))], now);
        let events = next_events(&def, &state, now, WORKER);
        let skipped: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                FlowEvent::TaskSkipped(s) => Some(s.task.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(skipped, ["manual"], "{events:?}");
        let started_now: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                FlowEvent::StepStarted(s) => Some(s.step.task.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(started_now, ["auto"], "{events:?}");
        state = apply(&state, &events, now);
        assert_eq!(
            state
                .step(&StepId::new("manual", Phase::Action))
                .skip_reason
                .as_deref(),
            Some("condition false: tasks.score.output.value < 700")
        );
        assert!(
            !state.outputs.contains_key("manual"),
            "a skipped task has no output"
        );
        state = apply(&state, &[succeeded("auto", 1, json!({}))], now);
        let events = next_events(&def, &state, now, WORKER);
        assert!(
            matches!(&events[..], [FlowEvent::StepStarted(s)] if s.step.task == "join"),
            "{events:?}"
        );
    }

    #[test]
    fn a_condition_that_cannot_be_evaluated_fails_the_task() {
        let (def, now) = (branching(), Utc::now());
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        // No `value` in the output: the conditions cannot be evaluated.
        state = apply(&state, &[succeeded("score", 1, json!({}))], now);
        let events = next_events(&def, &state, now, WORKER);
        assert!(
            events.iter().any(|e| matches!(e, FlowEvent::StepFailed(f)
                if f.exhausted && f.code.as_deref() == Some("condition"))),
            "{events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, FlowEvent::Compensating(_))),
            "{events:?}"
        );
    }

    #[test]
    fn a_required_task_skipped_skips_its_dependant() {
        let def = FlowDefinition::builder("r")
            .task(TaskDefinition::new("a", Action::rust("a")).when("false"))
            .task(
                TaskDefinition::new("b", Action::rust("b"))
                    .after(["a"])
                    .requires(["a"]),
            )
            .task(TaskDefinition::new("c", Action::rust("c")).after(["b"]))
            .build();
        let now = Utc::now();
        let state = started(&def, now);
        let events = next_events(&def, &state, now, WORKER);
        let state = apply(&state, &events, now);
        assert_eq!(
            state.step(&StepId::new("b", Phase::Action)).status,
            StepStatus::Skipped
        );
        // c only depends on b: it runs.
        assert!(
            events
                .iter()
                .any(|e| matches!(e, FlowEvent::StepStarted(s) if s.step.task == "c")),
            "{events:?}"
        );
    }

    #[test]
    fn a_wait_is_due_at_its_time_and_then_succeeds() {
        let def = FlowDefinition::builder("w")
            .task(TaskDefinition::wait("pause", Duration::from_secs(60)))
            .task(TaskDefinition::new("after", Action::rust("a")).after(["pause"]))
            .build();
        let now = Utc::now();
        let mut state = started(&def, now);
        let events = next_events(&def, &state, now, WORKER);
        assert!(
            matches!(&events[..], [FlowEvent::StepWaiting(w)] if w.until == Some((now + chrono::Duration::seconds(60)).trunc_subsecs(6))),
            "{events:?}"
        );
        state = apply(&state, &events, now);
        let p = plan(&def, &state, now + chrono::Duration::seconds(30));
        assert!(p.is_idle());
        assert_eq!(
            p.next_due,
            Some((now + chrono::Duration::seconds(60)).trunc_subsecs(6))
        );
        let later = now + chrono::Duration::seconds(61);
        let events = next_events(&def, &state, later, WORKER);
        assert!(
            matches!(&events[0], FlowEvent::StepSucceeded(s) if s.step.task == "pause"),
            "{events:?}"
        );
        assert!(
            matches!(&events[1], FlowEvent::StepStarted(s) if s.step.task == "after"),
            "{events:?}"
        );
    }

    fn signal(name: &str, id: &str, payload: serde_json::Value) -> FlowEvent {
        FlowEvent::SignalReceived(crate::flow::model::events::SignalReceived {
            name: name.into(),
            signal_id: id.into(),
            payload,
            actor: None,
            reason: None,
        })
    }

    #[test]
    fn a_signal_sent_early_is_consumed_once_when_its_task_is_reached() {
        let def = FlowDefinition::builder("s")
            .task(TaskDefinition::new("first", Action::rust("a")))
            .task(TaskDefinition::signal("approve", "approved").after(["first"]))
            .task(TaskDefinition::signal("again", "approved").after(["approve"]))
            .build();
        let now = Utc::now();
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        state = apply(
            &state,
            &[signal("approved", "s-1", json!({"by": "ada"}))],
            now,
        );
        // Sent twice: kept once.
        state = apply(
            &state,
            &[signal("approved", "s-1", json!({"by": "ada"}))],
            now,
        );
        assert_eq!(state.signals.len(), 1);
        state = apply(&state, &[succeeded("first", 1, json!({}))], now);
        let events = next_events(&def, &state, now, WORKER);
        state = apply(&state, &events, now);
        assert_eq!(state.outputs["approve"], json!({"by": "ada"}));
        assert_eq!(state.signals[0].consumed_by.as_deref(), Some("approve"));
        // The second signal task waits for a signal of its own.
        assert_eq!(
            state.step(&StepId::new("again", Phase::Action)).status,
            StepStatus::Waiting
        );
        assert!(plan(&def, &state, now).is_idle());
        state = apply(&state, &[signal("approved", "s-2", json!(2))], now);
        let events = next_events(&def, &state, now, WORKER);
        state = apply(&state, &events, now);
        assert_eq!(state.outputs["again"], json!(2));
        assert!(
            matches!(events.last(), Some(FlowEvent::Completed(_))),
            "{events:?}"
        );
    }

    #[test]
    fn a_signal_that_does_not_come_in_time_fails_its_task() {
        let def = FlowDefinition::builder("s")
            .task(
                TaskDefinition::signal("approve", "approved")
                    .signal_timeout(Duration::from_secs(10))
                    .on_exhausted(crate::flow::OnExhausted::Fail),
            )
            .build();
        let now = Utc::now();
        let mut state = started(&def, now);
        state = apply(&state, &next_events(&def, &state, now, WORKER), now);
        let late = now + chrono::Duration::seconds(11);
        let events = next_events(&def, &state, late, WORKER);
        assert!(
            matches!(&events[..], [FlowEvent::StepFailed(f), FlowEvent::Failed(_)]
                if f.code.as_deref() == Some("signal_timeout")),
            "{events:?}"
        );
        state = apply(&state, &events, late);
        assert_eq!(state.status, InstanceStatus::Failed);
    }

    #[test]
    fn a_step_records_its_queue_wait_run_time_and_backoff() {
        let (def, t0) = (serial(), Utc::now());
        let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
        let mut state = started(&def, t0);
        let step = StepId::new("reserve", Phase::Action);
        // Started 40 ms after the instance, failed after 100 ms of running.
        state = apply(&state, &next_events(&def, &state, at(40), WORKER), at(40));
        let task = def.task("reserve").unwrap();
        let failed = failure_events(
            task,
            &state,
            &step,
            &TaskError::retryable("503"),
            false,
            at(140),
        );
        let FlowEvent::RetryScheduled(r) = &failed[1] else {
            panic!("{failed:?}")
        };
        let backoff = (r.due_at - at(140)).num_milliseconds() as u64;
        state = apply(&state, &failed, at(140));
        // The retry starts 30 ms after its due time and runs 50 ms.
        let later = |ms: i64| r.due_at + chrono::Duration::milliseconds(ms);
        state = apply(
            &state,
            &next_events(&def, &state, later(30), WORKER),
            later(30),
        );
        state = apply(&state, &[succeeded("reserve", 2, json!({}))], later(80));
        let t = state.step(&step).timings;
        assert_eq!(
            (t.queued_ms, t.running_ms, t.backoff_ms, t.waiting_ms),
            (70, 150, backoff, 0),
            "{t:?}"
        );
    }

    #[test]
    fn a_fan_out_keeps_max_parallel_items_running_and_collects_outputs_in_order() {
        let def = FlowDefinition::builder("fan")
            .task(
                TaskDefinition::new("each", Action::rust("each"))
                    .for_each("{{flow.input.items}}", 2),
            )
            .build();
        let now = Utc::now();
        let mut state = started(&def, now);
        state.input = json!({"items": ["a", "b", "c", "d", "e"]});
        let starts = |events: &[FlowEvent]| -> Vec<(String, Option<u32>)> {
            events
                .iter()
                .filter_map(|e| match e {
                    FlowEvent::StepStarted(s) => Some((s.step.key(), s.items)),
                    _ => None,
                })
                .collect()
        };
        let first = next_events(&def, &state, now, WORKER);
        assert_eq!(
            starts(&first),
            [
                ("each[0]/action".to_owned(), Some(5)),
                ("each[1]/action".to_owned(), Some(5))
            ],
            "{first:?}"
        );
        state = apply(&state, &first, now);
        let done = |i: u32| {
            FlowEvent::StepSucceeded(StepSucceeded {
                step: StepId::item("each", i, Phase::Action),
                attempt: 1,
                output: json!(i * 10),
                signal_id: None,
            })
        };
        // Item 1 finishes before item 0: one slot is free, item 2 starts.
        state = apply(&state, &[done(1)], now);
        let next = next_events(&def, &state, now, WORKER);
        assert_eq!(
            starts(&next),
            [("each[2]/action".to_owned(), None)],
            "{next:?}"
        );
        state = apply(&state, &next, now);
        for i in [0, 2] {
            state = apply(&state, &[done(i)], now);
        }
        let next = next_events(&def, &state, now, WORKER);
        assert_eq!(
            starts(&next),
            [
                ("each[3]/action".to_owned(), None),
                ("each[4]/action".to_owned(), None)
            ]
        );
        state = apply(&state, &next, now);
        for i in [4, 3] {
            state = apply(&state, &[done(i)], now);
        }
        // Every item done: the task's own step succeeds with the outputs in item
        // order, and the item outputs are not outputs of their own.
        let last = next_events(&def, &state, now, WORKER);
        assert!(
            matches!(&last[0], FlowEvent::StepSucceeded(s)
                if s.step == StepId::new("each", Phase::Action) && s.output == json!([0, 10, 20, 30, 40])),
            "{last:?}"
        );
        state = apply(&state, &last, now);
        assert_eq!(state.outputs.len(), 1);
        assert_eq!(state.outputs["each"], json!([0, 10, 20, 30, 40]));
        // The same round completes the instance.
        assert!(matches!(&last[1..], [FlowEvent::Completed(_)]), "{last:?}");
        assert!(next_events(&def, &state, now, WORKER).is_empty());
    }
}
