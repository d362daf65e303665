//! End-to-end tests of the dashboard: headless Debian Chromium, driven through
//! ChromeDriver with `fantoccini`, against a real `dcbflow serve` process on
//! real PostgreSQL, with local HTTP services the tests switch.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian packages
//! `chromium` and `chromium-driver`); without them every test fails saying so.
//! Each page a scenario visits is saved to `target/browser-screenshots/`; the
//! documentation's set (see [`harness::DOC_SHOTS`]) also goes to
//! `DCBFLOW_SCREENSHOTS` when set (`DCBFLOW_SCREENSHOTS=docs/img`, relative
//! to the workspace root).

#[path = "../support/mod.rs"]
mod support;

mod harness;

use std::collections::BTreeSet;

use harness::{Browser, READER, Server, ServerConfig, Service};
use serde_json::{Value, json};

/// One HTTP task: `POST <service>/<path>`, one attempt, then the instance
/// pauses with an incident.
const PARCEL: &str = "name: parcel\ninput: { service: string, path: string }\ntasks:\n  \
    - name: send\n    action: { executor: http, method: POST, url: \"{{flow.input.service}}/{{flow.input.path}}\" }\n    \
    retry: { max_attempts: 1 }\n    on_exhausted: pause\n    timeout_ms: 5000\n";

/// A payment that fails until the service is switched.
const PAY: &str = "name: pay\ninput: { service: string }\ntasks:\n  \
    - name: charge\n    action: { executor: http, method: POST, url: \"{{flow.input.service}}/flaky\" }\n    \
    retry: { max_attempts: 1 }\n    on_exhausted: pause\n    timeout_ms: 5000\n";

/// Two tasks: `reserve` (compensated by `/undo`), then `dispatch`, which
/// fails and pauses the instance.
const SHIP: &str = "name: ship\ninput: { service: string }\ntasks:\n  \
    - name: reserve\n    action: { executor: http, method: POST, url: \"{{flow.input.service}}/ok\" }\n    \
    compensate: { executor: http, method: POST, url: \"{{flow.input.service}}/undo\" }\n    \
    retry: { max_attempts: 1 }\n    timeout_ms: 5000\n  \
    - name: dispatch\n    depends_on: [reserve]\n    action: { executor: http, method: POST, url: \"{{flow.input.service}}/flaky\" }\n    \
    retry: { max_attempts: 1 }\n    on_exhausted: pause\n    timeout_ms: 5000\n";

/// A step that runs until the test ends.
const SLOW: &str = "name: slow\ninput: { service: string }\ntasks:\n  \
    - name: wait\n    action: { executor: http, method: POST, url: \"{{flow.input.service}}/hang\" }\n    \
    timeout_ms: 120000\n";

/// A human approval: the instance waits for the signal `approved`.
const APPROVE: &str = "name: approve\ntasks:\n  \
    - name: approval\n    signal: { name: approved }\n";

/// A number as the page shows it (`1,234`, `1 234`).
fn number(text: &str) -> Option<i64> {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() || text.chars().any(|c| c.is_alphabetic()) {
        return None;
    }
    digits.parse().ok()
}

