//! Flow definitions: tasks, dependencies, executors, retries, compensation.
//!
//! A definition is plain data (serde): build it with [`FlowDefinition::builder`] or
//! load it from YAML, JSON or TOML. It is validated when registered
//! ([`validate`](crate::flow::validate)) and identified by the hash of its content, so an
//! instance keeps running on the version it started with.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::events::{Phase, StepId};
use crate::backoff::Backoff;
use crate::flow::DefinitionError;

/// A flow: named tasks with dependencies (a task runs when all it depends on have
/// succeeded; tasks with no path between them run in parallel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowDefinition {
    /// The flow's name (instances are started by name).
    pub name: String,
    /// The instance must finish within this many milliseconds of its start, or it
    /// is compensated. `None`: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The flow input's fields: a type (`amount: number`), or a type with
    /// `required` and `default` (`amount: { type: number, default: 0 }`).
    /// Checked, converted and completed when an instance starts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input: BTreeMap<String, InputField>,
    /// The tasks, in any order.
    pub tasks: Vec<TaskDefinition>,
}

/// The type of a flow input field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    /// A JSON string.
    String,
    /// Any JSON number.
    Number,
    /// A JSON number without fraction.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A JSON object.
    Object,
    /// A JSON array.
    Array,
    /// Anything (but it must be present).
    Any,
}

/// A declared flow input field: its type alone (required, no default), or
/// with `required` and `default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InputField {
    /// `amount: number`: required, no default.
    Type(ValueType),
    /// `amount: { type: number, required: false, default: 0 }`.
    Spec(InputSpec),
}

/// A flow input field with its rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Its type.
    #[serde(rename = "type")]
    pub ty: ValueType,
    /// Whether a start must give it (default: yes unless it has a default; a
    /// field with a default is never missing, and cannot also be required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    /// The value it takes when a start does not give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// What it is, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl InputField {
    /// Its type.
    pub fn ty(&self) -> ValueType {
        match self {
            InputField::Type(t) => *t,
            InputField::Spec(s) => s.ty,
        }
    }

    /// Whether a start must give it (and it has no default).
    pub fn required(&self) -> bool {
        match self {
            InputField::Type(_) => true,
            InputField::Spec(s) => s.required.unwrap_or(true) && s.default.is_none(),
        }
    }

    /// Its default, if any.
    pub fn default_value(&self) -> Option<&Value> {
        match self {
            InputField::Type(_) => None,
            InputField::Spec(s) => s.default.as_ref(),
        }
    }
}

impl From<ValueType> for InputField {
    fn from(ty: ValueType) -> Self {
        InputField::Type(ty)
    }
}

impl ValueType {
    /// `value` as this type, if it is one or converts unambiguously: a string
    /// holding an integer (`"42"`) for an integer, a number for a number, `"true"`
    /// or `"false"` for a boolean; a number without fraction (`42.0`) for an
    /// integer. Nothing becomes a string: a number where text is expected is
    /// more likely a mistake. `Err`: why not.
    pub fn convert(self, value: &Value) -> Result<Value, String> {
        if self.admits(value) {
            return Ok(value.clone());
        }
        let converted = match (self, value) {
            (ValueType::Integer, Value::String(s)) => s.trim().parse::<i64>().ok().map(Value::from),
            (ValueType::Integer, Value::Number(n)) => n
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| Value::from(f as i64)),
            (ValueType::Number, Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(|f| {
                    if f.fract() == 0.0 && f.abs() < 9.0e15 && !s.contains(['.', 'e', 'E']) {
                        Some(Value::from(f as i64))
                    } else {
                        serde_json::Number::from_f64(f).map(Value::Number)
                    }
                }),
            (ValueType::Boolean, Value::String(s)) => match s.trim() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            _ => None,
        };
        converted.ok_or_else(|| {
            format!(
                "must be {}, got {}",
                self.name(),
                match value {
                    Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
                    other => other.to_string(),
                }
            )
        })
    }

