//! Graceful shutdown of the real binary: SIGTERM while a step is in flight;
//! the step finishes within the grace period, its result is recorded, the
//! process says what it drained and exits 0.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use dcbflow::{Query, ReadOptions, Store};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

/// Kills the server if the test fails half-way.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A service whose `/slow` answers only once the test says so.
async fn slow_service() -> (String, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let app = axum::Router::new().route(
        "/slow",
        post(move || {
            let (tx, r) = (arrived_tx.clone(), r.clone());
            async move {
                let _ = tx.send(());
                r.notified().await;
                axum::Json(json!({"done": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, arrived, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_running_step_finish_and_reports_the_drain() {
    let db_url = support::db::Database::shared_url().to_owned();
    let schema = format!("s_{}", uuid::Uuid::new_v4().simple());
    let (service, mut arrived, release) = slow_service().await;
    let dir = std::env::temp_dir().join(&schema);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("slow.yaml"),
        "name: slow\ninput: { url: string }\ntasks:\n  - name: wait\n    action: { executor: http, method: POST, url: \"{{flow.input.url}}/slow\" }\n    timeout_ms: 60000\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("dcbflow.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\n[database]\nurl = \"{db_url}\"\nschema = \"{schema}\"\npool_size = 8\n\
             [flows]\npaths = [\"slow.yaml\"]\nhttp_allow = [\"loopback\"]\n\
             [workers]\ncount = 1\nconcurrency = 4\nshutdown_grace_ms = 30000\n"
        ),
    )
    .unwrap();
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_dcbflow"))
            .args(["serve", "--config"])
            .arg(dir.join("dcbflow.toml"))
            .env_remove("DATABASE_URL")
            .env_remove("DCBFLOW_DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let (line_tx, mut lines) = mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let mut output = Vec::new();
    let url = loop {
        let line = tokio::time::timeout(support::DEADLINE, lines.recv())
            .await
            .expect("the server to start")
            .expect("a line");
        output.push(line.clone());
        if let Some(rest) = line.strip_prefix("dcbflow listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let http = dcbflow::http::client_builder().build().unwrap();
    let started: serde_json::Value = http
        .post(format!("{url}/api/v1/instances"))
        .json(&json!({"flow": "slow", "input": {"url": service}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id: uuid::Uuid = started["id"].as_str().unwrap().parse().unwrap();
    tokio::time::timeout(support::DEADLINE, arrived.recv())
        .await
        .expect("the step to call the service");
    // The step is in flight: ask the server to stop.
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let announced = loop {
        let line = tokio::time::timeout(support::DEADLINE, lines.recv())
            .await
            .expect("a shutdown line");
        let Some(line) = line else { break false };
        output.push(line.clone());
        if line.starts_with("shutting down") {
            break true;
        }
    };
    assert!(announced, "{output:?}");
    // It waits for the step: still running until the service answers.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server exited with a step in flight"
    );
    release.notify_one();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < support::DEADLINE,
            "the server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    while let Ok(l) = lines.try_recv() {
        output.push(l);
    }
    assert!(status.success(), "{status} {output:?}");
    let drained = output
        .iter()
        .find(|l| l.starts_with("drained:"))
        .unwrap_or_else(|| panic!("{output:?}"));
    assert!(drained.contains("1 running steps finished"), "{drained}");
    assert!(drained.contains("0 abandoned"), "{drained}");
    // The step's success is in the log.
    let store = Store::builder_for_url(&db_url, Some(2))
        .unwrap()
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let tl = store
        .read_all(
            &Query::items_of(["FlowStepSucceeded"], [format!("flow_instance:{id}")]),
            ReadOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(tl.events.len(), 1, "the step's success was recorded");
    store
        .pool()
        .get()
        .await
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
