//! The dcb.events-compatible `/read` and `/append` over real HTTP on real
//! PostgreSQL: the contract the k6 benchmark suite's default HTTP adapter
//! relies on (bare arrays, `from` inclusive, `items: []` for everything, data
//! strings byte for byte, a failed condition as 200), streaming of large reads,
//! and the late committer that bare positions must not let through.

mod support;

use dcbflow::{Event, Position, Query, ReadOptions};
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

/// The `/read` path for a query and options, as the adapter builds it.
fn read_path(query: &Value, options: Option<&Value>) -> String {
    let mut p = format!("/read?query={}", enc(&query.to_string()));
    if let Some(o) = options {
        p.push_str(&format!("&options={}", enc(&o.to_string())));
    }
    p
}

/// `/read`: the events, checking the shape the adapter checks (and no more
/// fields than the contract's).
async fn read(s: &TestServer, query: Value, options: Option<Value>) -> Vec<Value> {
    let (status, body) = s.get(&read_path(&query, options.as_ref())).await;
    assert_eq!(status, 200, "{body}");
    let events = body
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {body}"));
    for e in events {
        let o = e.as_object().unwrap();
        assert_eq!(o.len(), 4, "{e}");
        assert!(e["type"].is_string() && e["tags"].is_array(), "{e}");
        assert!(e["data"].is_string() && e["position"].is_i64(), "{e}");
    }
    events.clone()
}

fn positions(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect()
}

fn all() -> Value {
    json!({ "items": [] })
}

/// `/append`: `appendConditionFailed`.
async fn append(s: &TestServer, events: Value, condition: Option<Value>) -> bool {
    let mut body = json!({ "events": events });
    if let Some(c) = condition {
        body["condition"] = c;
    }
    let (status, res) = s.post("/append", body).await;
    assert_eq!(status, 200, "{res}");
    assert!(res["durationInMicroseconds"].is_u64(), "{res}");
    assert_eq!(res.as_object().unwrap().len(), 2, "{res}");
    res["appendConditionFailed"].as_bool().unwrap()
}

fn ev(ty: &str, tags: &[&str], data: &str) -> Value {
    json!({ "type": ty, "tags": tags, "data": data })
}

async fn head(s: &TestServer) -> Option<Position> {
    s.app.store.head().await.unwrap()
}

#[tokio::test]
async fn reads_answer_bare_arrays_and_no_items_match_everything() {
    let s = TestServer::start().await;
    assert_eq!(
        read(&s, all(), None).await,
        Vec::<Value>::new(),
        "empty log"
    );
    assert!(
        !append(
            &s,
            json!([ev("A", &["t:1"], "{}"), ev("B", &["t:2", "t:1"], "x")]),
            None
        )
        .await
    );
    assert!(!append(&s, json!([ev("C", &[], "")]), None).await);
    let events = read(&s, all(), None).await;
    assert_eq!(positions(&events), vec![1, 2, 3], "positions start at 1");
    assert_eq!(
        events[0],
        json!({ "type": "A", "tags": ["t:1"], "data": "{}", "position": 1 })
    );
    assert_eq!(events[1]["tags"], json!(["t:1", "t:2"]));
    assert_eq!(events[2]["tags"], json!([]));
    // Without a query parameter: everything too.
    let (status, body) = s.get("/read").await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), 3);

    // Items: types OR'd, tags AND'd, items OR'd; absent or empty lists: any.
    let q = |v: Value| positions_of(&s, v);
    assert_eq!(
        q(json!({ "items": [{ "types": ["A", "C"] }] })).await,
        vec![1, 3]
    );
    assert_eq!(
        q(json!({ "items": [{ "tags": ["t:1"] }] })).await,
        vec![1, 2]
    );
    assert_eq!(
        q(json!({ "items": [{ "tags": ["t:1", "t:2"] }] })).await,
        vec![2]
    );
    assert_eq!(
        q(json!({ "items": [{ "types": ["A"], "tags": ["t:2"] }] })).await,
        Vec::<i64>::new()
    );
    assert_eq!(
        q(json!({ "items": [{ "types": ["A"], "tags": ["t:1"] }, { "types": ["C"] }] })).await,
        vec![1, 3]
    );
    assert_eq!(q(json!({ "items": [{}] })).await, vec![1, 2, 3]);
    assert_eq!(
        q(json!({ "items": [{ "types": [], "tags": [] }] })).await,
        vec![1, 2, 3]
    );
    assert_eq!(
        q(json!({ "items": [{ "types": null, "tags": ["t:2"] }] })).await,
        vec![2]
    );
}