    /// Lower-case name, as written in definitions.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::String => "a string",
            ValueType::Number => "a number",
            ValueType::Integer => "an integer",
            ValueType::Boolean => "a boolean",
            ValueType::Object => "an object",
            ValueType::Array => "an array",
            ValueType::Any => "a value",
        }
    }

    /// Whether `value` has this type.
    pub fn admits(self, value: &Value) -> bool {
        match self {
            ValueType::String => value.is_string(),
            ValueType::Number => value.is_number(),
            ValueType::Integer => value.is_i64() || value.is_u64(),
            ValueType::Boolean => value.is_boolean(),
            ValueType::Object => value.is_object(),
            ValueType::Array => value.is_array(),
            ValueType::Any => !value.is_null(),
        }
    }
}

/// One task of a flow: either an `action` (optionally with a `compensate` action,
/// for sagas) or a `tcc` group of participants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDefinition {
    /// Unique within the flow.
    pub name: String,
    /// Tasks that must succeed before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Named input values: JSON, where strings may hold templates
    /// (`{{flow.input.x}}`, `{{tasks.<task>.output.x}}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input: BTreeMap<String, Value>,
    /// A condition (CEL) over `flow.input` and the upstream tasks' outputs
    /// (`tasks.<task>.output`): when it is false the task is skipped, with a
    /// `FlowTaskSkipped` event, and its dependants treat it as done with no
    /// output. Checked when the flow is registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Tasks among `depends_on` that must have run: if one of them was skipped
    /// by its condition, this task is skipped too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// What the task does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// A durable timer (instead of `action`): the task succeeds once it is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
    /// Waits for a named signal (instead of `action`): its payload becomes the
    /// task's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalWait>,
    /// Waits for an event in the log matching a query (instead of `action`):
    /// the event becomes the task's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub await_event: Option<AwaitEvent>,
    /// Starts a child instance of another flow (instead of `action`) and
    /// completes with the child's outputs; a child that fails or is
    /// compensated fails the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<SubFlow>,
    /// Runs the task once per item of an array (fan-out): each item is a
    /// step of its own (`<task>[<i>]`), with its own attempts, idempotency key
    /// and compensation, and `{{item}}` / `{{item_index}}` in its templates.
    /// The task's output is the items' outputs, in the items' order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<ForEach>,
    /// How to undo it when the flow is compensated (saga).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Action>,
    /// Try/confirm/cancel participants (instead of `action`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcc: Option<Tcc>,
    /// Retries of each attempt.
    #[serde(default)]
    pub retry: TaskRetry,
    /// Time allowed for one attempt, in milliseconds (default 30 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// What happens when the retries are exhausted.
    #[serde(default)]
    pub on_exhausted: OnExhausted,
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// A `wait` task's timer: a duration from when the task is reached, or an
/// instant from a template (an RFC 3339 timestamp, such as
/// `"{{flow.input.ship_at}}"`). Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    /// Milliseconds from when the task is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// An instant (templated, RFC 3339); one in the past is due at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// A `signal` task: waits for the signal `name`, sent with
/// [`Flows::signal`](crate::flow::Flows::signal) (or the API, the CLI, the
/// dashboard). A signal sent before the task is reached is kept and consumed
/// when it is; each signal is consumed once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalWait {
    /// The signal's name.
    pub name: String,
    /// Milliseconds to wait from when the task is reached; then the task fails
    /// (code `signal_timeout`) and `on_exhausted` applies. `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// An `await_event` task: waits until an event of one of `types` carrying
/// every one of `tags` (templated, e.g. `order:{{business_key}}`) is in the
/// log, whether it was appended before the task was reached or after, late
/// committers included. The first such event (by position) is the task's
/// output: `{position, type, tags, data, recorded_at}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwaitEvent {
    /// Event types, any of which matches (empty: any type).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// Tags the event must all carry (templated; at least one).
    pub tags: Vec<String>,
    /// Milliseconds to wait from when the task is reached; then the task fails
    /// (code `event_timeout`) and `on_exhausted` applies. `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A `flow` task: a child instance of flow `name` with `input` (templated),
