//! `dcbflow append` and `dcbflow read`: the event log, with the same
//! operations and views as `/api/v1/events`; `read --follow` tails it live,
//! through the library's [`dcbflow::Subscription`] on the database or the
//! server's Server-Sent Events endpoint `/api/v1/events/live`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args};
use futures::StreamExt;
use serde_json::Value;
use uuid::Uuid;

use super::backend::{Backend, Remote, query_string};
use super::render::{self, Human};
use super::{emit, json_arg, note};
use crate::api::events::{
    self, AppendRequest, Appended, ConditionBody, EventPage, LiveParams, NewEvent, QueryBody,
    QueryItemBody, ReadParams,
};
use crate::api::instances::EventView;
use crate::error::{ApiError, ApiResult};

/// `dcbflow append`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["event_type", "file"])))]
pub struct AppendArgs {
    /// The event's type.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// A tag of the event (repeat for several).
    #[arg(long = "tag", value_name = "TAG", requires = "event_type")]
    pub tags: Vec<String>,
    /// The event's payload, JSON (or @FILE). Default: {}.
    #[arg(long, value_name = "JSON", requires = "event_type")]
    pub data: Option<String>,
    /// The event's metadata, JSON (or @FILE).
    #[arg(long, value_name = "JSON", requires = "event_type")]
    pub metadata: Option<String>,
    /// An idempotency id: appending it again returns the original position.
    #[arg(long, value_name = "UUID", requires = "event_type")]
    pub id: Option<Uuid>,
    /// Events from a file (`-`: stdin): a JSON array of events
    /// ({"type", "tags", "data", "metadata", "id"}), one event, or a whole
    /// append request ({"events": [...], "condition": {...}}).
    #[arg(long, value_name = "FILE", conflicts_with = "event_type")]
    pub file: Option<PathBuf>,
    /// Condition: fail if an event of one of these types exists (after --after) (repeat or comma-separate).
    #[arg(long = "condition-types", value_name = "TYPES", value_delimiter = ',')]
    pub condition_types: Vec<String>,
    /// Condition: ... carrying all of these tags (repeat or comma-separate).
    #[arg(long = "condition-tags", value_name = "TAGS", value_delimiter = ',')]
    pub condition_tags: Vec<String>,
    /// Condition: only events the read with this cursor (or after this position) did not see count.
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
}

/// `dcbflow read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Event types, any of which matches (repeat or comma-separate).
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Tags, all of which an event must carry (repeat or comma-separate).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// After this cursor or position (backwards: before it). With --follow:
    /// the position to tail from (default: the current end of the log).
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
    /// At most this many events (default 100, at most 1000); with --follow,
    /// stop after this many.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Newest first.
    #[arg(long, conflicts_with = "follow")]
    pub backwards: bool,
    /// Keep reading: print events as they are appended, until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

impl Human for EventPage {
    fn human(&self) -> String {
        let mut out = if self.events.is_empty() {
            "no events match\n".to_owned()
        } else {
            render::events_table(&self.events)
        };
        out.push_str(&format!(
            "cursor: {}  (pass as append --after to fail on anything this read did not see)\n",
            self.cursor
        ));
        if let Some(n) = &self.next {
            out.push_str(&format!("more: pass --after {n}\n"));
        }
        out
    }
}

impl Human for Appended {
    fn human(&self) -> String {
        let positions = self
            .positions
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if self.replayed {
            format!(
                "already appended (same ids): {} events at positions {positions}, transaction {}; nothing was written\n",
                self.positions.len(),
                self.transaction_id
            )
        } else {
            format!(
                "appended {} events at positions {positions} (transaction {})\n",
                self.positions.len(),
                self.transaction_id
            )
        }
    }
}

/// The request of `dcbflow append`.
///
/// # Errors
/// 400 naming the argument at fault.
pub fn append_request(args: AppendArgs) -> ApiResult<AppendRequest> {
    let mut req = match (&args.event_type, &args.file) {
        (Some(t), _) => AppendRequest {
            events: vec![NewEvent {
                event_type: t.clone(),
                tags: args.tags.clone(),
                data: match &args.data {
                    Some(d) => json_arg("data", d)?,
                    None => Value::Object(Default::default()),
                },
                metadata: args
                    .metadata
                    .as_deref()
                    .map(|m| json_arg("metadata", m))
                    .transpose()?,
                id: args.id,
            }],
            condition: None,
        },
        (None, Some(file)) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| ApiError::bad_field("file", format!("cannot read stdin: {e}")))?
            } else {
                std::fs::read_to_string(file).map_err(|e| {
                    ApiError::bad_field("file", format!("cannot read {}: {e}", file.display()))
                })?
            };
            events_of_file(&text).map_err(|mut e| {
                e.detail = format!("{}: {}", file.display(), e.detail);
                e
            })?
        }
        (None, None) => return Err(ApiError::bad_field("--type", "give --type or --file")),
    };
    let conditioned = !args.condition_types.is_empty() || !args.condition_tags.is_empty();
    if conditioned {
        if req.condition.is_some() {
            return Err(ApiError::bad_field(
                "--condition-types",
                "the file has a condition already; give it there or here, not both",
            ));
        }
        req.condition = Some(ConditionBody {
            fail_if_events_match: QueryBody {
                items: vec![QueryItemBody {
                    types: args.condition_types,
                    tags: args.condition_tags,
                }],
            },
            after: args.after,
        });
    } else if let Some(after) = args.after {
        match &mut req.condition {
            Some(c) => c.after = Some(after),
            None => {
                return Err(ApiError::bad_field(
                    "--after",
                    "an append condition needs --condition-types and/or --condition-tags (the events that would fail it)",
                ));
            }
        }
    }
    Ok(req)
}

