//! Where a CLI command runs: on the database directly (the same operations the
//! HTTP handlers call) or through a running server's REST API. Either way a
//! command gets the same view types, and errors as [`ApiError`]s (problem
//! documents from a server are mapped back with [`ApiError::from_problem`]).

use axum::http::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::api::flows::{self, FlowDetail, FlowPage, Registered};
use crate::api::incidents::{
    self, GroupDetail, GroupPage, HandleRequest, IncidentView, RetryRequest,
};
use crate::api::instances::{
    self, BulkRequest, BulkResult, InstancePage, InstanceView, Operation, OperationRequest,
    SignalRequest, SkipRequest, StartRequest, Started, Timeline,
};
use crate::api::relays::{self, ConsumerList, DeadLetterAction, DeadLetterPage, DeadLetterParams};
use crate::api::schedules::{self, ScheduleChange, ScheduleList, ScheduleRequest, ScheduleView};
use crate::app::App;
use crate::error::{ApiError, ApiResult, Problem};

/// The database (an [`App`]) or a server.
#[derive(Debug)]
pub enum Backend {
    /// Directly on the database.
    Local(Box<App>),
    /// Through a server's REST API.
    Remote(Remote),
}

/// A running server's REST API.
#[derive(Debug, Clone)]
pub struct Remote {
    base: reqwest::Url,
    token: Option<String>,
    http: reqwest::Client,
}

/// The path segment of an operation.
pub fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::Retry => "retry",
        Operation::Abort => "abort",
        Operation::Pause => "pause",
        Operation::Resume => "resume",
    }
}

impl Remote {
    /// A client of the server at `server` (`http://host:port`, optionally with a
    /// path prefix), sending `token` as a bearer token.
    ///
    /// # Errors
    /// 400 naming `--server` for a URL that is not http(s).
    pub fn new(server: &str, token: Option<String>) -> ApiResult<Remote> {
        let base = reqwest::Url::parse(server).map_err(|e| {
            ApiError::bad_field("--server", format!("{server:?} is not a URL: {e}"))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ApiError::bad_field(
                "--server",
                format!("{server:?} must be an http:// or https:// URL"),
            ));
        }
        let http = dcbflow::http::client_builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .user_agent(concat!("dcbflow-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("HTTP client: {e}"),
                )
            })?;
        Ok(Remote {
            base,
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// The server's base URL.
    pub fn base(&self) -> &reqwest::Url {
        &self.base
    }

    /// The URL of `segments` under the base, each segment percent-encoded (an
    /// incident id's `/` included).
    pub fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("checked: can be a base");
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
        }
        url
    }

    /// A request to `url` with the token.
    pub fn request(&self, method: reqwest::Method, url: reqwest::Url) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends `request`: the response when successful, the error its problem
    /// document describes otherwise.
    ///
    /// # Errors
    /// 503 `unavailable` when the server cannot be reached; the server's errors.
    pub async fn response(&self, request: reqwest::RequestBuilder) -> ApiResult<reqwest::Response> {
        let res = request.send().await.map_err(|e| self.transport(&e))?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let retry_after = res
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = res.bytes().await.map_err(|e| self.transport(&e))?;
        let mut err = match serde_json::from_slice::<Problem>(&body) {
            Ok(p) => ApiError::from_problem(p),
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                let text: String = text.trim().chars().take(300).collect();
                ApiError::new(
                    status,
                    code_of_status(status),
                    format!("the server at {} answered {status}: {text}", self.base),
                )
            }
        };
        err.retry_after = retry_after;
        Err(err)
    }

    /// Sends `request` and reads the JSON view it answers with.
    ///
    /// # Errors
    /// As [`response`](Self::response); 500 when the answer is not the view.
    pub async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> ApiResult<T> {
        let res = self.response(request).await?;
        let body = res.bytes().await.map_err(|e| self.transport(&e))?;
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!(
                    "the server at {} answered with something this CLI does not understand ({e}); is it the same version?",
                    self.base
                ),
            )
        })
    }

    async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: Option<String>,
    ) -> ApiResult<T> {
        let mut url = self.url(segments);
        url.set_query(query.as_deref().filter(|q| !q.is_empty()));
        self.send(self.request(reqwest::Method::GET, url)).await
    }

    async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> ApiResult<T> {
        let url = self.url(segments);
        self.send(self.request(reqwest::Method::PUT, url).json(body))
            .await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> ApiResult<T> {
        let url = self.url(segments);
        self.send(self.request(reqwest::Method::POST, url).json(body))
            .await
    }

    /// A transport failure: the server is unreachable (or went away midway).
    pub fn transport(&self, e: &reqwest::Error) -> ApiError {
        let mut detail = format!("cannot reach the server at {}", self.base);
        let mut source: Option<&dyn std::error::Error> = Some(e);
        let mut last = String::new();
        while let Some(s) = source {
            let text = s.to_string();
            if !last.contains(&text) {
                detail.push_str(": ");
                detail.push_str(&text);
            }
            last = text;
            source = s.source();
        }
        ApiError::unavailable("unavailable", detail, 1)
    }
}

