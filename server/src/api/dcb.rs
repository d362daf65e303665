//! The dcb.events-compatible `/read` and `/append`, the HTTP contract of the
//! dcb.events k6 benchmark suite's default adapter (see `docs/k6.md`).
//!
//! - `GET /read?query=<JSON>&options=<JSON>` answers a bare JSON array of
//!   `{"type","tags","data","position"}`, streamed as it is read.
//! - `POST /append` answers `{"durationInMicroseconds","appendConditionFailed"}`,
//!   200 also when the condition failed.
//!
//! The contract hands out bare positions, which carry no snapshot, and takes
//! them back as a condition's `after`. That is only safe if no event can still
//! commit at or below a position once it was handed out: `/read` therefore reads
//! only up to [`Store::settled_head`](dcbflow::Store::settled_head), below which
//! every writer has finished (see "The settled head" in `docs/architecture.md`).
//! A late committer always lands above every position `/read` has returned, so
//! `after: <largest position read>` catches it.

use std::borrow::Cow;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dcbflow::{
    AppendCondition, Cursor, Event, Position, Query, QueryItem, ReadOptions, SequencedEvent,
};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::{JsonBody, Params, parse_json};
use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// A dcb.events query: items OR'd; **no items matches every event**.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DcbQuery {
    /// The items, OR'd (`[]`: every event).
    #[serde(default)]
    pub items: Vec<DcbQueryItem>,
}

/// One item: type one of `types` (absent or empty: any) AND every one of `tags`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DcbQueryItem {
    /// Accepted types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// Required tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

impl From<&DcbQuery> for Query {
    fn from(q: &DcbQuery) -> Self {
        if q.items.is_empty() {
            return Query::all();
        }
        Query::from_items(q.items.iter().map(|i| {
            QueryItem::new()
                .types(i.types.iter().flatten().cloned())
                .tags(i.tags.iter().flatten().cloned())
        }))
    }
}

/// The `options` of `/read`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DcbReadOptions {
    /// Start here, inclusive: forward, events at or after it; backwards, at or
    /// before it. Absent (or 0 forward): from the start (backwards: the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<i64>,
    /// At most this many events (at least 1). Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Newest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backwards: Option<bool>,
}

/// The parameters of `GET /read`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DcbReadParams {
    /// The query as JSON: `{"items":[{"types"?:[..],"tags"?:[..]}]}`
    /// (`{"items":[]}` or absent: every event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Options as JSON: `{"from"?:n,"limit"?:n,"backwards"?:bool}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
}

/// A sequenced event as the dcb.events contract shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DcbEvent {
    /// Type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Tags (a sorted set).
    pub tags: Vec<String>,
    /// The data string exactly as appended (events appended with other JSON
    /// data through `/api/v1/events` show it serialized).
    pub data: String,
    /// Position (from 1).
    pub position: i64,
}

/// The borrowed form [`DcbEvent`] is serialized from.
#[derive(Serialize)]
struct DcbEventRef<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    tags: &'a [String],
    data: Cow<'a, str>,
    position: i64,
}

impl<'a> From<&'a SequencedEvent> for DcbEventRef<'a> {
    fn from(e: &'a SequencedEvent) -> Self {
        DcbEventRef {
            event_type: e.event_type(),
            tags: e.tags(),
            data: data_string(e.data()),
            position: e.position.0,
        }
    }
}

impl From<&SequencedEvent> for DcbEvent {
    fn from(e: &SequencedEvent) -> Self {
        DcbEvent {
            event_type: e.event_type().to_owned(),
            tags: e.tags().to_vec(),
            data: data_string(e.data()).into_owned(),
            position: e.position.0,
        }
    }
}

/// The data string of an event: stored as a JSON string, returned unchanged.
fn data_string(data: &Value) -> Cow<'_, str> {
    match data {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

/// `POST /append`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DcbAppendRequest {
    /// The events, appended atomically.
    pub events: Vec<DcbNewEvent>,
    /// The append condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<DcbCondition>,
}