/// started once per parent and task (idempotent), linked both ways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubFlow {
    /// The child's flow (its latest version when the task starts).
    pub name: String,
    /// The child's input (templated values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input: BTreeMap<String, Value>,
}

/// A task's fan-out: the items (a template that renders to an array, such as
/// `"{{tasks.order.output.lines}}"`) and how many of them run at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForEach {
    /// The array, as one template (`{{flow.input.lines}}`,
    /// `{{tasks.<task>.output.<field>}}`).
    pub items: String,
    /// Items running at once, at most (default 10).
    #[serde(default = "default_max_parallel")]
    pub max_parallel: u32,
}

fn default_max_parallel() -> u32 {
    10
}

/// The most items a `for_each` task runs (more fail the task, code
/// `for_each`).
pub const MAX_FOR_EACH_ITEMS: usize = 10_000;

/// What kind of task a definition is (by which of its fields is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskKind {
    /// Runs an action by an executor (with its compensation).
    Action,
    /// A try/confirm/cancel group.
    Tcc,
    /// A durable timer.
    Wait,
    /// Waits for a signal.
    Signal,
    /// Waits for an event in the log.
    AwaitEvent,
    /// Runs a child instance.
    SubFlow,
}

/// A try/confirm/cancel task: every participant's `try` (within `try_deadline_ms`),
/// then every `confirm`; or, if a try fails or the deadline passes, `cancel` for
/// each participant whose try was attempted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tcc {
    /// The participants, tried in parallel.
    pub participants: Vec<TccParticipant>,
    /// All tries must succeed within this many milliseconds of the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub try_deadline_ms: Option<u64>,
}

/// One participant of a [`Tcc`] task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TccParticipant {
    /// Unique within the task.
    pub name: String,
    /// Reserve.
    #[serde(rename = "try")]
    pub try_action: Action,
    /// Make the reservation final (retried until it succeeds).
    pub confirm: Action,
    /// Release the reservation (retried until it succeeds).
    pub cancel: Action,
}

/// What an attempt runs, by executor. Strings may hold templates: `{{input.k}}`
/// (the task's resolved input), `{{flow.input.x}}`, `{{tasks.<task>.output.x}}`,
/// `{{instance}}`, `{{idempotency_key}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "executor", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// An HTTP request; 2xx succeeds (the JSON response is the output), 408, 429,
    /// 5xx and connection errors are retryable, other statuses fatal.
    Http {
        /// HTTP method (default POST).
        #[serde(default = "default_method")]
        method: String,
        /// URL (templated).
        url: String,
        /// Extra headers (templated values).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        /// JSON body (templated); none for no body.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Value>,
    },
    /// SQL statements run on the store's database in the same transaction as the
    /// task's completion event: exactly once.
    Sql {
        /// Run in order.
        statements: Vec<SqlStatement>,
    },
    /// A message published to NATS through the outbox (at least once): the
    /// message is an event appended with the task's completion.
    Nats {
        /// Subject (templated).
        subject: String,
        /// JSON payload (templated).
        #[serde(default)]
        payload: Value,
    },
    /// A message published to RabbitMQ through the outbox (at least once, with
    /// publisher confirms, persistent, the idempotency key as `message_id`):
    /// the message is a `FlowAmqpMessage` event appended with the task's
    /// completion, relayed by [`Flows::amqp_relay`](crate::flow::Flows::amqp_relay).
    Amqp {
        /// The exchange (templated; default `""`, the default exchange, which
        /// routes to the queue named by the routing key).
        #[serde(default)]
        exchange: String,
        /// The routing key (templated).
        routing_key: String,
        /// JSON payload (templated).
        #[serde(default)]
        payload: Value,
    },
    /// A unary gRPC call (feature `grpc`): the request is built from the
    /// templated JSON `message` with the method's input type from a descriptor
    /// set registered with
    /// [`Flows::grpc_descriptor_set`](crate::flow::Flows::grpc_descriptor_set);
    /// the reply, as JSON (proto field names, defaults included), is the
    /// output. UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and ABORTED
    /// are retryable, other statuses fatal.
    Grpc {
        /// The server, `http://host:port` or `https://host:port` (templated).
        endpoint: String,
        /// The method, `package.Service/Method`.
        method: String,
        /// The name of the registered descriptor set that describes it.
        descriptor_set: String,
        /// The request as JSON (templated), in protobuf's JSON mapping.
        #[serde(default)]
        message: Value,
        /// Extra metadata (templated values; `idempotency-key` and
        /// `traceparent` are always sent).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        metadata: BTreeMap<String, String>,
    },
    /// A Rust function registered with the engine under this name.
    Rust {
        /// Registered name.
        function: String,
    },
}