/// The stable code of an HTTP status, for answers without a problem document.
fn code_of_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "invalid_input",
        503 => "unavailable",
        504 => "timeout",
        _ => "error",
    }
}

/// A query string of `params` (None: nothing to send).
///
/// # Errors
/// 400 when a value cannot be put in a query string.
pub fn query_string<T: Serialize>(params: &T) -> ApiResult<Option<String>> {
    let q = serde_html_form::to_string(params)
        .map_err(|e| ApiError::bad_request(format!("cannot encode the query: {e}")))?;
    Ok((!q.is_empty()).then_some(q))
}

/// The paging parameters of the flow list as a query string.
#[derive(Serialize)]
struct FlowListQuery<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
}

#[derive(Serialize)]
struct FormatQuery<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<&'a str>,
}

impl Backend {
    /// Whether commands go through a server.
    pub fn remote(&self) -> Option<&Remote> {
        match self {
            Backend::Remote(r) => Some(r),
            Backend::Local(_) => None,
        }
    }

    /// Registers a definition in `format` (`yaml`, `json`, `toml`).
    ///
    /// # Errors
    /// 422 `definition_invalid` with every problem.
    pub async fn register(&self, text: &str, format: &str) -> ApiResult<Registered> {
        match self {
            Backend::Local(app) => flows::register_source(app, text, format).await,
            Backend::Remote(r) => {
                let ct = match format {
                    "json" => "application/json",
                    "toml" => "application/toml",
                    _ => "application/yaml",
                };
                let req = r
                    .request(reqwest::Method::POST, r.url(&["api", "v1", "flows"]))
                    .header(reqwest::header::CONTENT_TYPE, ct)
                    .body(text.to_owned());
                r.send(req).await
            }
        }
    }

    /// A page of flows.
    ///
    /// # Errors
    /// Store or server errors.
    pub async fn list_flows(
        &self,
        cursor: Option<String>,
        limit: Option<usize>,
    ) -> ApiResult<FlowPage> {
        match self {
            Backend::Local(app) => {
                flows::list_flows(app, &flows::ListParams { cursor, limit }).await
            }
            Backend::Remote(r) => {
                let q = query_string(&FlowListQuery {
                    cursor: cursor.as_deref(),
                    limit,
                })?;
                r.get(&["api", "v1", "flows"], q).await
            }
        }
    }

    /// A flow at `version` (None: the newest), its source in `format`.
    ///
    /// # Errors
    /// 404 for an unknown flow or version.
    pub async fn flow_detail(
        &self,
        name: &str,
        version: Option<&str>,
        format: Option<&str>,
    ) -> ApiResult<FlowDetail> {
        match self {
            Backend::Local(app) => flows::flow_detail(app, name, version, format).await,
            Backend::Remote(r) => {
                let q = query_string(&FormatQuery { format })?;
                match version {
                    Some(v) => r.get(&["api", "v1", "flows", name, "versions", v], q).await,
                    None => r.get(&["api", "v1", "flows", name], q).await,
                }
            }
        }
    }

