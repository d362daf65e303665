//! `/api/v1/flows`: register, list and show flow definitions.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::response::Response;
use chrono::{DateTime, Utc};
use dcbflow::flow::events::types;
use dcbflow::flow::{FlowDefinition, FlowError};
use dcbflow::{Query, ReadOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::{Params, body_bytes, created};
use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// What registering a definition did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    /// Flow name.
    pub name: String,
    /// Its version (content hash).
    pub version: String,
    /// `false` when this exact version was registered before (nothing new was written).
    pub created: bool,
}

/// A flow in the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowSummary {
    /// Flow name.
    pub name: String,
    /// Its newest version.
    pub latest_version: String,
    /// Versions registered.
    pub versions: usize,
    /// Tasks in the newest version.
    pub tasks: usize,
    /// When the newest version was registered.
    pub registered_at: DateTime<Utc>,
}

/// A page of flows, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowPage {
    /// The flows.
    pub items: Vec<FlowSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One registered version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowVersion {
    /// Version (content hash).
    pub version: String,
    /// When it was registered.
    pub registered_at: DateTime<Utc>,
    /// The position of its registration event.
    pub position: i64,
    /// Instances started on it.
    pub instances: i64,
}

/// A node of a flow's graph: one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// Task name.
    pub id: String,
    /// The action's executor (`http`, `sql`, `nats`, `function`), or `tcc`.
    pub executor: String,
    /// Whether it has a compensation.
    pub compensable: bool,
    /// Try/confirm/cancel participants, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<String>,
    /// A `for_each` task's items template and how many run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub for_each: Option<serde_json::Value>,
}

/// An edge of a flow's graph: `to` depends on `from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Edge {
    /// The task that runs first.
    pub from: String,
    /// The task that waits for it.
    pub to: String,
}

/// A flow's dependency graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Graph {
    /// Tasks.
    pub nodes: Vec<Node>,
    /// Dependencies.
    pub edges: Vec<Edge>,
}

/// A flow: its versions, its definition and source, its graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowDetail {
    /// Flow name.
    pub name: String,
    /// The version shown.
    pub version: String,
    /// Every version, newest first.
    pub versions: Vec<FlowVersion>,
    /// The definition (JSON).
    #[schema(value_type = Object)]
    pub definition: Value,
    /// The definition rendered in `format` (comments of the original are not kept).
    pub source: String,
    /// `yaml`, `json` or `toml`.
    pub format: String,
    /// The graph.
    pub graph: Graph,
}

/// `?format=` of a flow.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ShowParams {
    /// `yaml` (default), `json` or `toml`.
    pub format: Option<String>,
}

/// Paging of lists by name.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// At most this many (default 100, at most 500).
    pub limit: Option<usize>,
}

/// Registers a definition given as YAML, JSON or TOML (by `Content-Type`:
/// `application/yaml`, `application/json`, `application/toml`).
#[utoipa::path(post, path = "/api/v1/flows", tag = "flows",
    request_body(content = Object, description = "A flow definition", content_type = "application/yaml"),
    responses(
        (status = 201, description = "A new version", body = Registered),
        (status = 200, description = "This version was registered before", body = Registered),
        (status = 415, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Every validation problem", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn register(State(app): State<App>, req: Request) -> ApiResult<Response> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = format_of_media_type(&ct)?;
    let bytes = body_bytes(req, &()).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("the definition is not UTF-8"))?;
    let r = register_source(&app, text, format).await?;
    Ok(created(r.created, r))
}

/// The definition format of a media type.
fn format_of_media_type(ct: &str) -> ApiResult<&'static str> {
    let base = ct.split(';').next().unwrap_or("").trim();
    Ok(match base {
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => "yaml",
        "application/json" => "json",
        "application/toml" | "text/toml" => "toml",
        other => {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "a definition is application/yaml, application/json or application/toml, not {other:?}"
                ),
            ));
        }
    })
}

/// Parses and registers a definition in `format` (`yaml`, `json`, `toml`).
///
/// # Errors
/// 422 `definition_invalid` with every problem.
pub async fn register_source(app: &App, text: &str, format: &str) -> ApiResult<Registered> {
    let parsed = match format {
        "yaml" => FlowDefinition::from_yaml(text),
        "json" => FlowDefinition::from_json(text),
        "toml" => FlowDefinition::from_toml(text),
        other => {
            return Err(ApiError::bad_field(
                "format",
                format!("unknown format {other:?}"),
            ));
        }
    };
    let def = parsed.map_err(FlowError::Definition)?;
    let existed = app
        .flows
        .definition(&def.name, Some(&def.version()))
        .await
        .is_ok();
    let version = app.flows.register(&def).await?;
    Ok(Registered {
        name: def.name.clone(),
        version,
        created: !existed,
    })
}

/// Lists the registered flows by name.
#[utoipa::path(get, path = "/api/v1/flows", tag = "flows", params(ListParams),
    responses((status = 200, body = FlowPage)))]
pub async fn list(
    State(app): State<App>,
    Params(p): Params<ListParams>,
) -> ApiResult<Json<FlowPage>> {
    Ok(Json(list_flows(&app, &p).await?))
}

/// Every registration, by flow name.
async fn registrations(
    app: &App,
) -> ApiResult<BTreeMap<String, Vec<(String, DateTime<Utc>, i64, usize)>>> {
    let q = Query::items_of([types::DEFINITION_REGISTERED], Vec::<String>::new());
    let events = app.store.read_all(&q, ReadOptions::default()).await?.events;
    let mut by_name: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for e in events {
        let d = e.data();
        let (Some(name), Some(version)) = (d["name"].as_str(), d["version"].as_str()) else {
            continue;
        };
        let tasks = d["definition"]["tasks"].as_array().map_or(0, Vec::len);
        by_name.entry(name.to_owned()).or_default().push((
            version.to_owned(),
            e.recorded_at,
            e.position.0,
            tasks,
        ));
    }
    Ok(by_name)
}