fn default_method() -> String {
    "POST".into()
}

/// One SQL statement and its parameters. Parameters are passed as text (cast them
/// in the SQL: `$1::int`); JSON values other than strings are passed as JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlStatement {
    /// The statement.
    pub sql: String,
    /// Parameters `$1..` (templated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<Value>,
}

/// Retry policy of a task's attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskRetry {
    /// Attempts in all, the first included (default 3).
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds (default 100).
    pub initial_backoff_ms: u64,
    /// Longest delay, in milliseconds (default 10,000).
    pub max_backoff_ms: u64,
    /// Growth of the delay per retry (default 2).
    pub multiplier: f64,
    /// Only errors with these codes are retried (default: every error the
    /// executor classifies as retryable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<String>>,
}

impl Default for TaskRetry {
    fn default() -> Self {
        TaskRetry {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 10_000,
            multiplier: 2.0,
            retry_on: None,
        }
    }
}

impl TaskRetry {
    /// The delays between attempts as a [`Backoff`].
    pub fn as_backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.initial_backoff_ms),
            Duration::from_millis(self.max_backoff_ms),
        )
        .multiplier(self.multiplier)
    }

    /// The ceiling of the delay before retry number `retry` (1-based); the actual
    /// delay is drawn uniformly below it (full jitter).
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.as_backoff().ceiling(retry)
    }

    /// A jittered delay before retry number `retry`.
    pub fn delay(&self, retry: u32) -> Duration {
        self.as_backoff().delay(retry)
    }
}

/// What happens when a task's retries are exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Compensate the completed tasks in reverse order (default).
    #[default]
    Compensate,
    /// Pause the instance with an incident until an operator acts.
    Pause,
    /// Fail the instance without compensation (it stays as an incident).
    Fail,
}

/// The largest definition source accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;
/// The deepest nesting of brackets (or YAML indentation, in columns / 4)
/// accepted in a definition source.
pub const MAX_SOURCE_DEPTH: usize = 64;