    /// Starts an instance.
    ///
    /// # Errors
    /// 404 unknown flow, 422 input mismatch.
    pub async fn start(&self, req: &StartRequest) -> ApiResult<Started> {
        match self {
            Backend::Local(app) => instances::start_instance(app, req).await,
            Backend::Remote(r) => r.post(&["api", "v1", "instances"], req).await,
        }
    }

    /// A page of instances.
    ///
    /// # Errors
    /// 400 for bad filters.
    pub async fn list_instances(&self, p: &instances::ListParams) -> ApiResult<InstancePage> {
        match self {
            Backend::Local(app) => instances::list_instances(app, p).await,
            Backend::Remote(r) => r.get(&["api", "v1", "instances"], query_string(p)?).await,
        }
    }

    /// An instance.
    ///
    /// # Errors
    /// 404.
    pub async fn show_instance(&self, id: Uuid) -> ApiResult<InstanceView> {
        match self {
            Backend::Local(app) => instances::show_instance(app, id).await,
            Backend::Remote(r) => {
                r.get(&["api", "v1", "instances", &id.to_string()], None)
                    .await
            }
        }
    }

    /// An instance's events.
    ///
    /// # Errors
    /// 404.
    pub async fn timeline(&self, id: Uuid) -> ApiResult<Timeline> {
        match self {
            Backend::Local(app) => instances::instance_timeline(app, id).await,
            Backend::Remote(r) => {
                r.get(
                    &["api", "v1", "instances", &id.to_string(), "timeline"],
                    None,
                )
                .await
            }
        }
    }

    /// Retry, abort, pause or resume.
    ///
    /// # Errors
    /// 404, 409 `moved` / `not_allowed`, 422.
    pub async fn operate(
        &self,
        id: Uuid,
        op: Operation,
        req: &OperationRequest,
    ) -> ApiResult<InstanceView> {
        match self {
            Backend::Local(app) => instances::operate(app, id, op, req).await,
            Backend::Remote(r) => {
                r.post(
                    &[
                        "api",
                        "v1",
                        "instances",
                        &id.to_string(),
                        operation_name(op),
                    ],
                    req,
                )
                .await
            }
        }
    }

    /// Skips a task.
    ///
    /// # Errors
    /// As [`operate`](Self::operate).
    pub async fn skip(&self, id: Uuid, req: &SkipRequest) -> ApiResult<InstanceView> {
        match self {
            Backend::Local(app) => instances::skip_task(app, id, req).await,
            Backend::Remote(r) => {
                r.post(&["api", "v1", "instances", &id.to_string(), "skip"], req)
                    .await
            }
        }
    }

    /// Sends a signal.
    ///
    /// # Errors
    /// As [`instances::send_signal`].
    pub async fn signal(&self, id: Uuid, req: &SignalRequest) -> ApiResult<InstanceView> {
        match self {
            Backend::Local(app) => instances::send_signal(app, id, req).await,
            Backend::Remote(r) => {
                r.post(&["api", "v1", "instances", &id.to_string(), "signals"], req)
                    .await
            }
        }
    }

    /// A bulk operation; `progress(done, total)` after each instance (locally:
    /// a server reports only at the end).
    ///
    /// # Errors
    /// 400, 409 beyond `api.bulk_max`, 422.
    pub async fn bulk(
        &self,
        req: &BulkRequest,
        progress: &mut (dyn FnMut(usize, i64) + Send),
    ) -> ApiResult<BulkResult> {
        match self {
            Backend::Local(app) => instances::bulk_operate(app, req, progress).await,
            Backend::Remote(r) => r.post(&["api", "v1", "instances", "bulk"], req).await,
        }
    }

    /// A page of incident groups.
    ///
    /// # Errors
    /// 400 for a bad limit.
    pub async fn incident_groups(&self, p: &incidents::ListParams) -> ApiResult<GroupPage> {
        match self {
            Backend::Local(app) => incidents::list_groups(app, p).await,
            Backend::Remote(r) => r.get(&["api", "v1", "incidents"], query_string(p)?).await,
        }
    }

    /// An incident group with its incidents.
    ///
    /// # Errors
    /// 404.
    pub async fn group_detail(&self, id: &str) -> ApiResult<GroupDetail> {
        match self {
            Backend::Local(app) => incidents::group_detail(app, id).await,
            Backend::Remote(r) => r.get(&["api", "v1", "incidents", id], None).await,
        }
    }

