//! `/api/v1/events`: read with a query, append with a condition, live tail (SSE).
//!
//! - `GET /api/v1/events` reads a page of events with a query (`types`/`tags`,
//!   or a JSON `query` of several items) and answers the read's cursor, to pass
//!   as an append condition's `after`, and `next`, to pass as `after` for the
//!   next page.
//! - `POST /api/v1/events` appends atomically, optionally with a condition;
//!   a failed condition is 409 `conflict`.
//! - `GET /api/v1/events/live` is a Server-Sent Events tail from a library
//!   [`Subscription`]: gap-free (a late committer is delivered in its place,
//!   never skipped), in position order, each event once; reconnecting with
//!   `Last-Event-ID` resumes after it.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dcbflow::{
    AppendCondition, Backoff, CancellationToken, Cursor, Event, Position, Query, QueryItem,
    ReadOptions, SequencedEvent, Subscription, SubscriptionOptions,
};
use futures::{Stream, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::instances::EventView;
use super::{JsonBody, Params, created, parse_json};
use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// Events per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u64 = 100;
/// Most events per page.
pub const MAX_LIMIT: u64 = 1000;
/// How often an idle live tail sends a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------

/// A query: its items are OR'd. An empty list of items matches nothing (the
/// library's semantics); an item with neither types nor tags matches every event.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    /// The items, OR'd.
    pub items: Vec<QueryItemBody>,
}

/// One query item: the event's type is one of `types` (none: any type) AND it
/// carries every one of `tags` (none: any tags).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryItemBody {
    /// Accepted types (OR'd).
    #[serde(default)]
    pub types: Vec<String>,
    /// Required tags (AND'd).
    #[serde(default)]
    pub tags: Vec<String>,
}

impl From<&QueryBody> for Query {
    fn from(q: &QueryBody) -> Self {
        Query::from_items(q.items.iter().map(|i| {
            QueryItem::new()
                .types(i.types.iter().cloned())
                .tags(i.tags.iter().cloned())
        }))
    }
}

/// Splits repeated and comma-separated values (`types=a,b&types=c`) into one
/// list. Empty values are kept (the library refuses them with 422).
fn split_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(',').map(str::to_owned))
        .collect()
}

