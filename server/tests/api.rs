//! The REST API over real HTTP against real PostgreSQL: every endpoint, every
//! error class with its status and problem code, auth, hostile input. Every
//! response of `get`/`post` is validated against the OpenAPI document.

mod support;

use std::time::Duration;

use dcbflow::CancellationToken;
use dcbflow::flow::{TaskContext, TaskError, WorkerOptions};
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

const GREETING: &str = r#"
name: greeting
input: { who: string }
tasks:
  - name: hello
    action: { executor: rust, function: hello }
  - name: shout
    depends_on: [hello]
    action: { executor: rust, function: shout }
    retry: { max_attempts: 1 }
    on_exhausted: pause
"#;

/// Registers the `hello` and `shout` functions (`shout` fails for "nobody").
fn functions(s: &TestServer) {
    s.app
        .flows
        .function("hello", |ctx: TaskContext| async move {
            Ok::<_, TaskError>(
                json!({"greeting": format!("hello {}", ctx.flow_input["who"].as_str().unwrap_or("?"))}),
            )
        });
    s.app
        .flows
        .function("shout", |ctx: TaskContext| async move {
            if ctx.flow_input["who"] == "nobody" {
                Err(TaskError::fatal("nobody to shout at"))
            } else {
                Ok(json!({"shouted": true}))
            }
        });
}

async fn register_yaml(s: &TestServer, yaml: &str) -> (u16, Value) {
    let r = send(
        s.req(Method::POST, "/api/v1/flows")
            .header("content-type", "application/yaml")
            .body(yaml.to_owned()),
    )
    .await;
    conform(&s.doc, "post", "/api/v1/flows", r.0, &r.1);
    r
}

fn worker(s: &TestServer) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut o = WorkerOptions::default().id("test-worker");
    o.poll_interval = Duration::from_millis(50);
    let w = s.app.flows.worker(o);
    let stop = CancellationToken::new();
    let c = stop.clone();
    (stop, tokio::spawn(async move { w.run(c).await.unwrap() }))
}

