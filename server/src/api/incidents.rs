//! `/api/v1/incidents` (the seeds call them exceptions): failed or stuck
//! steps, grouped by flow, task, kind and error; acknowledged with a note (an
//! event on the instance) or retried.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use dcbflow::Position;
use dcbflow::flow::{IncidentFilter, IncidentGroup};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::instances::InstanceView;
use super::{JsonBody, Params, operator};
use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// A group of open incidents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    /// The group's stable id.
    pub id: String,
    /// Flow.
    pub flow: String,
    /// Task.
    pub task: String,
    /// `exhausted`, `compensation_failed`, `timed_out`, `paused`.
    pub kind: String,
    /// The error.
    pub error: String,
    /// Instances affected.
    pub instance_count: i64,
    /// Of which acknowledged.
    pub acknowledged: i64,
    /// Failed attempts in all.
    pub occurrences: i64,
    /// First seen.
    pub first_seen: DateTime<Utc>,
    /// Last seen.
    pub last_seen: DateTime<Utc>,
    /// The first instances (at most 100).
    pub instances: Vec<Uuid>,
}

impl From<IncidentGroup> for GroupView {
    fn from(g: IncidentGroup) -> Self {
        GroupView {
            id: g.id,
            flow: g.flow,
            task: g.task,
            kind: g.kind,
            error: g.error,
            instance_count: g.instance_count,
            acknowledged: g.acknowledged,
            occurrences: g.occurrences,
            first_seen: g.first_seen,
            last_seen: g.last_seen,
            instances: g.instances,
        }
    }
}

/// A page of incident groups, in the stable order of their ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupPage {
    /// The groups.
    pub items: Vec<GroupView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One incident: one step of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncidentView {
    /// Its id (`<instance>/<step key>`; percent-encode the `/` in paths).
    pub id: String,
    /// The instance.
    pub instance: Uuid,
    /// The step key.
    pub step: String,
    /// Flow.
    pub flow: String,
    /// Task.
    pub task: String,
    /// Kind.
    pub kind: String,
    /// The error.
    pub error: String,
    /// Failed attempts.
    pub occurrences: i64,
    /// First seen.
    pub first_seen: DateTime<Utc>,
    /// Last seen.
    pub last_seen: DateTime<Utc>,
    /// Who acknowledged it, when, with what note.
    pub acknowledged_by: Option<String>,
    /// The note.
    pub note: Option<String>,
    /// When.
    pub acknowledged_at: Option<DateTime<Utc>>,
}

impl From<dcbflow::flow::Incident> for IncidentView {
    fn from(i: dcbflow::flow::Incident) -> Self {
        let (by, note, at) = match i.acknowledged {
            Some(a) => (Some(a.actor), Some(a.note), Some(a.at)),
            None => (None, None, None),
        };
        IncidentView {
            id: i.id,
            instance: i.instance,
            step: i.step,
            flow: i.flow,
            task: i.task,
            kind: i.kind,
            error: i.error,
            occurrences: i.occurrences,
            first_seen: i.first_seen,
            last_seen: i.last_seen,
            acknowledged_by: by,
            note,
            acknowledged_at: at,
        }
    }
}

/// A group with its incidents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupDetail {
    /// The group.
    pub group: GroupView,
    /// Its incidents (at most 500).
    pub incidents: Vec<IncidentView>,
}

/// Filters of the incident list.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only this flow.
    pub flow: Option<String>,
    /// Leave out acknowledged incidents (and groups left empty by that).
    #[serde(default)]
    pub unacknowledged: bool,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// At most this many groups (default 50, at most 100).
    pub limit: Option<u32>,
}

/// `POST /api/v1/incidents/{id}/handle`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HandleRequest {
    /// Who.
    pub actor: String,
    /// What was done or decided.
    pub note: String,
    /// The instance's `seen`, if you want a 409 when it moved.
    #[serde(default)]
    pub seen: Option<i64>,
}

/// `POST /api/v1/incidents/{id}/retry`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// The instance's `seen`; default: its current one.
    #[serde(default)]
    pub seen: Option<i64>,
}

/// Lists open incidents, grouped.
#[utoipa::path(get, path = "/api/v1/incidents", tag = "incidents", params(ListParams),
    responses((status = 200, body = GroupPage)))]
pub async fn list(
    State(app): State<App>,
    Params(p): Params<ListParams>,
) -> ApiResult<Json<GroupPage>> {
    Ok(Json(list_groups(&app, &p).await?))
}

