//! Deciding what an instance needs next, from its definition and state alone
//! (pure: the worker applies the plan as conditional appends).

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Value, json};

use super::condition;
use super::definition::{
    FlowDefinition, ForEach, MAX_FOR_EACH_ITEMS, OnExhausted, TaskDefinition, TaskKind,
};
use super::events::{AwaitedEvent, Phase, StepId, types};
use super::state::{InstanceState, InstanceStatus, StepState, StepStatus};
use super::template;

/// What to do now.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan {
    /// Steps whose attempt should start now.
    pub start: Vec<StepId>,
    /// Running steps whose lease expired (their worker is gone or late).
    pub timeouts: Vec<StepId>,
    /// One instance-level transition: (event type, reason).
    pub instance: Option<(&'static str, String)>,
    /// When to look again (retries, leases, deadlines); `None`: only on events.
    pub next_due: Option<DateTime<Utc>>,
    /// Tasks to skip without running: (task, reason, the false condition).
    pub skip: Vec<(String, String, Option<String>)>,
    /// Wait, signal and await_event steps reached.
    pub wait: Vec<Waiting>,
    /// Waiting steps whose time came or whose signal is there: (step, output,
    /// the signal consumed).
    pub finish: Vec<(StepId, Value, Option<String>)>,
    /// Steps that fail without an attempt (a condition that cannot be
    /// evaluated, a signal that did not come in time): (step, error, code).
    pub fail: Vec<(StepId, String, &'static str)>,
    /// The item counts of the `for_each` tasks whose first items start now
    /// (their items template rendered), by task.
    pub items: Vec<(String, u32)>,
}

impl Plan {
    fn due(&mut self, at: Option<DateTime<Utc>>) {
        if let Some(at) = at {
            self.next_due = Some(self.next_due.map_or(at, |d| d.min(at)));
        }
    }

    /// Nothing to do right now.
    pub fn is_idle(&self) -> bool {
        self.start.is_empty()
            && self.timeouts.is_empty()
            && self.instance.is_none()
            && self.skip.is_empty()
            && self.wait.is_empty()
            && self.finish.is_empty()
            && self.fail.is_empty()
    }

    /// A compensation (or cancel) failed for good: the instance needs an
    /// operator, and no step moves.
    fn compensation_failed(&mut self, reason: String) {
        self.instance = Some((types::COMPENSATION_FAILED, reason));
        self.clear_steps();
    }

    /// Drops the step-level decisions (an instance-level change comes first).
    fn clear_steps(&mut self) {
        self.start.clear();
        self.skip.clear();
        self.wait.clear();
        self.finish.clear();
        self.fail.clear();
    }
}

/// A wait, signal or await_event step being reached.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Waiting {
    /// The step.
    pub step: StepId,
    /// A timer's due time, or a signal's or an event's timeout.
    pub until: Option<DateTime<Utc>>,
    /// The signal waited for.
    pub signal: Option<String>,
    /// The event waited for.
    pub event: Option<AwaitedEvent>,
}

/// Where a task is, derived from its steps.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TaskOutcome {
    NotStarted,
    InProgress,
    /// Succeeded, or skipped by an operator.
    Done,
    /// Failed for good (for TCC: cancelled after a failed try).
    Failed(String),
}

fn done(s: &StepState) -> bool {
    matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped)
}

/// TCC progress of a task.
struct TccView {
    tries: Vec<StepState>,
    confirms: Vec<StepState>,
    cancels: Vec<StepState>,
    /// Cancels are needed: a try failed, the try deadline passed, or the instance
    /// is compensating before every try succeeded.
    cancelling: bool,
    try_deadline: Option<DateTime<Utc>>,
}