/// The flows, a page by name.
///
/// # Errors
/// Store errors.
pub async fn list_flows(app: &App, p: &ListParams) -> ApiResult<FlowPage> {
    let limit = p.limit.unwrap_or(100).clamp(1, 500);
    let all = registrations(app).await?;
    let mut items: Vec<FlowSummary> = all
        .into_iter()
        .filter(|(name, _)| p.cursor.as_ref().is_none_or(|c| name > c))
        .take(limit + 1)
        .map(|(name, versions)| {
            let latest = versions.last().expect("a registration");
            FlowSummary {
                latest_version: latest.0.clone(),
                registered_at: latest.1,
                tasks: latest.3,
                versions: versions.len(),
                name,
            }
        })
        .collect();
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|f| f.name.clone())
    } else {
        None
    };
    Ok(FlowPage { items, next_cursor })
}

/// Shows a flow's newest version.
#[utoipa::path(get, path = "/api/v1/flows/{name}", tag = "flows",
    params(("name" = String, Path, description = "Flow name"), ShowParams),
    responses((status = 200, body = FlowDetail), (status = 404, body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn show(
    State(app): State<App>,
    Path(name): Path<String>,
    Params(p): Params<ShowParams>,
) -> ApiResult<Json<FlowDetail>> {
    Ok(Json(
        flow_detail(&app, &name, None, p.format.as_deref()).await?,
    ))
}

/// Shows one version of a flow.
#[utoipa::path(get, path = "/api/v1/flows/{name}/versions/{version}", tag = "flows",
    params(("name" = String, Path, description = "Flow name"), ("version" = String, Path, description = "Version"), ShowParams),
    responses((status = 200, body = FlowDetail), (status = 404, body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn version(
    State(app): State<App>,
    Path((name, version)): Path<(String, String)>,
    Params(p): Params<ShowParams>,
) -> ApiResult<Json<FlowDetail>> {
    Ok(Json(
        flow_detail(&app, &name, Some(&version), p.format.as_deref()).await?,
    ))
}

/// A flow at `version` (None: the newest) with its versions, source and graph.
///
/// # Errors
/// 404 for an unknown flow or version.
pub async fn flow_detail(
    app: &App,
    name: &str,
    version: Option<&str>,
    format: Option<&str>,
) -> ApiResult<FlowDetail> {
    let format = format.unwrap_or("yaml");
    if !matches!(format, "yaml" | "json" | "toml") {
        return Err(ApiError::bad_field("format", "must be yaml, json or toml"));
    }
    let def = app.flows.definition(name, version).await?;
    let counts = instance_counts_by_version(app, name).await?;
    let all = registrations(app).await?;
    let mut versions: Vec<FlowVersion> = all
        .get(name)
        .into_iter()
        .flatten()
        .map(|(v, at, pos, _)| FlowVersion {
            version: v.clone(),
            registered_at: *at,
            position: *pos,
            instances: counts.get(v).copied().unwrap_or(0),
        })
        .collect();
    versions.reverse();
    let definition = serde_json::to_value(def.as_ref()).map_err(ApiError::internal)?;
    let source = match format {
        "json" => serde_json::to_string_pretty(&definition).map_err(ApiError::internal)?,
        "toml" => toml::to_string_pretty(def.as_ref()).unwrap_or_else(|e| {
            format!("# this definition has no TOML form ({e}); as JSON:\n{definition}")
        }),
        _ => yaml_serde::to_string(def.as_ref()).map_err(ApiError::internal)?,
    };
    Ok(FlowDetail {
        name: def.name.clone(),
        version: def.version(),
        versions,
        graph: graph(&def),
        definition,
        source,
        format: format.to_owned(),
    })
}

async fn instance_counts_by_version(app: &App, flow: &str) -> ApiResult<BTreeMap<String, i64>> {
    let client = app.store.pool().get().await.map_err(dcbflow::Error::from)?;
    let sql = format!(
        "SELECT definition_version, count(*) FROM \"{}\".flow_instances WHERE flow = $1 GROUP BY 1",
        app.store.schema()
    );
    let rows = client
        .query(&sql, &[&flow])
        .await
        .map_err(dcbflow::Error::from)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The dependency graph of a definition.
pub fn graph(def: &FlowDefinition) -> Graph {
    let nodes = def
        .tasks
        .iter()
        .map(|t| Node {
            id: t.name.clone(),
            executor: match (&t.action, &t.tcc) {
                (Some(a), _) => serde_json::to_value(a)
                    .ok()
                    .and_then(|v| v["executor"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| "action".into()),
                (None, Some(_)) => "tcc".into(),
                (None, None) => "none".into(),
            },
            compensable: t.compensate.is_some() || t.tcc.is_some(),
            participants: t
                .tcc
                .as_ref()
                .and_then(|tcc| serde_json::to_value(tcc).ok())
                .and_then(|v| {
                    v["participants"].as_array().map(|ps| {
                        ps.iter()
                            .filter_map(|p| p["name"].as_str().map(str::to_owned))
                            .collect()
                    })
                })
                .unwrap_or_default(),
            for_each: t
                .for_each
                .as_ref()
                .and_then(|f| serde_json::to_value(f).ok()),
        })
        .collect();
    let edges = def
        .tasks
        .iter()
        .flat_map(|t| {
            t.depends_on.iter().map(|d| Edge {
                from: d.clone(),
                to: t.name.clone(),
            })
        })
        .collect();
    Graph { nodes, edges }
}