async fn status_of(s: &TestServer, id: &str) -> Value {
    s.get(&format!("/api/v1/instances/{id}")).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_operation_is_routed_and_every_route_documented() {
    let s = TestServer::start().await;
    let (status, doc) = s.get("/api/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"].as_str().unwrap().get(..3), Some("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    // The routes outside /api/v1 are documented too.
    for p in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/api/openapi.json",
        "/read",
        "/append",
    ] {
        assert!(paths.contains_key(p), "{p} is not documented");
    }
    // Every documented operation reaches a handler: never the router's
    // fallback ("no such endpoint") or its 405.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{id}", "00000000-0000-0000-0000-000000000000")
                .replace("{name}", "nope")
                .replace("{version}", "nope");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut r = s.req(m, &concrete);
            if method == "post" {
                r = r.json(&json!({}));
            }
            if path.ends_with("/live") {
                continue; // a stream: checked in tests/events.rs
            }
            let res = r.send().await.unwrap();
            let st = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            assert!(
                !(st == 404 && body["detail"] == "no such endpoint") && st != 405,
                "{method} {path} is documented but not routed: {st} {body}"
            );
        }
    }
    // And the router has nothing undocumented: an unknown path is the fallback.
    let (st, body) = send(s.req(Method::GET, "/api/v1/nothing-here")).await;
    assert_eq!((st, body["code"].as_str()), (404, Some("not_found")));
    let (st, body) = send(s.req(Method::DELETE, "/api/v1/flows")).await;
    assert_eq!(
        (st, body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flows_register_in_every_format_list_and_show() {
    let s = TestServer::start().await;
    functions(&s);
    let (st, r) = register_yaml(&s, GREETING).await;
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["name"], "greeting");
    let version = r["version"].as_str().unwrap().to_owned();
    // The same definition again: 200, nothing new.
    let (st, again) = register_yaml(&s, GREETING).await;
    assert_eq!((st, again["created"].clone()), (200, json!(false)));
    // JSON and TOML bodies.
    let json_def = json!({"name": "solo", "tasks": [{"name": "a", "action": {"executor": "rust", "function": "hello"}}]});
    let (st, _) = send(s.req(Method::POST, "/api/v1/flows").json(&json_def)).await;
    assert_eq!(st, 201);
    let toml_def = "name = \"tomlish\"\n[[tasks]]\nname = \"a\"\naction = { executor = \"rust\", function = \"hello\" }\n";
    let (st, b) = send(
        s.req(Method::POST, "/api/v1/flows")
            .header("content-type", "application/toml")
            .body(toml_def),
    )
    .await;
    assert_eq!(st, 201, "{b}");
    // Every validation problem in one 422.
    let bad = "name: bad\ntasks:\n  - name: a\n    depends_on: [ghost]\n    action: { executor: rust, function: missing_fn }\n  - name: a\n    action: { executor: rust, function: hello }\n";
    let (st, p) = register_yaml(&s, bad).await;
    assert_eq!(
        (st, p["code"].as_str()),
        (422, Some("definition_invalid")),
        "{p}"
    );
    assert!(p["errors"].as_array().unwrap().len() >= 2, "{p}");
    // Not a definition format.
    let (st, p) = send(
        s.req(Method::POST, "/api/v1/flows")
            .header("content-type", "text/plain")
            .body("x"),
    )
    .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    // List, paginated by name.
    let (st, page) = s.get("/api/v1/flows?limit=2").await;
    assert_eq!(st, 200);
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["greeting", "solo"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page2) = s
        .get(&format!("/api/v1/flows?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"][0]["name"], "tomlish");
    assert!(page2.get("next_cursor").is_none());
    // Show: versions, source, graph.
    let (st, f) = s.get("/api/v1/flows/greeting").await;
    assert_eq!(st, 200);
    assert_eq!(f["version"], version.as_str());
    assert_eq!(f["versions"].as_array().unwrap().len(), 1);
    assert!(f["source"].as_str().unwrap().contains("shout"));
    assert_eq!(
        f["graph"]["edges"],
        json!([{"from": "hello", "to": "shout"}])
    );
    assert_eq!(f["graph"]["nodes"].as_array().unwrap().len(), 2);
    let (_, fj) = s.get("/api/v1/flows/greeting?format=json").await;
    assert!(serde_json::from_str::<Value>(fj["source"].as_str().unwrap()).is_ok());
    let (st, _) = s
        .get(&format!("/api/v1/flows/greeting/versions/{version}"))
        .await;
    assert_eq!(st, 200);
    let (st, p) = s.get("/api/v1/flows/nope").await;
    assert_eq!((st, p["code"].as_str()), (404, Some("not_found")));
    let (st, p) = s.get("/api/v1/flows/greeting?format=xml").await;
    assert_eq!((st, p["code"].as_str()), (400, Some("bad_request")));
    assert_eq!(p["errors"][0]["field"], "format");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_start_list_show_operate_and_bulk() {
    let s = TestServer::start().await;
    functions(&s);
    register_yaml(&s, GREETING).await;
    // Start, idempotent by business key.
    let (st, a) = s
        .post(
            "/api/v1/instances",
            json!({"flow": "greeting", "business_key": "order-1", "input": {"who": "ada"}}),
        )
        .await;
    assert_eq!(st, 201, "{a}");
    let (st, again) = s
        .post(
            "/api/v1/instances",
            json!({"flow": "greeting", "business_key": "order-1", "input": {"who": "ada"}}),
        )
        .await;
    assert_eq!((st, &again["id"]), (200, &a["id"]));
    let (st, p) = s
        .post("/api/v1/instances", json!({"flow": "nope", "input": {}}))
        .await;
    assert_eq!((st, p["code"].as_str()), (404, Some("not_found")));
    let (st, p) = s
        .post(
            "/api/v1/instances",
            json!({"flow": "greeting", "input": {"who": 7}}),
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (422, Some("input_mismatch")),
        "{p}"
    );
    for i in 0..4 {
        s.post("/api/v1/instances", json!({"flow": "greeting", "business_key": format!("batch-{i}%_"), "input": {"who": "x"}})).await;
    }
    // List: filters and cursor pagination without duplicates.
    let (_, all) = s.get("/api/v1/instances?limit=2").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/api/v1/instances?flow=greeting&limit=2&cursor={c}"),
            None => "/api/v1/instances?flow=greeting&limit=2".into(),
        };
        let (st, page) = s.get(&q).await;
        assert_eq!(st, 200);
        for it in page["items"].as_array().unwrap() {
            assert!(
                seen.insert(it["id"].as_str().unwrap().to_owned()),
                "a duplicate across pages"
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let (_, found) = s.get("/api/v1/instances?q=BATCH-2").await;
    assert_eq!(found["items"].as_array().unwrap().len(), 1);
    let (_, found) = s.get("/api/v1/instances?q=%25_").await;
    assert_eq!(
        found["items"].as_array().unwrap().len(),
        4,
        "LIKE metacharacters are literal"
    );
    let (_, found) = s
        .get("/api/v1/instances?business_key=order-1&status=running")
        .await;
    assert_eq!(found["items"].as_array().unwrap().len(), 1);
    let (_, none) = s
        .get("/api/v1/instances?started_after=2999-01-01T00:00:00Z")
        .await;
    assert!(none["items"].as_array().unwrap().is_empty());
    let (st, p) = s.get("/api/v1/instances?status=sleeping").await;
    assert_eq!(
        (st, p["errors"][0]["field"].as_str()),
        (400, Some("status"))
    );
    let (st, p) = s.get("/api/v1/instances?cursor=garbage").await;
    assert_eq!(
        (st, p["errors"][0]["field"].as_str()),
        (400, Some("cursor"))
    );
    let (st, p) = s.get("/api/v1/instances?limit=0").await;
    assert_eq!(st, 400, "{p}");
    let (st, p) = s.get("/api/v1/instances?colour=red").await;
    assert_eq!(st, 400, "unknown parameters are refused: {p}");

    // Show and timeline.
    let id = a["id"].as_str().unwrap();
    let inst = status_of(&s, id).await;
    assert_eq!(inst["status"], "running");
    let seen_pos = inst["seen"].as_i64().unwrap();
    let (st, tl) = s.get(&format!("/api/v1/instances/{id}/timeline")).await;
    assert_eq!(st, 200);
    assert_eq!(tl["events"][0]["type"], "FlowStarted");
    let (st, p) = s
        .get("/api/v1/instances/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!((st, p["code"].as_str()), (404, Some("not_found")));
    let (st, p) = s.get("/api/v1/instances/not-a-uuid").await;
    assert_eq!((st, p["errors"][0]["field"].as_str()), (400, Some("id")));

    // Operations: pause needs actor and reason; a stale `seen` is 409 moved.
    let op = |seen: i64, reason: &str| json!({"seen": seen, "actor": "ada", "reason": reason});
    let (st, p) = s
        .post(&format!("/api/v1/instances/{id}/pause"), op(seen_pos, ""))
        .await;
    assert_eq!((st, p["code"].as_str()), (422, Some("invalid_input")));
    let (st, paused) = s
        .post(
            &format!("/api/v1/instances/{id}/pause"),
            op(seen_pos, "checking"),
        )
        .await;
    assert_eq!(
        (st, paused["status"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    let (st, p) = s
        .post(
            &format!("/api/v1/instances/{id}/resume"),
            op(seen_pos, "stale"),
        )
        .await;
    assert_eq!((st, p["code"].as_str()), (409, Some("moved")), "{p}");
    let (st, p) = s
        .post(
            &format!("/api/v1/instances/{id}/pause"),
            op(paused["seen"].as_i64().unwrap(), "again"),
        )
        .await;
    assert_eq!((st, p["code"].as_str()), (409, Some("not_allowed")));
    let (st, resumed) = s
        .post(
            &format!("/api/v1/instances/{id}/resume"),
            op(paused["seen"].as_i64().unwrap(), "done checking"),
        )
        .await;
    assert_eq!((st, resumed["status"].as_str()), (200, Some("running")));
    let (st, p) = s
        .post(
            &format!("/api/v1/instances/{id}/skip"),
            json!({"task": "ghost", "seen": resumed["seen"], "actor": "ada", "reason": "r"}),
        )
        .await;
    assert_eq!((st, p["code"].as_str()), (409, Some("not_allowed")));
    let (st, skipped) = s.post(&format!("/api/v1/instances/{id}/skip"), json!({"task": "hello", "output": {"greeting": "hi"}, "seen": resumed["seen"], "actor": "ada", "reason": "done by hand"})).await;
    assert_eq!(st, 200, "{skipped}");
    assert_eq!(skipped["outputs"]["hello"], json!({"greeting": "hi"}));
    let (st, aborted) = s
        .post(
            &format!("/api/v1/instances/{id}/abort"),
            json!({"seen": skipped["seen"], "actor": "ada", "reason": "customer cancelled"}),
        )
        .await;
    assert_eq!(st, 200, "{aborted}");
    let (st, p) = s
        .post(
            &format!("/api/v1/instances/{id}/retry"),
            op(aborted["seen"].as_i64().unwrap(), "r"),
        )
        .await;
    assert!(st == 409 || st == 400, "{p}");

    // Bulk: a dry run counts, the real one acts (paced) and reports refusals.
    let bulk = |dry: bool| json!({"operation": "pause", "filter": {"flow": "greeting", "q": "batch"}, "dry_run": dry, "actor": "ada", "reason": "maintenance"});
    let (st, dry) = s.post("/api/v1/instances/bulk", bulk(true)).await;
    assert_eq!(
        (st, dry["matched"].as_i64(), dry["acted"].as_u64()),
        (200, Some(4), Some(0)),
        "{dry}"
    );
    let (_, done) = s.post("/api/v1/instances/bulk", bulk(false)).await;
    assert_eq!(
        (done["matched"].as_i64(), done["acted"].as_u64()),
        (Some(4), Some(4)),
        "{done}"
    );
    let (_, again) = s.post("/api/v1/instances/bulk", bulk(false)).await;
    assert_eq!(
        again["refused"].as_array().unwrap().len(),
        4,
        "already paused: {again}"
    );
    let (_, paused) = s.get("/api/v1/instances?status=paused&q=batch").await;
    assert_eq!(paused["items"].as_array().unwrap().len(), 4);
    let (st, p) = s
        .post(
            "/api/v1/instances/bulk",
            json!({"operation": "explode", "filter": {}, "actor": "a", "reason": "r"}),
        )
        .await;
    assert_eq!(
        (st, p["errors"][0]["field"].as_str()),
        (400, Some("operation"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incidents_are_grouped_handled_and_retried() {
    let s = TestServer::start().await;
    functions(&s);
    register_yaml(&s, GREETING).await;
    let (stop, w) = worker(&s);
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, a) = s.post("/api/v1/instances", json!({"flow": "greeting", "business_key": format!("n{i}"), "input": {"who": "nobody"}})).await;
        ids.push(a["id"].as_str().unwrap().to_owned());
    }
    let page = eventually("three paused instances in one incident group", || async {
        let (_, page) = s.get("/api/v1/incidents").await;
        (page["items"]
            .as_array()?
            .iter()
            .any(|g| g["task"] == "shout" && g["instance_count"] == 3))
        .then_some(page)
    })
    .await;
    let group = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["task"] == "shout")
        .unwrap()
        .clone();
    assert_eq!(group["kind"], "exhausted");
    let gid = group["id"].as_str().unwrap();
    let (st, detail) = s.get(&format!("/api/v1/incidents/{gid}")).await;
    assert_eq!(st, 200, "{detail}");
    let incidents = detail["incidents"].as_array().unwrap();
    assert_eq!(incidents.len(), 3);
    let iid = incidents[0]["id"].as_str().unwrap().to_owned();
    let enc = iid.replace('/', "%2F");
    // Handle: an event on the instance with the note.
    let (st, p) = s
        .post(
            &format!("/api/v1/incidents/{enc}/handle"),
            json!({"actor": "ada", "note": ""}),
        )
        .await;
    assert_eq!((st, p["code"].as_str()), (422, Some("invalid_input")));
    let (st, handled) = s
        .post(
            &format!("/api/v1/incidents/{enc}/handle"),
            json!({"actor": "ada", "note": "customer notified"}),
        )
        .await;
    assert_eq!(st, 200, "{handled}");
    assert_eq!(handled["note"], "customer notified");
    let inst = handled["instance"].as_str().unwrap();
    let (_, tl) = s.get(&format!("/api/v1/instances/{inst}/timeline")).await;
    assert!(
        tl["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "FlowIncidentAcknowledged")
    );
    let (_, unacked) = s.get("/api/v1/incidents?unacknowledged=true").await;
    let g = unacked["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["task"] == "shout")
        .unwrap();
    assert_eq!(
        g["instance_count"], 2,
        "acknowledged incidents are left out: {g}"
    );
    let (_, all) = s.get("/api/v1/incidents").await;
    let g = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["task"] == "shout")
        .unwrap();
    assert_eq!(
        (g["instance_count"].as_i64(), g["acknowledged"].as_i64()),
        (Some(3), Some(1))
    );
    // Retry: the step runs again (and fails again: still an incident).
    let before = status_of(&s, inst).await["seen"].as_i64().unwrap();
    let (st, r) = s
        .post(
            &format!("/api/v1/incidents/{enc}/retry"),
            json!({"actor": "ada", "reason": "try once more"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    eventually("the retried step to fail again", || async {
        let v = status_of(&s, inst).await;
        (v["seen"].as_i64()? > before + 1 && v["status"] == "paused").then_some(())
    })
    .await;
    let (st, p) = s
        .post(
            "/api/v1/incidents/nope/handle",
            json!({"actor": "a", "note": "n"}),
        )
        .await;
    assert_eq!((st, p["code"].as_str()), (404, Some("not_found")));
    let (st, _) = s.get("/api/v1/incidents/deadbeef").await;
    assert_eq!(st, 404);
    stop.cancel();
    w.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_gate_reading_and_operating() {
    let mut s = TestServer::with_tokens().await;
    functions(&s);
    register_yaml(&s, GREETING).await;
    // No token: 401 with a challenge.
    let res = s
        .http
        .get(format!("{}/api/v1/flows", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().contains_key("www-authenticate"));
    let (st, p) = send(s.http.get(format!("{}/api/v1/flows", s.url))).await;
    assert_eq!((st, p["code"].as_str()), (401, Some("unauthorized")));
    // A wrong token: 401.
    let (st, _) = send(
        s.http
            .get(format!("{}/api/v1/flows", s.url))
            .bearer_auth("operator-token-0123456788"),
    )
    .await;
    assert_eq!(st, 401);
    // The read-only token reads, and may not change anything.
    s.token = Some(READER.into());
    let (st, _) = s.get("/api/v1/flows").await;
    assert_eq!(st, 200);
    let (st, p) = s
        .post(
            "/api/v1/instances",
            json!({"flow": "greeting", "input": {"who": "x"}}),
        )
        .await;
    assert_eq!((st, p["code"].as_str()), (403, Some("forbidden")));
    let (st, _) = register_yaml(&s, GREETING).await;
    assert_eq!(st, 403);
    let (st, p) = s.post("/append", json!({"events": []})).await;
    assert_eq!(st, 403, "{p}");
    // Nothing was started.
    s.token = Some(OPERATOR.into());
    let (_, list) = s.get("/api/v1/instances").await;
    assert!(list["items"].as_array().unwrap().is_empty());
    let (st, _) = s
        .post(
            "/api/v1/instances",
            json!({"flow": "greeting", "input": {"who": "x"}}),
        )
        .await;
    assert_eq!(st, 201);
    // Health needs no token; metrics do.
    let (st, _) = send(s.http.get(format!("{}/health/live", s.url))).await;
    assert_eq!(st, 200);
    let res = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_gets_a_clear_4xx_and_writes_nothing() {
    let s = TestServer::with(|c| c.api.body_limit_bytes = 4096).await;
    functions(&s);
    register_yaml(&s, GREETING).await;
    let head = || async { s.app.store.head().await.unwrap() };
    let before = head().await;
    let post_raw = |path: &str, body: String| {
        send(
            s.req(Method::POST, path)
                .header("content-type", "application/json")
                .body(body),
        )
    };
    // Oversized body.
    let big = json!({"flow": "greeting", "input": {"who": "x".repeat(10_000)}}).to_string();
    let (st, p) = post_raw("/api/v1/instances", big).await;
    assert_eq!((st, p["code"].as_str()), (413, Some("payload_too_large")));
    // Deeply nested JSON.
    let deep = format!(
        "{{\"flow\":\"greeting\",\"input\":{}{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let (st, p) = post_raw("/api/v1/instances", deep).await;
    assert_eq!(st, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("nests deeper"));
    // Malformed JSON.
    let (st, p) = post_raw("/api/v1/instances", "{\"flow\": \"greeting\",".into()).await;
    assert_eq!((st, p["code"].as_str()), (400, Some("bad_request")));
    // Unknown field, named.
    let (st, p) = post_raw(
        "/api/v1/instances",
        json!({"flow": "greeting", "input": {}, "priority": 9}).to_string(),
    )
    .await;
    assert_eq!(st, 400);
    assert!(p["detail"].as_str().unwrap().contains("priority"), "{p}");
    // A field of the wrong type, named.
    let (st, p) = post_raw(
        "/api/v1/instances",
        json!({"flow": 42, "input": {}}).to_string(),
    )
    .await;
    assert_eq!(
        (st, p["errors"][0]["field"].as_str()),
        (400, Some("flow")),
        "{p}"
    );
    // Not JSON at all.
    let (st, p) = send(
        s.req(Method::POST, "/api/v1/instances")
            .header("content-type", "text/xml")
            .body("<a/>"),
    )
    .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    // An operation on an instance id that is not one.
    let (st, _) = post_raw("/api/v1/instances/../../etc/abort", "{}".into()).await;
    assert!(st == 404 || st == 400);
    // Malformed query string values.
    let (st, p) = s.get("/api/v1/instances?limit=lots").await;
    assert_eq!(
        (st, p["errors"][0]["field"].as_str()),
        (400, Some("limit")),
        "{p}"
    );
    let (st, _) = s.get("/api/v1/instances?started_after=yesterday").await;
    assert_eq!(st, 400);
    assert_eq!(head().await, before, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_answers_503_with_retry_after() {
    let s = TestServer::with(|c| {
        c.api.max_in_flight = 1;
        c.api.bulk_per_second = 2;
    })
    .await;
    functions(&s);
    register_yaml(&s, GREETING).await;
    for i in 0..6 {
        s.app
            .flows
            .start("greeting", Some(&format!("k{i}")), json!({"who": "x"}))
            .await
            .unwrap();
    }
    // A bulk operation paced at 2 per second holds the only slot for ~3 s.
    let bulk = s.post(
        "/api/v1/instances/bulk",
        json!({"operation": "pause", "filter": {"flow": "greeting"}, "actor": "a", "reason": "r"}),
    );
    let probe = async {
        eventually("a 503 while the slot is taken", || async {
            let res = s.req(Method::GET, "/api/v1/flows").send().await.unwrap();
            if res.status() == 503 {
                let retry = res.headers().get("retry-after").cloned();
                let body: Value = res.json().await.unwrap();
                return Some((retry, body));
            }
            None
        })
        .await
    };
    let ((st, done), (retry, body)) = tokio::join!(bulk, probe);
    assert_eq!((st, done["acted"].as_u64()), (200, Some(6)));
    assert_eq!(retry.unwrap(), "1");
    assert_eq!(body["code"], "overloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_metrics() {
    let s = TestServer::start().await;
    let (st, live) = s.get("/health/live").await;
    assert_eq!((st, live["status"].as_str()), (200, Some("live")));
    let (st, ready) = s.get("/health/ready").await;
    assert_eq!(st, 200, "{ready}");
    let names: Vec<&str> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["database", "migrations", "workers"]);
    s.app
        .store
        .append(
            vec![dcbflow::Event::new("Pinged", ["t:1"], json!({}))],
            None,
        )
        .await
        .unwrap();
    let text = s
        .req(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "dcbflow_head_position",
        "dcbflow_dead_letters",
        "dcbflow_appends_total",
        "dcbflow_append_duration_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    // The dashboard's calls.
    let (st, who) = s.get("/api/v1/whoami").await;
    assert_eq!(
        (st, who["role"].as_str(), who["tokens"].as_bool()),
        (200, Some("operator"), Some(false))
    );
    s.app.samples.take(&s.app).await.unwrap();
    let (st, o) = s.get("/api/v1/overview").await;
    assert_eq!(st, 200, "{o}");
    assert_eq!(o["head"], 1);
    assert_eq!(o["series"].as_array().unwrap().len(), 1);
    // The dashboard's shell needs no token and carries no data.
    let res = s.http.get(format!("{}/", s.url)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    // Workers configured but not running: not ready, 503 with Retry-After.
    let s2 = TestServer::with(|c| c.workers.count = 1).await;
    let res = s2.req(Method::GET, "/health/ready").send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
}

const LOAN: &str = r#"
name: loan
input: { amount: number }
tasks:
  - name: score
    action: { executor: rust, function: hello }
  - name: auto
    depends_on: [score]
    when: "flow.input.amount < 1000"
    action: { executor: rust, function: hello }
  - name: approval
    depends_on: [score]
    when: "flow.input.amount >= 1000"
    signal: { name: approved, timeout_ms: 600000 }
  - name: cool_off
    depends_on: [auto, approval]
    wait: { duration_ms: 50 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signals_conditions_and_waits_over_http() {
    let s = TestServer::start().await;
    functions(&s);
    let (st, body) = register_yaml(&s, LOAN).await;
    assert_eq!(st, 201, "{body}");
    // An ill-typed condition is a 422 naming the task, and registers nothing.
    let (st, p) = register_yaml(
        &s,
        "name: bad\ninput: { amount: number }\ntasks:\n  - name: a\n    when: \"flow.input.amount == 'x'\"\n    action: { executor: rust, function: hello }\n",
    )
    .await;
    assert_eq!(st, 422, "{p}");
    assert!(
        p.to_string().contains("compares a number with a string"),
        "{p}"
    );

    let (stop, w) = worker(&s);
    let (_, big) = s
        .post(
            "/api/v1/instances",
            json!({"flow": "loan", "input": {"amount": 5000}}),
        )
        .await;
    let id = big["id"].as_str().unwrap().to_owned();
    let waiting = eventually("approval to wait", || async {
        let v = status_of(&s, &id).await;
        let step = v["steps"]
            .as_array()?
            .iter()
            .find(|x| x["task"] == "approval")?
            .clone();
        (step["status"] == "waiting").then_some(v)
    })
    .await;
    let auto = waiting["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["task"] == "auto")
        .unwrap();
    assert_eq!(auto["status"], "skipped");
    assert_eq!(
        auto["skip_reason"],
        "condition false: flow.input.amount < 1000"
    );
    let approval = waiting["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["task"] == "approval")
        .unwrap();
    assert_eq!(approval["signal"], "approved");

    // Bad signals: 4xx problems, nothing written.
    let path = format!("/api/v1/instances/{id}/signals");
    let (st, p) = s.post(&path, json!({"name": "approvd", "id": "x"})).await;
    assert_eq!((st, p["code"].as_str()), (409, Some("not_allowed")), "{p}");
    let (st, p) = s.post(&path, json!({"name": ""})).await;
    assert_eq!(st, 400, "{p}");
    let (st, p) = s.post(&path, json!({"name": "approved", "bogus": 1})).await;
    assert_eq!(st, 400, "{p}");
    let (st, p) = s
        .post(
            &format!("/api/v1/instances/{}/signals", uuid::Uuid::new_v4()),
            json!({"name": "approved", "id": "y"}),
        )
        .await;
    assert_eq!(st, 404, "{p}");
    assert_eq!(
        status_of(&s, &id).await["seen"],
        waiting["seen"],
        "nothing written"
    );

    // The approval, sent twice with one id: one signal.
    let signal = json!({"name": "approved", "id": "approval-1", "payload": {"by": "ada"}, "actor": "ada", "reason": "looks fine"});
    for _ in 0..2 {
        let (st, v) = s.post(&path, signal.clone()).await;
        assert_eq!(st, 200, "{v}");
    }
    let done = eventually("the loan to complete", || async {
        let v = status_of(&s, &id).await;
        (v["status"] == "completed").then_some(v)
    })
    .await;
    stop.cancel();
    w.await.unwrap();
    assert_eq!(done["outputs"]["approval"], json!({"by": "ada"}));
    let steps = done["steps"].as_array().unwrap();
    let approval = steps.iter().find(|x| x["task"] == "approval").unwrap();
    assert!(
        approval["timings"]["waiting_ms"].as_u64().unwrap() > 0,
        "{approval}"
    );
    let cool = steps.iter().find(|x| x["task"] == "cool_off").unwrap();
    assert!(
        cool["timings"]["waiting_ms"].as_u64().unwrap() >= 40,
        "{cool}"
    );
    assert_eq!(done["signals"].as_array().unwrap().len(), 1);
    assert_eq!(done["signals"][0]["consumed_by"], "approval");
    let (_, t) = s.get(&format!("/api/v1/instances/{id}/timeline")).await;
    let received: Vec<&Value> = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "FlowSignalReceived")
        .collect();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["data"]["reason"], "looks fine");
    // Once its task is done, a further signal is refused.
    let (st, p) = s
        .post(&path, json!({"name": "approved", "id": "approval-2"}))
        .await;
    assert_eq!((st, p["code"].as_str()), (409, Some("not_allowed")), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sub_flow_links_parent_and_child() {
    let s = TestServer::start().await;
    functions(&s);
    let kid = "name: kid\ninput: { who: string }\ntasks:\n  - name: hello\n    action: { executor: rust, function: hello }\n";
    let mum = "name: mum\ninput: { who: string }\ntasks:\n  - name: raise\n    flow: { name: kid, input: { who: \"{{flow.input.who}}\" } }\n";
    assert_eq!(register_yaml(&s, kid).await.0, 201);
    assert_eq!(register_yaml(&s, mum).await.0, 201);
    let (stop, w) = worker(&s);
    let (_, started) = s
        .post(
            "/api/v1/instances",
            json!({"flow": "mum", "input": {"who": "ada"}}),
        )
        .await;
    let id = started["id"].as_str().unwrap().to_owned();
    let done = eventually("the parent to complete", || async {
        let v = status_of(&s, &id).await;
        if v["children"][0]["id"].is_string() {
            let c = status_of(&s, v["children"][0]["id"].as_str().unwrap()).await;
            eprintln!("parent {} child {}", v["status"], c["status"]);
        }
        (v["status"] == "completed").then_some(v)
    })
    .await;
    stop.cancel();
    w.await.unwrap();
    assert_eq!(
        done["outputs"]["raise"]["hello"]["greeting"], "hello ada",
        "{done}"
    );
    let child = done["children"][0]["id"]
        .as_str()
        .expect("a child link")
        .to_owned();
    assert_eq!(done["children"][0]["task"], "raise");
    let kid = status_of(&s, &child).await;
    assert_eq!(kid["parent"], json!({"id": id, "task": "raise"}));
    assert_eq!(kid["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedules_are_set_listed_paused_and_refused_when_bad() {
    let s = TestServer::start().await;
    functions(&s);
    register_yaml(&s, GREETING).await;
    let (st, v) = s
        .put(
            "/api/v1/schedules/hourly",
            json!({"flow": "greeting", "cron": "0 0 * * * *", "timezone": "Europe/Amsterdam", "input": {"who": "cron"}, "actor": "ada"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["paused"].as_bool(), v["missed"].as_str()),
        (Some(false), Some("skip"))
    );
    assert!(v["next_tick"].is_string(), "{v}");
    let (st, list) = s.get("/api/v1/schedules").await;
    assert_eq!((st, list["items"].as_array().unwrap().len()), (200, 1));
    let (st, v) = s
        .post(
            "/api/v1/schedules/hourly/pause",
            json!({"actor": "ada", "reason": "maintenance"}),
        )
        .await;
    assert_eq!((st, v["paused"].as_bool()), (200, Some(true)), "{v}");
    // Bad ones: each problem named, nothing written.
    let (st, p) = s
        .put("/api/v1/schedules/bad", json!({"flow": "greeting", "cron": "hourly", "timezone": "Mars/Olympus", "input": {"who": "x"}}))
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (422, Some("schedule_invalid")),
        "{p}"
    );
    assert_eq!(p["errors"].as_array().unwrap().len(), 2, "{p}");
    let (st, p) = s
        .put(
            "/api/v1/schedules/bad",
            json!({"flow": "greeting", "cron": "0 0 * * * *", "input": {"who": 7}}),
        )
        .await;
    assert_eq!(
        (st, p["code"].as_str()),
        (422, Some("input_mismatch")),
        "{p}"
    );
    let (st, _) = s
        .put(
            "/api/v1/schedules/bad",
            json!({"flow": "nope", "cron": "0 0 * * * *"}),
        )
        .await;
    assert_eq!(st, 404);
    let (st, _) = s
        .post(
            "/api/v1/schedules/nope/resume",
            json!({"actor": "ada", "reason": "x"}),
        )
        .await;
    assert_eq!(st, 404);
    let (_, list) = s.get("/api/v1/schedules").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "nothing written"
    );
}