fn tcc_view(task: &TaskDefinition, s: &InstanceState, now: DateTime<Utc>) -> Option<TccView> {
    let tcc = task.tcc.as_ref()?;
    let step = |p: &str, phase| s.step(&StepId::participant(&task.name, p, phase));
    let tries: Vec<_> = tcc
        .participants
        .iter()
        .map(|p| step(&p.name, Phase::Try))
        .collect();
    let confirms: Vec<_> = tcc
        .participants
        .iter()
        .map(|p| step(&p.name, Phase::Confirm))
        .collect();
    let cancels: Vec<_> = tcc
        .participants
        .iter()
        .map(|p| step(&p.name, Phase::Cancel))
        .collect();
    let all_tried = tries.iter().all(done);
    let first_try = tries.iter().filter_map(|t| t.first_started).min();
    let try_deadline = match (tcc.try_deadline_ms, first_try) {
        (Some(ms), Some(at)) => Some(at + chrono::Duration::milliseconds(ms as i64)),
        _ => None,
    };
    let confirming = all_tried || confirms.iter().any(|c| c.attempts > 0);
    let cancelling = cancels.iter().any(|c| c.attempts > 0)
        || (!confirming
            && (tries.iter().any(|t| t.status == StepStatus::Failed)
                || try_deadline.is_some_and(|d| now >= d)
                || (s.status == InstanceStatus::Compensating && first_try.is_some())));
    Some(TccView {
        tries,
        confirms,
        cancels,
        cancelling,
        try_deadline,
    })
}

/// Where `task` is.
pub(crate) fn task_outcome(
    task: &TaskDefinition,
    s: &InstanceState,
    now: DateTime<Utc>,
) -> TaskOutcome {
    let action = s.step(&StepId::new(&task.name, Phase::Action));
    if action.status == StepStatus::Skipped {
        return TaskOutcome::Done;
    }
    if task.for_each.is_some() && action.status != StepStatus::Failed {
        if action.status == StepStatus::Succeeded {
            return TaskOutcome::Done;
        }
        let Some(f) = s.fan_out.get(&task.name) else {
            return TaskOutcome::NotStarted;
        };
        // A failed item is still active (it never succeeded).
        for &i in &f.active {
            let item = s.step(&StepId::item(&task.name, i, Phase::Action));
            if item.status == StepStatus::Failed {
                return TaskOutcome::Failed(format!(
                    "item {i}: {}",
                    item.error.unwrap_or_default()
                ));
            }
        }
        return TaskOutcome::InProgress;
    }
    let Some(v) = tcc_view(task, s, now) else {
        return match action.status {
            StepStatus::Succeeded => TaskOutcome::Done,
            StepStatus::Failed => TaskOutcome::Failed(action.error.unwrap_or_default()),
            StepStatus::Pending => TaskOutcome::NotStarted,
            _ => TaskOutcome::InProgress,
        };
    };
    if v.cancelling {
        let needed = v
            .tries
            .iter()
            .zip(&v.cancels)
            .filter(|(t, _)| t.attempts > 0);
        let mut all = true;
        for (_, c) in needed {
            all &= done(c);
        }
        if all {
            let why = v
                .tries
                .iter()
                .find_map(|t| t.error.clone())
                .unwrap_or_else(|| "try deadline passed".into());
            return TaskOutcome::Failed(format!("cancelled: {why}"));
        }
        return TaskOutcome::InProgress;
    }
    if v.confirms.iter().all(done) {
        return TaskOutcome::Done;
    }
    if v.tries.iter().all(|t| t.attempts == 0) {
        TaskOutcome::NotStarted
    } else {
        TaskOutcome::InProgress
    }
}

/// Whether a step should start now; otherwise notes when it is due.
fn consider(step: &StepState, plan: &mut Plan, now: DateTime<Utc>) {
    match step.status {
        StepStatus::Pending => plan.start.push(step.step.clone()),
        StepStatus::RetryDue => match step.due_at {
            Some(at) if at > now => plan.due(Some(at)),
            _ => plan.start.push(step.step.clone()),
        },
        StepStatus::Running => plan.due(step.lease_until),
        _ => {}
    }
}