/// The overview's count of `flow` in `status`.
fn count_of(overview: &Value, flow: &str, status: &str) -> i64 {
    overview["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["flow"] == flow && c["status"] == status)
        .filter_map(|c| c["count"].as_i64())
        .sum()
}

/// The ids of the instance rows the page shows.
async fn rows(b: &Browser) -> BTreeSet<String> {
    b.probe(
        "return [...document.querySelectorAll('tr[data-instance]')].map(e => e.dataset.instance)",
    )
    .await
    .as_array()
    .into_iter()
    .flatten()
    .filter_map(|v| v.as_str().map(str::to_owned))
    .collect()
}

/// Waits until the page shows exactly the instance rows `ids`.
async fn wait_rows(b: &Browser, what: &str, ids: &[&String]) {
    let want: BTreeSet<String> = ids.iter().map(|s| (*s).clone()).collect();
    b.until(what, async || (rows(b).await == want).then_some(()))
        .await;
}

/// Presses an instance action and gives a reason.
async fn act(b: &Browser, button: &str, reason: &str) {
    b.click(button).await;
    b.wait("#reason").await;
    b.fill("#reason", reason).await;
    b.click("#reason-ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_the_demos_counts() {
    let server = Server::start(ServerConfig {
        demo: true,
        ..Default::default()
    })
    .await;
    let b = Browser::open("demo", &server.url).await;
    b.goto("/").await;
    let cell = r#"[data-testid="count-order_saga-completed"]"#;
    // The demo keeps completing orders: the page's number must be the API's
    // at some moment between the two reads around it.
    let shown = b
        .until("a completed count that matches the API's", async || {
            let before = count_of(
                &server.get("/api/v1/overview").await,
                "order_saga",
                "completed",
            );
            let shown = number(&b.text(cell).await?)?;
            let after = count_of(
                &server.get("/api/v1/overview").await,
                "order_saga",
                "completed",
            );
            (shown >= 1 && before <= shown && shown <= after).then_some(shown)
        })
        .await;
    assert!(shown >= 1);
    b.wait_text("#head", "a position", |t| number(t).is_some_and(|n| n >= 1))
        .await;
    b.wait_text("#open-incidents", "a number", |t| number(t).is_some())
        .await;
    b.wait_text("#dead-letters", "0", |t| number(t) == Some(0))
        .await;
    // Every 5th order is declined and compensated; the charts appear from
    // the third sample (one every 5 s).
    b.wait_text(
        r#"[data-testid="count-order_saga-compensated"]"#,
        "a compensated order",
        |t| number(t).is_some_and(|n| n >= 1),
    )
    .await;
    b.present("#chart-finished canvas").await;
    b.shot("overview").await;

    // The demo's instances, newest first.
    b.click(r#"a[data-nav="instances"]"#).await;
    b.until("the demo's instances", async || {
        (rows(&b).await.len() >= 2).then_some(())
    })
    .await;
    b.shot("instances").await;

    // A completed order: every task of the saga succeeded in the graph.
    let done = server
        .get("/api/v1/instances?flow=order_saga&status=completed&limit=1")
        .await;
    let id = done["items"][0]["id"].as_str().unwrap().to_owned();
    b.click(&format!(r#"tr[data-instance="{id}"] a"#)).await;
    for task in ["reserve_stock", "charge_payment", "fraud_check", "ship"] {
        b.present(&format!(
            r#"svg#graph g[data-step="{task}"][data-state="succeeded"]"#
        ))
        .await;
    }
    b.wait(r#"tr[data-event-type="FlowCompleted"]"#).await;
    b.shot("instance").await;

    // The flow's definition.
    b.click(r#"a[data-nav="flows"]"#).await;
    b.wait(r#"[data-flow="order_saga"]"#).await;
    b.shot("demo-flows").await;
    b.click(r#"[data-flow="order_saga"] a"#).await;
    b.wait_text("pre#source", "the YAML", |t| t.contains("reserve_stock"))
        .await;
    b.wait("svg#graph").await;
    b.shot("flows").await;

    // The demo's log, newest first.
    b.click(r#"a[data-nav="events"]"#).await;
    b.click("#q-backwards").await;
    b.until("the newest events first", async || {
        let p = b
            .probe("return [...document.querySelectorAll('tr[data-position]')].map(e => Number(e.dataset.position))")
            .await;
        let p: Vec<i64> = p.as_array()?.iter().filter_map(Value::as_i64).collect();
        (p.len() >= 10 && p.windows(2).all(|w| w[0] > w[1])).then_some(())
    })
    .await;
    assert!(b.url().await.contains("backwards=1"), "{}", b.url().await);
    b.shot("events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_filtered_by_status_and_key_and_the_url_keeps_the_filters() {
    let svc = Service::start().await;
    let server = Server::start(ServerConfig {
        flows: vec![("parcel.yaml", PARCEL.into())],
        ..Default::default()
    })
    .await;
    let mut ids = Vec::new();
    for (key, path) in [
        ("alpha-1", "ok"),
        ("alpha-2", "flaky"),
        ("beta-1", "ok"),
        ("beta-2", "flaky"),
    ] {
        let id = server
            .start_instance("parcel", key, json!({"service": svc.url, "path": path}))
            .await;
        let status = if path == "ok" { "completed" } else { "paused" };
        server.until_status(&id, status).await;
        ids.push(id);
    }
    let b = Browser::open("filters", &server.url).await;
    b.goto("/instances").await;
    wait_rows(&b, "every instance", &ids.iter().collect::<Vec<_>>()).await;

    b.fill("#f-status", "paused").await;
    wait_rows(&b, "the paused ones", &[&ids[1], &ids[3]]).await;
    for id in [&ids[1], &ids[3]] {
        assert_eq!(
            b.attr(
                &format!(r#"tr[data-instance="{id}"] [data-status]"#),
                "data-status"
            )
            .await
            .as_deref(),
            Some("paused")
        );
    }
    assert!(b.url().await.contains("status=paused"), "{}", b.url().await);

    b.fill("#f-key", "alpha").await;
    wait_rows(&b, "the paused alpha", &[&ids[1]]).await;
    let url = b.url().await;
    assert!(
        url.contains("status=paused") && url.contains("q=alpha"),
        "{url}"
    );
    b.shot("filters-instances").await;

    // A reload (or a shared link) shows the same.
    b.reload().await;
    wait_rows(&b, "the paused alpha after a reload", &[&ids[1]]).await;
    assert_eq!(b.value("#f-status").await.as_deref(), Some("paused"));
    assert_eq!(b.value("#f-key").await.as_deref(), Some("alpha"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_is_highlighted_and_a_retry_completes_the_instance() {
    let svc = Service::start().await;
    let server = Server::start(ServerConfig {
        flows: vec![("pay.yaml", PAY.into())],
        ..Default::default()
    })
    .await;
    let id = server
        .start_instance("pay", "invoice-17", json!({"service": svc.url}))
        .await;
    server.until_status(&id, "paused").await;
    let b = Browser::open("retry", &server.url).await;

    // The incident, grouped.
    b.goto("/incidents").await;
    b.wait("tr[data-group]").await;
    b.wait("button[data-retry-group]").await;
    b.click("[data-expand-group]").await;
    b.wait(&format!(r#"button[data-retry-incident^="{id}"]"#))
        .await;
    b.shot("incidents").await;

    b.goto(&format!("/instances/{id}")).await;
    b.present(r#"svg#graph g[data-step="charge"][data-state="failed"]"#)
        .await;
    b.wait_text(r#"[data-step-error="charge"]"#, "the HTTP error", |t| {
        t.contains("503")
    })
    .await;
    b.shot("retry-failed").await;

    svc.heal();
    act(&b, "#act-retry", "the payment provider is back").await;
    b.present(r#"svg#graph g[data-step="charge"][data-state="succeeded"]"#)
        .await;
    b.wait(r#"#instance-status[data-status="completed"]"#).await;
    b.wait(r#"tr[data-event-type="FlowCompleted"]"#).await;
    b.shot("retry-completed").await;
    let v = server.until_status(&id, "completed").await;
    assert_eq!(v["outputs"]["charge"]["charged"], 42, "{v:#}");
    let timeline = server
        .get(&format!("/api/v1/instances/{id}/timeline"))
        .await;
    let retry = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "FlowRetryRequested")
        .unwrap_or_else(|| panic!("no retry in {timeline:#}"));
    assert!(
        retry.to_string().contains("the payment provider is back"),
        "{retry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_approval_is_given_with_the_send_signal_button() {
    let server = Server::start(ServerConfig {
        flows: vec![("approve.yaml", APPROVE.into())],
        ..Default::default()
    })
    .await;
    let id = server.start_instance("approve", "loan-9", json!({})).await;
    let b = Browser::open("signal", &server.url).await;
    b.goto(&format!("/instances/{id}")).await;
    b.present(r#"td[data-status="waiting"] [data-waits-for="approved"]"#)
        .await;
    b.shot("signal-waiting").await;
    b.click("#act-signal").await;
    b.wait("#signal-payload").await;
    b.fill("#signal-name", "approved").await;
    b.fill("#signal-payload", r#"{"approved": true}"#).await;
    b.fill("#reason", "income checked").await;
    b.click("#reason-ok").await;
    b.wait(r#"#instance-status[data-status="completed"]"#).await;
    b.wait(r#"tr[data-event-type="FlowSignalReceived"]"#).await;
    // The profile shows the approval's wait.
    b.until("the profile to show the wait", async || {
        let ms = b
            .probe(r#"return document.querySelector('#profile tr[data-profile-step="approval/action"]')?.dataset.waitingMs"#)
            .await;
        ms.as_str().and_then(|m| m.parse::<u64>().ok()).filter(|m| *m > 0)
    })
    .await;
    b.shot("signal-completed").await;
    let v = server.until_status(&id, "completed").await;
    assert_eq!(v["outputs"]["approval"], json!({"approved": true}), "{v:#}");
    assert_eq!(v["signals"][0]["consumed_by"], "approval", "{v:#}");
    let timeline = server
        .get(&format!("/api/v1/instances/{id}/timeline"))
        .await;
    let sent = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "FlowSignalReceived")
        .unwrap_or_else(|| panic!("no signal in {timeline:#}"));
    assert_eq!(sent["data"]["reason"], "income checked", "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_is_listed_and_paused_from_the_flows_page() {
    let server = Server::start(ServerConfig {
        flows: vec![("approve.yaml", APPROVE.into())],
        ..Default::default()
    })
    .await;
    let (status, body) = support::send(
        server
            .req(reqwest::Method::PUT, "/api/v1/schedules/hourly")
            .json(
                &json!({"flow": "approve", "cron": "0 0 * * * *", "timezone": "Europe/Amsterdam"}),
            ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let b = Browser::open("schedules", &server.url).await;
    b.goto("/flows").await;
    b.present(r#"tr[data-schedule="hourly"][data-paused="false"]"#)
        .await;
    b.shot("schedules").await;
    act(
        &b,
        r#"button[data-schedule-op="pause"][data-schedule-name="hourly"]"#,
        "month-end freeze",
    )
    .await;
    b.present(r#"tr[data-schedule="hourly"][data-paused="true"]"#)
        .await;
    let list = server.get("/api/v1/schedules").await;
    assert_eq!(list["items"][0]["paused"], true, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_compensates_what_completed() {
    let svc = Service::start().await;
    let server = Server::start(ServerConfig {
        flows: vec![("ship.yaml", SHIP.into())],
        ..Default::default()
    })
    .await;
    let id = server
        .start_instance("ship", "order-5", json!({"service": svc.url}))
        .await;
    server.until_status(&id, "paused").await;
    let b = Browser::open("abort", &server.url).await;
    b.goto(&format!("/instances/{id}")).await;
    b.present(r#"svg#graph g[data-step="reserve"][data-state="succeeded"]"#)
        .await;
    b.present(r#"svg#graph g[data-step="dispatch"][data-state="failed"]"#)
        .await;
    b.shot("abort-paused").await;

    act(&b, "#act-abort", "the customer cancelled").await;
    b.present(r#"svg#graph g[data-step="reserve"][data-compensate="succeeded"]"#)
        .await;
    b.wait(r#"#instance-status[data-status="compensated"]"#)
        .await;
    b.wait(r#"tr[data-event-type="FlowCompensated"]"#).await;
    b.shot("abort-compensated").await;
    server.until_status(&id, "compensated").await;
    assert_eq!(
        svc.calls("undo").len(),
        1,
        "the reservation was undone once"
    );
    // Nothing applies to a compensated instance any more.
    assert_eq!(b.count(r#"button[id^="act-"]"#).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_moved_meanwhile_asks_to_reload() {
    let svc = Service::start().await;
    let server = Server::start(ServerConfig {
        flows: vec![("slow.yaml", SLOW.into())],
        ..Default::default()
    })
    .await;
    let id = server
        .start_instance("slow", "slow-1", json!({"service": svc.url}))
        .await;
    let b = Browser::open("moved", &server.url).await;
    b.until("the step to call the service", async || {
        (!svc.calls("hang").is_empty()).then_some(())
    })
    .await;
    b.goto(&format!("/instances/{id}")).await;
    b.present(r#"svg#graph g[data-step="wait"][data-state="running"]"#)
        .await;
    b.wait("#act-pause").await;

    // Someone else pauses it.
    let seen = server.instance(&id).await["seen"].clone();
    let (status, body) = server
        .post(
            &format!("/api/v1/instances/{id}/pause"),
            json!({"seen": seen, "actor": "someone else", "reason": "checking"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // The page still offers what it saw.
    act(&b, "#act-pause", "me too").await;
    b.wait("#moved").await;
    assert_eq!(b.count("#error").await, 0, "a raw error instead of #moved");
    b.shot("moved").await;
    b.click("#refresh").await;
    b.wait_gone("#moved").await;
    b.wait("#act-resume").await;
    assert_eq!(b.count("#act-pause").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_token_sees_no_actions_and_the_api_refuses_it() {
    let svc = Service::start().await;
    let server = Server::start(ServerConfig {
        flows: vec![("pay.yaml", PAY.into())],
        tokens: true,
        ..Default::default()
    })
    .await;
    let id = server
        .start_instance("pay", "invoice-3", json!({"service": svc.url}))
        .await;
    let seen = server.until_status(&id, "paused").await["seen"].clone();
    let b = Browser::open("readonly", &server.url).await;
    b.goto("/").await;
    b.login(READER).await;
    b.goto(&format!("/instances/{id}")).await;
    b.present(r#"svg#graph g[data-step="charge"][data-state="failed"]"#)
        .await;
    b.wait(r#"tr[data-event-type="FlowPaused"]"#).await;
    for action in [
        "#act-retry",
        "#act-skip",
        "#act-abort",
        "#act-pause",
        "#act-resume",
    ] {
        assert_eq!(b.count(action).await, 0, "{action} shown to a reader");
    }
    b.shot("readonly-instance").await;
    b.goto("/instances").await;
    b.wait(&format!(r#"tr[data-instance="{id}"]"#)).await;
    assert_eq!(
        b.count("#bulk-retry").await + b.count("#bulk-abort").await,
        0
    );

    let (status, body) = support::send(
        server
            .http
            .post(format!("{}/api/v1/instances/{id}/retry", server.url))
            .bearer_auth(READER)
            .json(&json!({"seen": seen, "actor": "reader", "reason": "try"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_page_follows_a_live_append() {
    let server = Server::start(ServerConfig::default()).await;
    let append = async |ty: &str, tags: Value| -> i64 {
        let (status, body) = server
            .post(
                "/api/v1/events",
                json!({"events": [{"type": ty, "tags": tags, "data": {"parcel": "p-1"}}]}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["positions"][0].as_i64().unwrap()
    };
    let first = append("ParcelLabelled", json!(["parcel:p-1"])).await;
    let b = Browser::open("events", &server.url).await;
    b.goto("/events").await;
    b.wait(&format!(r#"tr[data-position="{first}"]"#)).await;
    b.click("#follow").await;
    b.until("#follow to be ticked", async || {
        b.probe("return document.querySelector('#follow').checked")
            .await
            .as_bool()
            .filter(|c| *c)
    })
    .await;
    assert!(b.url().await.contains("follow=1"), "{}", b.url().await);
    // Appended once the tail is connected (it starts at the head).
    b.wait_text("#live-state", "a connected tail", |t| {
        let state = t.trim_start_matches("Live:").trim_start();
        state.starts_with("connected") || state.starts_with("live")
    })
    .await;

    let next = append("ParcelShipped", json!(["parcel:p-1", "carrier:dhl"])).await;
    let row = format!(r#"tr[data-position="{next}"]"#);
    b.wait_text(&row, "the appended event", |t| t.contains("ParcelShipped"))
        .await;
    b.wait(&format!(r#"{row} a[data-tag="carrier:dhl"]"#)).await;
    b.shot("events-follow").await;

    // A tag filters the log by it.
    b.click(&format!(r#"{row} a[data-tag="carrier:dhl"]"#))
        .await;
    b.until("the tag filter", async || {
        b.value("#q-tags")
            .await
            .filter(|v| v.contains("carrier:dhl"))
    })
    .await;
    b.wait_gone(&format!(r#"tr[data-position="{first}"]"#))
        .await;
    b.wait(&row).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_replayed_from_the_relays_page() {
    let svc = Service::start().await;
    let server = Server::start(ServerConfig {
        extra: format!(
            "[[relays]]\nname = \"parcels-hook\"\ntypes = [\"ParcelShipped\"]\n\
             webhook = {{ url = \"{}/hook\", timeout_ms = 5000 }}\nmax_attempts = 1\n",
            svc.url
        ),
        ..Default::default()
    })
    .await;
    let (status, body) = server
        .post(
            "/api/v1/events",
            json!({"events": [{"type": "ParcelShipped", "tags": ["parcel:p-9"], "data": {"parcel": "p-9"}}]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let position = body["positions"][0].as_i64().unwrap();
    let b = Browser::open("relays", &server.url).await;
    let dead = b
        .until("the refused event to become a dead letter", async || {
            let page = server.get("/api/v1/dead-letters").await;
            page["items"][0]["id"].as_i64()
        })
        .await;
    assert_eq!(svc.calls("hook").len(), 1, "one refused attempt");

    b.goto("/relays").await;
    b.wait(r#"tr[data-consumer="parcels-hook"]"#).await;
    b.wait(&format!(r#"tr[data-dead-letter="{dead}"]"#)).await;
    b.shot("relays").await;

    svc.heal();
    b.click(&format!(r#"button[data-replay="{dead}"]"#)).await;
    b.click("#confirm-ok").await;
    b.wait_gone(&format!(r#"tr[data-dead-letter="{dead}"]"#))
        .await;
    b.shot("relays-replayed").await;
    let calls = svc.calls("hook");
    assert_eq!(calls.len(), 2, "{calls:?}");
    let got = calls[1].body.to_string();
    assert!(
        got.contains("ParcelShipped") && got.contains("p-9") && got.contains(&position.to_string()),
        "{got}"
    );
    assert_eq!(server.get("/api/v1/dead-letters").await["total"], 0);
}
