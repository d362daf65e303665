//! `/api/v1/instances`: start, list, show, timeline, and the operations retry,
//! skip, abort, pause and resume, one by one or in bulk by filter.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use dcbflow::flow::{
    InstanceCursor, InstanceFilter, InstanceState, InstanceStatus, StepId, StepStatus,
};
use dcbflow::{Position, SequencedEvent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{JsonBody, Params, created, operator};
use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// `POST /api/v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The flow to start (its newest version).
    pub flow: String,
    /// A business key: starting again with the same key returns the first instance.
    #[serde(default)]
    pub business_key: Option<String>,
    /// The flow's input.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub input: Value,
}

/// A started (or found) instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Started {
    /// Instance id.
    pub id: Uuid,
    /// The definition version it runs on.
    pub definition_version: String,
    /// `false` when an instance with the business key already existed.
    pub created: bool,
}

/// A row of the instance list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceRow {
    /// Instance id.
    pub id: Uuid,
    /// Flow name.
    pub flow: String,
    /// Definition version.
    pub definition_version: String,
    /// Business key.
    pub business_key: Option<String>,
    /// Status.
    pub status: String,
    /// Started.
    pub started_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Its version: pass it as `seen` to operations.
    pub seen: i64,
}

/// A page of instances, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstancePage {
    /// The instances.
    pub items: Vec<InstanceRow>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters of the instance list (and of bulk operations).
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only this status (`running`, `compensating`, `paused`, `completed`,
    /// `compensated`, `compensation_failed`, `failed`).
    pub status: Option<String>,
    /// Only this business key.
    pub business_key: Option<String>,
    /// Business keys containing this text (case-insensitive).
    pub q: Option<String>,
    /// Started at or after (RFC 3339).
    pub started_after: Option<DateTime<Utc>>,
    /// Started before (RFC 3339).
    pub started_before: Option<DateTime<Utc>>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// At most this many (default 50, at most 1000).
    pub limit: Option<i64>,
}

impl ListParams {
    /// The library filter.
    ///
    /// # Errors
    /// 400 naming a bad status or cursor.
    pub fn filter(&self) -> ApiResult<InstanceFilter> {
        let mut f = InstanceFilter::default();
        f.flow = self.flow.clone();
        f.status = self.status.as_deref().map(parse_status).transpose()?;
        f.business_key = self.business_key.clone();
        f.key_contains = self.q.clone().filter(|q| !q.is_empty());
        f.started_after = self.started_after;
        f.started_before = self.started_before;
        f.page_after = self
            .cursor
            .as_deref()
            .map(|c| {
                c.parse::<InstanceCursor>().map_err(|_| {
                    ApiError::bad_field("cursor", "not a cursor this server handed out")
                })
            })
            .transpose()?;
        let limit = self.limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::bad_field("limit", "must be 1 to 1000"));
        }
        f.limit = Some(limit);
        Ok(f)
    }
}

/// A status by name.
///
/// # Errors
/// 400 naming `status`.
pub fn parse_status(s: &str) -> ApiResult<InstanceStatus> {
    serde_json::from_value(Value::String(s.to_owned())).map_err(|_| {
        ApiError::bad_field(
            "status",
            format!("unknown status {s:?} (running, compensating, paused, completed, compensated, compensation_failed, failed)"),
        )
    })
}

/// One step of an instance, as shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StepView {
    /// `<task>[.<participant>]/<phase>`, or `<task>[<item>]/<phase>` for an
    /// item of a `for_each` task.
    pub key: String,
    /// Task name.
    pub task: String,
    /// The item's index, for a step of one item of a `for_each` task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// `action`, `compensate`, `try`, `confirm`, `cancel`.
    pub phase: String,
    /// Status.
    pub status: String,
    /// Attempts started.
    pub attempts: u32,
    /// The worker of the running attempt.
    pub worker: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// First attempt's start.
    pub started_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// From the first attempt's start to the last change, once finished.
    pub duration_ms: Option<i64>,
    /// Next attempt due; for a waiting step, its timer's time or its signal's
    /// timeout.
    pub due_at: Option<DateTime<Utc>>,
    /// The signal a waiting signal step waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The event a waiting await_event step waits for: `{types, tags}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub awaits: Option<Value>,
    /// Why the task was skipped without running (its condition was false, or a
    /// task it requires was skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    /// Where its time went.
    pub timings: TimingsView,
    /// A `flow` task's child instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<Uuid>,
}