/// The plan for `s` at `now`.
pub(crate) fn plan(def: &FlowDefinition, s: &InstanceState, now: DateTime<Utc>) -> Plan {
    let mut plan = Plan::default();
    for step in s.steps.values() {
        if step.status == StepStatus::Running {
            match step.lease_until {
                Some(at) if at <= now => plan.timeouts.push(step.step.clone()),
                at => plan.due(at),
            }
        }
    }
    match s.status {
        InstanceStatus::Running => forward(def, s, now, &mut plan),
        InstanceStatus::Compensating => compensate(def, s, now, &mut plan),
        _ => {}
    }
    plan
}

fn forward(def: &FlowDefinition, s: &InstanceState, now: DateTime<Utc>, plan: &mut Plan) {
    if let Some(deadline) = s.deadline_at {
        if now >= deadline {
            plan.instance = Some((types::COMPENSATING, "flow deadline passed".into()));
            return;
        }
        plan.due(Some(deadline));
    }
    let outcomes: Vec<_> = def.tasks.iter().map(|t| task_outcome(t, s, now)).collect();
    let outcome_of = |name: &str| {
        def.tasks
            .iter()
            .position(|t| t.name == name)
            .map(|i| &outcomes[i])
    };
    for (task, outcome) in def.tasks.iter().zip(&outcomes) {
        if let TaskOutcome::Failed(error) = outcome {
            let reason = format!("task {:?} failed: {error}", task.name);
            plan.instance = Some(match task.on_exhausted {
                OnExhausted::Compensate => (types::COMPENSATING, reason),
                OnExhausted::Pause => (types::PAUSED, reason),
                OnExhausted::Fail => (types::FAILED, reason),
            });
            plan.clear_steps();
            return;
        }
        let ready = task
            .depends_on
            .iter()
            .all(|d| outcome_of(d) == Some(&TaskOutcome::Done));
        if !ready || *outcome == TaskOutcome::Done {
            continue;
        }
        let action = s.step(&StepId::new(&task.name, Phase::Action));
        let items_started = s.fan_out.contains_key(&task.name);
        if !items_started
            && unreached(task, &action, outcome, now)
            && !admitted(def, task, &action, s, plan)
        {
            continue;
        }
        if let Some(each) = &task.for_each {
            fan_out(task, each, &action, s, now, plan);
            continue;
        }
        match task.kind() {
            TaskKind::Wait | TaskKind::Signal | TaskKind::AwaitEvent => {
                waiting(task, &action, s, now, plan);
                continue;
            }
            TaskKind::Action | TaskKind::Tcc | TaskKind::SubFlow => {}
        }
        match tcc_view(task, s, now) {
            None => consider(&s.step(&StepId::new(&task.name, Phase::Action)), plan, now),
            Some(v) if v.cancelling => {
                for (t, c) in v.tries.iter().zip(&v.cancels) {
                    if t.attempts > 0 {
                        if c.status == StepStatus::Failed {
                            plan.compensation_failed(format!(
                                "cancel {} failed: {}",
                                c.step,
                                c.error.clone().unwrap_or_default()
                            ));
                            return;
                        }
                        consider(c, plan, now);
                    }
                }
            }
            Some(v) if v.tries.iter().all(done) => {
                for c in &v.confirms {
                    if c.status == StepStatus::Failed {
                        plan.instance = Some((
                            types::PAUSED,
                            format!(
                                "confirm {} failed: {}",
                                c.step,
                                c.error.clone().unwrap_or_default()
                            ),
                        ));
                        plan.clear_steps();
                        return;
                    }
                    consider(c, plan, now);
                }
            }
            Some(v) => {
                for t in &v.tries {
                    consider(t, plan, now);
                }
                plan.due(v.try_deadline);
            }
        }
    }
    if outcomes.iter().all(|o| *o == TaskOutcome::Done) {
        plan.instance = Some((types::COMPLETED, String::new()));
        plan.clear_steps();
    }
}