async fn positions_of(s: &TestServer, query: Value) -> Vec<i64> {
    positions(&read(s, query, None).await)
}

#[tokio::test]
async fn from_is_inclusive_both_ways_and_limit_caps() {
    let s = TestServer::start().await;
    let events: Vec<Value> = (1..=10)
        .map(|i| {
            ev(
                if i % 2 == 0 { "Even" } else { "Odd" },
                &["n:1"],
                &i.to_string(),
            )
        })
        .collect();
    append(&s, Value::Array(events), None).await;
    let r = |o: Value| {
        let s = &s;
        async move { positions(&read(s, all(), Some(o)).await) }
    };
    assert_eq!(r(json!({ "from": 4 })).await, (4..=10).collect::<Vec<_>>());
    assert_eq!(r(json!({ "from": 1 })).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(r(json!({ "from": 0 })).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(r(json!({ "from": 10 })).await, vec![10]);
    assert_eq!(r(json!({ "from": 11 })).await, Vec::<i64>::new());
    assert_eq!(
        r(json!({ "from": 4, "backwards": true })).await,
        vec![4, 3, 2, 1]
    );
    assert_eq!(r(json!({ "from": 1, "backwards": true })).await, vec![1]);
    assert_eq!(
        r(json!({ "from": 0, "backwards": true })).await,
        Vec::<i64>::new()
    );
    assert_eq!(
        r(json!({ "from": 99, "backwards": true })).await,
        (1..=10).rev().collect::<Vec<_>>()
    );
    assert_eq!(
        r(json!({ "backwards": true })).await,
        (1..=10).rev().collect::<Vec<_>>()
    );
    assert_eq!(r(json!({ "limit": 3 })).await, vec![1, 2, 3]);
    assert_eq!(r(json!({ "from": 4, "limit": 2 })).await, vec![4, 5]);
    assert_eq!(r(json!({ "from": 9, "limit": 5 })).await, vec![9, 10]);
    assert_eq!(
        r(json!({ "from": 7, "limit": 2, "backwards": true })).await,
        vec![7, 6]
    );
    assert_eq!(
        r(json!({ "backwards": false })).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(r(json!({})).await, (1..=10).collect::<Vec<_>>());
    // The adapter's readLastEvent.
    let last = read(
        &s,
        json!({ "items": [{ "types": ["Odd"] }] }),
        Some(json!({ "backwards": true, "limit": 1 })),
    )
    .await;
    assert_eq!(positions(&last), vec![9]);
    assert_eq!(last[0]["data"], "9");
    // `from` with a filter: inclusive of the position, not of the match.
    let evens = read(
        &s,
        json!({ "items": [{ "types": ["Even"] }] }),
        Some(json!({ "from": 5 })),
    )
    .await;
    assert_eq!(positions(&evens), vec![6, 8, 10]);
}

#[tokio::test]
async fn a_read_without_options_streams_every_event_in_order() {
    let s = TestServer::start().await;
    const N: i64 = 20_000;
    for batch in 0..20 {
        let events: Vec<Value> = (0..1000)
            .map(|i| {
                ev(
                    "Tick",
                    &[&format!("batch:{batch}")],
                    &format!("{{\"i\":{}}}", batch * 1000 + i),
                )
            })
            .collect();
        assert!(!append(&s, Value::Array(events), None).await);
    }
    let res = s
        .req(reqwest::Method::GET, &read_path(&all(), None))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    // Streamed: no length known up front, the body comes in chunks.
    assert!(
        res.headers().get("content-length").is_none(),
        "{:?}",
        res.headers()
    );
    let mut chunks = 0usize;
    let mut body = Vec::new();
    let mut stream = res.bytes_stream();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        body.extend_from_slice(&chunk.unwrap());
        chunks += 1;
    }
    assert!(chunks > 10, "{chunks} chunks");
    let events: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(events.len() as i64, N);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["position"], i as i64 + 1);
        let data: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["i"], i as i64);
    }
    // A filter over the same log.
    let one = read(&s, json!({ "items": [{ "tags": ["batch:7"] }] }), None).await;
    assert_eq!(positions(&one), (7001..=8000).collect::<Vec<_>>());
}

