//! Validation of flow definitions: every problem of a definition is collected, one
//! human-readable line each, before it is registered.
//!
//! What is checked:
//! - names: the flow's, the tasks' (unique) and the TCC participants' (unique
//!   within their task) hold only letters, digits, `_`, `.` and `-`;
//! - dependencies: no unknown task, no task depending on itself, no duplicate
//!   entry, no cycle, and no task joining on a task that can never complete;
//! - each task has exactly one of `action`, `tcc`, `wait` and `signal` (and a `tcc` task no
//!   `compensate`), and every action is well formed (HTTP method and URL, SQL
//!   statements, NATS subject, registered Rust function);
//! - retry policies are sensible and cannot outlive the flow deadline;
//! - a condition (`when`) parses as CEL, names only declared flow inputs and
//!   tasks the task depends on, and is a well-typed `bool`
//!   ([`condition`](super::condition)); `requires` names dependencies only;
//! - a `wait` has exactly one of `duration_ms` and `until`, a `signal` a valid
//!   name; neither has a `compensate`;
//! - templates refer only to declared flow inputs, to the outputs of tasks the
//!   task (transitively) depends on, and to the task's own inputs;
//! - an HTTP body taken whole from a flow input is declared as an object or array.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde_json::Value;

mod graph;

use graph::{shortest_cycle, strongly_connected};

use super::condition;
use super::definition::{Action, FlowDefinition, SqlStatement, TaskDefinition, ValueType};
use super::template::{self, Reference};
use crate::flow::DefinitionError;

/// Most tasks in one flow (validation's dependency closure grows with the
/// square of a chain's length; this keeps it to well under a second).
pub const MAX_TASKS: usize = 500;

/// The HTTP methods an `http` action may use.
const HTTP_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// The retry after which [`TaskRetry::ceiling`](super::TaskRetry::ceiling) stops
/// growing (its exponent is capped at 64).
const LAST_GROWING_RETRY: u32 = 65;

/// Checks `flow`, listing every problem. `functions` are the names of the Rust
/// functions registered with the engine (`rust` actions must name one of them).
///
/// # Errors
/// [`DefinitionError`] listing every problem found, one line each, naming the
/// task concerned (for instance `task "ship": depends on unknown task "shipp"`).
pub fn validate(flow: &FlowDefinition, functions: &[&str]) -> Result<(), DefinitionError> {
    validate_for(flow, functions, ALL_EXECUTORS)
}

/// Every executor kind a definition may name.
pub const ALL_EXECUTORS: &[&str] = &["http", "sql", "nats", "amqp", "grpc", "rust"];

/// Like [`validate`], for an engine that runs only the executors in `executors`
/// (`http`, `sql`, `nats`, `rust`): an action of another kind is a problem (a
/// build without the `http` feature cannot run HTTP tasks).
///
/// # Errors
/// As [`validate`].
pub fn validate_for(
    flow: &FlowDefinition,
    functions: &[&str],
    executors: &[&str],
) -> Result<(), DefinitionError> {
    // Bounded before the expensive work (dependency closure, templates).
    if flow.tasks.len() > MAX_TASKS {
        return Err(DefinitionError {
            flow: flow.name.clone(),
            problems: vec![format!(
                "the flow has {} tasks, the limit is {MAX_TASKS}",
                flow.tasks.len()
            )],
        });
    }
    let mut checker = Checker {
        flow,
        functions,
        executors,
        problems: Vec::new(),
    };
    checker.check();
    if checker.problems.is_empty() {
        Ok(())
    } else {
        Err(DefinitionError {
            flow: flow.name.clone(),
            problems: checker.problems,
        })
    }
}

/// Whether `name` is a valid flow, task or participant name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether `name` can be referred to from a template as `input.<name>` or
/// `flow.input.<name>`.
fn valid_field(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '{' | '}'))
}

/// Whether `name` is a valid HTTP header name (an RFC 9110 token).
fn valid_header(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    '!' | '#'
                        | '$'
                        | '%'
                        | '&'
                        | '\''
                        | '*'
                        | '+'
                        | '-'
                        | '.'
                        | '^'
                        | '_'
                        | '`'
                        | '|'
                        | '~'
                )
        })
}