/// A `for_each` task: its active items (running, or waiting for a retry) as
/// any step, then new items into the free slots, in order; once every item is
/// done, the task's own step succeeds with their outputs in order. Only the
/// active items are looked at.
fn fan_out(
    task: &TaskDefinition,
    each: &ForEach,
    action: &StepState,
    s: &InstanceState,
    now: DateTime<Utc>,
    plan: &mut Plan,
) {
    if action.status == StepStatus::RetryDue && action.due_at.is_some_and(|d| d > now) {
        plan.due(action.due_at);
        return;
    }
    let progress = s.fan_out.get(&task.name);
    let count = match progress.and_then(|f| f.items) {
        Some(n) => n,
        None => match items_of(each, s) {
            Ok(n) => {
                plan.items.push((task.name.clone(), n));
                n
            }
            Err(e) => {
                plan.fail.push((action.step.clone(), e, "for_each"));
                return;
            }
        },
    };
    let (started, active, done) = match progress {
        Some(f) => (f.started, f.active.len() as u32, f.outputs.len() as u32),
        None => (0, 0, 0),
    };
    if active == 0 && done >= count {
        let outputs = progress.map_or(Value::Array(Vec::new()), |f| {
            let mut f = f.clone();
            f.items = Some(count);
            f.ordered_outputs()
        });
        plan.finish.push((action.step.clone(), outputs, None));
        return;
    }
    if let Some(f) = progress {
        for &i in &f.active {
            consider(
                &s.step(&StepId::item(&task.name, i, Phase::Action)),
                plan,
                now,
            );
        }
    }
    let free = each.max_parallel.max(1).saturating_sub(active);
    for i in started..count.min(started.saturating_add(free)) {
        plan.start.push(StepId::item(&task.name, i, Phase::Action));
    }
}

/// How many items a `for_each` task's items template renders to (an array,
/// of at most [`MAX_FOR_EACH_ITEMS`]).
fn items_of(each: &ForEach, s: &InstanceState) -> Result<u32, String> {
    let items = items_value(each, s)?;
    match items {
        Value::Array(a) if a.len() <= MAX_FOR_EACH_ITEMS => Ok(a.len() as u32),
        Value::Array(a) => Err(format!(
            "for_each items {:?} has {} items, more than the {MAX_FOR_EACH_ITEMS} allowed",
            each.items,
            a.len()
        )),
        other => Err(format!(
            "for_each items {:?} is not an array (it is {})",
            each.items,
            match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Object(_) => "an object",
                Value::Array(_) => "an array",
            }
        )),
    }
}

/// A `for_each` task's items, rendered against the instance.
pub(crate) fn items_value(each: &ForEach, s: &InstanceState) -> Result<Value, String> {
    let instance = s.id.to_string();
    template::render(
        &Value::String(each.items.clone()),
        &s.template_context(&instance, &instance),
    )
    .map_err(|e| format!("for_each items {:?}: {e}", each.items))
}

/// Whether `task` has not been reached yet: nothing of it ever started, and it
/// is not waiting for a retry that is not due (a condition that could not be
/// evaluated is evaluated again on "retry now").
fn unreached(
    task: &TaskDefinition,
    action: &StepState,
    outcome: &TaskOutcome,
    now: DateTime<Utc>,
) -> bool {
    let waiting_retry =
        action.status == StepStatus::RetryDue && action.due_at.is_some_and(|d| d > now);
    action.first_started.is_none()
        && matches!(action.status, StepStatus::Pending | StepStatus::RetryDue)
        && !waiting_retry
        && (task.kind() != TaskKind::Tcc || *outcome == TaskOutcome::NotStarted)
}