/// Bounds a definition source before it is parsed (parsers are slow, some
/// quadratic, on deep nesting): its size, its bracket nesting, and for YAML how
/// far a line's content starts (block nesting needs indentation or `- `).
fn check_source(text: &str, what: &str, yaml: bool) -> Result<(), DefinitionError> {
    if text.len() > MAX_SOURCE_BYTES {
        return Err(DefinitionError::parse(
            what,
            format!(
                "the source is {} bytes, the limit is {MAX_SOURCE_BYTES}",
                text.len()
            ),
        ));
    }
    let (mut depth, mut deepest, mut in_string) = (0usize, 0usize, None::<u8>);
    let mut escaped = false;
    for b in text.bytes() {
        match in_string {
            Some(q) => {
                if b == b'\n' {
                    // Quoted strings rarely span lines; ending them here keeps an
                    // apostrophe in plain text from hiding the brackets after it.
                    in_string = None;
                } else if escaped {
                    escaped = false;
                } else if b == b'\\' && q == b'"' {
                    escaped = true;
                } else if b == q {
                    in_string = None;
                }
            }
            None => match b {
                b'"' | b'\'' => in_string = Some(b),
                b'[' | b'{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    let indented = if yaml {
        text.lines()
            .map(|l| {
                l.bytes()
                    .take_while(|b| matches!(b, b' ' | b'-' | b'\t'))
                    .count()
            })
            .max()
            .unwrap_or(0)
            / 4
    } else {
        0
    };
    if deepest.max(indented) > MAX_SOURCE_DEPTH {
        return Err(DefinitionError::parse(
            what,
            format!("the source is nested deeper than {MAX_SOURCE_DEPTH} levels"),
        ));
    }
    Ok(())
}

impl FlowDefinition {
    /// `input` checked against the declared fields, converted where that is
    /// unambiguous and completed with defaults: the input an instance starts
    /// with. Undeclared fields pass as they are. Every problem names its field.
    ///
    /// # Errors
    /// One line per problem.
    pub fn prepare_input(&self, input: &Value) -> Result<Value, Vec<String>> {
        if self.input.is_empty() {
            return Ok(input.clone());
        }
        let Some(obj) = input.as_object() else {
            return Err(vec!["the input must be a JSON object".into()]);
        };
        let mut out = obj.clone();
        let mut problems = Vec::new();
        for (name, field) in &self.input {
            match obj.get(name).filter(|v| !v.is_null()) {
                None => match field.default_value() {
                    Some(d) => {
                        out.insert(name.clone(), d.clone());
                    }
                    None if field.required() => problems.push(format!(
                        "field {name:?} is missing (it must be {})",
                        field.ty().name()
                    )),
                    None => {}
                },
                Some(v) => match field.ty().convert(v) {
                    Ok(c) => {
                        out.insert(name.clone(), c);
                    }
                    Err(e) => problems.push(format!("field {name:?} {e}")),
                },
            }
        }
        if problems.is_empty() {
            Ok(Value::Object(out))
        } else {
            Err(problems)
        }
    }

    /// A builder for a flow named `name`.
    pub fn builder(name: impl Into<String>) -> FlowBuilder {
        FlowBuilder {
            flow: FlowDefinition {
                name: name.into(),
                deadline_ms: None,
                input: BTreeMap::new(),
                tasks: Vec::new(),
            },
        }
    }

    /// Parses YAML (feature `yaml`).
    ///
    /// # Errors
    /// [`DefinitionError`] with the parser's message.
    #[cfg(feature = "yaml")]
    pub fn from_yaml(text: &str) -> Result<Self, DefinitionError> {
        check_source(text, "YAML", true)?;
        yaml_serde::from_str(text).map_err(|e| DefinitionError::parse("YAML", e))
    }

    /// Parses JSON.
    ///
    /// # Errors
    /// [`DefinitionError`] with the parser's message.
    pub fn from_json(text: &str) -> Result<Self, DefinitionError> {
        check_source(text, "JSON", false)?;
        serde_json::from_str(text).map_err(|e| DefinitionError::parse("JSON", e))
    }

    /// Parses TOML (feature `toml`).
    ///
    /// # Errors
    /// [`DefinitionError`] with the parser's message.
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Self, DefinitionError> {
        check_source(text, "TOML", false)?;
        toml::from_str(text).map_err(|e| DefinitionError::parse("TOML", e))
    }

    /// The file extensions [`from_file`](Self::from_file) reads in this build.
    pub const EXTENSIONS: &[&str] = &[
        #[cfg(feature = "yaml")]
        ".yaml",
        #[cfg(feature = "yaml")]
        ".yml",
        ".json",
        #[cfg(feature = "toml")]
        ".toml",
    ];

    /// Reads a `.yaml`/`.yml` (feature `yaml`), `.json` or `.toml` (feature
    /// `toml`) file.
    ///
    /// # Errors
    /// [`DefinitionError`] for an unreadable file, an unknown extension or a parse error.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, DefinitionError> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::metadata(path)
            && meta.len() > MAX_SOURCE_BYTES as u64
        {
            return Err(DefinitionError::parse(
                &path.display().to_string(),
                format!("the file is larger than {MAX_SOURCE_BYTES} bytes"),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| DefinitionError::parse(&path.display().to_string(), e))?;
        match path.extension().and_then(|e| e.to_str()) {
            #[cfg(feature = "yaml")]
            Some("yaml" | "yml") => Self::from_yaml(&text),
            Some("json") => Self::from_json(&text),
            #[cfg(feature = "toml")]
            Some("toml") => Self::from_toml(&text),
            _ => Err(DefinitionError::parse(
                &path.display().to_string(),
                format!(
                    "unknown extension (this build reads {})",
                    Self::EXTENSIONS.join(", ")
                ),
            )),
        }
    }

    /// The version: the first 16 hex digits of the SHA-256 of the definition's
    /// canonical JSON. Equal definitions have equal versions, whatever the source.
    pub fn version(&self) -> String {
        let json = serde_json::to_vec(self).expect("a definition serializes");
        let digest = Sha256::digest(&json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The task named `name`.
    pub fn task(&self, name: &str) -> Option<&TaskDefinition> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

impl TaskDefinition {
    /// The action `step` of this task runs: its action, its compensation, or the
    /// phase of one of its TCC participants.
    pub fn action_for(&self, step: &StepId) -> Option<&Action> {
        match step.phase {
            Phase::Action => self.action.as_ref(),
            Phase::Compensate => self.compensate.as_ref(),
            phase => {
                let p = self
                    .tcc
                    .as_ref()?
                    .participants
                    .iter()
                    .find(|p| Some(&p.name) == step.participant.as_ref())?;
                Some(match phase {
                    Phase::Try => &p.try_action,
                    Phase::Confirm => &p.confirm,
                    _ => &p.cancel,
                })
            }
        }
    }

    /// What kind of task this is (an action when nothing else is set).
    pub(crate) fn kind(&self) -> TaskKind {
        if self.tcc.is_some() {
            TaskKind::Tcc
        } else if self.wait.is_some() {
            TaskKind::Wait
        } else if self.signal.is_some() {
            TaskKind::Signal
        } else if self.await_event.is_some() {
            TaskKind::AwaitEvent
        } else if self.flow.is_some() {
            TaskKind::SubFlow
        } else {
            TaskKind::Action
        }
    }

    /// A task running `action`.
    pub fn new(name: impl Into<String>, action: Action) -> Self {
        TaskDefinition {
            name: name.into(),
            depends_on: Vec::new(),
            input: BTreeMap::new(),
            when: None,
            requires: Vec::new(),
            wait: None,
            signal: None,
            await_event: None,
            flow: None,
            for_each: None,
            action: Some(action),
            compensate: None,
            tcc: None,
            retry: TaskRetry::default(),
            timeout_ms: default_timeout_ms(),
            on_exhausted: OnExhausted::default(),
        }
    }

    /// A try/confirm/cancel task over `participants`.
    pub fn tcc(name: impl Into<String>, participants: Vec<TccParticipant>) -> Self {
        TaskDefinition {
            tcc: Some(Tcc {
                participants,
                try_deadline_ms: None,
            }),
            action: None,
            ..TaskDefinition::new(name, Action::rust(""))
        }
    }

    /// A timer task: succeeds `duration` after it is reached.
    pub fn wait(name: impl Into<String>, duration: Duration) -> Self {
        TaskDefinition {
            action: None,
            wait: Some(Wait {
                duration_ms: Some(duration.as_millis() as u64),
                until: None,
            }),
            ..TaskDefinition::new(name, Action::rust(""))
        }
    }

    /// A timer task: succeeds at the instant `until` renders to (a template
    /// giving an RFC 3339 timestamp).
    pub fn wait_until(name: impl Into<String>, until: impl Into<String>) -> Self {
        TaskDefinition {
            action: None,
            wait: Some(Wait {
                duration_ms: None,
                until: Some(until.into()),
            }),
            ..TaskDefinition::new(name, Action::rust(""))
        }
    }

    /// A task waiting for the signal `signal` (no time limit; see
    /// [`signal_timeout`](Self::signal_timeout)).
    pub fn signal(name: impl Into<String>, signal: impl Into<String>) -> Self {
        TaskDefinition {
            action: None,
            signal: Some(SignalWait {
                name: signal.into(),
                timeout_ms: None,
            }),
            ..TaskDefinition::new(name, Action::rust(""))
        }
    }

    /// A task waiting for an event of one of `types` (empty: any) carrying all
    /// of `tags` (templated) in the log.
    pub fn await_event<T, S, U, V>(name: impl Into<String>, types: T, tags: U) -> Self
    where
        T: IntoIterator<Item = S>,
        S: Into<String>,
        U: IntoIterator<Item = V>,
        V: Into<String>,
    {
        TaskDefinition {
            action: None,
            await_event: Some(AwaitEvent {
                types: types.into_iter().map(Into::into).collect(),
                tags: tags.into_iter().map(Into::into).collect(),
                timeout_ms: None,
            }),
            ..TaskDefinition::new(name, Action::rust(""))
        }
    }

    /// A task running a child instance of `flow` with `input` (templated
    /// values) and completing with its outputs.
    pub fn sub_flow(name: impl Into<String>, flow: impl Into<String>, input: Value) -> Self {
        let input = match input {
            Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        TaskDefinition {
            action: None,
            flow: Some(SubFlow {
                name: flow.into(),
                input,
            }),
            ..TaskDefinition::new(name, Action::rust(""))
        }
    }

    /// Sets how long a signal or await_event task waits before it fails
    /// (`on_exhausted` applies).
    #[must_use]
    pub fn signal_timeout(mut self, timeout: Duration) -> Self {
        let ms = Some(timeout.as_millis() as u64);
        if let Some(s) = &mut self.signal {
            s.timeout_ms = ms;
        }
        if let Some(a) = &mut self.await_event {
            a.timeout_ms = ms;
        }
        self
    }

    /// Runs the task once per item of `items` (a template rendering to an
    /// array), at most `max_parallel` at once.
    #[must_use]
    pub fn for_each(mut self, items: impl Into<String>, max_parallel: u32) -> Self {
        self.for_each = Some(ForEach {
            items: items.into(),
            max_parallel,
        });
        self
    }

    /// Runs only when the CEL condition `expression` is true (otherwise it is
    /// skipped).
    #[must_use]
    pub fn when(mut self, expression: impl Into<String>) -> Self {
        self.when = Some(expression.into());
        self
    }

    /// Is skipped if one of `tasks` (among its dependencies) was skipped by its
    /// condition.
    #[must_use]
    pub fn requires<I, S>(mut self, tasks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.requires.extend(tasks.into_iter().map(Into::into));
        self
    }

    /// Runs after `tasks` have succeeded.
    #[must_use]
    pub fn after<I, S>(mut self, tasks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.depends_on.extend(tasks.into_iter().map(Into::into));
        self
    }

    /// Adds an input value (may hold templates).
    #[must_use]
    pub fn input(mut self, name: impl Into<String>, value: Value) -> Self {
        self.input.insert(name.into(), value);
        self
    }

    /// Sets the compensation action.
    #[must_use]
    pub fn compensate(mut self, action: Action) -> Self {
        self.compensate = Some(action);
        self
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn retry(mut self, retry: TaskRetry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the per-attempt timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = timeout.as_millis() as u64;
        self
    }

    /// Sets what happens when retries are exhausted.
    #[must_use]
    pub fn on_exhausted(mut self, on_exhausted: OnExhausted) -> Self {
        self.on_exhausted = on_exhausted;
        self
    }

    /// Sets the TCC try deadline.
    #[must_use]
    pub fn try_deadline(mut self, deadline: Duration) -> Self {
        if let Some(tcc) = &mut self.tcc {
            tcc.try_deadline_ms = Some(deadline.as_millis() as u64);
        }
        self
    }
}

impl TaskRetry {
    /// `max_attempts` attempts with the default backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        TaskRetry {
            max_attempts,
            ..TaskRetry::default()
        }
    }

    /// Sets the backoff: `initial` doubling up to `max`.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff_ms = initial.as_millis() as u64;
        self.max_backoff_ms = max.as_millis() as u64;
        self
    }
}

impl Action {
    /// A registered Rust function.
    pub fn rust(function: impl Into<String>) -> Self {
        Action::Rust {
            function: function.into(),
        }
    }

    /// An HTTP request with a JSON body.
    pub fn http(method: &str, url: impl Into<String>, body: Option<Value>) -> Self {
        Action::Http {
            method: method.to_owned(),
            url: url.into(),
            headers: BTreeMap::new(),
            body,
        }
    }

    /// SQL statements with their parameters.
    pub fn sql<I, S>(statements: I) -> Self
    where
        I: IntoIterator<Item = (S, Vec<Value>)>,
        S: Into<String>,
    {
        Action::Sql {
            statements: statements
                .into_iter()
                .map(|(sql, params)| SqlStatement {
                    sql: sql.into(),
                    params,
                })
                .collect(),
        }
    }

    /// A unary gRPC call of `method` (`package.Service/Method`, described by
    /// the registered descriptor set `descriptor_set`) on `endpoint`.
    pub fn grpc(
        endpoint: impl Into<String>,
        method: impl Into<String>,
        descriptor_set: impl Into<String>,
        message: Value,
    ) -> Self {
        Action::Grpc {
            endpoint: endpoint.into(),
            method: method.into(),
            descriptor_set: descriptor_set.into(),
            message,
            metadata: BTreeMap::new(),
        }
    }

    /// Adds a metadata entry (a header) to a gRPC or HTTP action; other actions
    /// are returned unchanged.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        match &mut self {
            Action::Grpc { metadata, .. } => {
                metadata.insert(name.into(), value.into());
            }
            Action::Http { headers, .. } => {
                headers.insert(name.into(), value.into());
            }
            _ => {}
        }
        self
    }

    /// A NATS message through the outbox.
    pub fn nats(subject: impl Into<String>, payload: Value) -> Self {
        Action::Nats {
            subject: subject.into(),
            payload,
        }
    }
}

/// Builds a [`FlowDefinition`].
#[derive(Debug, Clone)]
#[must_use]
pub struct FlowBuilder {
    flow: FlowDefinition,
}

impl FlowBuilder {
    /// Declares a required flow input field.
    pub fn input(mut self, name: impl Into<String>, ty: ValueType) -> Self {
        self.flow.input.insert(name.into(), InputField::Type(ty));
        self
    }

    /// Declares a flow input field with a default (a start without it gets the
    /// default).
    pub fn input_default(mut self, name: impl Into<String>, ty: ValueType, default: Value) -> Self {
        self.flow.input.insert(
            name.into(),
            InputField::Spec(InputSpec {
                ty,
                required: None,
                default: Some(default),
                description: None,
            }),
        );
        self
    }

    /// Declares an optional flow input field (no default: absent when not given).
    pub fn input_optional(mut self, name: impl Into<String>, ty: ValueType) -> Self {
        self.flow.input.insert(
            name.into(),
            InputField::Spec(InputSpec {
                ty,
                required: Some(false),
                default: None,
                description: None,
            }),
        );
        self
    }

    /// Sets the flow deadline.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.flow.deadline_ms = Some(deadline.as_millis() as u64);
        self
    }

    /// Adds a task.
    pub fn task(mut self, task: TaskDefinition) -> Self {
        self.flow.tasks.push(task);
        self
    }

    /// The definition (validated when registered).
    pub fn build(self) -> FlowDefinition {
        self.flow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_or_huge_sources_are_refused_before_parsing() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        assert!(FlowDefinition::from_json(&deep).is_err());
        #[cfg(feature = "yaml")]
        {
            assert!(FlowDefinition::from_yaml(&deep).is_err());
            let dashes = format!("name: x\ntasks:\n{}- 1\n", "- ".repeat(50_000));
            let err = FlowDefinition::from_yaml(&dashes).unwrap_err();
            assert!(err.problems[0].contains("nested deeper"), "{err}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let huge = " ".repeat(MAX_SOURCE_BYTES + 1);
        assert!(FlowDefinition::from_json(&huge).unwrap_err().problems[0].contains("bytes"));
        // Brackets inside strings do not count.
        let quoted = format!(r#"{{"name": "{}", "tasks": []}}"#, "[".repeat(200));
        assert!(check_source(&quoted, "JSON", false).is_ok());
    }
}