/// The query of `types`, `tags` and `query` parameters: `query` (a JSON
/// [`QueryBody`]) or one item of `types` (OR'd) and `tags` (AND'd), or, with
/// none of them, every event.
///
/// # Errors
/// 400 naming `query` when it is malformed or given together with `types`/`tags`.
pub fn query_of_params(types: &[String], tags: &[String], query: Option<&str>) -> ApiResult<Query> {
    match query {
        Some(json) => {
            if !types.is_empty() || !tags.is_empty() {
                return Err(ApiError::bad_field(
                    "query",
                    "give either query or types/tags, not both",
                ));
            }
            let body: QueryBody = parse_json(json.as_bytes()).map_err(|e| {
                let why = match e.errors.first() {
                    Some(f) => format!("{}: {}", f.field, f.message),
                    None => e.detail,
                };
                ApiError::bad_field(
                    "query",
                    format!(
                        "not a JSON query {{\"items\":[{{\"types\":[..],\"tags\":[..]}}]}} ({why})"
                    ),
                )
            })?;
            Ok(Query::from(&body))
        }
        None => {
            let (types, tags) = (split_list(types), split_list(tags));
            if types.is_empty() && tags.is_empty() {
                Ok(Query::all())
            } else {
                Ok(Query::from_items([QueryItem::new()
                    .types(types)
                    .tags(tags)]))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// GET /api/v1/events
// ---------------------------------------------------------------------------

/// The parameters of `GET /api/v1/events`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// Event types, any of which matches (repeat the key or separate with commas).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// Tags, all of which an event must carry (repeat the key or separate with
    /// commas; a tag containing a comma needs `query`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Instead of `types`/`tags`: a JSON query of several OR'd items,
    /// `{"items":[{"types":[..],"tags":[..]}]}` (`"items": []` matches nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Where the previous page ended, in read order: a cursor
    /// (`<position>@<xmin>:<xmax>:<xip>`, as `cursor` or `next` answered) or a
    /// bare position. Forward: events after it; backwards: events before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many events (default 100, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Newest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backwards: Option<bool>,
}

/// A page of events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// The events, in read order.
    pub events: Vec<EventView>,
    /// What this read saw (position and snapshot): pass it as the `after` of an
    /// append condition protecting a decision taken on these events.
    pub cursor: String,
    /// Pass as `after` (with the same query and direction) for the next page;
    /// absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Reads events.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(ReadParams),
    responses(
        (status = 200, description = "A page of events, the read's cursor and the next page's `after`", body = EventPage),
        (status = 400, description = "A bad parameter (named in `errors`)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "An invalid query item (an empty type or tag, too many items)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or the database is unavailable", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn read(
    State(app): State<App>,
    Params(p): Params<ReadParams>,
) -> ApiResult<Json<EventPage>> {
    Ok(Json(read_events(&app, &p).await?))
}

/// A page of events.
///
/// # Errors
/// 400 for a bad parameter, 422 for an invalid query, store errors.
pub async fn read_events(app: &App, p: &ReadParams) -> ApiResult<EventPage> {
    let query = query_of_params(&p.types, &p.tags, p.query.as_deref())?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_field(
            "limit",
            format!("must be 1 to {MAX_LIMIT}"),
        ));
    }
    let after = p
        .after
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<Cursor>().map_err(|_| {
                ApiError::bad_field(
                    "after",
                    "not a cursor (<position>@<xmin>:<xmax>:<xip>) or a position",
                )
            })
        })
        .transpose()?
        .and_then(|c| c.position);
    let backwards = p.backwards.unwrap_or(false);
    // One more than asked for tells whether there is a next page.
    let mut options = ReadOptions::default().limit(limit + 1);
    if backwards {
        options = options.backwards();
        if let Some(Position(p)) = after {
            // Before `p`: up to `p - 1` (nothing before the first position).
            options = options.up_to(Position((p - 1).max(0)));
        }
    } else if let Some(a) = after {
        options = options.after(a);
    }
    let mut stream = app.store.read(&query, options).await?;
    let mut events: Vec<SequencedEvent> = Vec::with_capacity(limit.min(128) as usize);
    while let Some(e) = stream.try_next().await? {
        events.push(e);
    }
    let mut cursor = stream
        .cursor()
        .ok_or_else(|| ApiError::internal("a finished read has no cursor"))?;
    let more = events.len() as u64 > limit;
    if more {
        events.truncate(limit as usize);
        // The extra event was not handed out: the cursor covers the last one
        // that was (forward); backwards it is the newest, which stays.
        if !backwards {
            cursor.position = events.last().map(|e| e.position);
        }
    }
    let next = if more {
        events.last().map(|e| e.position.to_string())
    } else {
        None
    };
    Ok(EventPage {
        events: events.iter().map(EventView::from).collect(),
        cursor: cursor.to_string(),
        next,
    })
}

// ---------------------------------------------------------------------------
// POST /api/v1/events
// ---------------------------------------------------------------------------

/// `POST /api/v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendRequest {
    /// The events, appended atomically in this order (at least one).
    pub events: Vec<NewEvent>,
    /// Fail (409, nothing written) if an event matching this exists that the
    /// reader behind `after` did not see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<ConditionBody>,
}

/// An event to append.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// The type (non-empty).
    #[serde(rename = "type")]
    pub event_type: String,
    /// Tags (each non-empty; stored as a sorted set).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The payload: any JSON.
    #[schema(value_type = Value)]
    pub data: Value,
    /// Metadata: any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub metadata: Option<Value>,
    /// An idempotency id: re-sending an append whose events carry the same ids
    /// returns the original positions (`replayed`). All events or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
}

/// An append condition.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionBody {
    /// The events that would invalidate the decision.
    pub fail_if_events_match: QueryBody,
    /// What the decision saw: the `cursor` of a read (text form
    /// `<position>@<xmin>:<xmax>:<xip>`), or a bare position (which cannot
    /// detect late committers). Absent: every matching event counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// What an append wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Appended {
    /// Positions of the events, in the order given.
    pub positions: Vec<i64>,
    /// The writing transaction (xid8).
    pub transaction_id: String,
    /// `true` when the events' ids were stored before: nothing was written and
    /// these are the original positions.
    pub replayed: bool,
}

