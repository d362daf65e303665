//! Scenario 4: SIGKILLed worker and relay processes. `examples/fault_worker.rs`
//! runs two flow workers (a flow whose SQL step moves money between two accounts,
//! then a second SQL step) and an outbox relay posting every `FlowCompleted` event
//! to a webhook served by this test (axum). The test starts instances in waves,
//! starts the process, SIGKILLs it at a random moment, again and again, and
//! finally lets one run until everything is drained.
//!
//! Verdict: every SQL step applied exactly once (per instance one `transfer` and
//! one `audit` effect row, money conserved, every balance exactly what the
//! transfers imply), every instance completed once, and the webhook received
//! every message at least once (deduplicated by `Idempotency-Key` it is exactly
//! the set of `FlowCompleted` events). Figures: kills, takeovers, drain time,
//! webhook duplicates.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dcbflow::Store;
use dcbflow::flow::Flows;
use rand::Rng;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::figure;
use crate::support::{Cluster, Verdicts, long, raw, within};

const S: &str = "kill";
const ACCOUNTS: [&str; 4] = ["a", "b", "c", "d"];

#[test]
fn sigkilled_workers_and_relay() {
    crate::support::run(scenario());
}

/// `target/<profile>/examples/fault_worker`: `cargo test` builds it; if it is
/// missing or older than this test binary or its source (`cargo test --test
/// fault` alone builds no example), it is built here.
async fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let bin = profile_dir.join("examples").join("fault_worker");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fault_worker.rs");
    if let Some(built) = modified(&bin)
        && modified(&exe).is_none_or(|t| built >= t)
        && modified(&source).is_none_or(|t| built >= t)
    {
        return bin;
    }
    let t0 = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--example",
        "fault_worker",
        "--all-features",
        "--quiet",
    ])
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .env("CARGO_TARGET_DIR", &target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build --example fault_worker failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bin.is_file(), "no {}", bin.display());
    figure!(
        S,
        "built {} in {:.1} s",
        bin.display(),
        t0.elapsed().as_secs_f64()
    );
    bin
}

struct Env {
    bin: PathBuf,
    url: String,
    schema: String,
    webhook: String,
    log: PathBuf,
}

impl Env {
    fn command(&self, mode: &str) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("worker log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg(mode)
            .env("DATABASE_URL", &self.url)
            .env("FAULT_SCHEMA", &self.schema)
            .env("FAULT_WEBHOOK", &self.webhook)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        cmd
    }