/// Whether a task being reached runs: its required tasks ran and its
/// condition holds. Otherwise notes a skip (or a failure, for a condition
/// that cannot be evaluated) in `plan`.
fn admitted(
    def: &FlowDefinition,
    task: &TaskDefinition,
    action: &StepState,
    s: &InstanceState,
    plan: &mut Plan,
) -> bool {
    let skipped = |name: &str| {
        s.steps
            .get(&StepId::new(name, Phase::Action).key())
            .is_some_and(|x| x.skip_reason.is_some())
    };
    if let Some(r) = task.requires.iter().find(|r| skipped(r)) {
        plan.skip.push((
            task.name.clone(),
            format!("required task {r:?} was skipped"),
            None,
        ));
        return false;
    }
    let Some(when) = &task.when else {
        return true;
    };
    let instance = s.id.to_string();
    let scope = condition::Scope {
        input: &s.input,
        instance: &instance,
        business_key: s.business_key.as_deref(),
        tasks: def
            .tasks
            .iter()
            .filter_map(|t| {
                let a = s.steps.get(&StepId::new(&t.name, Phase::Action).key());
                match a.map(|a| (a.status, a.skip_reason.is_some())) {
                    Some((StepStatus::Skipped, true)) => {
                        Some((t.name.as_str(), &Value::Null, "skipped"))
                    }
                    _ => s
                        .outputs
                        .get(&t.name)
                        .map(|o| (t.name.as_str(), o, "succeeded")),
                }
            })
            .collect(),
    };
    match condition::evaluate(when, &scope) {
        Ok(true) => true,
        Ok(false) => {
            plan.skip.push((
                task.name.clone(),
                format!("condition false: {when}"),
                Some(when.clone()),
            ));
            false
        }
        Err(e) => {
            plan.fail.push((
                action.step.clone(),
                format!("condition {when:?} could not be evaluated: {e}"),
                "condition",
            ));
            false
        }
    }
}

/// A wait or signal task: reach it, or finish it when its time or its signal
/// came, or fail it when its signal did not come in time.
fn waiting(
    task: &TaskDefinition,
    action: &StepState,
    s: &InstanceState,
    now: DateTime<Utc>,
    plan: &mut Plan,
) {
    let step = action.step.clone();
    match action.status {
        StepStatus::Pending | StepStatus::RetryDue => {
            if let Some(at) = action.due_at.filter(|d| *d > now) {
                plan.due(Some(at));
                return;
            }
            if let Some(wait) = &task.wait {
                let until = match (&wait.duration_ms, &wait.until) {
                    (Some(ms), _) => Ok(now + chrono::Duration::milliseconds(*ms as i64)),
                    (None, Some(t)) => wait_until(t, s),
                    (None, None) => Ok(now),
                };
                // To the microsecond, as PostgreSQL keeps times.
                match until.map(|at| at.trunc_subsecs(6)) {
                    Ok(at) => plan.wait.push(Waiting {
                        step,
                        until: Some(at),
                        signal: None,
                        event: None,
                    }),
                    Err(e) => plan.fail.push((step, e, "template")),
                }
            } else if let Some(signal) = &task.signal {
                plan.wait.push(Waiting {
                    step,
                    until: timeout(signal.timeout_ms, now),
                    signal: Some(signal.name.clone()),
                    event: None,
                });
            } else if let Some(wanted) = &task.await_event {
                let tags: Result<Vec<String>, String> = wanted
                    .tags
                    .iter()
                    .map(|t| render(t, s).map_err(|e| format!("await_event tag {t:?}: {e}")))
                    .collect();
                match tags {
                    Ok(tags) => plan.wait.push(Waiting {
                        step,
                        until: timeout(wanted.timeout_ms, now),
                        signal: None,
                        event: Some(AwaitedEvent {
                            types: wanted.types.clone(),
                            tags,
                        }),
                    }),
                    Err(e) => plan.fail.push((step, e, "template")),
                }
            }
        }
        StepStatus::Waiting => {
            if let Some(wanted) = &task.await_event {
                // The event itself is looked for by the worker (a read of the
                // log); here only its timeout.
                if let Some(at) = action.due_at {
                    if at <= now {
                        plan.fail.push((
                            step,
                            format!(
                                "no event of {:?} tagged {:?} came within {} ms",
                                wanted.types,
                                action
                                    .event
                                    .as_ref()
                                    .map(|e| e.tags.clone())
                                    .unwrap_or_default(),
                                wanted.timeout_ms.unwrap_or_default()
                            ),
                            "event_timeout",
                        ));
                    } else {
                        plan.due(Some(at));
                    }
                }
            } else if let Some(signal) = &task.signal {
                if let Some(sig) = s.pending_signal(&signal.name) {
                    plan.finish
                        .push((step, sig.payload.clone(), Some(sig.signal_id.clone())));
                } else if let Some(at) = action.due_at {
                    if at <= now {
                        plan.fail.push((
                            step,
                            format!(
                                "no signal {:?} came within {} ms",
                                signal.name,
                                signal.timeout_ms.unwrap_or_default()
                            ),
                            "signal_timeout",
                        ));
                    } else {
                        plan.due(Some(at));
                    }
                }
            } else {
                match action.due_at {
                    Some(at) if at > now => plan.due(Some(at)),
                    at => {
                        plan.finish
                            .push((step, json!({ "waited_until": at.unwrap_or(now) }), None))
                    }
                }
            }
        }
        _ => {}
    }
}