/// A page of incident groups.
///
/// # Errors
/// 400 for a bad limit; store errors.
pub async fn list_groups(app: &App, p: &ListParams) -> ApiResult<GroupPage> {
    let limit = p.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_field("limit", "must be 1 to 100"));
    }
    let mut f = IncidentFilter::default();
    f.flow = p.flow.clone();
    f.after = p.cursor.clone();
    f.limit = Some(limit);
    f.include_acknowledged = !p.unacknowledged;
    let groups = app.flows.incident_groups(&f).await?;
    let next_cursor = (groups.len() == limit as usize)
        .then(|| groups.last().map(|g| g.id.clone()))
        .flatten();
    Ok(GroupPage {
        items: groups.into_iter().map(GroupView::from).collect(),
        next_cursor,
    })
}

/// Shows an incident group with its incidents.
#[utoipa::path(get, path = "/api/v1/incidents/{id}", tag = "incidents",
    params(("id" = String, Path, description = "Group id")),
    responses((status = 200, body = GroupDetail), (status = 404, body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn show(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<GroupDetail>> {
    Ok(Json(group_detail(&app, &id).await?))
}

/// A group and its incidents.
///
/// # Errors
/// 404.
pub async fn group_detail(app: &App, id: &str) -> ApiResult<GroupDetail> {
    let group = app
        .flows
        .incident_groups(&IncidentFilter::new().group(id))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("no open incidents in group {id:?}")))?;
    let incidents = app.flows.group_incidents(id, 500).await?;
    Ok(GroupDetail {
        group: group.into(),
        incidents: incidents.into_iter().map(IncidentView::from).collect(),
    })
}

/// Acknowledges (handles) an incident with a note: an event on its instance.
#[utoipa::path(post, path = "/api/v1/incidents/{id}/handle", tag = "incidents", request_body = HandleRequest,
    params(("id" = String, Path, description = "Incident id (`<instance>/<step key>`, percent-encoded)")),
    responses(
        (status = 200, description = "The incident now", body = IncidentView),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn handle(
    State(app): State<App>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<HandleRequest>,
) -> ApiResult<Json<IncidentView>> {
    Ok(Json(handle_incident(&app, &id, &req).await?))
}

/// Acknowledges an incident.
///
/// # Errors
/// 404, 409, 422.
pub async fn handle_incident(app: &App, id: &str, req: &HandleRequest) -> ApiResult<IncidentView> {
    let by = operator(&req.actor, &req.note)?;
    let incident = app
        .flows
        .incident(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no open incident {id:?}")))?;
    let seen = req.seen.map(Position);
    let Some(step) = &incident.step_id else {
        return Err(ApiError::conflict(
            "not_allowed",
            "this incident is a paused instance: resume it (POST /api/v1/instances/{id}/resume)",
        ));
    };
    app.flows
        .acknowledge(incident.instance, step, seen, &by)
        .await?;
    let now =
        app.flows.incident(id).await?.ok_or_else(|| {
            ApiError::not_found(format!("incident {id:?} was resolved meanwhile"))
        })?;
    Ok(now.into())
}

/// Retries an incident's step now.
#[utoipa::path(post, path = "/api/v1/incidents/{id}/retry", tag = "incidents", request_body = RetryRequest,
    params(("id" = String, Path, description = "Incident id (`<instance>/<step key>`, percent-encoded)")),
    responses(
        (status = 200, description = "The instance now", body = InstanceView),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn retry(
    State(app): State<App>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<RetryRequest>,
) -> ApiResult<Json<InstanceView>> {
    Ok(Json(retry_incident(&app, &id, &req).await?))
}

/// Retries an incident's step.
///
/// # Errors
/// 404, 409, 422.
pub async fn retry_incident(app: &App, id: &str, req: &RetryRequest) -> ApiResult<InstanceView> {
    let by = operator(&req.actor, &req.reason)?;
    let incident = app
        .flows
        .incident(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no open incident {id:?}")))?;
    let seen = match req.seen {
        Some(s) => Position(s),
        None => {
            app.flows
                .instance(incident.instance)
                .await?
                .ok_or_else(|| ApiError::not_found("the instance is gone"))?
                .last_position
        }
    };
    let state = match &incident.step_id {
        Some(step) => {
            app.flows
                .retry_now(incident.instance, step, seen, &by)
                .await?
        }
        // A paused instance: retrying it is resuming it.
        None => app.flows.resume(incident.instance, seen, &by).await?,
    };
    Ok(InstanceView::from(&state))
}