/// Appends events.
#[utoipa::path(post, path = "/api/v1/events", tag = "events", request_body = AppendRequest,
    responses(
        (status = 201, description = "Appended", body = Appended),
        (status = 200, description = "Replayed: these event ids were stored before", body = Appended),
        (status = 400, description = "Malformed JSON, an unknown field, a bad cursor", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`conflict`: the condition failed (the detail names the conflicting position); nothing was written", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 413, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 415, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_input`: refused by the store (no events, an empty type or tag, a condition after the head, ...); nothing was written", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or the database is unavailable", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn append(
    State(app): State<App>,
    JsonBody(req): JsonBody<AppendRequest>,
) -> ApiResult<Response> {
    let a = append_events(&app, &req).await?;
    Ok(created(!a.replayed, a))
}

/// Appends events, with the request's condition.
///
/// # Errors
/// 400 for a bad cursor, 409 `conflict`, 422 `invalid_input`, store errors.
pub async fn append_events(app: &App, req: &AppendRequest) -> ApiResult<Appended> {
    let condition = req
        .condition
        .as_ref()
        .map(|c| {
            let mut condition = AppendCondition::new(Query::from(&c.fail_if_events_match));
            if let Some(after) = c.after.as_deref() {
                let cursor = after.parse::<Cursor>().map_err(|_| {
                    ApiError::bad_field(
                        "condition.after",
                        "not a cursor (<position>@<xmin>:<xmax>:<xip>) or a position",
                    )
                })?;
                condition = condition.after(cursor);
            }
            Ok::<_, ApiError>(condition)
        })
        .transpose()?;
    let events = req
        .events
        .iter()
        .map(|e| {
            let mut event = Event::new(e.event_type.clone(), e.tags.clone(), e.data.clone());
            event.metadata = e.metadata.clone();
            event.id = e.id;
            event
        })
        .collect();
    let r = app.store.append(events, condition).await?;
    Ok(Appended {
        positions: r.positions.iter().map(|p| p.0).collect(),
        transaction_id: r.transaction_id.to_string(),
        replayed: r.replayed,
    })
}

// ---------------------------------------------------------------------------
// GET /api/v1/events/live
// ---------------------------------------------------------------------------

/// The parameters of `GET /api/v1/events/live`.
#[derive(Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LiveParams {
    /// Start after this position (default: the start of the log). A
    /// `Last-Event-ID` header, sent by reconnecting clients, takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    /// Event types, any of which matches (repeat the key or separate with commas).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// Tags, all of which an event must carry (repeat the key or separate with commas).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Instead of `types`/`tags`: a JSON query of several OR'd items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The bearer token, for `EventSource` clients that cannot set headers.
    #[serde(default, skip_serializing)]
    pub access_token: Option<String>,
}

impl std::fmt::Debug for LiveParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveParams")
            .field("after", &self.after)
            .field("types", &self.types)
            .field("tags", &self.tags)
            .field("query", &self.query)
            .field("access_token", &self.access_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A live tail: stops the [`Subscription`] when its shutdown token fires.
#[must_use = "streams do nothing unless polled"]
pub struct LiveTail {
    sub: Subscription,
    stop: CancellationToken,
    ready: VecDeque<SequencedEvent>,
    failures: u32,
}

impl std::fmt::Debug for LiveTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTail")
            .field("position", &self.sub.position())
            .finish_non_exhaustive()
    }
}

impl LiveTail {
    /// The next event, waiting for one; `None` once the server shuts down (or
    /// the store fails in a way retrying cannot fix). Transient errors are
    /// retried with backoff: the subscription keeps its place, so nothing is
    /// skipped or repeated.
    pub async fn next(&mut self) -> Option<SequencedEvent> {
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            match self.sub.next_batch_or_cancel(&self.stop).await {
                Ok(Some(batch)) => {
                    self.failures = 0;
                    self.ready.extend(batch);
                }
                Ok(None) => return None,
                Err(e) if e.is_retryable() => {
                    self.failures += 1;
                    tracing::warn!(error = %e, attempt = self.failures, "live tail: retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.delay(self.failures)) => {}
                        () = self.stop.cancelled() => return None,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "live tail ended");
                    return None;
                }
            }
        }
    }

    /// The tail as a stream.
    pub fn into_stream(self) -> impl Stream<Item = SequencedEvent> + Send {
        futures::stream::unfold(self, |mut tail| async move {
            tail.next().await.map(|e| (e, tail))
        })
    }
}