/// A link between a parent instance and a child it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceLink {
    /// The other instance.
    pub id: Uuid,
    /// The parent's `flow` task.
    pub task: String,
}

/// Where a step's time went, in milliseconds (a per-stage profile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimingsView {
    /// Waiting for a worker once due, summed over attempts.
    pub queued_ms: u64,
    /// Running, summed over attempts.
    pub running_ms: u64,
    /// Backing off between attempts.
    pub backoff_ms: u64,
    /// Waiting for a timer, a signal or an event.
    pub waiting_ms: u64,
}

/// A signal an instance received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SignalView {
    /// Its name.
    pub name: String,
    /// The sender's id for it.
    pub id: String,
    /// What it carries.
    #[schema(value_type = Value)]
    pub payload: Value,
    /// When it was received.
    pub at: DateTime<Utc>,
    /// The task that consumed it (none yet: kept until a signal task is reached).
    pub consumed_by: Option<String>,
}

/// An instance: its state, steps and outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceView {
    /// Instance id.
    pub id: Uuid,
    /// Flow name.
    pub flow: String,
    /// Definition version.
    pub definition_version: String,
    /// Business key.
    pub business_key: Option<String>,
    /// Status.
    pub status: String,
    /// Why it is compensating, paused or failed.
    pub reason: Option<String>,
    /// Its version: pass it as `seen` to operations.
    pub seen: i64,
    /// Input.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Outputs by task.
    #[schema(value_type = Object)]
    pub outputs: Value,
    /// Steps, in the order they first started.
    pub steps: Vec<StepView>,
    /// Signals received, oldest first.
    pub signals: Vec<SignalView>,
    /// The instance that started this one (a `flow` task's child).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<InstanceLink>,
    /// The child instances its `flow` tasks started.
    pub children: Vec<InstanceLink>,
    /// Started.
    pub started_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Deadline.
    pub deadline_at: Option<DateTime<Utc>>,
    /// Events folded.
    pub events: u64,
}

impl From<&InstanceState> for InstanceView {
    fn from(s: &InstanceState) -> Self {
        let mut steps: Vec<StepView> = s
            .steps
            .values()
            .map(|st| {
                let done = matches!(
                    st.status,
                    StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped
                );
                StepView {
                    key: st.step.key(),
                    task: st.step.task.clone(),
                    item: st.step.item,
                    phase: st.step.phase.as_str().to_owned(),
                    status: enum_name(&st.status),
                    attempts: st.attempts,
                    worker: st.worker.clone(),
                    error: st.error.clone(),
                    started_at: st.first_started,
                    updated_at: st.updated_at,
                    duration_ms: st
                        .first_started
                        .filter(|_| done)
                        .map(|f| (st.updated_at - f).num_milliseconds()),
                    due_at: st.due_at,
                    signal: st
                        .signal
                        .clone()
                        .filter(|_| st.status == StepStatus::Waiting),
                    awaits: st
                        .event
                        .as_ref()
                        .filter(|_| st.status == StepStatus::Waiting)
                        .and_then(|e| serde_json::to_value(e).ok()),
                    skip_reason: st.skip_reason.clone(),
                    timings: TimingsView {
                        queued_ms: st.timings.queued_ms,
                        running_ms: st.timings.running_ms,
                        backoff_ms: st.timings.backoff_ms,
                        waiting_ms: st.timings.waiting_ms,
                    },
                    child: st.child,
                }
            })
            .collect();
        steps.sort_by_key(|s| (s.started_at, s.key.clone()));
        InstanceView {
            id: s.id,
            flow: s.flow.clone(),
            definition_version: s.definition_version.clone(),
            business_key: s.business_key.clone(),
            status: s.status.as_str().to_owned(),
            reason: s.reason.clone(),
            seen: s.last_position.0,
            input: s.input.clone(),
            outputs: serde_json::to_value(&s.outputs).unwrap_or_default(),
            steps,
            signals: s
                .signals
                .iter()
                .map(|g| SignalView {
                    name: g.name.clone(),
                    id: g.signal_id.clone(),
                    payload: g.payload.clone(),
                    at: g.at,
                    consumed_by: g.consumed_by.clone(),
                })
                .collect(),
            parent: s.parent.as_ref().map(|p| InstanceLink {
                id: p.instance,
                task: p.task.clone(),
            }),
            children: s
                .steps
                .values()
                .filter_map(|st| {
                    st.child.map(|id| InstanceLink {
                        id,
                        task: st.step.task.clone(),
                    })
                })
                .collect(),
            started_at: s.started_at,
            updated_at: s.updated_at,
            deadline_at: s.deadline_at,
            events: s.events,
        }
    }
}