/// The events of a file: an array of events, one event, or an append request.
fn events_of_file(text: &str) -> ApiResult<AppendRequest> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_field("file", format!("not JSON: {e}")))?;
    let bytes = text.as_bytes();
    match &value {
        Value::Array(_) => Ok(AppendRequest {
            events: crate::api::parse_json(bytes)?,
            condition: None,
        }),
        Value::Object(o) if o.contains_key("events") => crate::api::parse_json(bytes),
        Value::Object(_) => Ok(AppendRequest {
            events: vec![crate::api::parse_json(bytes)?],
            condition: None,
        }),
        _ => Err(ApiError::bad_field(
            "file",
            "expected an array of events, an event, or {\"events\": [...], \"condition\": ...}",
        )),
    }
}

/// `dcbflow append`.
///
/// # Errors
/// 400/422 bad input, 409 `conflict` when the condition fails.
pub async fn append(backend: &Backend, args: AppendArgs, json: bool) -> ApiResult<()> {
    let req = append_request(args)?;
    let appended = match backend {
        Backend::Local(app) => events::append_events(app, &req).await?,
        Backend::Remote(r) => {
            let url = r.url(&["api", "v1", "events"]);
            r.send(r.request(reqwest::Method::POST, url).json(&req))
                .await?
        }
    };
    emit(json, &appended)
}

/// A page of events.
///
/// # Errors
/// 400 for a bad parameter, 422 for an invalid query.
pub async fn read_page(backend: &Backend, p: &ReadParams) -> ApiResult<EventPage> {
    match backend {
        Backend::Local(app) => events::read_events(app, p).await,
        Backend::Remote(r) => {
            let mut url = r.url(&["api", "v1", "events"]);
            url.set_query(query_string(p)?.as_deref());
            r.send(r.request(reqwest::Method::GET, url)).await
        }
    }
}

/// `dcbflow read`.
///
/// # Errors
/// 400 for a bad parameter, 422 for an invalid query; unavailable.
pub async fn read(backend: &Backend, args: ReadArgs, json: bool) -> ApiResult<()> {
    if args.follow {
        return follow(backend, args, json).await;
    }
    let p = ReadParams {
        types: args.types,
        tags: args.tags,
        query: None,
        after: args.after,
        limit: args.limit,
        backwards: args.backwards.then_some(true),
    };
    emit(json, &read_page(backend, &p).await?)
}

/// Where a tail starts: `--after` (a position or a cursor), or the end of the log.
async fn start_of_tail(backend: &Backend, after: Option<&str>) -> ApiResult<i64> {
    if let Some(a) = after {
        return a
            .parse::<dcbflow::Cursor>()
            .map_err(|_| {
                ApiError::bad_field(
                    "after",
                    "not a cursor (<position>@<xmin>:<xmax>:<xip>) or a position",
                )
            })
            .map(|c| c.position.map_or(0, |p| p.0));
    }
    let p = ReadParams {
        limit: Some(1),
        backwards: Some(true),
        ..ReadParams::default()
    };
    let last = read_page(backend, &p).await?;
    let head = last.events.first().map_or(0, |e| e.position);
    note(format!(
        "following new events after position {head} (pass --after 0 for the whole log); Ctrl-C stops"
    ));
    Ok(head)
}