#[tokio::test]
async fn data_round_trips_byte_for_byte() {
    let s = TestServer::start().await;
    let strings = [
        "",
        " ",
        "plain",
        "unicode: héllo wörld, 日本語, emoji 🦀🌍, combining e\u{301}, rtl שלום",
        "escapes: \" \\ / \u{8} \u{c} \n \r \t \u{1} \u{1f} \u{7f} \u{2028} \u{2029}",
        "  leading and trailing whitespace\r\n\t  ",
        r#"{"looks": "like JSON",   "n": 1.0e3, "nested": [ {"a" :null} ] }"#,
        r#"{"a":1}"#,
        "null",
        "123",
        "\"quoted\"",
        "\\u0041 is not A",
        "line\nbreaks\n\nand a blank line",
    ];
    let events: Vec<Value> = strings.iter().map(|d| ev("Data", &[], d)).collect();
    assert!(!append(&s, Value::Array(events), None).await);
    // Check the raw bytes too: the JSON string in the response decodes to
    // exactly what was sent.
    let text = s
        .req(reqwest::Method::GET, &read_path(&all(), None))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let back: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(back.len(), strings.len());
    for (e, sent) in back.iter().zip(strings) {
        assert_eq!(
            e["data"].as_str().unwrap().as_bytes(),
            sent.as_bytes(),
            "{e}"
        );
    }
    // A NUL cannot be stored: refused, nothing written.
    let before = head(&s).await;
    let (status, body) = s
        .post(
            "/append",
            json!({ "events": [ev("Data", &[], "nul\u{0}")] }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(head(&s).await, before);
}

#[tokio::test]
async fn a_failed_condition_is_200_and_writes_nothing() {
    let s = TestServer::start().await;
    let item = |tag: &str| json!({ "items": [{ "types": ["Registered"], "tags": [tag] }] });
    // Nothing yet: the condition holds.
    assert!(
        !append(
            &s,
            json!([ev("Registered", &["user:ada"], "1")]),
            Some(json!({ "failIfEventsMatch": item("user:ada") }))
        )
        .await
    );
    let before = head(&s).await;
    assert_eq!(before, Some(Position(1)));
    // The same again: fails, nothing written.
    assert!(
        append(
            &s,
            json!([ev("Registered", &["user:ada"], "2")]),
            Some(json!({ "failIfEventsMatch": item("user:ada") }))
        )
        .await
    );
    assert_eq!(head(&s).await, before);
    // after 0: nothing seen, so the existing event counts.
    assert!(
        append(
            &s,
            json!([ev("Registered", &["user:ada"], "3")]),
            Some(json!({ "failIfEventsMatch": item("user:ada"), "after": 0 }))
        )
        .await
    );
    assert_eq!(head(&s).await, before);
    // after the event: it was seen, the condition holds.
    assert!(
        !append(
            &s,
            json!([ev("Renamed", &["user:ada"], "4")]),
            Some(json!({ "failIfEventsMatch": item("user:ada"), "after": 1 }))
        )
        .await
    );
    // Another scope does not conflict.
    assert!(
        !append(
            &s,
            json!([ev("Registered", &["user:bob"], "5")]),
            Some(json!({ "failIfEventsMatch": item("user:bob") }))
        )
        .await
    );
    // items [] in a condition: every event.
    assert!(
        append(
            &s,
            json!([ev("X", &[], "6")]),
            Some(json!({ "failIfEventsMatch": all(), "after": 2 }))
        )
        .await
    );
    assert!(
        !append(
            &s,
            json!([ev("X", &[], "7")]),
            Some(json!({ "failIfEventsMatch": all(), "after": 3 }))
        )
        .await
    );
    assert!(
        append(
            &s,
            json!([ev("X", &[], "8")]),
            Some(json!({ "failIfEventsMatch": all() }))
        )
        .await
    );
    // The adapter's flow: read the last matching position, append after it.
    let last = read(
        &s,
        item("user:ada"),
        Some(json!({ "backwards": true, "limit": 1 })),
    )
    .await;
    let after = last.first().map_or(0, |e| e["position"].as_i64().unwrap());
    assert_eq!(after, 1);
    assert!(
        !append(
            &s,
            json!([ev("Registered", &["user:ada"], "9")]),
            Some(json!({ "failIfEventsMatch": item("user:ada"), "after": after }))
        )
        .await
    );
    assert!(
        append(
            &s,
            json!([ev("Registered", &["user:ada"], "10")]),
            Some(json!({ "failIfEventsMatch": item("user:ada"), "after": after }))
        )
        .await
    );
    let datas: Vec<String> = read(&s, all(), None)
        .await
        .iter()
        .map(|e| e["data"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(datas, ["1", "4", "5", "7", "9"]);
}

#[tokio::test]
async fn bad_input_is_a_problem_document_and_writes_nothing() {
    let s = TestServer::start().await;
    append(&s, json!([ev("A", &["t:1"], "")]), None).await;
    for (path, status, field) in [
        ("/read?query=nope".to_owned(), 400, Some("query")),
        (
            format!("/read?query={}", enc(r#"{"items":[{"types":"A"}]}"#)),
            400,
            Some("query.items[0].types"),
        ),
        (
            format!("/read?query={}", enc(r#"{"itemz":[]}"#)),
            400,
            Some("query"),
        ),
        (
            format!("/read?query={}&options=%7B", enc(r#"{"items":[]}"#)),
            400,
            Some("options"),
        ),
        (
            format!(
                "/read?query={}&options={}",
                enc(r#"{"items":[]}"#),
                enc(r#"{"form":1}"#)
            ),
            400,
            Some("options"),
        ),
        (
            format!(
                "/read?query={}&options={}",
                enc(r#"{"items":[]}"#),
                enc(r#"{"from":-1}"#)
            ),
            400,
            Some("options.from"),
        ),
        (
            format!(
                "/read?query={}&options={}",
                enc(r#"{"items":[]}"#),
                enc(r#"{"limit":-1}"#)
            ),
            400,
            Some("options.limit"),
        ),
        (
            format!(
                "/read?query={}&options={}",
                enc(r#"{"items":[]}"#),
                enc(r#"{"backwards":"yes"}"#)
            ),
            400,
            Some("options.backwards"),
        ),
        ("/read?colour=red".to_owned(), 400, None),
        (
            format!(
                "/read?query={}&options={}",
                enc(r#"{"items":[]}"#),
                enc(r#"{"limit":0}"#)
            ),
            422,
            None,
        ),
        (
            format!("/read?query={}", enc(r#"{"items":[{"tags":[""]}]}"#)),
            422,
            None,
        ),
        (
            format!("/read?query={}", enc(r#"{"items":[{"types":[""]}]}"#)),
            422,
            None,
        ),
    ] {
        let (got, body) = s.get(&path).await;
        assert_eq!(got, status, "{path}: {body}");
        if let Some(f) = field {
            assert!(
                body["errors"][0]["field"].as_str().unwrap().starts_with(f),
                "{path}: {body}"
            );
        }
    }
    let before = head(&s).await;
    for (body, status) in [
        (json!({ "events": [] }), 422),
        (json!({ "events": [ev("", &[], "")] }), 422),
        (
            json!({ "events": [ev("A", &["ok"], ""), ev("B", &[""], "")] }),
            422,
        ),
        (
            json!({ "events": [{ "type": "A", "tags": [], "data": {"not": "a string"} }] }),
            400,
        ),
        (json!({ "events": [{ "type": "A", "tags": [] }] }), 400),
        (
            json!({ "events": [ev("A", &[], "")], "condition": { "failIfEventsMatch": all(), "after": -1 } }),
            400,
        ),
        (
            json!({ "events": [ev("A", &[], "")], "condition": { "failIfEventsMatch": all(), "after": 99 } }),
            422,
        ),
        (
            json!({ "events": [ev("A", &[], "")], "condition": { "after": 1 } }),
            400,
        ),
        (
            json!({ "events": [ev("A", &[], "")], "condition": { "fail_if_events_match": all() } }),
            400,
        ),
        (json!({ "events": [ev("A", &[], "")], "extra": true }), 400),
    ] {
        let (got, problem) = s.post("/append", body.clone()).await;
        assert_eq!(got, status, "{body}: {problem}");
        assert_eq!(head(&s).await, before, "nothing written by {body}");
    }
    let (status, _) = send(
        s.req(reqwest::Method::POST, "/append")
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 415);
}

#[tokio::test]
async fn the_endpoints_can_be_switched_off() {
    let s = TestServer::with(|c| c.api.dcb_endpoints = false).await;
    // (Not through `get`/`post`: they check the answer against the OpenAPI
    // document, which rightly has no such paths.)
    let (status, body) = send(s.req(reqwest::Method::GET, &read_path(&all(), None))).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, _) = send(
        s.req(reqwest::Method::POST, "/append")
            .json(&json!({ "events": [ev("A", &[], "")] })),
    )
    .await;
    assert_eq!(status, 404);
    let (_, doc) = s.get("/api/openapi.json").await;
    assert!(doc["paths"]["/read"].is_null() && doc["paths"]["/append"].is_null());
    assert_eq!(head(&s).await, None);
}

/// `Some` once some connection of the server has asked whether the writers in
/// flight have finished: a `/read` is waiting for the settled head.
async fn waiting_for_writers(s: &TestServer) -> Option<()> {
    let client = s.app.store.pool().get().await.unwrap();
    let pattern = format!("%\"{}\".writers_finished%", s.schema);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap();
    (row.get::<_, i64>(0) > 0).then_some(())
}

/// THE LATE COMMITTER. Writer A takes a position and holds its transaction
/// open; writer B commits above it. A bare position is only a safe `after` if
/// nothing can still commit at or below it, so a `/read` issued meanwhile must
/// not hand out B's position while A is open (it waits for A, or stops below
/// it), and a condition after the largest position `/read` returned must fail
/// on every matching event the reader did not see, A's included.
///
/// Tried once with `/read` reading to the plain head (`store.head()` instead
/// of `store.settled_head()` in `read_dcb_events`): the read answered at once,
/// while A was open, with B's position and without A's, and the first check
/// failed:
///
/// ```text
/// panicked at server/tests/dcb.rs: /read handed out [1, 3] while writer A (2) was open
/// ```
///
/// With that check switched off, the next one failed ("the read missed an
/// event below a position it handed out", the log up to 3 being [1, 2, 3]),
/// and with that one off too, the condition `after: 3` on A's scope
/// succeeded although A's event at 2 was never seen ("the condition after 3
/// missed an event the reader did not see": `false` vs `true`).
#[tokio::test]
async fn a_late_committer_below_a_handed_out_position_is_never_missed() {
    let s = TestServer::start().await;
    let seat = json!({ "items": [{ "types": ["SeatBooked"], "tags": ["seat:a1"] }] });
    assert!(!append(&s, json!([ev("Opened", &["hall:1"], "")]), None).await);

    // A takes position 2 and stays open.
    let mut client = s.app.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let a = s
        .app
        .store
        .append_in_tx(
            &tx,
            vec![Event::new("SeatBooked", ["seat:a1"], json!("A"))],
            None,
        )
        .await
        .unwrap()
        .last_position()
        .0;
    // B commits above it.
    assert!(!append(&s, json!([ev("Opened", &["hall:2"], "")]), None).await);
    assert_eq!(head(&s).await, Some(Position(a + 1)));

    // A reader reads everything meanwhile.
    let reader = {
        let (http, url) = (
            s.http.clone(),
            format!("{}{}", s.url, read_path(&all(), None)),
        );
        tokio::spawn(async move {
            let res = http.get(url).send().await.unwrap();
            assert_eq!(res.status(), 200);
            let events: Vec<Value> = res.json().await.unwrap();
            positions(&events)
        })
    };
    // Until A ends, the read either has not answered (it waits for A: the
    // server is polling whether A has finished) or answered only below A.
    eventually("the read answers or waits for A", || async {
        if reader.is_finished() {
            return Some(());
        }
        waiting_for_writers(&s).await
    })
    .await;
    let early = reader.is_finished();
    tx.commit().await.unwrap();
    drop(client);
    let seen = reader.await.unwrap();
    if early {
        assert!(
            seen.iter().all(|p| *p < a),
            "/read handed out {seen:?} while writer A ({a}) was open"
        );
    }

    // What the reader saw is a prefix of the log that will never change:
    // every event at or below the largest position it got is in it.
    let largest = seen.iter().copied().max().unwrap_or(0);
    let log = s
        .app
        .store
        .read_all(
            &Query::all(),
            ReadOptions::default().up_to(Position(largest)),
        )
        .await
        .unwrap();
    assert_eq!(
        log.events.iter().map(|e| e.position.0).collect::<Vec<_>>(),
        seen,
        "the read missed an event below a position it handed out"
    );

    // The reader decides on the seat with `after: largest`. The condition
    // must fail exactly when a matching event exists that it did not see.
    let saw_a = seen.contains(&a);
    let failed = append(
        &s,
        json!([ev("SeatBooked", &["seat:a1"], "reader")]),
        Some(json!({ "failIfEventsMatch": seat, "after": largest })),
    )
    .await;
    assert_eq!(
        failed, !saw_a,
        "the condition after {largest} missed an event the reader did not see"
    );

    // And a writer that takes its position after the read and commits late,
    // below another writer that commits first, is caught too.
    let seen = positions(&read(&s, all(), None).await);
    let largest = *seen.last().unwrap();
    let mut client = s.app.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    s.app
        .store
        .append_in_tx(
            &tx,
            vec![Event::new("SeatBooked", ["seat:a1"], json!("late"))],
            None,
        )
        .await
        .unwrap();
    assert!(!append(&s, json!([ev("Opened", &["hall:3"], "")]), None).await);
    tx.commit().await.unwrap();
    drop(client);
    assert!(
        append(
            &s,
            json!([ev("SeatBooked", &["seat:a1"], "again")]),
            Some(json!({ "failIfEventsMatch": seat, "after": largest })),
        )
        .await,
        "a late committer above the handed-out position is caught"
    );
}
