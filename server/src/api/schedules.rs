//! `/api/v1/schedules`: cron schedules that start flow instances, exactly one
//! per tick whatever the number of workers.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use dcbflow::flow::{MissedTicks, Schedule, ScheduleState};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{JsonBody, operator};
use crate::app::App;
use crate::error::ApiResult;

/// A schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleView {
    /// Its name.
    pub name: String,
    /// The flow it starts.
    pub flow: String,
    /// The cron expression (seconds first).
    pub cron: String,
    /// Its time zone.
    pub timezone: String,
    /// Each instance's input.
    #[schema(value_type = Object)]
    pub input: Value,
    /// `skip` or `run_once`: what happens to ticks missed while no worker ran.
    pub missed: String,
    /// Paused: no tick starts an instance.
    pub paused: bool,
    /// When it was last set.
    pub set_at: DateTime<Utc>,
    /// Who set, paused or resumed it last.
    pub changed_by: Option<String>,
    /// The last tick an instance was started for.
    pub last_tick: Option<DateTime<Utc>>,
    /// The next tick (none while paused).
    pub next_tick: Option<DateTime<Utc>>,
}

impl From<&ScheduleState> for ScheduleView {
    fn from(s: &ScheduleState) -> Self {
        ScheduleView {
            name: s.schedule.name.clone(),
            flow: s.schedule.flow.clone(),
            cron: s.schedule.cron.clone(),
            timezone: s.schedule.timezone.clone(),
            input: s.schedule.input.clone(),
            missed: match s.schedule.missed {
                MissedTicks::Skip => "skip".into(),
                MissedTicks::RunOnce => "run_once".into(),
            },
            paused: s.paused,
            set_at: s.set_at,
            changed_by: s.changed_by.clone(),
            last_tick: s.last_tick,
            next_tick: s.next_tick,
        }
    }
}

/// The schedules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    /// By name.
    pub items: Vec<ScheduleView>,
}

/// A schedule to create or change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// The flow it starts.
    pub flow: String,
    /// A cron expression with seconds first, e.g. `0 */5 * * * *`.
    pub cron: String,
    /// An IANA time zone (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Each instance's input (default `{}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// `skip` (default) or `run_once`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<String>,
    /// Who sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

/// Who pauses or resumes a schedule, and why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleChange {
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// Lists the schedules.
#[utoipa::path(get, path = "/api/v1/schedules", tag = "flows",
    responses((status = 200, body = ScheduleList)))]
pub async fn list(State(app): State<App>) -> ApiResult<Json<ScheduleList>> {
    Ok(Json(list_schedules(&app).await?))
}

/// The schedules.
///
/// # Errors
/// Store errors.
pub async fn list_schedules(app: &App) -> ApiResult<ScheduleList> {
    let items = app.flows.schedules().await?;
    Ok(ScheduleList {
        items: items.iter().map(ScheduleView::from).collect(),
    })
}

/// Creates or changes a schedule; ticks from now on start instances.
#[utoipa::path(put, path = "/api/v1/schedules/{name}", tag = "flows", request_body = ScheduleRequest,
    params(("name" = String, Path, description = "Schedule name")),
    responses(
        (status = 200, body = ScheduleView),
        (status = 400, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such flow", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`schedule_invalid` or `input_mismatch`, each problem naming its field", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn set(
    State(app): State<App>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ScheduleRequest>,
) -> ApiResult<Json<ScheduleView>> {
    Ok(Json(set_schedule(&app, &name, &req).await?))
}

/// Sets a schedule.
///
/// # Errors
/// 404 for an unknown flow, 422 for an invalid schedule or input.
pub async fn set_schedule(app: &App, name: &str, req: &ScheduleRequest) -> ApiResult<ScheduleView> {
    let missed = match req.missed.as_deref() {
        None | Some("skip") => MissedTicks::Skip,
        Some("run_once") => MissedTicks::RunOnce,
        Some(other) => {
            return Err(crate::error::ApiError::bad_field(
                "missed",
                format!("{other:?} is not skip or run_once"),
            ));
        }
    };
    let schedule = Schedule {
        name: name.to_owned(),
        flow: req.flow.clone(),
        cron: req.cron.clone(),
        timezone: req.timezone.clone().unwrap_or_else(|| "UTC".into()),
        input: req
            .input
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default())),
        missed,
    };
    let state = app
        .flows
        .set_schedule(&schedule, req.actor.as_deref())
        .await?;
    Ok(ScheduleView::from(&state))
}

/// Pauses a schedule: no tick starts an instance until it is resumed.
#[utoipa::path(post, path = "/api/v1/schedules/{name}/pause", tag = "flows", request_body = ScheduleChange,
    params(("name" = String, Path, description = "Schedule name")),
    responses(
        (status = 200, body = ScheduleView),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn pause(
    State(app): State<App>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ScheduleChange>,
) -> ApiResult<Json<ScheduleView>> {
    Ok(Json(change_schedule(&app, &name, true, &req).await?))
}

/// Resumes a paused schedule.
#[utoipa::path(post, path = "/api/v1/schedules/{name}/resume", tag = "flows", request_body = ScheduleChange,
    params(("name" = String, Path, description = "Schedule name")),
    responses(
        (status = 200, body = ScheduleView),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume(
    State(app): State<App>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ScheduleChange>,
) -> ApiResult<Json<ScheduleView>> {
    Ok(Json(change_schedule(&app, &name, false, &req).await?))
}

/// Pauses (`pause`) or resumes a schedule.
///
/// # Errors
/// 404, 422 without actor or reason.
pub async fn change_schedule(
    app: &App,
    name: &str,
    pause: bool,
    req: &ScheduleChange,
) -> ApiResult<ScheduleView> {
    let by = operator(&req.actor, &req.reason)?;
    let state = if pause {
        app.flows.pause_schedule(name, &by).await?
    } else {
        app.flows.resume_schedule(name, &by).await?
    };
    Ok(ScheduleView::from(&state))
}
