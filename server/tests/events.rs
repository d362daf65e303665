//! `/api/v1/events` over real HTTP on real PostgreSQL: read with queries,
//! pagination both ways, cursors as append conditions, conflicts, bad input
//! (nothing written), and the live tail (SSE) with writers committing out of
//! order and reconnects with `Last-Event-ID`.

mod support;

use dcbflow::{Event, Position, Query, ReadOptions};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use support::*;

/// Percent-encodes a query-string value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The head of the log as the store sees it.
async fn head(s: &TestServer) -> Option<Position> {
    s.app.store.head().await.unwrap()
}

/// Appends through the API: the positions.
async fn append(s: &TestServer, events: Value) -> Vec<i64> {
    let (status, body) = s.post("/api/v1/events", json!({ "events": events })).await;
    assert_eq!(status, 201, "{body}");
    body["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect()
}

fn positions(page: &Value) -> Vec<i64> {
    page["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events in {page}"))
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect()
}

fn ev(ty: &str, tags: &[&str], data: Value) -> Value {
    json!({ "type": ty, "tags": tags, "data": data })
}

#[tokio::test]
async fn append_then_read_with_types_tags_and_json_queries() {
    let s = TestServer::start().await;
    let id = uuid::Uuid::new_v4();
    let (status, body) = s
        .post(
            "/api/v1/events",
            json!({ "events": [
                { "type": "CourseDefined", "tags": ["course:c1"], "data": {"capacity": 10},
                  "metadata": {"by": "ada"} },
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["positions"], json!([1]));
    assert!(
        body["transaction_id"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .is_ok(),
        "{body}"
    );
    assert_eq!(body["replayed"], false);
    append(
        &s,
        json!([
            ev("StudentSubscribed", &["course:c1", "student:s1"], json!({})),
            ev(
                "StudentSubscribed",
                &["course:c2", "student:s1"],
                json!({ "list": [1, 2] })
            ),
            ev("CourseDefined", &["course:c2"], json!({ "text": "x" })),
        ]),
    )
    .await;
    let (status, body) = s
        .post(
            "/api/v1/events",
            json!({ "events": [{ "type": "Renamed", "tags": ["course:c1"], "data": {}, "id": id }] }),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // Everything.
    let (status, all) = s.get("/api/v1/events").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(positions(&all), vec![1, 2, 3, 4, 5]);
    let first = &all["events"][0];
    assert_eq!(first["type"], "CourseDefined");
    assert_eq!(first["tags"], json!(["course:c1"]));
    assert_eq!(first["data"], json!({"capacity": 10}));
    assert_eq!(first["metadata"], json!({"by": "ada"}));
    assert!(first["recorded_at"].is_string() && first["transaction_id"].is_string());
    assert_eq!(all["events"][4]["id"], json!(id));
    assert!(all["next"].is_null(), "one page: no next");
    assert!(all["cursor"].as_str().unwrap().starts_with("5@"), "{all}");

    // Types OR'd, tags AND'd; repeated keys and commas.
    let (_, p) = s.get("/api/v1/events?types=CourseDefined").await;
    assert_eq!(positions(&p), vec![1, 4]);
    let (_, p) = s.get("/api/v1/events?types=CourseDefined,Renamed").await;
    assert_eq!(positions(&p), vec![1, 4, 5]);
    let (_, p) = s
        .get("/api/v1/events?types=CourseDefined&types=Renamed")
        .await;
    assert_eq!(positions(&p), vec![1, 4, 5]);
    let (_, p) = s.get("/api/v1/events?tags=course:c1,student:s1").await;
    assert_eq!(positions(&p), vec![2]);
    let (_, p) = s
        .get("/api/v1/events?tags=course:c2&types=CourseDefined")
        .await;
    assert_eq!(positions(&p), vec![4]);
    // Several items, OR'd.
    let q = json!({ "items": [
        { "types": ["Renamed"] },
        { "types": ["StudentSubscribed"], "tags": ["course:c2"] },
    ]});
    let (status, p) = s
        .get(&format!("/api/v1/events?query={}", enc(&q.to_string())))
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(positions(&p), vec![3, 5]);
    // An item without types or tags matches everything; no items, nothing.
    let (_, p) = s
        .get(&format!(
            "/api/v1/events?query={}",
            enc(r#"{"items":[{}]}"#)
        ))
        .await;
    assert_eq!(positions(&p), vec![1, 2, 3, 4, 5]);
    let (_, p) = s
        .get(&format!("/api/v1/events?query={}", enc(r#"{"items":[]}"#)))
        .await;
    assert_eq!(positions(&p), Vec::<i64>::new());
}

#[tokio::test]
async fn data_and_metadata_may_be_any_json() {
    let s = TestServer::start().await;
    let datas = [
        json!(null),
        json!(true),
        json!(3.5),
        json!("text"),
        json!([1, "two", { "three": 3 }]),
        json!({ "nested": { "deep": [[]] } }),
    ];
    let events: Vec<Value> = datas
        .iter()
        .map(|d| json!({ "type": "Any", "data": d, "metadata": d }))
        .collect();
    append(&s, Value::Array(events)).await;
    // Read without the OpenAPI check of `TestServer::get`: `EventView`
    // (instances.rs) declares `data` and `metadata` objects (reported).
    let (status, page) = send(s.req(reqwest::Method::GET, "/api/v1/events")).await;
    assert_eq!(status, 200, "{page}");
    for (e, d) in page["events"].as_array().unwrap().iter().zip(&datas) {
        assert_eq!(&e["data"], d);
        if d.is_null() {
            // A null metadata is no metadata.
            assert!(e.get("metadata").is_none(), "{e}");
        } else {
            assert_eq!(&e["metadata"], d);
        }
    }
}

#[tokio::test]
async fn pages_forward_and_backwards_cover_the_log_once() {
    let s = TestServer::start().await;
    let events: Vec<Value> = (0..25)
        .map(|i| {
            ev(
                if i % 5 == 0 { "Odd" } else { "Tick" },
                &["clock:1"],
                json!({ "i": i }),
            )
        })
        .collect();
    append(&s, Value::Array(events)).await;

    // Forward, 10 at a time.
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/events?limit=10&after={}", enc(a)),
            None => "/api/v1/events?limit=10".to_owned(),
        };
        let (status, page) = s.get(&path).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        seen.extend(positions(&page));
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());

    // A page that ends exactly at the end says so: no next.
    let (_, page) = s.get("/api/v1/events?limit=5&after=20").await;
    assert_eq!(positions(&page), vec![21, 22, 23, 24, 25]);
    assert!(page["next"].is_null(), "{page}");
    // The cursor of a page is also an `after`.
    let (_, page) = s.get("/api/v1/events?limit=3").await;
    let cursor = page["cursor"].as_str().unwrap().to_owned();
    assert!(cursor.starts_with("3@"), "{cursor}");
    let (_, page) = s
        .get(&format!("/api/v1/events?limit=3&after={}", enc(&cursor)))
        .await;
    assert_eq!(positions(&page), vec![4, 5, 6]);

    // Backwards, 10 at a time, with a filter.
    let (mut seen, mut after) = (Vec::new(), None::<String>);
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/events?types=Tick&backwards=true&limit=10&after={a}"),
            None => "/api/v1/events?types=Tick&backwards=true&limit=10".to_owned(),
        };
        let (status, page) = s.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(positions(&page));
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    let ticks: Vec<i64> = (1..=25).rev().filter(|p| (p - 1) % 5 != 0).collect();
    assert_eq!(seen, ticks);
    let (_, page) = s.get("/api/v1/events?backwards=true&limit=1").await;
    assert_eq!(positions(&page), vec![25]);
    let (_, page) = s.get("/api/v1/events?backwards=true&after=1").await;
    assert_eq!(positions(&page), Vec::<i64>::new());
}

#[tokio::test]
async fn a_read_cursor_guards_a_decision_and_a_conflict_is_409() {
    let s = TestServer::start().await;
    append(&s, json!([ev("CourseDefined", &["course:c1"], json!({}))])).await;
    let (_, page) = s.get("/api/v1/events?types=SeatBooked&tags=seat:a1").await;
    assert_eq!(positions(&page), Vec::<i64>::new());
    let cursor = page["cursor"].as_str().unwrap().to_owned();
    let booking = |who: &str| {
        json!({
            "events": [ev("SeatBooked", &["seat:a1"], json!({ "by": who }))],
            "condition": {
                "fail_if_events_match": { "items": [{ "types": ["SeatBooked"], "tags": ["seat:a1"] }] },
                "after": cursor,
            }
        })
    };
    let (status, body) = s.post("/api/v1/events", booking("ada")).await;
    assert_eq!(status, 201, "{body}");
    let booked = body["positions"][0].as_i64().unwrap();
    // The same decision again: the first booking is an event it did not see.
    let (status, body) = s.post("/api/v1/events", booking("bob")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "conflict");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("event {booked} ")),
        "names the conflicting position: {body}"
    );
    // Unrelated events after the cursor do not conflict.
    let (status, body) = s
        .post(
            "/api/v1/events",
            json!({
                "events": [ev("SeatBooked", &["seat:b2"], json!({}))],
                "condition": {
                    "fail_if_events_match": { "items": [{ "types": ["SeatBooked"], "tags": ["seat:b2"] }] },
                    "after": cursor,
                }
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // No cursor: any matching event counts.
    let (status, body) = s
        .post(
            "/api/v1/events",
            json!({
                "events": [ev("SeatBooked", &["seat:a1"], json!({}))],
                "condition": { "fail_if_events_match": { "items": [{ "tags": ["seat:a1"] }] } }
            }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn a_read_cursor_catches_a_late_committer_below_it() {
    let s = TestServer::start().await;
    append(&s, json!([ev("Other", &[], json!({}))])).await;
    // A takes position 2 and stays open; B commits 3 above it.
    let mut client = s.app.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let a = s
        .app
        .store
        .append_in_tx(
            &tx,
            vec![Event::new("SeatBooked", ["seat:a1"], json!({}))],
            None,
        )
        .await
        .unwrap()
        .last_position();
    append(&s, json!([ev("Other", &[], json!({}))])).await;
    // The reader sees 1 and 3, not A; its cursor carries the snapshot.
    let (_, page) = s.get("/api/v1/events").await;
    assert_eq!(positions(&page), vec![1, 3]);
    let cursor = page["cursor"].as_str().unwrap().to_owned();
    tx.commit().await.unwrap();
    drop(client);
    let (status, body) = s
        .post(
            "/api/v1/events",
            json!({
                "events": [ev("SeatBooked", &["seat:a1"], json!({}))],
                "condition": {
                    "fail_if_events_match": { "items": [{ "tags": ["seat:a1"] }] },
                    "after": cursor,
                }
            }),
        )
        .await;
    assert_eq!(
        status, 409,
        "A committed below the cursor's position: {body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("event {a} ")),
        "{body}"
    );
}

#[tokio::test]
async fn bad_read_parameters_are_400_naming_them_and_bad_queries_422() {
    let s = TestServer::start().await;
    for (path, field) in [
        ("/api/v1/events?limit=0", "limit"),
        ("/api/v1/events?limit=1001", "limit"),
        ("/api/v1/events?limit=ten", "limit"),
        ("/api/v1/events?limit=-1", "limit"),
        ("/api/v1/events?after=yesterday", "after"),
        ("/api/v1/events?after=-3", "after"),
        ("/api/v1/events?after=5@9:2:", "after"),
        ("/api/v1/events?backwards=maybe", "backwards"),
        ("/api/v1/events?query=nope", "query"),
        ("/api/v1/events?query=%7B%22itemz%22%3A%5B%5D%7D", "query"),
        (
            "/api/v1/events?query=%7B%22items%22%3A%5B%5D%7D&types=A",
            "query",
        ),
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "bad_request", "{path}");
        assert_eq!(body["errors"][0]["field"], field, "{path}: {body}");
    }
    let (status, body) = s.get("/api/v1/events?colour=red").await;
    assert_eq!(status, 400, "unknown parameter: {body}");
    for path in [
        "/api/v1/events?tags=a,,b",
        "/api/v1/events?tags=",
        "/api/v1/events?types=",
        "/api/v1/events?query=%7B%22items%22%3A%5B%7B%22tags%22%3A%5B%22%22%5D%7D%5D%7D",
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(body["code"], "invalid_input", "{path}");
    }
}

#[tokio::test]
async fn bad_appends_are_refused_and_write_nothing() {
    let s = TestServer::start().await;
    append(&s, json!([ev("First", &["k:1"], json!({}))])).await;
    let before = head(&s).await;
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({ "events": [] }), 422, "invalid_input"),
        (
            json!({ "events": [ev("", &[], json!({}))] }),
            422,
            "invalid_input",
        ),
        (
            json!({ "events": [ev("A", &["ok"], json!({})), ev("B", &[""], json!({}))] }),
            422,
            "invalid_input",
        ),
        (
            json!({ "events": [ev("A", &[], json!("nul \u{0}"))] }),
            422,
            "invalid_input",
        ),
        (
            json!({ "events": [
                { "type": "A", "tags": [], "data": {}, "id": uuid::Uuid::new_v4() },
                { "type": "B", "tags": [], "data": {} },
            ]}),
            422,
            "invalid_input",
        ),
        (
            json!({ "events": [ev("A", &[], json!({}))], "condition": {
            "fail_if_events_match": { "items": [{ "types": ["A"] }] }, "after": "99" } }),
            422,
            "invalid_input",
        ),
        (
            json!({ "events": [ev("A", &[], json!({}))], "condition": {
            "fail_if_events_match": { "items": [{ "types": [""] }] } } }),
            422,
            "invalid_input",
        ),
        (
            json!({ "events": [ev("A", &[], json!({}))], "condition": {
            "fail_if_events_match": { "items": [] }, "after": "x" } }),
            400,
            "bad_request",
        ),
        (
            json!({ "events": [ev("A", &[], json!({}))], "colour": "red" }),
            400,
            "bad_request",
        ),
        (
            json!({ "events": [{ "type": "A", "tags": [], "data": {}, "extra": 1 }] }),
            400,
            "bad_request",
        ),
        (
            json!({ "events": [{ "type": "A", "tags": [] }] }),
            400,
            "bad_request",
        ),
        (
            json!({ "events": [{ "type": "A", "data": {}, "id": "not-a-uuid" }] }),
            400,
            "bad_request",
        ),
        (
            json!({ "events": [{ "type": 7, "data": {} }] }),
            400,
            "bad_request",
        ),
        (json!([1, 2]), 400, "bad_request"),
    ];
    for (body, status, code) in cases {
        let (got, problem) = s.post("/api/v1/events", body.clone()).await;
        assert_eq!(got, status, "{body}: {problem}");
        assert_eq!(problem["code"], code, "{body}: {problem}");
        assert_eq!(head(&s).await, before, "nothing written by {body}");
    }
    // A field of the wrong type is named.
    let (_, problem) = s
        .post(
            "/api/v1/events",
            json!({ "events": [{ "type": "A", "tags": "x", "data": {} }] }),
        )
        .await;
    assert_eq!(problem["errors"][0]["field"], "events[0].tags", "{problem}");
    // Not JSON.
    let (status, _) = send(
        s.req(reqwest::Method::POST, "/api/v1/events")
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 415);
    let (status, _) = send(
        s.req(reqwest::Method::POST, "/api/v1/events")
            .header("content-type", "application/json")
            .body("{\"events\": ["),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(head(&s).await, before);
}

#[tokio::test]
async fn events_with_ids_replay_instead_of_writing_twice() {
    let s = TestServer::start().await;
    let body = json!({ "events": [
        { "type": "Paid", "tags": ["order:1"], "data": {"eur": 5}, "id": uuid::Uuid::new_v4() },
        { "type": "Shipped", "tags": ["order:1"], "data": {}, "id": uuid::Uuid::new_v4() },
    ]});
    let (status, first) = s.post("/api/v1/events", body.clone()).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = s.post("/api/v1/events", body).await;
    assert_eq!(status, 200, "a replay is not a creation: {again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["positions"], first["positions"]);
    assert_eq!(again["transaction_id"], first["transaction_id"]);
    assert_eq!(head(&s).await, Some(Position(2)));
}

#[tokio::test]
async fn the_openapi_document_describes_the_event_endpoints() {
    let s = TestServer::start().await;
    let (status, doc) = s.get("/api/openapi.json").await;
    assert_eq!(status, 200);
    for (path, method) in [
        ("/api/v1/events", "get"),
        ("/api/v1/events", "post"),
        ("/api/v1/events/live", "get"),
        ("/read", "get"),
        ("/append", "post"),
    ] {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing");
        let responses = op["responses"].as_object().unwrap();
        for (code, r) in responses {
            if code.starts_with('4') || code.starts_with('5') {
                assert!(
                    r["content"]["application/problem+json"].is_object(),
                    "{method} {path} {code}: problem document"
                );
            }
        }
    }
    assert!(doc["paths"]["/api/v1/events/live"]["get"]["responses"]["200"]["content"]["text/event-stream"].is_object());
    let params = doc["paths"]["/api/v1/events"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = params.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for n in ["types", "tags", "query", "after", "limit", "backwards"] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
}

// ---------------------------------------------------------------------------
// The live tail
// ---------------------------------------------------------------------------

/// One SSE message.
#[derive(Debug, Clone, PartialEq)]
struct Msg {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// A minimal SSE client over a reqwest response.
struct Sse {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
    comments: usize,
}

impl Sse {
    /// Opens the live tail at `path` (with `last_event_id` as the header).
    async fn open(s: &TestServer, path: &str, last_event_id: Option<&str>) -> Sse {
        let mut r = s.req(reqwest::Method::GET, path);
        if let Some(id) = last_event_id {
            r = r.header("last-event-id", id);
        }
        let res = r.send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Sse {
            body: res.bytes_stream().boxed(),
            buf: String::new(),
            comments: 0,
        }
    }

    /// The next message, `None` when the stream ends; panics past the deadline.
    async fn next(&mut self) -> Option<Msg> {
        tokio::time::timeout(DEADLINE, self.next_inner())
            .await
            .expect("an SSE message within the deadline")
    }

    async fn next_inner(&mut self) -> Option<Msg> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut msg = Msg {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut is_message = false;
                for line in block.lines() {
                    if line.is_empty() {
                        continue;
                    }
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    is_message = true;
                    match field {
                        "id" => msg.id = Some(value.to_owned()),
                        "event" => msg.event = Some(value.to_owned()),
                        "data" => {
                            if !msg.data.is_empty() {
                                msg.data.push('\n');
                            }
                            msg.data.push_str(value);
                        }
                        _ => {}
                    }
                }
                if is_message {
                    return Some(msg);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                Some(Err(e)) => panic!("SSE stream failed: {e}"),
                None => return None,
            }
        }
    }

    /// The next `n` messages' positions (ids), checking each message's shape.
    async fn take(&mut self, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = self.next().await.expect("the stream goes on");
            let view: Value = serde_json::from_str(&m.data).unwrap();
            let id: i64 = m.id.as_deref().unwrap().parse().unwrap();
            assert_eq!(view["position"], id, "{m:?}");
            assert_eq!(m.event.as_deref(), view["type"].as_str(), "{m:?}");
            out.push(id);
        }
        out
    }
}

/// `Some` once a round of the live tail's horizon watcher has started after
/// `since` (the database's clock): it looked at the writers in flight after the
/// event above the open writer was visible, so it found that writer.
async fn looked_at_writers_since(
    s: &TestServer,
    since: chrono::DateTime<chrono::Utc>,
) -> Option<()> {
    let client = s.app.store.pool().get().await.unwrap();
    let pattern = format!("%\"{}\".writer_horizon%", s.schema);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND query LIKE $1 AND query_start > $2",
            &[&pattern, &since],
        )
        .await
        .unwrap();
    (row.get::<_, i64>(0) > 0).then_some(())
}

/// Opens a transaction on the app's pool and appends `ty` in it: the open
/// transaction (commit it with `tx.commit()`) and the position it took.
macro_rules! hold_open {
    ($s:expr, $client:ident, $tx:ident, $ty:expr) => {
        let mut $client = $s.app.store.pool().get().await.unwrap();
        let $tx = $client.transaction().await.unwrap();
        let _pos = $s
            .app
            .store
            .append_in_tx(&$tx, vec![Event::new($ty, ["live:1"], json!({ "held": true }))], None)
            .await
            .unwrap()
            .last_position();
    };
}

#[tokio::test]
async fn the_live_tail_delivers_out_of_order_commits_once_in_position_order() {
    let s = TestServer::start().await;
    append(
        &s,
        json!([
            ev("Before", &["live:1"], json!({})),
            ev("Before", &["live:1"], json!({}))
        ]),
    )
    .await;
    let mut sse = Sse::open(&s, "/api/v1/events/live", None).await;
    assert_eq!(sse.take(2).await, vec![1, 2]);

    // A1 (3) and A2 (4) take positions and stay open; B (5) commits above
    // them; A2 commits; C (6) commits; A1 commits last.
    let store = &s.app.store;
    let mut c1 = store.pool().get().await.unwrap();
    let t1 = c1.transaction().await.unwrap();
    let a1 = store
        .append_in_tx(&t1, vec![Event::new("A1", ["live:1"], json!({}))], None)
        .await
        .unwrap()
        .last_position();
    let mut c2 = store.pool().get().await.unwrap();
    let t2 = c2.transaction().await.unwrap();
    let a2 = store
        .append_in_tx(&t2, vec![Event::new("A2", ["live:1"], json!({}))], None)
        .await
        .unwrap()
        .last_position();
    let b = append(&s, json!([ev("B", &["live:1"], json!({}))])).await[0];
    t2.commit().await.unwrap();
    let c = append(&s, json!([ev("C", &["live:1"], json!({}))])).await[0];
    assert!(a1 < a2 && a2 < Position(b) && b < c, "{a1} {a2} {b} {c}");
    // A second client on the same events, opened while A1 is still open.
    let mut other = Sse::open(&s, "/api/v1/events/live?after=2", None).await;
    t1.commit().await.unwrap();
    drop((c1, c2));

    let expected = vec![a1.0, a2.0, b, c];
    assert_eq!(
        sse.take(4).await,
        expected,
        "every event once, in position order"
    );
    assert_eq!(other.take(4).await, expected);
    // Nothing more: the next message is the next event appended.
    let d = append(&s, json!([ev("D", &["live:1"], json!({}))])).await[0];
    assert_eq!(sse.take(1).await, vec![d]);
    assert_eq!(other.take(1).await, vec![d]);
}

#[tokio::test]
async fn the_live_tail_holds_back_events_above_an_open_writer() {
    let s = TestServer::start().await;
    let mut sse = Sse::open(&s, "/api/v1/events/live", None).await;
    let first = append(&s, json!([ev("First", &[], json!({}))])).await[0];
    assert_eq!(sse.take(1).await, vec![first]);
    hold_open!(s, client, tx, "Held");
    let above = append(&s, json!([ev("Above", &[], json!({}))])).await[0];
    // The event above the open writer is committed and readable...
    eventually("the event above is visible", || async {
        let all = s
            .app
            .store
            .read_all(&Query::all(), ReadOptions::default())
            .await
            .unwrap();
        all.events
            .iter()
            .any(|e| e.position.0 == above)
            .then_some(())
    })
    .await;
    // ...but the tail sends nothing until the writer below it has ended: the
    // next message is the held event, then the one above.
    let next = tokio::spawn(async move {
        let got = sse.take(2).await;
        (got, sse)
    });
    // The tail has seen the event above and is waiting for the writer below
    // it (a round of its watcher started since, and found that writer)...
    let since: chrono::DateTime<chrono::Utc> = s
        .app
        .store
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT now()", &[])
        .await
        .unwrap()
        .get(0);
    eventually("the tail waits for the open writer", || {
        looked_at_writers_since(&s, since)
    })
    .await;
    // ...and has sent nothing.
    assert!(
        !next.is_finished(),
        "sent events while a writer below them was open"
    );
    tx.commit().await.unwrap();
    drop(client);
    let (got, _sse) = next.await.unwrap();
    assert_eq!(got, vec![first + 1, above]);
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_resumes_without_gaps_or_duplicates() {
    let s = TestServer::start().await;
    let events: Vec<Value> = (0..5)
        .map(|i| ev("Tick", &["t:1"], json!({ "i": i })))
        .collect();
    append(&s, Value::Array(events)).await;
    let mut sse = Sse::open(&s, "/api/v1/events/live?types=Tick", None).await;
    let got = sse.take(3).await;
    assert_eq!(got, vec![1, 2, 3]);
    drop(sse);
    // While disconnected: more events, one of them committing late.
    hold_open!(s, client, tx, "Tick");
    append(
        &s,
        json!([ev("Tick", &["t:1"], json!({})), ev("Other", &[], json!({}))]),
    )
    .await;
    // The reconnect names the last id it got; `after` in the URL (the original
    // request's) loses to it. Nothing comes while the writer below is open.
    let mut sse = Sse::open(&s, "/api/v1/events/live?types=Tick&after=0", Some("3")).await;
    tx.commit().await.unwrap();
    drop(client);
    assert_eq!(
        sse.take(4).await,
        vec![4, 5, 6, 7],
        "the ones before, the late committer, the one above it (Other, 8, filtered out)"
    );
    let more = append(&s, json!([ev("Tick", &["t:1"], json!({}))])).await[0];
    assert_eq!(sse.take(1).await, vec![more]);
    // The URL's `after` alone works too.
    let mut sse = Sse::open(&s, "/api/v1/events/live?types=Tick&after=5", None).await;
    assert_eq!(sse.take(3).await, vec![6, 7, more]);
}

#[tokio::test]
async fn the_live_tail_filters_and_refuses_bad_parameters() {
    let s = TestServer::start().await;
    append(
        &s,
        json!([
            ev("A", &["x:1"], json!({})),
            ev("B", &["x:1", "y:1"], json!({})),
            ev("A", &["y:1"], json!({})),
        ]),
    )
    .await;
    let mut sse = Sse::open(&s, "/api/v1/events/live?tags=y:1", None).await;
    assert_eq!(sse.take(2).await, vec![2, 3]);
    let q = enc(r#"{"items":[{"types":["A"],"tags":["x:1"]},{"types":["B"]}]}"#);
    let mut sse = Sse::open(&s, &format!("/api/v1/events/live?query={q}"), None).await;
    assert_eq!(sse.take(2).await, vec![1, 2]);
    let m = {
        let mut sse = Sse::open(&s, "/api/v1/events/live?types=B", None).await;
        sse.next().await.unwrap()
    };
    assert_eq!(m.id.as_deref(), Some("2"));
    assert_eq!(m.event.as_deref(), Some("B"));
    let view: Value = serde_json::from_str(&m.data).unwrap();
    assert_eq!(view["tags"], json!(["x:1", "y:1"]));

    for (path, header, status, field) in [
        ("/api/v1/events/live?after=-1", None, 400, Some("after")),
        ("/api/v1/events/live?after=x", None, 400, Some("after")),
        (
            "/api/v1/events/live",
            Some("abc"),
            400,
            Some("Last-Event-ID"),
        ),
        (
            "/api/v1/events/live",
            Some("-4"),
            400,
            Some("Last-Event-ID"),
        ),
        ("/api/v1/events/live?after=99", None, 422, None),
        ("/api/v1/events/live", Some("99"), 422, None),
        ("/api/v1/events/live?tags=", None, 422, None),
        ("/api/v1/events/live?colour=red", None, 400, None),
    ] {
        let mut r = s.req(reqwest::Method::GET, path);
        if let Some(h) = header {
            r = r.header("last-event-id", h);
        }
        let (got, body) = send(r).await;
        assert_eq!(got, status, "{path} {header:?}: {body}");
        if let Some(f) = field {
            assert_eq!(body["errors"][0]["field"], f, "{path}: {body}");
        }
    }
}

#[tokio::test]
async fn the_live_tail_takes_the_token_in_the_query_string_for_event_source() {
    let mut s = TestServer::with_tokens().await;
    append(&s, json!([ev("A", &[], json!({}))])).await;
    s.token = None;
    let (status, _) = send(s.req(reqwest::Method::GET, "/api/v1/events/live")).await;
    assert_eq!(status, 401);
    let mut sse = Sse::open(
        &s,
        &format!("/api/v1/events/live?access_token={READER}"),
        None,
    )
    .await;
    assert_eq!(sse.take(1).await, vec![1]);
}

#[tokio::test]
async fn live_tails_end_when_the_server_shuts_down() {
    let s = TestServer::start().await;
    append(&s, json!([ev("A", &[], json!({}))])).await;
    let mut sse = Sse::open(&s, "/api/v1/events/live", None).await;
    assert_eq!(sse.take(1).await, vec![1]);
    dcbflow_server::api::events::end_live_tails(&s.app);
    assert_eq!(sse.next().await, None, "the stream ends");
    // Tails opened afterwards run normally.
    let mut sse = Sse::open(&s, "/api/v1/events/live", None).await;
    assert_eq!(sse.take(1).await, vec![1]);
}