/// `now` plus `ms`, to the microsecond (as PostgreSQL keeps times).
fn timeout(ms: Option<u64>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    ms.map(|ms| (now + chrono::Duration::milliseconds(ms as i64)).trunc_subsecs(6))
}

/// A template rendered as text against the instance.
fn render(text: &str, s: &InstanceState) -> Result<String, String> {
    let instance = s.id.to_string();
    template::render_text(text, &s.template_context(&instance, &instance))
}

/// The instant a `wait.until` template renders to.
fn wait_until(text: &str, s: &InstanceState) -> Result<DateTime<Utc>, String> {
    let rendered = render(text, s).map_err(|e| format!("wait until {text:?}: {e}"))?;
    DateTime::parse_from_rfc3339(rendered.trim())
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| format!("wait until {text:?} gave {rendered:?}, not an RFC 3339 instant: {e}"))
}

/// A task whose effects are settled for compensation: never done by its action,
/// or nothing to undo, or undone.
fn settled(task: &TaskDefinition, s: &InstanceState, now: DateTime<Utc>) -> bool {
    if let Some(v) = tcc_view(task, s, now) {
        let running = v
            .tries
            .iter()
            .chain(&v.confirms)
            .chain(&v.cancels)
            .any(|x| matches!(x.status, StepStatus::Running | StepStatus::RetryDue));
        return !running && task_outcome(task, s, now) != TaskOutcome::InProgress;
    }
    if task.for_each.is_some() {
        return items_to_compensate(task, s).is_empty();
    }
    let action = s.step(&StepId::new(&task.name, Phase::Action));
    match action.status {
        StepStatus::Succeeded if task.compensate.is_some() => {
            done(&s.step(&StepId::new(&task.name, Phase::Compensate)))
        }
        // A child still running is aborted (and so compensated) first.
        StepStatus::Waiting if task.flow.is_some() && action.child.is_some() => {
            done(&s.step(&StepId::new(&task.name, Phase::Compensate)))
        }
        StepStatus::Running => false,
        _ => true,
    }
}

/// The compensation steps of a `for_each` task's succeeded items that are
/// not done yet (none without a compensate action).
fn items_to_compensate(task: &TaskDefinition, s: &InstanceState) -> Vec<StepState> {
    let (Some(_), Some(f)) = (&task.compensate, s.fan_out.get(&task.name)) else {
        return Vec::new();
    };
    f.outputs
        .keys()
        .filter(|&&i| {
            s.steps
                .get(&StepId::item(&task.name, i, Phase::Action).key())
                .is_some_and(|a| a.status == StepStatus::Succeeded)
        })
        .map(|&i| s.step(&StepId::item(&task.name, i, Phase::Compensate)))
        .filter(|c| !done(c))
        .collect()
}