/// An event to append.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DcbNewEvent {
    /// Type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// An opaque string, returned byte for byte by `/read`.
    pub data: String,
}

/// "Fail if an event matching `failIfEventsMatch` exists after `after`."
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DcbCondition {
    /// The query (`{"items":[]}`: every event).
    #[serde(rename = "failIfEventsMatch")]
    pub fail_if_events_match: DcbQuery,
    /// Only events after this position count (exclusive; absent or 0: every
    /// matching event). Use a position `/read` returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
}

/// What `/append` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DcbAppended {
    /// How long the append took in the store.
    #[serde(rename = "durationInMicroseconds")]
    pub duration_in_microseconds: u64,
    /// `true`: the condition matched and nothing was written.
    #[serde(rename = "appendConditionFailed")]
    pub append_condition_failed: bool,
}

/// Parses a JSON parameter, naming it (and the field within) when bad.
fn json_param<T: serde::de::DeserializeOwned>(name: &str, json: &str) -> ApiResult<T> {
    parse_json(json.as_bytes()).map_err(|e| match e.errors.first() {
        Some(f) => ApiError::bad_field(format!("{name}.{}", f.field), f.message.clone()),
        None => ApiError::bad_field(name, e.detail),
    })
}

/// Parses `/read`'s parameters.
///
/// # Errors
/// 400 naming the parameter.
pub fn parse_read_params(p: &DcbReadParams) -> ApiResult<(DcbQuery, DcbReadOptions)> {
    let query = match p.query.as_deref() {
        Some(q) => json_param("query", q)?,
        None => DcbQuery::default(),
    };
    let options = match p.options.as_deref() {
        Some(o) => json_param("options", o)?,
        None => DcbReadOptions::default(),
    };
    Ok((query, options))
}

/// The events `/read` returns, as a stream read row by row (constant memory):
/// those matching `query` within `options`, up to the settled head.
///
/// # Errors
/// 400 for a negative `from`, 422 for an invalid query or a zero limit, store
/// errors (a writer in flight for longer than the store's call timeout is a
/// 503 `timeout`). Errors while streaming come as stream items.
pub async fn read_dcb_events(
    app: &App,
    query: &DcbQuery,
    options: &DcbReadOptions,
) -> ApiResult<BoxStream<'static, dcbflow::Result<SequencedEvent>>> {
    if options.from.is_some_and(|f| f < 0) {
        return Err(ApiError::bad_field("options.from", "must not be negative"));
    }
    let query = Query::from(query);
    // Bare positions are only safe below the settled head: nothing can commit
    // at or below it any more (see the module documentation).
    let settled = app.store.settled_head().await?;
    let mut ro = ReadOptions::default();
    if let Some(l) = options.limit {
        ro = ro.limit(l);
    }
    let empty = if options.backwards.unwrap_or(false) {
        ro = ro.backwards();
        let up_to = options.from.map_or(settled, |f| Position(f).min(settled));
        ro = ro.up_to(up_to);
        up_to.0 < 1
    } else {
        ro = ro.up_to(settled);
        match options.from {
            Some(f) if f > 1 => {
                ro = ro.after(Position(f - 1));
                f > settled.0
            }
            _ => settled.0 < 1,
        }
    };
    if empty {
        // Still check the query and options, as a read would.
        drop(
            app.store
                .read(&query, ro.up_to(Position(0)).after(Position(0)))
                .await?,
        );
        return Ok(futures::stream::empty().boxed());
    }
    Ok(app.store.read(&query, ro).await?.boxed())
}

/// Events per chunk of the response body, at most (fewer when the database
/// has sent no more yet).
const CHUNK_EVENTS: usize = 256;