/// Whether `url` is acceptable: `http://` or `https://` followed by something,
/// or starting with a template (which then supplies the scheme).
/// Whether `method` reads as `package.Service/Method`.
fn valid_grpc_method(method: &str) -> bool {
    let ident = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    };
    match method.split_once('/') {
        Some((service, name)) => ident(name) && service.split('.').all(ident),
        None => false,
    }
}

/// Whether `key` may be an ASCII metadata key that a task sets (the reserved
/// `grpc-` keys and binary `-bin` keys are not).
fn valid_grpc_metadata(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
        && !key.starts_with("grpc-")
        && !key.ends_with("-bin")
}

/// Whether `v` is a string that is one whole template.
fn is_template(v: &Value) -> bool {
    matches!(v, Value::String(s) if whole_template(s.trim()).is_some())
}

fn valid_url(url: &str) -> bool {
    let url = url.trim();
    if url.starts_with("{{") {
        return true;
    }
    ["http://", "https://"].iter().any(|scheme| {
        url.len() > scheme.len()
            && url.is_char_boundary(scheme.len())
            && url[..scheme.len()].eq_ignore_ascii_case(scheme)
    })
}

/// The path of `s` if it is exactly one template (`{{ path }}`), as
/// [`template::render`] sees it: such a value keeps the referenced value's type.
fn whole_template(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") {
        return None;
    }
    Some(inner.trim())
}

/// The lower-case name of a value type, as written in definitions.
fn type_name(ty: ValueType) -> &'static str {
    match ty {
        ValueType::String => "string",
        ValueType::Number => "number",
        ValueType::Integer => "integer",
        ValueType::Boolean => "boolean",
        ValueType::Object => "object",
        ValueType::Array => "array",
        ValueType::Any => "any",
    }
}

/// The Levenshtein distance between `a` and `b` (in characters).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// ` (did you mean "x"?)` for the candidate closest to `name`, if one is close.
fn suggestion<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let limit = (name.chars().count() / 3).clamp(1, 3);
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

/// The worst-case time, in milliseconds, of a task's attempts and the delays
/// between them (each attempt takes its whole timeout, each delay its ceiling).
fn worst_case_ms(task: &TaskDefinition) -> u128 {
    let retry = &task.retry;
    let mut total = u128::from(retry.max_attempts) * u128::from(task.timeout_ms);
    let retries = retry.max_attempts.saturating_sub(1);
    let growing = retries.min(LAST_GROWING_RETRY);
    for r in 1..=growing {
        total += retry.ceiling(r).as_millis();
    }
    if retries > growing {
        total += u128::from(retries - growing) * retry.ceiling(LAST_GROWING_RETRY).as_millis();
    }
    total
}

/// Where a template sits, for messages and for the rules that apply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A value of the task's `input` map (which cannot refer to `input.*`).
    TaskInput,
    /// Inside an action (which may refer to the task's `input` keys).
    Action,
}

struct Checker<'a> {
    flow: &'a FlowDefinition,
    functions: &'a [&'a str],
    executors: &'a [&'a str],
    problems: Vec<String>,
}

impl<'a> Checker<'a> {
    fn report(&mut self, problem: String) {
        if !self.problems.contains(&problem) {
            self.problems.push(problem);
        }
    }

    fn check(&mut self) {
        let flow = self.flow;
        if flow.name.is_empty() {
            self.report("the flow's name is empty".into());
        } else if !valid_name(&flow.name) {
            self.report(format!(
                "flow name {:?} may only contain letters, digits, '_', '.' and '-'",
                flow.name
            ));
        }
        if flow.tasks.is_empty() {
            self.report("the flow has no tasks".into());
        }
        if flow.deadline_ms == Some(0) {
            self.report("the flow deadline must be more than 0 ms".into());
        }
        for (field, spec) in &flow.input {
            if !valid_field(field) {
                self.report(format!(
                    "flow input name {field:?} must be non-empty and contain no '.', '{{', '}}' or whitespace"
                ));
            }
            if let super::definition::InputField::Spec(s) = spec
                && let Some(d) = &s.default
            {
                if s.required == Some(true) {
                    self.report(format!(
                        "flow input {field:?}: has a default, so it cannot be required (remove one of required and default)"
                    ));
                }
                match s.ty.convert(d) {
                    Ok(c) if c == *d => {}
                    Ok(c) => self.report(format!(
                        "flow input {field:?}: its default {d} must be {} (write {c})",
                        s.ty.name()
                    )),
                    Err(e) => self.report(format!("flow input {field:?}: its default {e}")),
                }
            }
        }
        let by_name = self.check_names();
        let ancestors = self.check_dependencies(&by_name);
        for (i, task) in flow.tasks.iter().enumerate() {
            self.check_task(i, task, &by_name, &ancestors[i]);
        }
    }