    /// Acknowledges an incident with a note.
    ///
    /// # Errors
    /// 404, 409, 422.
    pub async fn handle_incident(&self, id: &str, req: &HandleRequest) -> ApiResult<IncidentView> {
        match self {
            Backend::Local(app) => incidents::handle_incident(app, id, req).await,
            Backend::Remote(r) => r.post(&["api", "v1", "incidents", id, "handle"], req).await,
        }
    }

    /// Retries an incident's step.
    ///
    /// # Errors
    /// 404, 409, 422.
    pub async fn retry_incident(&self, id: &str, req: &RetryRequest) -> ApiResult<InstanceView> {
        match self {
            Backend::Local(app) => incidents::retry_incident(app, id, req).await,
            Backend::Remote(r) => r.post(&["api", "v1", "incidents", id, "retry"], req).await,
        }
    }

    /// Relays and projections with checkpoint and lag.
    ///
    /// # Errors
    /// Store or server errors.
    pub async fn consumers(&self) -> ApiResult<ConsumerList> {
        match self {
            Backend::Local(app) => relays::consumers(app).await,
            Backend::Remote(r) => r.get(&["api", "v1", "relays"], None).await,
        }
    }

    /// The schedules.
    ///
    /// # Errors
    /// Store errors.
    pub async fn schedules(&self) -> ApiResult<ScheduleList> {
        match self {
            Backend::Local(app) => schedules::list_schedules(app).await,
            Backend::Remote(r) => r.get(&["api", "v1", "schedules"], None).await,
        }
    }

    /// Creates or changes a schedule.
    ///
    /// # Errors
    /// As [`schedules::set_schedule`].
    pub async fn set_schedule(&self, name: &str, req: &ScheduleRequest) -> ApiResult<ScheduleView> {
        match self {
            Backend::Local(app) => schedules::set_schedule(app, name, req).await,
            Backend::Remote(r) => r.put(&["api", "v1", "schedules", name], req).await,
        }
    }

    /// Pauses (`pause`) or resumes a schedule.
    ///
    /// # Errors
    /// As [`schedules::change_schedule`].
    pub async fn change_schedule(
        &self,
        name: &str,
        pause: bool,
        req: &ScheduleChange,
    ) -> ApiResult<ScheduleView> {
        match self {
            Backend::Local(app) => schedules::change_schedule(app, name, pause, req).await,
            Backend::Remote(r) => {
                let op = if pause { "pause" } else { "resume" };
                r.post(&["api", "v1", "schedules", name, op], req).await
            }
        }
    }

    /// A page of dead letters.
    ///
    /// # Errors
    /// 400 for a bad cursor or limit.
    pub async fn dead_letters(&self, p: &DeadLetterParams) -> ApiResult<DeadLetterPage> {
        match self {
            Backend::Local(app) => relays::list_dead_letters(app, p).await,
            Backend::Remote(r) => {
                r.get(&["api", "v1", "dead-letters"], query_string(p)?)
                    .await
            }
        }
    }

    /// Replays a dead letter.
    ///
    /// # Errors
    /// 404; 409 when its relay is not configured; 503 when publishing fails.
    pub async fn replay_dead_letter(&self, id: i64) -> ApiResult<DeadLetterAction> {
        match self {
            Backend::Local(app) => relays::replay_dead_letter(app, id).await,
            Backend::Remote(r) => {
                r.post(
                    &["api", "v1", "dead-letters", &id.to_string(), "replay"],
                    &serde_json::json!({}),
                )
                .await
            }
        }
    }

    /// Discards a dead letter.
    ///
    /// # Errors
    /// 404.
    pub async fn discard_dead_letter(&self, id: i64) -> ApiResult<DeadLetterAction> {
        match self {
            Backend::Local(app) => relays::discard_dead_letter(app, id).await,
            Backend::Remote(r) => {
                r.post(
                    &["api", "v1", "dead-letters", &id.to_string(), "discard"],
                    &serde_json::json!({}),
                )
                .await
            }
        }
    }
}