fn compensate(def: &FlowDefinition, s: &InstanceState, now: DateTime<Utc>, plan: &mut Plan) {
    // Attempts still running finish (or time out) first: their effects count.
    let forward_running = s.steps.values().any(|x| {
        x.status == StepStatus::Running && matches!(x.step.phase, Phase::Action | Phase::Try)
    });
    if forward_running {
        return;
    }
    for task in &def.tasks {
        if let Some(v) = tcc_view(task, s, now) {
            // Tries that may have reserved something are cancelled; confirms
            // already under way are finished (a confirmed reservation stays).
            let targets: Vec<&StepState> = if v.cancelling {
                v.tries
                    .iter()
                    .zip(&v.cancels)
                    .filter(|(t, _)| t.attempts > 0)
                    .map(|(_, c)| c)
                    .collect()
            } else if v.confirms.iter().any(|c| c.attempts > 0) {
                v.confirms.iter().collect()
            } else {
                Vec::new()
            };
            for c in targets {
                if c.status == StepStatus::Failed {
                    plan.compensation_failed(format!(
                        "{} failed: {}",
                        c.step,
                        c.error.clone().unwrap_or_default()
                    ));
                    return;
                }
                consider(c, plan, now);
            }
            continue;
        }
        if let Some(each) = &task.for_each {
            let pending = items_to_compensate(task, s);
            if pending.is_empty() {
                continue;
            }
            let dependents_settled = def
                .tasks
                .iter()
                .filter(|t| t.depends_on.contains(&task.name))
                .all(|t| settled(t, s, now));
            if !dependents_settled {
                continue;
            }
            // Each succeeded item's compensation, at most max_parallel at once.
            let mut free = each.max_parallel.max(1) as usize;
            free = free.saturating_sub(
                pending
                    .iter()
                    .filter(|c| c.status == StepStatus::Running)
                    .count(),
            );
            for c in &pending {
                if c.status == StepStatus::Failed {
                    plan.compensation_failed(format!(
                        "compensation of {} failed: {}",
                        c.step,
                        c.error.clone().unwrap_or_default()
                    ));
                    return;
                }
                if c.status == StepStatus::Running {
                    consider(c, plan, now);
                } else if free > 0 {
                    let before = plan.start.len();
                    consider(c, plan, now);
                    free -= plan.start.len() - before;
                }
            }
            continue;
        }
        let action = s.step(&StepId::new(&task.name, Phase::Action));
        if task.flow.is_some() && action.status == StepStatus::Waiting && action.child.is_some() {
            // Abort the running child: its compensate step.
            let abort = s.step(&StepId::new(&task.name, Phase::Compensate));
            if abort.status == StepStatus::Failed {
                plan.compensation_failed(format!(
                    "aborting the child of {:?} failed: {}",
                    task.name,
                    abort.error.clone().unwrap_or_default()
                ));
                return;
            }
            if !done(&abort) {
                consider(&abort, plan, now);
            }
            continue;
        }
        if action.status != StepStatus::Succeeded || task.compensate.is_none() {
            continue;
        }
        let comp = s.step(&StepId::new(&task.name, Phase::Compensate));
        if done(&comp) {
            continue;
        }
        // Reverse dependency order: everything that depends on this task first.
        let dependents_settled = def
            .tasks
            .iter()
            .filter(|t| t.depends_on.contains(&task.name))
            .all(|t| settled(t, s, now));
        if !dependents_settled {
            continue;
        }
        if comp.status == StepStatus::Failed {
            plan.compensation_failed(format!(
                "compensation of {:?} failed: {}",
                task.name,
                comp.error.clone().unwrap_or_default()
            ));
            return;
        }
        consider(&comp, plan, now);
    }
    if plan.start.is_empty() && def.tasks.iter().all(|t| settled(t, s, now)) {
        plan.instance = Some((types::COMPENSATED, s.reason.clone().unwrap_or_default()));
    }
}