/// The snake_case name serde gives a unit variant.
pub fn enum_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// An event as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// Position in the log.
    pub position: i64,
    /// Type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Payload (any JSON).
    #[schema(value_type = Value)]
    pub data: Value,
    /// Metadata, if any (any JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub metadata: Option<Value>,
    /// The writing transaction's id (xid8).
    pub transaction_id: String,
    /// Its idempotency id, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
}

impl From<&SequencedEvent> for EventView {
    fn from(e: &SequencedEvent) -> Self {
        EventView {
            position: e.position.0,
            event_type: e.event_type().to_owned(),
            tags: e.tags().to_vec(),
            data: e.data().clone(),
            metadata: e.event.metadata.clone(),
            transaction_id: e.transaction_id.to_string(),
            id: e.event.id,
            recorded_at: e.recorded_at,
        }
    }
}

/// An instance's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Timeline {
    /// Instance id.
    pub id: Uuid,
    /// Its events, oldest first.
    pub events: Vec<EventView>,
}

/// `seen`, `actor` and `reason` of an operation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationRequest {
    /// The instance's `seen` when you looked: refused with 409 `moved` if it changed.
    pub seen: i64,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// The step to retry (`retry` only): a step key or a task name (its action);
    /// default: the failed or waiting step, if there is exactly one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// `POST /api/v1/instances/{id}/skip`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipRequest {
    /// The task to mark done.
    pub task: String,
    /// Its output.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub output: Value,
    /// The instance's `seen` when you looked.
    pub seen: i64,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// `POST /api/v1/instances/bulk`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// `retry`, `abort`, `pause` or `resume`.
    pub operation: String,
    /// Which instances (as the list's parameters; `cursor` and `limit` are ignored).
    pub filter: ListParams,
    /// Only count the instances it would act on.
    #[serde(default)]
    pub dry_run: bool,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// What a bulk operation did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BulkResult {
    /// Instances matching the filter.
    pub matched: i64,
    /// Instances acted on (0 for a dry run).
    pub acted: usize,
    /// Instances it could not act on, with why (they moved, or the operation
    /// does not apply to their state).
    pub refused: Vec<BulkRefusal>,
    /// Whether it was a dry run.
    pub dry_run: bool,
}

/// An instance a bulk operation left alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BulkRefusal {
    /// Instance id.
    pub id: Uuid,
    /// The problem code (`moved`, `not_allowed`, ...).
    pub code: String,
    /// Why.
    pub detail: String,
}