/// The events as the chunks of a JSON array.
fn json_array(
    events: BoxStream<'static, dcbflow::Result<SequencedEvent>>,
) -> impl Stream<Item = Result<Bytes, dcbflow::Error>> + Send {
    let mut first = true;
    let body = events.ready_chunks(CHUNK_EVENTS).map(move |chunk| {
        let mut buf = Vec::with_capacity(chunk.len() * 160);
        for e in chunk {
            let e = e.inspect_err(|e| tracing::error!(error = %e, "/read failed while streaming; the response is cut off"))?;
            if !first {
                buf.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut buf, &DcbEventRef::from(&e))
                .map_err(|e| dcbflow::Error::Config(format!("serializing an event: {e}")))?;
        }
        Ok(Bytes::from(buf))
    });
    futures::stream::once(async { Ok(Bytes::from_static(b"[")) })
        .chain(body)
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"]"))
        }))
}

/// dcb.events read.
///
/// The matching events as one JSON array, in position order (backwards: newest
/// first), streamed as they are read, so that reading the whole log does not
/// hold it in memory. Reads stop at the settled head: a position this returns
/// can be sent back as `/append`'s `after` without missing an event that
/// commits late below it. A database failure in the middle of the array cuts
/// the response off (the array is not closed).
#[utoipa::path(get, path = "/read", tag = "dcb", params(DcbReadParams),
    responses(
        (status = 200, description = "The matching events", body = [DcbEvent]),
        (status = 400, description = "Malformed `query` or `options` (named in `errors`)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "An invalid query item (an empty type or tag) or a zero limit", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded, the database is unavailable, or a writer stayed in flight too long", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn read(State(app): State<App>, Params(p): Params<DcbReadParams>) -> ApiResult<Response> {
    let (query, options) = parse_read_params(&p)?;
    let events = read_dcb_events(&app, &query, &options).await?;
    let mut res = Body::from_stream(json_array(events)).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

/// dcb.events append.
///
/// Appends atomically. A failed condition is not an error here: 200 with
/// `appendConditionFailed: true`, and nothing was written.
#[utoipa::path(post, path = "/append", tag = "dcb", request_body = DcbAppendRequest,
    responses(
        (status = 200, description = "Appended, or the condition failed (nothing written)", body = DcbAppended),
        (status = 400, description = "Malformed JSON, an unknown field, a negative `after`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 413, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 415, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused by the store (no events, an empty type or tag, `after` beyond the head, ...); nothing written", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or the database is unavailable", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn append(
    State(app): State<App>,
    JsonBody(req): JsonBody<DcbAppendRequest>,
) -> ApiResult<Json<DcbAppended>> {
    Ok(Json(append_dcb_events(&app, &req).await?))
}

/// Appends the request's events; a failed condition is a result, not an error.
///
/// # Errors
/// 400 for a negative `after`, 422 `invalid_input`, store errors.
pub async fn append_dcb_events(app: &App, req: &DcbAppendRequest) -> ApiResult<DcbAppended> {
    let condition = match &req.condition {
        Some(c) => {
            let mut condition = AppendCondition::new(Query::from(&c.fail_if_events_match));
            match c.after {
                Some(a) if a < 0 => {
                    return Err(ApiError::bad_field(
                        "condition.after",
                        "must not be negative",
                    ));
                }
                // Positions start at 1: after 0 is "nothing seen".
                Some(a) if a > 0 => condition = condition.after(Cursor::at(Position(a))),
                _ => {}
            }
            Some(condition)
        }
        None => None,
    };
    let events = req
        .events
        .iter()
        .map(|e| {
            Event::new(
                e.event_type.clone(),
                e.tags.clone(),
                Value::String(e.data.clone()),
            )
        })
        .collect();
    let started = Instant::now();
    let result = app.store.append(events, condition).await;
    let duration_in_microseconds = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Ok(_) => Ok(DcbAppended {
            duration_in_microseconds,
            append_condition_failed: false,
        }),
        Err(dcbflow::Error::Conflict { .. }) => Ok(DcbAppended {
            duration_in_microseconds,
            append_condition_failed: true,
        }),
        Err(e) => Err(e.into()),
    }
}