    /// Starts `fault_worker run` and waits for its `ready` line.
    async fn spawn(&self) -> (Child, Instant) {
        let mut child = self.command("run").spawn().expect("spawn fault_worker");
        let spawned = Instant::now();
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "ready" {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(ready, Ok(true)),
            "fault_worker did not get ready; its log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        // Keep reading so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (child, spawned)
    }
}

async fn scenario() {
    let kills = if long() { 20 } else { 6 };
    let wave = if long() { 40 } else { 20 };
    let cluster = Cluster::start_async().await;
    let schema = "fault_killed".to_string();

    // The webhook: every delivery's Idempotency-Key.
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let received = received.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let received = received.clone();
                async move {
                    let key = headers
                        .get("Idempotency-Key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    received.lock().unwrap().push(key);
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = std::env::temp_dir().join(format!(
        "dcbflow-fault-worker-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let env = Env {
        bin: worker_binary().await,
        url: cluster.url("fault_worker"),
        schema: schema.clone(),
        webhook,
        log: dir.join("fault_worker.log"),
    };
    let setup = env
        .command("setup")
        .output()
        .await
        .expect("fault_worker setup");
    assert!(
        setup.status.success(),
        "fault_worker setup failed: {}",
        std::fs::read_to_string(&env.log).unwrap_or_default()
    );

    // This process only starts instances.
    let store = Store::builder_for_url(&cluster.url("fault_starter"), Some(4))
        .unwrap()
        .schema(&schema)
        .build()
        .await
        .unwrap();
    let flows = Flows::new(store);
    let check = raw(&cluster.url("fault_check")).await;
    let completed_sql =
        format!("SELECT count(*) FROM \"{schema}\".flow_instances WHERE status = 'completed'");
    let completed = || async {
        check
            .query_one(&completed_sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };

    let mut inputs: HashMap<uuid::Uuid, (usize, usize, i64)> = HashMap::new();
    let mut start_wave = async |n: usize| {
        for _ in 0..n {
            let i = inputs.len();
            let (from, to, amount) = (i % 4, (i + 1 + i / 4) % 4, 1 + (i % 17) as i64);
            let to = if to == from { (to + 1) % 4 } else { to };
            let started = flows
                .start(
                    "fault_transfer",
                    Some(&format!("transfer-{i}")),
                    json!({"from": ACCOUNTS[from], "to": ACCOUNTS[to], "amount": amount}),
                )
                .await
                .expect("start an instance");
            inputs.insert(started.instance, (from, to, amount));
        }
    };
    let mut kill_log = Vec::new();
    for k in 0..kills {
        start_wave(wave).await;
        let (mut child, spawned) = env.spawn().await;
        // A random moment of its life: the fault, not a wait for a condition.
        let life = Duration::from_millis(rand::rng().random_range(150..=1200));
        tokio::time::sleep(life).await;
        child.start_kill().expect("SIGKILL");
        let _ = child.wait().await;
        let done = completed().await;
        kill_log.push(format!(
            "#{}: killed {:.0} ms after ready ({:.0} ms after spawn), {done} completed",
            k + 1,
            life.as_secs_f64() * 1e3,
            spawned.elapsed().as_secs_f64() * 1e3
        ));
    }
    start_wave(wave).await;
    let total = inputs.len() as i64;
    for line in &kill_log {
        figure!(S, "kill {line} of {total} started so far");
    }

    // The last process drains everything.
    let (mut child, spawned) = env.spawn().await;
    let events_sql = format!(
        "SELECT position FROM \"{schema}\".events WHERE type = 'FlowCompleted' ORDER BY position"
    );
    let drained = within(Duration::from_secs(120), || async {
        if completed().await < total {
            return None;
        }
        let rows = check.query(&events_sql, &[]).await.ok()?;
        let expected: HashSet<String> = rows
            .iter()
            .map(|r| format!("{schema}:{}", r.get::<_, i64>(0)))
            .collect();
        let got: HashSet<String> = received.lock().unwrap().iter().cloned().collect();
        expected.is_subset(&got).then(|| spawned.elapsed())
    })
    .await;
    child.start_kill().expect("kill the last worker");
    let _ = child.wait().await;

    let mut v = Verdicts::new(S);
    let statuses: BTreeMap<String, i64> = check
        .query(
            &format!("SELECT status, count(*) FROM \"{schema}\".flow_instances GROUP BY status"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    v.check(
        "every instance completed",
        statuses.get("completed") == Some(&total) && statuses.len() == 1,
        format!("{total} started; {statuses:?}"),
    );
    let effects: Vec<(uuid::Uuid, String, i64)> = check
        .query(
            &format!("SELECT instance, step, count(*) FROM \"{schema}\".effects GROUP BY 1, 2"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let twice: Vec<_> = effects.iter().filter(|e| e.2 != 1).collect();
    let mut steps_per_instance: HashMap<uuid::Uuid, usize> = HashMap::new();
    for e in &effects {
        *steps_per_instance.entry(e.0).or_default() += 1;
    }
    let incomplete = inputs
        .keys()
        .filter(|id| steps_per_instance.get(id) != Some(&2))
        .count();
    v.check(
        "every SQL step applied exactly once (one effect row per instance and step)",
        twice.is_empty() && incomplete == 0 && effects.len() == 2 * inputs.len(),
        format!(
            "{} effect groups for {} instances; applied more than once: {:?}; instances missing a step: {incomplete}",
            effects.len(),
            inputs.len(),
            &twice[..twice.len().min(5)]
        ),
    );
    let balances: BTreeMap<String, i64> = check
        .query(
            &format!("SELECT id, balance FROM \"{schema}\".accounts"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut expected = [1000i64; 4];
    for (from, to, amount) in inputs.values() {
        expected[*from] -= amount;
        expected[*to] += amount;
    }
    let expected: BTreeMap<String, i64> = ACCOUNTS
        .iter()
        .zip(expected)
        .map(|(a, b)| (a.to_string(), b))
        .collect();
    let sum: i64 = balances.values().sum();
    v.check(
        "money conserved and every balance exactly what the transfers imply",
        sum == 4000 && balances == expected,
        format!("sum {sum} (4000), balances {balances:?}, expected {expected:?}"),
    );
    let per_instance: Vec<i64> = check
        .query(
            &format!(
                "SELECT count(*) FROM \"{schema}\".events WHERE type = 'FlowCompleted' GROUP BY tags[1]"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    v.check(
        "every instance completed exactly once in the log",
        per_instance.len() as i64 == total && per_instance.iter().all(|n| *n == 1),
        format!(
            "{} instances with a FlowCompleted event, counts {:?}",
            per_instance.len(),
            per_instance.iter().collect::<HashSet<_>>()
        ),
    );
    let expected_keys: HashSet<String> = check
        .query(&events_sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{schema}:{}", r.get::<_, i64>(0)))
        .collect();
    let deliveries = received.lock().unwrap().clone();
    let keys: HashSet<String> = deliveries.iter().cloned().collect();
    v.check(
        "the webhook received every message at least once; deduplicated by Idempotency-Key it is exactly the set",
        keys == expected_keys,
        format!(
            "{} deliveries, {} distinct keys, {} expected; missing {}, unexpected {}",
            deliveries.len(),
            keys.len(),
            expected_keys.len(),
            expected_keys.difference(&keys).count(),
            keys.difference(&expected_keys).count()
        ),
    );
    let count = |ty: &'static str| {
        let sql = format!("SELECT count(*) FROM \"{schema}\".events WHERE type = '{ty}'");
        let check = &check;
        async move { check.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    figure!(
        S,
        "{total} instances, {kills} SIGKILLs; {} step attempts started, {} timed out (taken over after a kill), {} retries; drain by the last process: {}; webhook deliveries {} for {} messages ({} duplicates)",
        count("FlowStepStarted").await,
        count("FlowStepTimedOut").await,
        count("FlowStepRetryScheduled").await,
        drained.map_or("not within 120 s".to_string(), |d| format!(
            "{:.1} s",
            d.as_secs_f64()
        )),
        deliveries.len(),
        keys.len(),
        deliveries.len() - keys.len()
    );
    let failures: Vec<String> = check
        .query(
            &format!(
                "SELECT type, left(data->>'error', 120), count(*) FROM \"{schema}\".events \
                 WHERE type IN ('FlowStepFailed', 'FlowStepTimedOut') GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{} x{}: {}", r.get::<_, String>(0), r.get::<_, i64>(2), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect();
    figure!(S, "failed attempts by error: {failures:?}");
    v.check(
        "the last process drained everything within 120 s",
        drained.is_some(),
        format!("{drained:?}"),
    );
    if !v.all_hold() {
        let log = std::fs::read_to_string(&env.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        println!(
            "[{S}] fault_worker log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    v.finish();
}