/// Starts an instance (idempotent with a business key).
#[utoipa::path(post, path = "/api/v1/instances", tag = "instances", request_body = StartRequest,
    responses(
        (status = 201, description = "Started", body = Started),
        (status = 200, description = "An instance with this business key existed", body = Started),
        (status = 404, description = "Unknown flow", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "The input does not match", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn start(
    State(app): State<App>,
    JsonBody(req): JsonBody<StartRequest>,
) -> ApiResult<Response> {
    let s = start_instance(&app, &req).await?;
    Ok(created(s.created, s))
}

/// Starts an instance.
///
/// # Errors
/// 404 unknown flow, 422 input mismatch.
pub async fn start_instance(app: &App, req: &StartRequest) -> ApiResult<Started> {
    if req.flow.is_empty() {
        return Err(ApiError::bad_field("flow", "must not be empty"));
    }
    if req
        .business_key
        .as_deref()
        .is_some_and(|k| k.is_empty() || k.len() > 200)
    {
        return Err(ApiError::bad_field("business_key", "1 to 200 bytes"));
    }
    let s = app
        .flows
        .start(&req.flow, req.business_key.as_deref(), req.input.clone())
        .await?;
    Ok(Started {
        id: s.instance,
        definition_version: s.definition_version,
        created: s.created,
    })
}

/// Lists instances, newest first, by filter.
#[utoipa::path(get, path = "/api/v1/instances", tag = "instances", params(ListParams),
    responses((status = 200, body = InstancePage), (status = 400, body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn list(
    State(app): State<App>,
    Params(p): Params<ListParams>,
) -> ApiResult<Json<InstancePage>> {
    Ok(Json(list_instances(&app, &p).await?))
}

/// A page of instances.
///
/// # Errors
/// 400 for bad filters; store errors.
pub async fn list_instances(app: &App, p: &ListParams) -> ApiResult<InstancePage> {
    let filter = p.filter()?;
    let limit = filter.limit.unwrap_or(50) as usize;
    let rows = app.flows.instances(&filter).await?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.cursor().to_string()))
        .flatten();
    Ok(InstancePage {
        items: rows
            .into_iter()
            .map(|r| InstanceRow {
                id: r.id,
                flow: r.flow,
                definition_version: r.definition_version,
                business_key: r.business_key,
                status: r.status,
                started_at: r.started_at,
                updated_at: r.updated_at,
                seen: r.last_position.0,
            })
            .collect(),
        next_cursor,
    })
}

/// Shows an instance.
#[utoipa::path(get, path = "/api/v1/instances/{id}", tag = "instances",
    params(("id" = Uuid, Path, description = "Instance id")),
    responses((status = 200, body = InstanceView), (status = 404, body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn show(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<InstanceView>> {
    Ok(Json(show_instance(&app, parse_id(&id)?).await?))
}

/// An instance id from a path.
///
/// # Errors
/// 400 naming `id`.
pub fn parse_id(id: &str) -> ApiResult<Uuid> {
    id.parse()
        .map_err(|_| ApiError::bad_field("id", format!("{id:?} is not an instance id (a UUID)")))
}

/// An instance's view.
///
/// # Errors
/// 404.
pub async fn show_instance(app: &App, id: Uuid) -> ApiResult<InstanceView> {
    let state = app
        .flows
        .instance(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no instance {id}")))?;
    Ok(InstanceView::from(&state))
}

/// An instance's events, oldest first.
#[utoipa::path(get, path = "/api/v1/instances/{id}/timeline", tag = "instances",
    params(("id" = Uuid, Path, description = "Instance id")),
    responses((status = 200, body = Timeline), (status = 404, body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn timeline(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<Timeline>> {
    Ok(Json(instance_timeline(&app, parse_id(&id)?).await?))
}

/// An instance's timeline.
///
/// # Errors
/// 404.
pub async fn instance_timeline(app: &App, id: Uuid) -> ApiResult<Timeline> {
    let events = app.flows.timeline(id).await?;
    if events.is_empty() {
        return Err(ApiError::not_found(format!("no instance {id}")));
    }
    Ok(Timeline {
        id,
        events: events.iter().map(EventView::from).collect(),
    })
}

/// The operations on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Retry a failed or waiting step now.
    Retry,
    /// Abort (compensate what completed).
    Abort,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
}

impl Operation {
    /// By name.
    ///
    /// # Errors
    /// 400 naming `operation`.
    pub fn parse(s: &str) -> ApiResult<Self> {
        Ok(match s {
            "retry" => Operation::Retry,
            "abort" => Operation::Abort,
            "pause" => Operation::Pause,
            "resume" => Operation::Resume,
            other => {
                return Err(ApiError::bad_field(
                    "operation",
                    format!("{other:?} is not retry, abort, pause or resume"),
                ));
            }
        })
    }
}

/// The step `retry` acts on: `step` (a key, or a task's action), or the one
/// failed or waiting step.
fn retry_step(state: &InstanceState, step: Option<&str>) -> ApiResult<StepId> {
    if let Some(s) = step {
        return Ok(state
            .steps
            .get(s)
            .map(|st| st.step.clone())
            .or_else(|| StepId::parse_key(s))
            .unwrap_or_else(|| StepId::new(s, dcbflow::flow::Phase::Action)));
    }
    let failed: Vec<&StepId> = state
        .steps
        .values()
        .filter(|s| matches!(s.status, StepStatus::Failed | StepStatus::RetryDue))
        .map(|s| &s.step)
        .collect();
    match failed.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(ApiError::conflict(
            "not_allowed",
            "no step is failed or waiting for a retry",
        )),
        many => Err(ApiError::bad_field(
            "step",
            format!(
                "several steps could be retried ({}); name one",
                many.iter().map(|s| s.key()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Runs `op` on instance `id` as the operator of `req`.
///
/// # Errors
/// 404, 409 `moved` / `not_allowed`, 422 without actor or reason.
pub async fn operate(
    app: &App,
    id: Uuid,
    op: Operation,
    req: &OperationRequest,
) -> ApiResult<InstanceView> {
    let by = operator(&req.actor, &req.reason)?;
    if req.seen < 0 {
        return Err(ApiError::bad_field("seen", "must not be negative"));
    }
    let seen = Position(req.seen);
    let state = match op {
        Operation::Retry => {
            let current = app
                .flows
                .instance(id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("no instance {id}")))?;
            let step = retry_step(&current, req.step.as_deref())?;
            app.flows.retry_now(id, &step, seen, &by).await
        }
        Operation::Abort => app.flows.abort(id, seen, &by).await,
        Operation::Pause => app.flows.pause(id, seen, &by).await,
        Operation::Resume => app.flows.resume(id, seen, &by).await,
    }?;
    Ok(InstanceView::from(&state))
}

macro_rules! operation {
    ($name:ident, $op:expr, $path:literal, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "instances", request_body = OperationRequest,
            params(("id" = Uuid, Path, description = "Instance id")),
            responses(
                (status = 200, description = "Done: the instance now", body = InstanceView),
                (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
                (status = 409, description = "`moved`: it changed since you looked; `not_allowed`: not in its state", body = crate::error::Problem, content_type = "application/problem+json"),
                (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
            ))]
        pub async fn $name(
            State(app): State<App>,
            Path(id): Path<String>,
            JsonBody(req): JsonBody<OperationRequest>,
        ) -> ApiResult<Json<InstanceView>> {
            Ok(Json(operate(&app, parse_id(&id)?, $op, &req).await?))
        }
    };
}

operation!(
    retry,
    Operation::Retry,
    "/api/v1/instances/{id}/retry",
    "Retries a failed or waiting step now, with a fresh budget of attempts."
);
operation!(
    abort,
    Operation::Abort,
    "/api/v1/instances/{id}/abort",
    "Aborts the instance: no new task starts, completed ones are compensated."
);
operation!(
    pause,
    Operation::Pause,
    "/api/v1/instances/{id}/pause",
    "Pauses the instance: no new step starts."
);
operation!(
    resume,
    Operation::Resume,
    "/api/v1/instances/{id}/resume",
    "Resumes a paused instance."
);

/// Marks a task done with an output, without running it.
#[utoipa::path(post, path = "/api/v1/instances/{id}/skip", tag = "instances", request_body = SkipRequest,
    params(("id" = Uuid, Path, description = "Instance id")),
    responses(
        (status = 200, description = "Done: the instance now", body = InstanceView),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn skip(
    State(app): State<App>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<SkipRequest>,
) -> ApiResult<Json<InstanceView>> {
    Ok(Json(skip_task(&app, parse_id(&id)?, &req).await?))
}

/// Skips a task.
///
/// # Errors
/// As [`operate`].
pub async fn skip_task(app: &App, id: Uuid, req: &SkipRequest) -> ApiResult<InstanceView> {
    let by = operator(&req.actor, &req.reason)?;
    if req.seen < 0 {
        return Err(ApiError::bad_field("seen", "must not be negative"));
    }
    let state = app
        .flows
        .skip(id, &req.task, req.output.clone(), Position(req.seen), &by)
        .await?;
    Ok(InstanceView::from(&state))
}

/// A signal to send to an instance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The signal's name (what a `signal` task waits for).
    pub name: String,
    /// Your id for this signal: sending it again changes nothing. Default: a
    /// new UUID (so a retried request sends a second signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What it carries: the consuming task's output.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub payload: Value,
    /// Who sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Why (recorded with the signal: an approver's note).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Sends a signal to an instance: a `signal` task waiting for its name
/// consumes it and completes with its payload; one not reached yet consumes it
/// when it is. Idempotent by `id`.
#[utoipa::path(post, path = "/api/v1/instances/{id}/signals", tag = "instances", request_body = SignalRequest,
    params(("id" = Uuid, Path, description = "Instance id")),
    responses(
        (status = 200, description = "Sent (or sent before with this id): the instance now", body = InstanceView),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`not_allowed`: no task waits for this signal, every one is done, the instance is over, or the id was used for another signal", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 400, description = "An empty name or a bad id", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn signal(
    State(app): State<App>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<SignalRequest>,
) -> ApiResult<Json<InstanceView>> {
    Ok(Json(send_signal(&app, parse_id(&id)?, &req).await?))
}

/// Sends a signal.
///
/// # Errors
/// 404, 409 `not_allowed`, 400 for an empty name or a bad id.
pub async fn send_signal(app: &App, id: Uuid, req: &SignalRequest) -> ApiResult<InstanceView> {
    if req.name.trim().is_empty() {
        return Err(ApiError::bad_field("name", "must not be empty"));
    }
    let signal_id = req.id.clone().unwrap_or_else(|| Uuid::new_v4().to_string());
    if signal_id.trim().is_empty() || signal_id.len() > dcbflow::flow::MAX_SIGNAL_ID {
        return Err(ApiError::bad_field(
            "id",
            format!("must be 1 to {} bytes", dcbflow::flow::MAX_SIGNAL_ID),
        ));
    }
    let mut signal = dcbflow::flow::Signal::new(&req.name, signal_id).payload(req.payload.clone());
    if let Some(actor) = req.actor.as_deref().filter(|a| !a.trim().is_empty()) {
        signal = signal.actor(actor);
    }
    if let Some(reason) = req.reason.as_deref().filter(|r| !r.trim().is_empty()) {
        signal = signal.reason(reason);
    }
    let state = app.flows.signal(id, signal).await?;
    Ok(InstanceView::from(&state))
}

/// Runs an operation on every instance matching a filter, at most
/// `api.bulk_per_second` instances per second; `dry_run` only counts them.
#[utoipa::path(post, path = "/api/v1/instances/bulk", tag = "instances", request_body = BulkRequest,
    responses(
        (status = 200, body = BulkResult),
        (status = 400, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn bulk(
    State(app): State<App>,
    JsonBody(req): JsonBody<BulkRequest>,
) -> ApiResult<Json<BulkResult>> {
    Ok(Json(bulk_operate(&app, &req, &mut |_, _| {}).await?))
}

/// A bulk operation; `progress(done, total)` is called after each instance.
///
/// # Errors
/// 400 for a bad filter or operation, 422 without actor or reason, 409 when
/// more instances match than `api.bulk_max`.
pub async fn bulk_operate(
    app: &App,
    req: &BulkRequest,
    progress: &mut (dyn FnMut(usize, i64) + Send),
) -> ApiResult<BulkResult> {
    let op = Operation::parse(&req.operation)?;
    operator(&req.actor, &req.reason)?;
    let mut filter = req.filter.clone();
    filter.cursor = None;
    filter.limit = Some(200);
    let lib_filter = filter.filter()?;
    let matched = app.flows.count_instances(&lib_filter).await?;
    if req.dry_run {
        return Ok(BulkResult {
            matched,
            acted: 0,
            refused: Vec::new(),
            dry_run: true,
        });
    }
    let max = i64::from(app.config.api.bulk_max);
    if matched > max {
        return Err(ApiError::conflict(
            "not_allowed",
            format!(
                "{matched} instances match, more than one bulk operation may act on ({max}); narrow the filter"
            ),
        ));
    }
    let pace = Duration::from_secs_f64(1.0 / f64::from(app.config.api.bulk_per_second.max(1)));
    let mut ticker = tokio::time::interval(pace);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut acted, mut refused, mut done) = (0, Vec::new(), 0);
    // The ids first, then act: acting changes what the filter matches.
    let mut ids = Vec::new();
    loop {
        let page = list_instances(app, &filter).await?;
        ids.extend(page.items.iter().map(|r| (r.id, r.seen)));
        match page.next_cursor {
            Some(c) if (ids.len() as i64) < max => filter.cursor = Some(c),
            _ => break,
        }
    }
    for (id, seen) in ids {
        ticker.tick().await;
        let one = OperationRequest {
            seen,
            actor: req.actor.clone(),
            reason: req.reason.clone(),
            step: None,
        };
        match operate(app, id, op, &one).await {
            Ok(_) => acted += 1,
            Err(e) if e.status.is_client_error() => refused.push(BulkRefusal {
                id,
                code: e.code.to_owned(),
                detail: e.detail,
            }),
            Err(e) => return Err(e),
        }
        done += 1;
        progress(done, matched);
    }
    Ok(BulkResult {
        matched,
        acted,
        refused,
        dry_run: false,
    })
}