    /// Task and participant names; the index of the first task of each name.
    fn check_names(&mut self) -> HashMap<&'a str, usize> {
        let flow = self.flow;
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, task) in flow.tasks.iter().enumerate() {
            if task.name.is_empty() {
                self.report(format!("task #{} has an empty name", i + 1));
            } else if !valid_name(&task.name) {
                self.report(format!(
                    "task {:?}: its name may only contain letters, digits, '_', '.' and '-'",
                    task.name
                ));
            }
            by_name.entry(&task.name).or_insert(i);
            *counts.entry(&task.name).or_default() += 1;
            if let Some(tcc) = &task.tcc {
                let mut seen = BTreeSet::new();
                for p in &tcc.participants {
                    if p.name.is_empty() {
                        self.report(format!(
                            "task {:?}: a participant has an empty name",
                            task.name
                        ));
                    } else if !valid_name(&p.name) {
                        self.report(format!(
                            "task {:?}: participant name {:?} may only contain letters, digits, '_', '.' and '-'",
                            task.name, p.name
                        ));
                    }
                    if !seen.insert(p.name.as_str()) {
                        self.report(format!(
                            "task {:?}: participant {:?} is defined more than once",
                            task.name, p.name
                        ));
                    }
                }
            }
        }
        for (name, count) in counts {
            if count > 1 {
                self.report(format!("task {name:?} is defined {count} times"));
            }
        }
        by_name
    }

    /// `depends_on` entries, cycles and joins that can never complete; the tasks
    /// each task transitively depends on (itself only through a cycle).
    fn check_dependencies(&mut self, by_name: &HashMap<&str, usize>) -> Vec<BTreeSet<usize>> {
        let flow = self.flow;
        let n = flow.tasks.len();
        let mut deps = vec![Vec::new(); n];
        // Tasks that can never start on their own account.
        let mut blocked = vec![false; n];
        for (i, task) in flow.tasks.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for dep in &task.depends_on {
                if !seen.insert(dep.as_str()) {
                    self.report(format!(
                        "task {:?}: depends on {dep:?} more than once",
                        task.name
                    ));
                    continue;
                }
                if *dep == task.name {
                    self.report(format!("task {:?}: depends on itself", task.name));
                    blocked[i] = true;
                    continue;
                }
                match by_name.get(dep.as_str()) {
                    Some(&d) => deps[i].push(d),
                    None => {
                        let hint = suggestion(dep, flow.tasks.iter().map(|t| t.name.as_str()));
                        self.report(format!(
                            "task {:?}: depends on unknown task {dep:?}{hint}",
                            task.name
                        ));
                        blocked[i] = true;
                    }
                }
            }
        }

        let on_cycle = self.check_cycles(&deps);
        for (b, &c) in blocked.iter_mut().zip(&on_cycle) {
            *b |= c;
        }

        // Everything downstream of a blocked task can never complete either.
        let mut dependents = vec![Vec::new(); n];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                dependents[d].push(i);
            }
        }
        let mut never = blocked;
        let mut queue: VecDeque<usize> = (0..n).filter(|&i| never[i]).collect();
        while let Some(v) = queue.pop_front() {
            for &w in &dependents[v] {
                if !never[w] {
                    never[w] = true;
                    queue.push_back(w);
                }
            }
        }
        for (i, task) in flow.tasks.iter().enumerate() {
            if on_cycle[i] {
                continue;
            }
            for &d in &deps[i] {
                if never[d] {
                    self.report(format!(
                        "task {:?}: joins on {:?}, which can never complete",
                        task.name, flow.tasks[d].name
                    ));
                }
            }
        }

        (0..n)
            .map(|i| {
                let mut found = BTreeSet::new();
                let mut queue: VecDeque<usize> = deps[i].iter().copied().collect();
                while let Some(v) = queue.pop_front() {
                    if found.insert(v) {
                        queue.extend(deps[v].iter().copied());
                    }
                }
                found
            })
            .collect()
    }

    /// Reports each group of tasks that depend on each other in a cycle; whether
    /// each task is on such a cycle (a task depending on itself is not: it is
    /// reported as such).
    fn check_cycles(&mut self, deps: &[Vec<usize>]) -> Vec<bool> {
        let flow = self.flow;
        let mut on_cycle = vec![false; deps.len()];
        let mut components: Vec<Vec<usize>> = strongly_connected(deps)
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|mut c| {
                c.sort_unstable();
                c
            })
            .collect();
        components.sort();
        for component in &components {
            for &i in component {
                on_cycle[i] = true;
            }
            let nodes: BTreeSet<usize> = component.iter().copied().collect();
            let start = component[0];
            let cycle = shortest_cycle(deps, &nodes, start).unwrap_or_else(|| component.clone());
            let path: Vec<String> = cycle
                .iter()
                .chain([&start])
                .map(|&i| format!("{:?}", flow.tasks[i].name))
                .collect();
            let others: Vec<String> = component
                .iter()
                .filter(|i| !cycle.contains(i))
                .map(|&i| format!("{:?}", flow.tasks[i].name))
                .collect();
            let others = match others.len() {
                0 => String::new(),
                1 => format!("; {} is on further cycles with them", others[0]),
                _ => format!("; {} are on further cycles with them", others.join(", ")),
            };
            self.report(format!(
                "tasks {} form a cycle (each depends on the next){others}",
                path.join(" -> ")
            ));
        }
        on_cycle
    }

    fn check_task(
        &mut self,
        i: usize,
        task: &TaskDefinition,
        by_name: &HashMap<&str, usize>,
        ancestors: &BTreeSet<usize>,
    ) {
        let name = &task.name;
        let scope = Scope {
            index: i,
            task,
            by_name,
            ancestors,
        };

        for (key, value) in &task.input {
            if !valid_field(key) {
                self.report(format!(
                    "task {name:?}: input name {key:?} must be non-empty and contain no '.', '{{', '}}' or whitespace"
                ));
            }
            self.check_templates(&scope, &format!("input {key:?}"), value, Place::TaskInput);
        }

        let kinds: Vec<&str> = [
            (task.action.is_some(), "an action"),
            (task.tcc.is_some(), "a tcc group"),
            (task.wait.is_some(), "a wait"),
            (task.signal.is_some(), "a signal"),
            (task.await_event.is_some(), "an await_event"),
            (task.flow.is_some(), "a flow"),
        ]
        .into_iter()
        .filter_map(|(set, what)| set.then_some(what))
        .collect();
        match kinds.len() {
            1 => {}
            0 => self.report(format!(
                "task {name:?}: has none of action, tcc, wait, signal, await_event and flow (it must have exactly one)"
            )),
            _ => self.report(format!(
                "task {name:?}: has {} (it must have exactly one of action, tcc, wait, signal, await_event and flow)",
                kinds.join(" and ")
            )),
        }
        self.check_control(&scope);
        if let Some(action) = &task.action {
            self.check_action(&scope, "", action);
        }
        if let Some(action) = &task.compensate {
            if task.tcc.is_some() {
                self.report(format!(
                    "task {name:?}: a tcc task cannot have a compensate action (its participants' cancel undoes it)"
                ));
            }
            self.check_action(&scope, "compensate: ", action);
        }
        if let Some(tcc) = &task.tcc {
            if tcc.participants.is_empty() {
                self.report(format!("task {name:?}: its tcc group has no participants"));
            }
            for p in &tcc.participants {
                let pn = &p.name;
                self.check_action(&scope, &format!("participant {pn:?} try: "), &p.try_action);
                self.check_action(&scope, &format!("participant {pn:?} confirm: "), &p.confirm);
                self.check_action(&scope, &format!("participant {pn:?} cancel: "), &p.cancel);
            }
            match (tcc.try_deadline_ms, self.flow.deadline_ms) {
                (Some(0), _) => self.report(format!(
                    "task {name:?}: its tcc try deadline must be more than 0 ms"
                )),
                (Some(t), Some(d)) if d > 0 && t > d => self.report(format!(
                    "task {name:?}: its tcc try deadline of {t} ms is beyond the flow deadline of {d} ms"
                )),
                _ => {}
            }
        }

        // A wait or signal has no attempts to retry or time out.
        if task.wait.is_none() && task.signal.is_none() && task.await_event.is_none() {
            self.check_retry(task);
        }
    }

    /// `when`, `requires`, `wait` and `signal`.
    fn check_control(&mut self, scope: &Scope<'_>) {
        let flow = self.flow;
        let task = scope.task;
        let name = &task.name;
        if let Some(when) = &task.when {
            let tasks: BTreeSet<&str> = flow.tasks.iter().map(|t| t.name.as_str()).collect();
            let upstream: BTreeSet<&str> = scope
                .ancestors
                .iter()
                .map(|&i| flow.tasks[i].name.as_str())
                .collect();
            let names = condition::Names {
                inputs: &flow.input,
                tasks: &tasks,
                upstream: &upstream,
            };
            if when.trim().is_empty() {
                self.report(format!("task {name:?}: its condition (when) is empty"));
            }
            for problem in condition::check(when, &names) {
                self.report(format!("task {name:?}: condition {when:?} {problem}"));
            }
        }
        let mut seen = BTreeSet::new();
        for r in &task.requires {
            if !seen.insert(r.as_str()) {
                self.report(format!("task {name:?}: requires {r:?} more than once"));
            } else if !task.depends_on.contains(r) {
                self.report(format!(
                    "task {name:?}: requires {r:?}, which is not among its depends_on"
                ));
            }
        }
        let timed = task.wait.is_some() || task.signal.is_some() || task.await_event.is_some();
        if timed && task.compensate.is_some() {
            self.report(format!(
                "task {name:?}: a wait, signal or await_event task has nothing to compensate (remove compensate)"
            ));
        }
        if let Some(wait) = &task.wait {
            match (wait.duration_ms, &wait.until) {
                (Some(_), Some(_)) => self.report(format!(
                    "task {name:?}: its wait has both duration_ms and until (it must have exactly one)"
                )),
                (None, None) => self.report(format!(
                    "task {name:?}: its wait has neither duration_ms nor until (it must have exactly one)"
                )),
                (Some(0), _) => self.report(format!(
                    "task {name:?}: its wait duration_ms must be more than 0"
                )),
                (None, Some(until)) => {
                    if until.trim().is_empty() {
                        self.report(format!("task {name:?}: its wait until is empty"));
                    }
                    let until = Value::String(until.clone());
                    self.check_templates(scope, "wait until", &until, Place::TaskInput);
                }
                (Some(ms), None) => {
                    if let Some(d) = flow.deadline_ms.filter(|d| *d > 0 && ms > *d) {
                        self.report(format!(
                            "task {name:?}: its wait of {ms} ms is beyond the flow deadline of {d} ms"
                        ));
                    }
                }
            }
        }
        if let Some(sub) = &task.flow {
            if !valid_name(&sub.name) {
                self.report(format!(
                    "task {name:?}: its flow {:?} is not a valid flow name",
                    sub.name
                ));
            } else if sub.name == flow.name {
                self.report(format!(
                    "task {name:?}: a flow task cannot start its own flow {:?} (that would never end)",
                    sub.name
                ));
            }
            if task.compensate.is_some() {
                self.report(format!(
                    "task {name:?}: a flow task's compensation is its child's (remove compensate)"
                ));
            }
            for (key, value) in &sub.input {
                self.check_templates(
                    scope,
                    &format!("flow input {key:?}"),
                    value,
                    Place::TaskInput,
                );
            }
        }
        if let Some(wanted) = &task.await_event {
            if wanted.tags.is_empty() {
                self.report(format!(
                    "task {name:?}: its await_event has no tags (it must wait for a fact about something, e.g. order:{{{{business_key}}}})"
                ));
            }
            for t in &wanted.tags {
                if t.trim().is_empty() {
                    self.report(format!("task {name:?}: its await_event has an empty tag"));
                }
                let v = Value::String(t.clone());
                self.check_templates(
                    scope,
                    &format!("await_event tag {t:?}"),
                    &v,
                    Place::TaskInput,
                );
            }
            for ty in &wanted.types {
                if ty.trim().is_empty() {
                    self.report(format!("task {name:?}: its await_event has an empty type"));
                }
            }
            if wanted.timeout_ms == Some(0) {
                self.report(format!(
                    "task {name:?}: its await_event timeout_ms must be more than 0"
                ));
            }
        }
        if let Some(each) = &task.for_each {
            if task.action.is_none() {
                self.report(format!(
                    "task {name:?}: for_each runs an action per item (a tcc, wait, signal, await_event or flow task cannot have one)"
                ));
            }
            if whole_template(each.items.trim()).is_none() {
                self.report(format!(
                    "task {name:?}: for_each items {:?} must be one template that renders to an array, such as \"{{{{tasks.order.output.lines}}}}\"",
                    each.items
                ));
            }
            let items = Value::String(each.items.clone());
            self.check_templates(scope, "for_each items", &items, Place::TaskInput);
            if each.max_parallel == 0 {
                self.report(format!(
                    "task {name:?}: for_each max_parallel must be at least 1"
                ));
            }
        }
        if let Some(signal) = &task.signal {
            if !valid_name(&signal.name) {
                self.report(format!(
                    "task {name:?}: signal name {:?} must be non-empty and contain only letters, digits, '_', '.' and '-'",
                    signal.name
                ));
            }
            if signal.timeout_ms == Some(0) {
                self.report(format!(
                    "task {name:?}: its signal timeout_ms must be more than 0"
                ));
            }
        }
    }

    fn check_retry(&mut self, task: &TaskDefinition) {
        let name = &task.name;
        let retry = &task.retry;
        if retry.max_attempts == 0 {
            self.report(format!(
                "task {name:?}: retry max_attempts must be at least 1 (the first attempt counts)"
            ));
        }
        if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
            self.report(format!(
                "task {name:?}: retry multiplier must be a finite number of at least 1, not {}",
                retry.multiplier
            ));
        }
        if retry.initial_backoff_ms > retry.max_backoff_ms {
            self.report(format!(
                "task {name:?}: retry initial_backoff_ms ({}) exceeds max_backoff_ms ({})",
                retry.initial_backoff_ms, retry.max_backoff_ms
            ));
        }
        if let Some(codes) = &retry.retry_on
            && codes.iter().any(|c| c.trim().is_empty())
        {
            self.report(format!("task {name:?}: retry_on holds an empty error code"));
        }
        if task.timeout_ms == 0 {
            self.report(format!("task {name:?}: timeout_ms must be more than 0"));
        }
        if let Some(d) = self.flow.deadline_ms
            && d > 0
            && retry.max_attempts > 0
        {
            let worst = worst_case_ms(task);
            if worst > u128::from(d) {
                self.report(format!(
                    "task {name:?}: its retry policy can take up to {worst} ms, beyond the flow deadline of {d} ms ({} attempts of up to {} ms each, plus backoff)",
                    retry.max_attempts, task.timeout_ms
                ));
            }
        }
    }

    /// One action; `label` prefixes its messages (`""` for the task's action).
    fn check_action(&mut self, scope: &Scope<'_>, label: &str, action: &Action) {
        let name = &scope.task.name;
        let prefix = format!("task {name:?}: {label}");
        let kind = match action {
            Action::Http { .. } => "http",
            Action::Sql { .. } => "sql",
            Action::Nats { .. } => "nats",
            Action::Amqp { .. } => "amqp",
            Action::Grpc { .. } => "grpc",
            Action::Rust { .. } => "rust",
        };
        if !self.executors.contains(&kind) {
            self.report(format!(
                "{prefix}executor {kind:?} is not available in this build (it runs {})",
                self.executors.join(", ")
            ));
        }
        match action {
            Action::Http {
                method,
                url,
                headers,
                body,
            } => {
                if !HTTP_METHODS.iter().any(|m| m.eq_ignore_ascii_case(method)) {
                    self.report(format!(
                        "{prefix}http method {method:?} is not one of {}",
                        HTTP_METHODS.join(", ")
                    ));
                }
                if url.trim().is_empty() {
                    self.report(format!("{prefix}http url is empty"));
                } else if !valid_url(url) {
                    self.report(format!(
                        "{prefix}http url {url:?} must start with http:// or https://"
                    ));
                }
                let url = Value::String(url.clone());
                self.check_templates(scope, &format!("{label}http url"), &url, Place::Action);
                for (header, value) in headers {
                    if header.trim().is_empty() {
                        self.report(format!("{prefix}http header with an empty name"));
                    } else if !valid_header(header) {
                        self.report(format!(
                            "{prefix}http header name {header:?} is not a valid header name"
                        ));
                    }
                    let value = Value::String(value.clone());
                    self.check_templates(
                        scope,
                        &format!("{label}http header {header:?}"),
                        &value,
                        Place::Action,
                    );
                }
                if let Some(body) = body {
                    self.check_templates(scope, &format!("{label}http body"), body, Place::Action);
                    self.check_body_type(&prefix, body);
                }
            }
            Action::Sql { statements } => {
                if statements.is_empty() {
                    self.report(format!("{prefix}sql action has no statements"));
                }
                for (k, SqlStatement { sql, params }) in statements.iter().enumerate() {
                    let k = k + 1;
                    if sql.trim().is_empty() {
                        self.report(format!("{prefix}sql statement {k} is empty"));
                    }
                    for (j, param) in params.iter().enumerate() {
                        self.check_templates(
                            scope,
                            &format!("{label}sql statement {k} parameter ${}", j + 1),
                            param,
                            Place::Action,
                        );
                    }
                }
            }
            Action::Nats { subject, payload } => {
                if subject.trim().is_empty() {
                    self.report(format!("{prefix}nats subject is empty"));
                }
                let subject = Value::String(subject.clone());
                self.check_templates(
                    scope,
                    &format!("{label}nats subject"),
                    &subject,
                    Place::Action,
                );
                self.check_templates(
                    scope,
                    &format!("{label}nats payload"),
                    payload,
                    Place::Action,
                );
            }
            Action::Amqp {
                exchange,
                routing_key,
                payload,
            } => {
                if routing_key.trim().is_empty() {
                    self.report(format!("{prefix}amqp routing_key is empty"));
                }
                for (what, text) in [("exchange", exchange), ("routing_key", routing_key)] {
                    let v = Value::String(text.clone());
                    self.check_templates(scope, &format!("{label}amqp {what}"), &v, Place::Action);
                }
                self.check_templates(
                    scope,
                    &format!("{label}amqp payload"),
                    payload,
                    Place::Action,
                );
            }
            Action::Grpc {
                endpoint,
                method,
                descriptor_set,
                message,
                metadata,
            } => {
                if endpoint.trim().is_empty() {
                    self.report(format!("{prefix}grpc endpoint is empty"));
                } else if !valid_url(endpoint) {
                    self.report(format!(
                        "{prefix}grpc endpoint {endpoint:?} must start with http:// or https://"
                    ));
                }
                let v = Value::String(endpoint.clone());
                self.check_templates(scope, &format!("{label}grpc endpoint"), &v, Place::Action);
                if !valid_grpc_method(method) {
                    self.report(format!(
                        "{prefix}grpc method {method:?} must be package.Service/Method (for example \"inventory.v1.Inventory/Reserve\")"
                    ));
                }
                if descriptor_set.trim().is_empty() {
                    self.report(format!("{prefix}grpc descriptor_set is empty"));
                }
                if !matches!(message, Value::Object(_) | Value::Null) && !is_template(message) {
                    self.report(format!(
                        "{prefix}grpc message must be a JSON object (the request's fields)"
                    ));
                }
                self.check_templates(
                    scope,
                    &format!("{label}grpc message"),
                    message,
                    Place::Action,
                );
                for (key, value) in metadata {
                    if !valid_grpc_metadata(key) {
                        self.report(format!(
                            "{prefix}grpc metadata key {key:?} must be lower-case letters, digits, '-', '_' or '.', not start with \"grpc-\" nor end with \"-bin\""
                        ));
                    }
                    let v = Value::String(value.clone());
                    self.check_templates(
                        scope,
                        &format!("{label}grpc metadata {key:?}"),
                        &v,
                        Place::Action,
                    );
                }
            }
            Action::Rust { function } => {
                if function.trim().is_empty() {
                    self.report(format!("{prefix}rust function name is empty"));
                } else if !self.functions.contains(&function.as_str()) {
                    let hint = suggestion(function, self.functions.iter().copied());
                    self.report(format!(
                        "{prefix}rust function {function:?} is not registered{hint}"
                    ));
                }
            }
        }
    }

    /// An HTTP body taken whole from a flow input must be declared as JSON that
    /// can be a body: an object or an array (or `any`).
    fn check_body_type(&mut self, prefix: &str, body: &Value) {
        let Value::String(s) = body else {
            return;
        };
        let Some(path) = whole_template(s) else {
            return;
        };
        let parts: Vec<&str> = path.split('.').map(str::trim).collect();
        let ["flow", "input", field] = parts.as_slice() else {
            return;
        };
        if let Some(ty) = self.flow.input.get(*field).map(|f| f.ty())
            && !matches!(ty, ValueType::Object | ValueType::Array | ValueType::Any)
        {
            self.report(format!(
                "{prefix}http body must be a JSON object or array, but flow input {field:?} is {}",
                type_name(ty)
            ));
        }
    }

    /// The templates inside `value`, at `place` (named `what` in messages).
    fn check_templates(&mut self, scope: &Scope<'_>, what: &str, value: &Value, place: Place) {
        let flow = self.flow;
        let task = scope.task;
        let prefix = format!("task {:?}: {what}", task.name);
        for reference in template::references(value) {
            match reference {
                Reference::Builtin => {}
                Reference::Item => {
                    if task.for_each.is_none() {
                        self.report(format!(
                            "{prefix} refers to {{{{item}}}}, but the task has no for_each"
                        ));
                    } else if what == "for_each items" {
                        self.report(format!("{prefix} cannot refer to the item itself"));
                    }
                }
                Reference::Unknown(path) => self.report(format!(
                    "{prefix} has an unknown template {{{{{path}}}}} (expected flow.input.*, tasks.<task>.output*, input.*, item*, item_index, instance, idempotency_key or business_key)"
                )),
                Reference::FlowInput(field) => {
                    if !flow.input.is_empty()
                        && !field.is_empty()
                        && !flow.input.contains_key(&field)
                    {
                        let hint = suggestion(&field, flow.input.keys().map(String::as_str));
                        self.report(format!(
                            "{prefix} refers to undeclared flow input {field:?}{hint}"
                        ));
                    }
                }
                Reference::TaskOutput(t) => match scope.by_name.get(t.as_str()) {
                    None => {
                        let hint = suggestion(&t, flow.tasks.iter().map(|t| t.name.as_str()));
                        self.report(format!(
                            "{prefix} refers to the output of unknown task {t:?}{hint}"
                        ));
                    }
                    // A compensation undoes what its task did: it may use its output.
                    Some(&j) if j == scope.index && what.starts_with("compensate: ") => {}
                    Some(&j) if j == scope.index || t == task.name => {
                        self.report(format!("{prefix} refers to the task's own output"));
                    }
                    Some(j) => {
                        if !scope.ancestors.contains(j) {
                            self.report(format!(
                                "{prefix} refers to the output of {t:?}, which is not among the tasks it depends on"
                            ));
                        }
                    }
                },
                Reference::Input(key) => match place {
                    Place::TaskInput => self.report(format!(
                        "{prefix} refers to the task input (\"{{{{input{}}}}}\"), but a task input cannot refer to the task's own input",
                        if key.is_empty() { String::new() } else { format!(".{key}") }
                    )),
                    Place::Action => {
                        if !key.is_empty() && !task.input.contains_key(&key) {
                            let hint = suggestion(&key, task.input.keys().map(String::as_str));
                            self.report(format!(
                                "{prefix} refers to undeclared task input {key:?}{hint}"
                            ));
                        }
                    }
                },
            }
        }
    }
}

/// The task being checked, with what its templates may refer to.
struct Scope<'a> {
    index: usize,
    task: &'a TaskDefinition,
    by_name: &'a HashMap<&'a str, usize>,
    ancestors: &'a BTreeSet<usize>,
}

#[cfg(test)]
mod tests;