/// Prints one event of a tail: false once stdout is closed.
fn print_event(e: &EventView, json: bool) -> bool {
    let line = if json {
        serde_json::to_string(e).unwrap_or_default()
    } else {
        render::event_line(e)
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

async fn follow(backend: &Backend, args: ReadArgs, json: bool) -> ApiResult<()> {
    let after = start_of_tail(backend, args.after.as_deref()).await?;
    let params = LiveParams {
        after: Some(after),
        types: args.types,
        tags: args.tags,
        query: None,
        access_token: None,
    };
    let limit = args.limit;
    let mut printed = 0u64;
    let mut on_event = |e: &EventView| -> bool {
        printed += 1;
        print_event(e, json) && limit.is_none_or(|l| printed < l)
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    match backend {
        Backend::Local(app) => {
            let mut tail = events::live_events(app, &params, None).await?;
            loop {
                tokio::select! {
                    e = tail.next() => match e {
                        Some(e) => if !on_event(&EventView::from(&e)) { return Ok(()) },
                        None => return Err(ApiError::unavailable("unavailable", "the live tail ended: the database is unavailable", 1)),
                    },
                    _ = &mut ctrl_c => return Ok(()),
                }
            }
        }
        Backend::Remote(r) => {
            tokio::select! {
                res = follow_remote(r, params, &mut on_event) => res,
                _ = &mut ctrl_c => Ok(()),
            }
        }
    }
}

/// How long a remote tail tries to reconnect before giving up.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Tails the server's SSE endpoint, reconnecting with `Last-Event-ID` (so no
/// event is lost or repeated) when the stream drops; gives up after
/// [`RECONNECT_FOR`] without a connection.
async fn follow_remote(
    r: &Remote,
    mut params: LiveParams,
    on_event: &mut (dyn FnMut(&EventView) -> bool + Send),
) -> ApiResult<()> {
    let mut last_id: Option<i64> = None;
    let mut failing_since: Option<Instant> = None;
    let mut attempt = 0u32;
    loop {
        let mut url = r.url(&["api", "v1", "events", "live"]);
        if let Some(id) = last_id {
            params.after = Some(id);
        }
        url.set_query(query_string(&params)?.as_deref());
        let mut req = r
            .request(reqwest::Method::GET, url)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let err = match r.response(req).await {
            Ok(res) => {
                failing_since = None;
                attempt = 0;
                match read_sse(res, &mut last_id, on_event).await {
                    Ok(Done::Stop) => return Ok(()),
                    Ok(Done::Ended) => {
                        ApiError::unavailable("unavailable", "the server ended the stream", 1)
                    }
                    Err(e) => r.transport(&e),
                }
            }
            // The server's refusals (auth, bad input) are final.
            Err(e) if e.status.as_u16() != 503 => return Err(e),
            Err(e) => e,
        };
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_FOR {
            return Err(err);
        }
        attempt += 1;
        note(format!("{}; reconnecting (attempt {attempt})", err.detail));
        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10)))).await;
    }
}

enum Done {
    /// The caller has had enough (limit reached, stdout closed).
    Stop,
    /// The server ended the stream.
    Ended,
}

/// Reads Server-Sent Events: each message's `data` is an [`EventView`], its
/// `id` the position.
async fn read_sse(
    res: reqwest::Response,
    last_id: &mut Option<i64>,
    on_event: &mut (dyn FnMut(&EventView) -> bool + Send),
) -> Result<Done, reqwest::Error> {
    let mut body = res.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut data = String::new();
    let mut id: Option<String> = None;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                // A message ends.
                if !data.is_empty() {
                    match serde_json::from_str::<EventView>(&data) {
                        Ok(e) => {
                            *last_id = id
                                .as_deref()
                                .and_then(|i| i.parse().ok())
                                .or(Some(e.position));
                            if !on_event(&e) {
                                return Ok(Done::Stop);
                            }
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "live tail: a message that is not an event")
                        }
                    }
                }
                data.clear();
                id = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                "id" => id = Some(value.to_owned()),
                _ => {}
            }
        }
    }
    Ok(Done::Ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AppendArgs {
        AppendArgs {
            event_type: Some("T".into()),
            tags: vec!["a:1".into()],
            data: Some(r#"{"x":1}"#.into()),
            metadata: None,
            id: None,
            file: None,
            condition_types: vec![],
            condition_tags: vec![],
            after: None,
        }
    }

    #[test]
    fn append_requests() {
        let r = append_request(args()).unwrap();
        assert_eq!(r.events[0].data["x"], 1);
        assert!(r.condition.is_none());
        let mut a = args();
        a.after = Some("3".into());
        assert_eq!(append_request(a).unwrap_err().exit_code(), 2);
        let mut a = args();
        a.condition_tags = vec!["a:1".into()];
        a.after = Some("3".into());
        let c = append_request(a).unwrap().condition.unwrap();
        assert_eq!(c.after.as_deref(), Some("3"));
        assert_eq!(c.fail_if_events_match.items[0].tags, vec!["a:1"]);
    }

    #[test]
    fn files_of_events() {
        let one = events_of_file(r#"{"type": "T", "data": {}}"#).unwrap();
        assert_eq!(one.events.len(), 1);
        let many = events_of_file(
            r#"[{"type": "T", "data": 1}, {"type": "U", "tags": ["x"], "data": null}]"#,
        )
        .unwrap();
        assert_eq!(many.events.len(), 2);
        let req = events_of_file(r#"{"events": [{"type": "T", "data": 1}], "condition": {"fail_if_events_match": {"items": [{"types": ["T"]}]}}}"#).unwrap();
        assert!(req.condition.is_some());
        let bad = events_of_file(r#"[{"type": "T", "data": 1, "colour": "red"}]"#).unwrap_err();
        assert_eq!(bad.exit_code(), 2);
        assert!(
            bad.errors[0].field.contains("colour") || bad.detail.contains("colour"),
            "{bad}"
        );
        assert_eq!(events_of_file("3").unwrap_err().exit_code(), 2);
    }
}