/// Open live tails' shutdown tokens, by store schema.
static LIVE_STOP: LazyLock<Mutex<HashMap<String, CancellationToken>>> =
    LazyLock::new(Default::default);

fn live_stop(app: &App) -> CancellationToken {
    LIVE_STOP
        .lock()
        .expect("live tails lock")
        .entry(app.store.schema().to_owned())
        .or_default()
        .clone()
}

/// Ends every open live tail of `app` (its SSE streams end cleanly): call it
/// when a graceful shutdown starts, since a server waits for open responses
/// and a live tail never ends by itself. Tails opened afterwards run until
/// this is called again.
pub fn end_live_tails(app: &App) {
    if let Some(token) = LIVE_STOP
        .lock()
        .expect("live tails lock")
        .remove(app.store.schema())
    {
        token.cancel();
    }
}

/// Opens a live tail of the events matching the parameters' query, after
/// `last_event_id` if given (a reconnect), else after `params.after`.
///
/// # Errors
/// 400 for a bad parameter or `Last-Event-ID`, 422 for an invalid query or a
/// position beyond the head, store errors.
pub async fn live_events(
    app: &App,
    params: &LiveParams,
    last_event_id: Option<&str>,
) -> ApiResult<LiveTail> {
    let query = query_of_params(&params.types, &params.tags, params.query.as_deref())?;
    let after = match last_event_id.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => Some(id.parse::<i64>().ok().filter(|p| *p >= 0).ok_or_else(|| {
            ApiError::bad_field(
                "Last-Event-ID",
                "must be the id (position) of an event this stream sent",
            )
        })?),
        None => params.after,
    };
    if after.is_some_and(|a| a < 0) {
        return Err(ApiError::bad_field("after", "must not be negative"));
    }
    let sub = Subscription::connect(
        &app.store,
        query,
        after.map(Position),
        SubscriptionOptions::default(),
    )
    .await?;
    Ok(LiveTail {
        sub,
        stop: live_stop(app),
        ready: VecDeque::new(),
        failures: 0,
    })
}

/// One event as an SSE message: `id` its position, `event` its type (left out
/// if the type holds a line break, which SSE cannot carry), `data` the
/// [`EventView`] JSON.
fn sse_event(e: &SequencedEvent) -> SseEvent {
    let view = EventView::from(e);
    let data = serde_json::to_string(&view).unwrap_or_else(|_| "{}".into());
    let mut msg = SseEvent::default().id(e.position.to_string()).data(data);
    let ty = e.event_type();
    if !ty.contains(['\n', '\r']) {
        msg = msg.event(ty);
    }
    msg
}

/// Live tail (Server-Sent Events).
///
/// Each event is one message: `id: <position>`, `event: <type>`, `data: <the
/// event as JSON>`. Events come in position order, each once, and never skip
/// one that committed late below others: an event is sent only once every
/// writer below it has finished. Reconnect with `Last-Event-ID` (browsers'
/// `EventSource` does) to resume right after the last event received. Idle
/// streams carry a keep-alive comment every 15 s. The stream ends when the
/// client disconnects or the server shuts down.
#[utoipa::path(get, path = "/api/v1/events/live", tag = "events",
    params(
        LiveParams,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event (sent by reconnecting clients)"),
    ),
    responses(
        (status = 200, description = "An event stream (`id: <position>`, `event: <type>`, `data: <event JSON>`)", body = String, content_type = "text/event-stream"),
        (status = 400, description = "A bad parameter or Last-Event-ID", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "An invalid query item, or `after` beyond the head of the log", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or the database is unavailable", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn live(
    State(app): State<App>,
    headers: HeaderMap,
    Params(p): Params<LiveParams>,
) -> ApiResult<Response> {
    let last = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_field("Last-Event-ID", "not text"))?
                .to_owned(),
        ),
        None => None,
    };
    let tail = live_events(&app, &p, last.as_deref()).await?;
    let stream =
        futures::StreamExt::map(tail.into_stream(), |e| Ok::<_, Infallible>(sse_event(&e)));
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
        .into_response())
}
