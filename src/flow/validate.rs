//! Validation of flow definitions: every problem of a definition is collected, one
//! human-readable line each, before it is registered.
//!
//! What is checked:
//! - names: the flow's, the tasks' (unique) and the TCC participants' (unique
//!   within their task) hold only letters, digits, `_`, `.` and `-`;
//! - dependencies: no unknown task, no task depending on itself, no duplicate
//!   entry, no cycle, and no task joining on a task that can never complete;
//! - each task has exactly one of `action` and `tcc` (and a `tcc` task no
//!   `compensate`), and every action is well formed (HTTP method and URL, SQL
//!   statements, NATS subject, registered Rust function);
//! - retry policies are sensible and cannot outlive the flow deadline;
//! - templates refer only to declared flow inputs, to the outputs of tasks the
//!   task (transitively) depends on, and to the task's own inputs;
//! - an HTTP body taken whole from a flow input is declared as an object or array.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde_json::Value;

use super::definition::SqlStatement;
use super::template::{self, Reference};
use super::{Action, DefinitionError, FlowDefinition, TaskDefinition, ValueType};

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
    let mut checker = Checker {
        flow,
        functions,
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

/// The strongly connected components of the graph `edges` (Tarjan's algorithm,
/// iterative so that long chains cannot overflow the stack).
fn strongly_connected(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNVISITED: usize = usize::MAX;
    let n = edges.len();
    let mut index = vec![UNVISITED; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut next = 0;
    let mut components = Vec::new();
    for root in 0..n {
        if index[root] != UNVISITED {
            continue;
        }
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        // (node, index of its next edge to follow)
        let mut calls = vec![(root, 0usize)];
        while let Some(&(v, i)) = calls.last() {
            if let Some(&w) = edges[v].get(i) {
                if let Some(call) = calls.last_mut() {
                    call.1 += 1;
                }
                if index[w] == UNVISITED {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                calls.pop();
                if let Some(&(u, _)) = calls.last() {
                    low[u] = low[u].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut component = Vec::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        component.push(w);
                        if w == v {
                            break;
                        }
                    }
                    components.push(component);
                }
            }
        }
    }
    components
}

/// A shortest cycle from `start` back to itself following `edges` within `nodes`
/// (`start` first, not repeated at the end), if there is one.
fn shortest_cycle(
    edges: &[Vec<usize>],
    nodes: &BTreeSet<usize>,
    start: usize,
) -> Option<Vec<usize>> {
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in &edges[v] {
            if !nodes.contains(&w) {
                continue;
            }
            if w == start {
                let mut path = vec![v];
                let mut at = v;
                while at != start {
                    at = parent[&at];
                    path.push(at);
                }
                path.reverse();
                return Some(path);
            }
            if let Entry::Vacant(e) = parent.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    None
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
        for field in flow.input.keys() {
            if !valid_field(field) {
                self.report(format!(
                    "flow input name {field:?} must be non-empty and contain no '.', '{{', '}}' or whitespace"
                ));
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

        match (&task.action, &task.tcc) {
            (Some(_), Some(_)) => self.report(format!(
                "task {name:?}: has both an action and a tcc group (it must have exactly one)"
            )),
            (None, None) => self.report(format!(
                "task {name:?}: has neither an action nor a tcc group (it must have exactly one)"
            )),
            _ => {}
        }
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

        self.check_retry(task);
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
        if let Some(&ty) = self.flow.input.get(*field)
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
                Reference::Unknown(path) => self.report(format!(
                    "{prefix} has an unknown template {{{{{path}}}}} (expected flow.input.*, tasks.<task>.output*, input.*, instance, idempotency_key or business_key)"
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
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::flow::{OnExhausted, TaskRetry, TccParticipant};

    const FUNCTIONS: &[&str] = &["reserve", "release", "audit"];

    fn problems(flow: &FlowDefinition) -> Vec<String> {
        match validate(flow, FUNCTIONS) {
            Ok(()) => Vec::new(),
            Err(e) => {
                assert_eq!(e.flow, flow.name);
                e.problems
            }
        }
    }

    #[track_caller]
    fn assert_has(problems: &[String], expected: &str) {
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "no problem contains {expected:?} in:\n{}",
            problems.join("\n")
        );
    }

    #[track_caller]
    fn assert_lacks(problems: &[String], unexpected: &str) {
        assert!(
            !problems.iter().any(|p| p.contains(unexpected)),
            "a problem contains {unexpected:?} in:\n{}",
            problems.join("\n")
        );
    }

    fn participant(name: &str) -> TccParticipant {
        TccParticipant {
            name: name.into(),
            try_action: Action::http("POST", "https://stock.example/{{input.sku}}/hold", None),
            confirm: Action::rust("audit"),
            cancel: Action::nats(
                "stock.{{input.sku}}.release",
                json!({"sku": "{{input.sku}}"}),
            ),
        }
    }

    #[test]
    fn a_valid_serial_and_parallel_flow_passes() {
        let flow = FlowDefinition::builder("order.placed-v2")
            .input("amount", ValueType::Number)
            .input("customer", ValueType::Object)
            .input("sku", ValueType::String)
            .deadline(Duration::from_secs(600))
            .task(
                TaskDefinition::new("reserve", Action::rust("reserve"))
                    .compensate(Action::rust("release"))
                    .retry(
                        TaskRetry::attempts(5)
                            .backoff(Duration::from_millis(50), Duration::from_secs(2)),
                    ),
            )
            .task(
                TaskDefinition::new(
                    "charge",
                    Action::http(
                        "post",
                        "https://pay.example/charges?c={{flow.input.customer.id}}",
                        Some(json!({
                            "amount": "{{flow.input.amount}}",
                            "reservation": "{{tasks.reserve.output.id}}",
                            "key": "{{idempotency_key}}",
                        })),
                    ),
                )
                .after(["reserve"])
                .compensate(Action::http("DELETE", "{{input.refund_url}}", None))
                .input(
                    "refund_url",
                    json!("https://pay.example/refunds/{{instance}}"),
                )
                .on_exhausted(OnExhausted::Pause),
            )
            .task(
                TaskDefinition::new(
                    "notify",
                    Action::nats(
                        "orders.{{flow.input.customer.id}}",
                        json!({"order": "{{business_key}}", "items": ["{{flow.input.sku}}"]}),
                    ),
                )
                .after(["reserve"]),
            )
            .task(
                TaskDefinition::tcc("hold", vec![participant("stock"), participant("backup")])
                    .try_deadline(Duration::from_secs(5))
                    .input("sku", json!("{{flow.input.sku}}"))
                    .after(["reserve"]),
            )
            .task(
                TaskDefinition::new(
                    "ship",
                    Action::sql([(
                        "insert into shipments (charge, total) values ($1, $2::numeric)",
                        vec![json!("{{input.charge}}"), json!("{{flow.input.amount}}")],
                    )]),
                )
                .after(["charge", "notify", "hold"])
                .input("charge", json!("{{tasks.charge.output.id}}"))
                .input("reserved", json!({"id": "{{tasks.reserve.output.id}}"})),
            )
            .build();
        assert_eq!(validate(&flow, FUNCTIONS), Ok(()));
    }

    #[test]
    fn a_valid_yaml_definition_passes() {
        let flow = FlowDefinition::from_yaml(
            r#"
name: payment
input: { amount: integer, order: object }
deadline_ms: 120000
tasks:
  - name: book
    input: { order: "{{flow.input.order}}" }
    action:
      executor: http
      url: "{{input.order}}"
      headers: { X-Amount: "{{flow.input.amount}}" }
      body: "{{flow.input.order}}"
    timeout_ms: 10000
  - name: record
    depends_on: [book]
    action:
      executor: sql
      statements:
        - sql: "insert into bookings (id) values ($1)"
          params: ["{{tasks.book.output.id}}"]
"#,
        )
        .unwrap();
        assert_eq!(validate(&flow, FUNCTIONS), Ok(()));
    }

    #[test]
    fn every_problem_is_reported() {
        let flow = FlowDefinition::from_yaml(
            r#"
name: "bad flow"
input: { amount: number }
tasks:
  - name: ship
    depends_on: [shipp, ship, pack, pack]
    action: { executor: rust, function: "" }
  - name: pack
    action: { executor: http, method: FETCH, url: "ftp://x", headers: { "": "a", "Bad Header": "b" } }
  - name: pack
    action: { executor: sql, statements: [] }
  - name: "a b"
    action: { executor: nats, subject: " " }
  - name: empty
  - name: both
    action: { executor: sql, statements: [{ sql: "  " }] }
    compensate: { executor: rust, function: refund }
    tcc: { participants: [], try_deadline_ms: 0 }
    retry: { max_attempts: 0, multiplier: 0.5, initial_backoff_ms: 10, max_backoff_ms: 5, retry_on: [""] }
    timeout_ms: 0
  - name: templ
    depends_on: [pack]
    input:
      own: "{{input.other}}"
      cost: "{{flow.input.cost}}"
    action:
      executor: nats
      subject: "x.{{input.missing}}.{{nonsense.path}}"
      payload: { a: "{{tasks.ship.output.id}}", b: "{{tasks.nowhere.output}}", c: "{{tasks.templ.output}}" }
  - name: tcc
    tcc:
      participants:
        - name: p
          try: { executor: rust, function: nope }
          confirm: { executor: http, url: "" }
          cancel: { executor: rust, function: release }
        - name: p
          try: { executor: rust, function: reserve }
          confirm: { executor: rust, function: audit }
          cancel: { executor: rust, function: release }
"#,
        )
        .unwrap();
        let problems = problems(&flow);
        for expected in [
            r#"flow name "bad flow" may only contain"#,
            r#"task "ship": depends on unknown task "shipp" (did you mean "ship"?)"#,
            r#"task "ship": depends on itself"#,
            r#"task "ship": depends on "pack" more than once"#,
            r#"task "ship": rust function name is empty"#,
            r#"task "pack" is defined 2 times"#,
            r#"task "pack": http method "FETCH" is not one of GET, POST"#,
            r#"task "pack": http url "ftp://x" must start with http:// or https://"#,
            r#"task "pack": http header with an empty name"#,
            r#"task "pack": http header name "Bad Header" is not a valid header name"#,
            r#"task "pack": sql action has no statements"#,
            r#"task "a b": its name may only contain"#,
            r#"task "a b": nats subject is empty"#,
            r#"task "empty": has neither an action nor a tcc group"#,
            r#"task "both": has both an action and a tcc group"#,
            r#"task "both": sql statement 1 is empty"#,
            r#"task "both": a tcc task cannot have a compensate action"#,
            r#"task "both": compensate: rust function "refund" is not registered"#,
            r#"task "both": its tcc group has no participants"#,
            r#"task "both": its tcc try deadline must be more than 0 ms"#,
            r#"task "both": retry max_attempts must be at least 1"#,
            r#"task "both": retry multiplier must be a finite number of at least 1, not 0.5"#,
            r#"task "both": retry initial_backoff_ms (10) exceeds max_backoff_ms (5)"#,
            r#"task "both": retry_on holds an empty error code"#,
            r#"task "both": timeout_ms must be more than 0"#,
            r#"task "templ": input "own" refers to the task input ("{{input.other}}"), but a task input cannot refer to the task's own input"#,
            r#"task "templ": input "cost" refers to undeclared flow input "cost""#,
            r#"task "templ": nats subject refers to undeclared task input "missing""#,
            r#"task "templ": nats subject has an unknown template {{nonsense.path}}"#,
            r#"task "templ": nats payload refers to the output of "ship", which is not among the tasks it depends on"#,
            r#"task "templ": nats payload refers to the output of unknown task "nowhere""#,
            r#"task "templ": nats payload refers to the task's own output"#,
            r#"task "tcc": participant "p" is defined more than once"#,
            r#"task "tcc": participant "p" try: rust function "nope" is not registered"#,
            r#"task "tcc": participant "p" confirm: http url is empty"#,
        ] {
            assert_has(&problems, expected);
        }
        // Each problem once, each naming what it is about.
        let unique: BTreeSet<&String> = problems.iter().collect();
        assert_eq!(unique.len(), problems.len(), "{problems:#?}");
        assert!(
            problems
                .iter()
                .all(|p| p.starts_with("task") || p.starts_with("flow")),
            "{problems:#?}"
        );
        let shown = validate(&flow, FUNCTIONS).unwrap_err().to_string();
        assert!(
            shown.contains(&format!("({} problems)", problems.len())),
            "{shown}"
        );
    }

    #[test]
    fn flow_level_problems() {
        let flow = FlowDefinition::builder("").deadline(Duration::ZERO).build();
        let problems = problems(&flow);
        assert_has(&problems, "the flow's name is empty");
        assert_has(&problems, "the flow has no tasks");
        assert_has(&problems, "the flow deadline must be more than 0 ms");
    }

    #[test]
    fn cycles_and_joins_that_can_never_complete() {
        let rust = || Action::rust("audit");
        let flow = FlowDefinition::builder("graph")
            .task(TaskDefinition::new("start", rust()))
            .task(TaskDefinition::new("a", rust()).after(["start", "b"]))
            .task(TaskDefinition::new("b", rust()).after(["a"]))
            .task(TaskDefinition::new("c", rust()).after(["a", "start"]))
            .task(TaskDefinition::new("d", rust()).after(["c"]))
            .task(TaskDefinition::new("x", rust()).after(["y"]))
            .task(TaskDefinition::new("y", rust()).after(["z"]))
            .task(TaskDefinition::new("z", rust()).after(["x", "w"]))
            .task(TaskDefinition::new("w", rust()).after(["y"]))
            .task(TaskDefinition::new("orphan", rust()).after(["ghost"]))
            .task(TaskDefinition::new("after-orphan", rust()).after(["orphan", "start"]))
            .task(TaskDefinition::new("selfish", rust()).after(["selfish"]))
            .task(TaskDefinition::new("after-selfish", rust()).after(["selfish"]))
            .task(TaskDefinition::new("fine", rust()).after(["start"]))
            .build();
        let problems = problems(&flow);
        assert_has(
            &problems,
            r#"tasks "a" -> "b" -> "a" form a cycle (each depends on the next)"#,
        );
        assert_has(
            &problems,
            r#"tasks "x" -> "y" -> "z" -> "x" form a cycle (each depends on the next); "w" is on further cycles with them"#,
        );
        assert_has(
            &problems,
            r#"task "c": joins on "a", which can never complete"#,
        );
        assert_has(
            &problems,
            r#"task "d": joins on "c", which can never complete"#,
        );
        assert_has(
            &problems,
            r#"task "orphan": depends on unknown task "ghost""#,
        );
        assert_has(
            &problems,
            r#"task "after-orphan": joins on "orphan", which can never complete"#,
        );
        assert_has(&problems, r#"task "selfish": depends on itself"#);
        assert_has(
            &problems,
            r#"task "after-selfish": joins on "selfish", which can never complete"#,
        );
        // Tasks on a cycle are reported as the cycle, not as joins; complete
        // tasks are not reported at all.
        assert_lacks(&problems, r#"task "a": joins"#);
        assert_lacks(&problems, r#"task "b": joins"#);
        assert_lacks(&problems, r#"task "w": joins"#);
        assert_lacks(&problems, r#"joins on "start""#);
        assert_lacks(&problems, r#"task "fine""#);
        assert_lacks(&problems, r#"task "start""#);
        assert_eq!(problems.len(), 8, "{problems:#?}");
    }

    #[test]
    fn strongly_connected_components() {
        // 0 -> 1 -> 2 -> 0, 2 -> 3, 3 -> 4 -> 3, 5 alone
        let edges = vec![vec![1], vec![2], vec![0, 3], vec![4], vec![3], vec![]];
        let mut components: Vec<Vec<usize>> = strongly_connected(&edges)
            .into_iter()
            .map(|mut c| {
                c.sort_unstable();
                c
            })
            .collect();
        components.sort();
        assert_eq!(components, vec![vec![0, 1, 2], vec![3, 4], vec![5]]);
        let nodes = BTreeSet::from([0, 1, 2]);
        assert_eq!(shortest_cycle(&edges, &nodes, 1), Some(vec![1, 2, 0]));
        assert_eq!(shortest_cycle(&edges, &BTreeSet::from([5]), 5), None);
    }

    #[test]
    fn a_retry_policy_outliving_the_flow_deadline() {
        let flow = FlowDefinition::builder("slow")
            .deadline(Duration::from_secs(10))
            .task(
                // 3 attempts of 5 s, then delays of up to 100 ms and 200 ms.
                TaskDefinition::new("slow", Action::rust("audit"))
                    .timeout(Duration::from_secs(5))
                    .retry(
                        TaskRetry::attempts(3)
                            .backoff(Duration::from_millis(100), Duration::from_secs(1)),
                    ),
            )
            .task(
                // 2 attempts of 4.5 s and one delay of up to 1 s: exactly 10 s.
                TaskDefinition::new("just-in-time", Action::rust("audit"))
                    .timeout(Duration::from_millis(4500))
                    .retry(
                        TaskRetry::attempts(2)
                            .backoff(Duration::from_secs(1), Duration::from_secs(1)),
                    ),
            )
            .task(
                TaskDefinition::new("forever", Action::rust("audit"))
                    .timeout(Duration::from_millis(1))
                    .retry(TaskRetry::attempts(u32::MAX)),
            )
            .task(
                TaskDefinition::tcc("hold", vec![participant("stock")])
                    .input("sku", json!("abc"))
                    .timeout(Duration::from_secs(1))
                    .try_deadline(Duration::from_secs(11)),
            )
            .build();
        let problems = problems(&flow);
        assert_has(
            &problems,
            r#"task "slow": its retry policy can take up to 15300 ms, beyond the flow deadline of 10000 ms"#,
        );
        assert_lacks(&problems, r#"task "just-in-time""#);
        // u32::MAX attempts of 1 ms, delays capped at 10 s: computed without looping over them.
        assert_has(
            &problems,
            r#"task "forever": its retry policy can take up to "#,
        );
        assert_has(
            &problems,
            r#"task "hold": its tcc try deadline of 11000 ms is beyond the flow deadline of 10000 ms"#,
        );
        assert_eq!(problems.len(), 3, "{problems:#?}");
    }

    #[test]
    fn worst_case_adds_timeouts_and_backoff_ceilings() {
        let task = TaskDefinition::new("t", Action::rust("audit"))
            .timeout(Duration::from_millis(10))
            .retry(
                TaskRetry::attempts(5)
                    .backoff(Duration::from_millis(100), Duration::from_millis(300)),
            );
        // 5 × 10 + 100 + 200 + 300 + 300
        assert_eq!(worst_case_ms(&task), 950);
        let many = TaskDefinition::new("t", Action::rust("audit"))
            .timeout(Duration::from_millis(1))
            .retry(
                TaskRetry::attempts(100)
                    .backoff(Duration::from_millis(1), Duration::from_secs(3600)),
            );
        let expected: u128 = 100
            + (1..100)
                .map(|r| many.retry.ceiling(r).as_millis())
                .sum::<u128>();
        assert_eq!(worst_case_ms(&many), expected);
    }

    #[test]
    fn an_unregistered_rust_function() {
        let flow = FlowDefinition::builder("f")
            .task(TaskDefinition::new("a", Action::rust("reserv")))
            .task(
                TaskDefinition::new("b", Action::rust("reserve")).compensate(Action::rust("undo")),
            )
            .build();
        let problems = problems(&flow);
        assert_eq!(
            problems,
            vec![
                r#"task "a": rust function "reserv" is not registered (did you mean "reserve"?)"#
                    .to_owned(),
                r#"task "b": compensate: rust function "undo" is not registered"#.to_owned(),
            ]
        );
        assert_eq!(
            validate(&flow, &["reserv", "undo"])
                .unwrap_err()
                .problems
                .len(),
            1
        );
    }

    #[test]
    fn templates_may_only_refer_to_outputs_of_tasks_depended_on() {
        let flow = FlowDefinition::builder("outputs")
            .task(TaskDefinition::new("a", Action::rust("audit")))
            .task(TaskDefinition::new("b", Action::rust("audit")).after(["a"]))
            .task(
                // Parallel to "b": its output may not exist yet.
                TaskDefinition::new(
                    "c",
                    Action::nats("c.{{tasks.a.output.id}}", json!("{{tasks.b.output}}")),
                )
                .after(["a"]),
            )
            .task(
                // Depends on "a" through "b".
                TaskDefinition::new("d", Action::rust("audit"))
                    .after(["b"])
                    .input("a", json!("{{tasks.a.output.id}}"))
                    .input("c", json!(["{{tasks.c.output.id}}"])),
            )
            .build();
        let problems = problems(&flow);
        assert_eq!(
            problems,
            vec![
                r#"task "c": nats payload refers to the output of "b", which is not among the tasks it depends on"#
                    .to_owned(),
                r#"task "d": input "c" refers to the output of "c", which is not among the tasks it depends on"#
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn an_http_body_of_the_wrong_type() {
        let body = |b: &str| Action::http("PUT", "https://x.example/", Some(json!(b)));
        let flow = FlowDefinition::builder("bodies")
            .input("amount", ValueType::Number)
            .input("order", ValueType::Object)
            .input("lines", ValueType::Array)
            .input("anything", ValueType::Any)
            .input("name", ValueType::String)
            .task(TaskDefinition::new("amount", body("{{flow.input.amount}}")))
            .task(TaskDefinition::new("order", body("{{ flow.input.order }}")))
            .task(TaskDefinition::new("lines", body("{{flow.input.lines}}")))
            .task(TaskDefinition::new(
                "anything",
                body("{{flow.input.anything}}"),
            ))
            .task(
                TaskDefinition::new("name", body("{{flow.input.amount}}"))
                    .compensate(body(" {{flow.input.name}} ")),
            )
            .task(TaskDefinition::new(
                "embedded",
                body("total {{flow.input.amount}}"),
            ))
            .task(TaskDefinition::new(
                "nested",
                body("{{flow.input.order.total}}"),
            ))
            .build();
        let problems = problems(&flow);
        assert_eq!(
            problems,
            vec![
                r#"task "amount": http body must be a JSON object or array, but flow input "amount" is number"#
                    .to_owned(),
                r#"task "name": http body must be a JSON object or array, but flow input "amount" is number"#
                    .to_owned(),
                r#"task "name": compensate: http body must be a JSON object or array, but flow input "name" is string"#
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn urls() {
        for ok in [
            "https://x.example/a",
            "HTTP://x",
            "{{input.url}}",
            "{{input.base}}/orders",
            " https://{{input.host}}/x ",
        ] {
            assert!(valid_url(ok), "{ok}");
        }
        for bad in [
            "ftp://x",
            "https://",
            "x.example",
            "/path",
            "http:/x",
            "é://x",
        ] {
            assert!(!valid_url(bad), "{bad}");
        }
    }

    #[test]
    fn undeclared_flow_inputs_are_only_checked_when_inputs_are_declared() {
        let task = TaskDefinition::new("a", Action::rust("audit"))
            .input("x", json!("{{flow.input.whatever}}"))
            .input("all", json!("{{flow.input}}"));
        let flow = FlowDefinition::builder("open").task(task.clone()).build();
        assert_eq!(validate(&flow, FUNCTIONS), Ok(()));
        let flow = FlowDefinition::builder("closed")
            .input("whatevr", ValueType::Any)
            .task(task)
            .build();
        assert_eq!(
            problems(&flow),
            vec![
                r#"task "a": input "x" refers to undeclared flow input "whatever" (did you mean "whatevr"?)"#
                    .to_owned()
            ]
        );
    }
}
