//! The `dcbflow` binary end to end: on real PostgreSQL in a fresh schema
//! (`--config` with `[database] schema = ...` and `DATABASE_URL`), and through
//! a real server (`--server`, `--token`), checking output, `--json` views and
//! exit codes (0 ok, 2 bad input, 3 not found, 4 conflict, 5 unavailable, 6 auth).

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dcbflow::CancellationToken;
use dcbflow::flow::{TaskContext, TaskError, WorkerOptions};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_dcbflow");

/// A flow of HTTP tasks: it registers without functions (no worker runs it).
const SHIPPING: &str = r#"
name: shipping
input:
  order: string
tasks:
  - name: pack
    action:
      executor: http
      method: POST
      url: "https://example.com/pack/{{flow.input.order}}"
  - name: ship
    depends_on: [pack]
    action:
      executor: http
      method: POST
      url: "https://example.com/ship"
"#;

/// A flow of functions (registered by [`functions`] on a test server).
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

/// What a run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the exit code, showing the output otherwise.
    #[track_caller]
    fn code(self, want: i32) -> Self {
        assert_eq!(
            self.code, want,
            "exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    fn ok(self) -> Self {
        self.code(0)
    }

    /// stdout as JSON.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    #[track_caller]
    fn out_has(self, text: &str) -> Self {
        assert!(
            self.stdout.contains(text),
            "stdout lacks {text:?}:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    fn err_has(self, text: &str) -> Self {
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}:\n{}",
            self.stderr
        );
        self
    }
}

/// How the binary is pointed at the data.
enum Target {
    /// `--config FILE` and `DATABASE_URL`.
    Database { url: String },
    /// `--server URL [--token T]`, no database in the environment.
    Server { url: String, token: Option<String> },
    /// Neither: only what the test puts in the environment.
    Bare,
}

/// A CLI user: a temp folder with a config file naming the schema.
struct Cli {
    dir: PathBuf,
    config: PathBuf,
    schema: String,
    target: Target,
    drop_schema: Option<String>,
}

impl Cli {
    /// On the database in a fresh schema (dropped at the end).
    fn fresh() -> Cli {
        let schema = format!("cli_{}", uuid::Uuid::new_v4().simple());
        let mut c = Cli::on_schema(&schema);
        c.drop_schema = Some(db::Database::shared_url().to_owned());
        c
    }

    /// On the database in `schema` (a test server's).
    fn on_schema(schema: &str) -> Cli {
        let dir =
            std::env::temp_dir().join(format!("dcbflow-cli-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("dcbflow.toml");
        std::fs::write(
            &config,
            format!("[database]\nschema = \"{schema}\"\npool_size = 4\n"),
        )
        .unwrap();
        Cli {
            dir,
            config,
            schema: schema.to_owned(),
            target: Target::Database {
                url: db::Database::shared_url().to_owned(),
            },
            drop_schema: None,
        }
    }

    /// Through the server at `url`.
    fn remote(url: &str, token: Option<&str>) -> Cli {
        let mut c = Cli::on_schema("unused");
        c.target = Target::Server {
            url: url.to_owned(),
            token: token.map(str::to_owned),
        };
        c
    }

    /// A file in the temp folder.
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// The command, with a clean environment of its own.
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(BIN);
        for k in [
            "DATABASE_URL",
            "DCBFLOW_DATABASE_URL",
            "DCBFLOW_CONFIG",
            "DCBFLOW_SERVER",
            "DCBFLOW_TOKEN",
            "DCBFLOW_OPERATOR_TOKEN",
            "DCBFLOW_READ_TOKEN",
            "RUST_LOG",
        ] {
            c.env_remove(k);
        }
        c.env("USER", "tester");
        match &self.target {
            Target::Database { url } => {
                c.env("DATABASE_URL", url);
                c.arg("--config").arg(&self.config);
            }
            Target::Server { url, token } => {
                c.arg("--server").arg(url);
                if let Some(t) = token {
                    c.env("DCBFLOW_TOKEN", t);
                }
            }
            Target::Bare => {}
        }
        c.args(args).stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// Runs the binary to the end.
    async fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, |_| {}).await
    }

    async fn run_with(
        &self,
        args: &[&str],
        edit: impl FnOnce(&mut tokio::process::Command),
    ) -> Run {
        let mut c = self.command(args);
        edit(&mut c);
        let out = tokio::time::timeout(Duration::from_secs(60), c.output())
            .await
            .unwrap_or_else(|_| panic!("dcbflow {args:?} did not finish in 60 s"))
            .expect("run dcbflow");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(url) = self.drop_schema.take() {
            support::drop_schema(&url, &self.schema);
        }
    }
}

/// A migrated fresh schema with the shipping flow registered.
async fn shipping() -> Cli {
    let cli = Cli::fresh();
    cli.run(&["migrate"]).await.ok();
    let f = cli.file("shipping.yaml", SHIPPING);
    cli.run(&["flows", "register", f.to_str().unwrap()])
        .await
        .ok();
    cli
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_register_list_show_start() {
    let cli = Cli::fresh();
    // Not migrated yet: the CLI does not install tables behind your back.
    cli.run(&["flows", "list"])
        .await
        .code(5)
        .err_has("dcbflow migrate");
    cli.run(&["migrate"])
        .await
        .ok()
        .out_has("store")
        .err_has("migrated");
    let status = cli.run(&["--json", "migrate"]).await.ok().json();
    assert_eq!(status["current"], true, "{status}");
    assert!(
        status["layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["layer"] == "flow"),
        "{status}"
    );

    cli.run(&["flows", "list"])
        .await
        .ok()
        .out_has("no flows registered");
    let f = cli.file("shipping.yaml", SHIPPING);
    cli.run(&["flows", "register", s(&f)])
        .await
        .ok()
        .out_has("registered flow shipping version");
    cli.run(&["flows", "register", s(&f)])
        .await
        .ok()
        .out_has("was registered before");
    let again = cli
        .run(&["--json", "flows", "register", s(&f)])
        .await
        .ok()
        .json();
    assert_eq!(again[0]["name"], "shipping");
    assert_eq!(again[0]["created"], false);

    // Invalid definitions: exit 2, every problem on its own line.
    let bad = cli.file("bad.yaml", "name: bad\ntasks:\n  - name: a\n    depends_on: [nope]\n    action: { executor: http, method: GET, url: \"https://example.com\" }\n");
    cli.run(&["flows", "register", s(&bad)])
        .await
        .code(2)
        .err_has("error: ")
        .err_has("bad.yaml")
        .err_has("\n  definition: ");
    let txt = cli.file("notes.txt", "hello");
    cli.run(&["flows", "register", s(&txt)])
        .await
        .code(2)
        .err_has(".yaml, .yml, .json or .toml");

    cli.run(&["flows", "list"])
        .await
        .ok()
        .out_has("shipping")
        .out_has("LATEST VERSION");
    let page = cli.run(&["--json", "flows", "list"]).await.ok().json();
    assert_eq!(page["items"][0]["name"], "shipping", "{page}");
    assert_eq!(page["items"][0]["tasks"], 2);

    cli.run(&["flows", "show", "shipping"])
        .await
        .ok()
        .out_has("TASK")
        .out_has("pack")
        .out_has("source (yaml):");
    let detail = cli
        .run(&["--json", "flows", "show", "shipping"])
        .await
        .ok()
        .json();
    assert_eq!(
        detail["graph"]["edges"],
        json!([{"from": "pack", "to": "ship"}])
    );
    let version = detail["version"].as_str().unwrap().to_owned();
    let source = cli
        .run(&[
            "flows",
            "show",
            "shipping",
            "--format",
            "json",
            "--version",
            &version,
        ])
        .await
        .ok()
        .stdout
        .clone();
    let def: Value = serde_json::from_str(&source).expect("--format json prints the definition");
    assert_eq!(def["name"], "shipping");
    cli.run(&["flows", "show", "shipping", "--format", "toml"])
        .await
        .ok()
        .out_has("name = \"shipping\"");
    cli.run(&["flows", "show", "shipping", "--format", "xml"])
        .await
        .code(2);
    cli.run(&["flows", "show", "nope"])
        .await
        .code(3)
        .err_has("error: ");
    cli.run(&["flows", "show", "shipping", "--version", "deadbeef"])
        .await
        .code(3);

    // Start: idempotent by business key.
    cli.run(&[
        "flows",
        "start",
        "shipping",
        "--key",
        "order-1",
        "--input",
        r#"{"order":"o1"}"#,
    ])
    .await
    .ok()
    .out_has("started instance");
    let started = cli
        .run(&[
            "--json",
            "flows",
            "start",
            "shipping",
            "--key",
            "order-1",
            "--input",
            r#"{"order":"o1"}"#,
        ])
        .await
        .ok()
        .json();
    assert_eq!(started["created"], false, "{started}");
    assert_eq!(started["definition_version"], version.as_str());
    let input = cli.file("input.json", r#"{"order": "o2"}"#);
    let other = cli
        .run(&[
            "--json",
            "flows",
            "start",
            "shipping",
            "--input",
            &format!("@{}", s(&input)),
        ])
        .await
        .ok()
        .json();
    assert_eq!(other["created"], true);
    cli.run(&["flows", "start", "shipping", "--input", "{nope"])
        .await
        .code(2)
        .err_has("input: not JSON");
    cli.run(&["flows", "start", "shipping"])
        .await
        .code(2)
        .err_has("field \"order\" is missing");
    cli.run(&["flows", "start", "nope"]).await.code(3);
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_list_show_timeline_and_operations() {
    let cli = shipping().await;
    let started = cli
        .run(&[
            "--json",
            "flows",
            "start",
            "shipping",
            "--key",
            "order-7",
            "--input",
            r#"{"order":"o7"}"#,
        ])
        .await
        .ok()
        .json();
    let id = started["id"].as_str().unwrap().to_owned();

    cli.run(&["instances", "list", "--flow", "shipping"])
        .await
        .ok()
        .out_has(&id)
        .out_has("order-7")
        .out_has("SEEN");
    let page = cli
        .run(&[
            "--json",
            "instances",
            "list",
            "--flow",
            "shipping",
            "--key",
            "order-7",
        ])
        .await
        .ok()
        .json();
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    let seen = page["items"][0]["seen"].as_i64().unwrap();
    let none = cli
        .run(&[
            "--json",
            "instances",
            "list",
            "--search",
            "no-such",
            "--started-after",
            "1h",
        ])
        .await
        .ok()
        .json();
    assert_eq!(none["items"], json!([]));
    cli.run(&["instances", "list", "--started-before", "2000-01-01"])
        .await
        .ok()
        .out_has("no instances match");

    cli.run(&["instances", "show", &id])
        .await
        .ok()
        .out_has("status:")
        .out_has("running")
        .out_has("order-7");
    let view = cli
        .run(&["--json", "instances", "show", &id])
        .await
        .ok()
        .json();
    assert_eq!(
        (view["flow"].as_str(), view["status"].as_str()),
        (Some("shipping"), Some("running"))
    );
    assert_eq!(view["seen"].as_i64(), Some(seen));

    cli.run(&["instances", "timeline", &id])
        .await
        .ok()
        .out_has("POSITION")
        .out_has("FlowStarted");
    let tl = cli
        .run(&["--json", "instances", "timeline", &id])
        .await
        .ok()
        .json();
    assert!(!tl["events"].as_array().unwrap().is_empty(), "{tl}");

    // A stale --seen: refused, exit 4.
    cli.run(&[
        "instances",
        "pause",
        &id,
        "--seen",
        "1",
        "--reason",
        "checking",
    ])
    .await
    .code(4)
    .err_has("error: the instance changed since you looked");
    // Without --seen: the current one, and it says so.
    let paused = cli
        .run(&["--json", "instances", "pause", &id, "--reason", "checking"])
        .await
        .ok();
    let paused = paused.err_has(&format!("using --seen {seen}"));
    let paused = paused.json();
    assert_eq!(paused["status"], "paused", "{paused}");
    let now = paused["seen"].as_i64().unwrap().to_string();
    cli.run(&[
        "instances",
        "resume",
        &id,
        "--seen",
        &seen.to_string(),
        "--reason",
        "late",
    ])
    .await
    .code(4);
    let resumed = cli
        .run(&[
            "--json",
            "instances",
            "resume",
            &id,
            "--seen",
            &now,
            "--reason",
            "done checking",
            "--actor",
            "ada",
        ])
        .await
        .ok()
        .json();
    assert_eq!(resumed["status"], "running");
    let tl = cli
        .run(&["--json", "instances", "timeline", &id])
        .await
        .ok()
        .json();
    let paused_event = tl["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "FlowPaused")
        .expect("a pause event")
        .clone();
    assert!(
        paused_event.to_string().contains("tester"),
        "the actor defaults to $USER: {paused_event}"
    );

    // Skip a task with an output.
    let skipped = cli
        .run(&[
            "--json",
            "instances",
            "skip",
            &id,
            "--task",
            "pack",
            "--output",
            r#"{"box":1}"#,
            "--reason",
            "packed by hand",
        ])
        .await
        .ok()
        .json();
    assert_eq!(skipped["outputs"]["pack"]["box"], 1, "{skipped}");

    // Not found, bad input.
    let unknown = uuid::Uuid::new_v4().to_string();
    cli.run(&["instances", "show", &unknown])
        .await
        .code(3)
        .err_has("error: no instance");
    cli.run(&["instances", "timeline", &unknown]).await.code(3);
    cli.run(&["instances", "abort", &unknown, "--reason", "x"])
        .await
        .code(3);
    cli.run(&["instances", "show", "not-a-uuid"])
        .await
        .code(2)
        .err_has("error: id: ");
    cli.run(&["instances", "pause", &id])
        .await
        .code(2)
        .err_has("--reason");
    cli.run(&["instances", "pause", &id, "--reason", " "])
        .await
        .code(2)
        .err_has("  reason: ");
    cli.run(&["instances", "list", "--status", "bogus"])
        .await
        .code(2)
        .err_has("error: status: ");
    cli.run(&["instances", "list", "--limit", "0"])
        .await
        .code(2)
        .err_has("error: limit: ");
    cli.run(&["instances", "list", "--started-after", "soon"])
        .await
        .code(2);
    cli.run(&["instances", "frobnicate"]).await.code(2);

    // The other lists, empty here.
    cli.run(&["incidents", "list"])
        .await
        .ok()
        .out_has("no open incidents");
    cli.run(&["incidents", "show", "nope"]).await.code(3);
    cli.run(&["dlq", "list"])
        .await
        .ok()
        .out_has("no dead letters");
    cli.run(&["dlq", "discard", "42"]).await.code(3);
    cli.run(&["dlq", "replay", "42"]).await.code(3);
    cli.run(&["projections", "list"])
        .await
        .ok()
        .out_has("log head:");
    let consumers = cli
        .run(&["--json", "projections", "list"])
        .await
        .ok()
        .json();
    assert!(consumers["head"].as_i64().unwrap() > 0, "{consumers}");
}

const APPROVAL: &str = r#"
name: approval
tasks:
  - name: pack
    action: { executor: http, method: POST, url: "https://example.com/pack" }
  - name: approve
    depends_on: [pack]
    signal: { name: approved }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn signals_are_sent_idempotently_and_bad_ones_exit_non_zero() {
    let cli = Cli::fresh();
    cli.run(&["migrate"]).await.ok();
    let f = cli.file("approval.yaml", APPROVAL);
    cli.run(&["flows", "register", s(&f)]).await.ok();
    let started = cli
        .run(&["--json", "flows", "start", "approval"])
        .await
        .ok()
        .json();
    let id = started["id"].as_str().unwrap().to_owned();
    // Sent before its task is reached (no worker runs here): kept.
    for _ in 0..2 {
        let v = cli
            .run(&[
                "--json",
                "instances",
                "signal",
                &id,
                "approved",
                "--payload",
                r#"{"ok":true}"#,
                "--signal-id",
                "a-1",
                "--actor",
                "ada",
                "--reason",
                "checked the file",
            ])
            .await
            .ok()
            .json();
        assert_eq!(v["signals"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["signals"][0]["payload"]["ok"], true, "{v}");
        assert_eq!(v["signals"][0]["consumed_by"], Value::Null, "{v}");
    }
    cli.run(&["instances", "signal", &id, "approved", "--signal-id", "a-2"])
        .await
        .ok()
        .err_has("sent signal approved");
    cli.run(&["instances", "signal", &id, "aproved"])
        .await
        .code(4)
        .err_has("no task of flow \"approval\" waits for signal \"aproved\"");
    cli.run(&["instances", "signal", &id, "approved", "--payload", "{nope"])
        .await
        .code(2)
        .err_has("payload");
    cli.run(&[
        "instances",
        "signal",
        &uuid::Uuid::new_v4().to_string(),
        "approved",
    ])
    .await
    .code(3);
}

#[tokio::test(flavor = "multi_thread")]
async fn schedules_are_set_listed_paused_and_bad_ones_exit_2() {
    let cli = shipping().await;
    cli.run(&[
        "schedules",
        "set",
        "nightly",
        "--flow",
        "shipping",
        "--cron",
        "0 0 2 * * *",
        "--timezone",
        "Europe/Amsterdam",
        "--input",
        r#"{"order":"nightly"}"#,
        "--missed",
        "run_once",
    ])
    .await
    .ok()
    .err_has("set schedule nightly");
    cli.run(&["schedules", "list"])
        .await
        .ok()
        .out_has("nightly")
        .out_has("Europe/Amsterdam")
        .out_has("run_once");
    let v = cli
        .run(&[
            "--json",
            "schedules",
            "pause",
            "nightly",
            "--reason",
            "maintenance",
        ])
        .await
        .ok()
        .json();
    assert_eq!(v["paused"], true, "{v}");
    cli.run(&[
        "schedules",
        "set",
        "bad",
        "--flow",
        "shipping",
        "--cron",
        "nightly",
    ])
    .await
    .code(2)
    .err_has("does not parse");
    cli.run(&["schedules", "resume", "nope", "--reason", "x"])
        .await
        .code(3);
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_dry_run_then_for_real_with_progress() {
    let cli = shipping().await;
    for i in 0..3 {
        cli.run(&[
            "flows",
            "start",
            "shipping",
            "--key",
            &format!("batch-{i}"),
            "--input",
            r#"{"order":"b"}"#,
        ])
        .await
        .ok();
    }
    cli.run(&[
        "flows",
        "start",
        "shipping",
        "--key",
        "single",
        "--input",
        r#"{"order":"s"}"#,
    ])
    .await
    .ok();
    cli.run(&["instances", "bulk", "pause", "--reason", "maintenance"])
        .await
        .code(2)
        .err_has("--all");
    let dry = cli
        .run(&[
            "--json",
            "instances",
            "bulk",
            "pause",
            "--search",
            "batch",
            "--dry-run",
            "--reason",
            "maintenance",
        ])
        .await
        .ok()
        .json();
    assert_eq!(
        (
            dry["matched"].as_i64(),
            dry["acted"].as_i64(),
            dry["dry_run"].as_bool()
        ),
        (Some(3), Some(0), Some(true)),
        "{dry}"
    );
    cli.run(&[
        "instances",
        "bulk",
        "pause",
        "--search",
        "batch",
        "--dry-run",
        "--reason",
        "m",
    ])
    .await
    .ok()
    .out_has("dry run: 3 instances match");
    let page = cli
        .run(&["--json", "instances", "list", "--status", "paused"])
        .await
        .ok()
        .json();
    assert_eq!(page["items"], json!([]), "a dry run changes nothing");

    let done = cli
        .run(&[
            "--json",
            "instances",
            "bulk",
            "pause",
            "--search",
            "batch",
            "--reason",
            "maintenance",
        ])
        .await
        .ok();
    let done = done.err_has("bulk pause: 3/3 (100%)");
    let done = done.json();
    assert_eq!(
        (done["matched"].as_i64(), done["acted"].as_i64()),
        (Some(3), Some(3)),
        "{done}"
    );
    let again = cli
        .run(&[
            "instances",
            "bulk",
            "pause",
            "--search",
            "batch",
            "--reason",
            "again",
        ])
        .await
        .ok();
    again
        .out_has("3 instances matched, 0 acted on, 3 refused")
        .out_has("not_allowed");
    let page = cli
        .run(&["--json", "instances", "list", "--status", "paused"])
        .await
        .ok()
        .json();
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let all = cli
        .run(&[
            "--json",
            "instances",
            "bulk",
            "resume",
            "--all",
            "--dry-run",
            "--reason",
            "r",
        ])
        .await
        .ok()
        .json();
    assert_eq!(all["matched"], 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_configuration_lists_every_problem_and_exits_2() {
    let cli = Cli::fresh();
    // Every problem of the values at once, each with its key path.
    std::fs::write(
        &cli.config,
        "[database]\npool_size = 1\ngroup_commit = 1\n\n[workers]\ncount = 1\nconcurrency = 0\n",
    )
    .unwrap();
    for cmd in [&["instances", "list"][..], &["serve"][..], &["migrate"][..]] {
        cli.run_with(cmd, |c| {
            c.env_remove("DATABASE_URL");
        })
        .await
        .code(2)
        .err_has("invalid configuration")
        .err_has("database.pool_size: must be at least 2")
        .err_has("database.group_commit: a batch of 1")
        .err_has("workers.concurrency: must be at least 1");
    }
    // Unknown keys and values of the wrong type.
    std::fs::write(
        &cli.config,
        "colour = \"red\"\n[database]\npool_size = \"many\"\nbogus = true\n",
    )
    .unwrap();
    cli.run(&["flows", "list"])
        .await
        .code(2)
        .err_has("colour: unknown key")
        .err_has("database.pool_size: ")
        .err_has("database.bogus: unknown key");
    // DCBFLOW_CONFIG names the file too.
    let mut bare = Cli::fresh();
    bare.target = Target::Bare;
    bare.run_with(&["flows", "list"], |c| {
        c.env("DCBFLOW_CONFIG", "/nonexistent/dcbflow.toml");
    })
    .await
    .code(2)
    .err_has("/nonexistent/dcbflow.toml")
    .err_has("cannot read the file");
    cli.run(&["serve", "--listen", "not-an-address"])
        .await
        .code(2);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_database_exit_5() {
    let cli = Cli::fresh();
    let r = cli
        .run_with(&["instances", "list"], |c| {
            c.env_remove("DATABASE_URL");
        })
        .await;
    r.code(5).err_has("error: no database");
    // No throwaway database for CLI commands, migrate included.
    cli.run_with(&["migrate"], |c| {
        c.env_remove("DATABASE_URL");
    })
    .await
    .code(5);
    // A database that cannot be reached.
    cli.run_with(&["flows", "list"], |c| {
        c.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres");
    })
    .await
    .code(5)
    .err_has("error: ");
    // A server that cannot be reached.
    Cli::remote("http://127.0.0.1:1", None)
        .run(&["flows", "list"])
        .await
        .code(5)
        .err_has("cannot reach the server at http://127.0.0.1:1/");
    Cli::remote("ftp://example.com", None)
        .run(&["flows", "list"])
        .await
        .code(2);
}

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

fn worker(s: &TestServer) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut o = WorkerOptions::default().id("cli-test-worker");
    o.poll_interval = Duration::from_millis(50);
    let w = s.app.flows.worker(o);
    let stop = CancellationToken::new();
    let c = stop.clone();
    (stop, tokio::spawn(async move { w.run(c).await.unwrap() }))
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_mode_gives_the_same_views_and_exit_codes() {
    let server = TestServer::with_tokens().await;
    functions(&server);
    let remote = Cli::remote(&server.url, Some(OPERATOR));
    let local = Cli::on_schema(&server.schema);

    // Auth: exit 6.
    Cli::remote(&server.url, Some("wrong-token-0123456789"))
        .run(&["flows", "list"])
        .await
        .code(6)
        .err_has("error: the token is not valid");
    Cli::remote(&server.url, None)
        .run(&["flows", "list"])
        .await
        .code(6);
    let reader = Cli::remote(&server.url, Some(READER));
    reader.run(&["flows", "list"]).await.ok();

    let f = remote.file("greeting.yaml", GREETING);
    remote
        .run(&["flows", "register", s(&f)])
        .await
        .ok()
        .out_has("registered flow greeting");
    reader
        .run(&["flows", "register", s(&f)])
        .await
        .code(6)
        .err_has("read-only");
    let bad = remote.file("bad.yaml", "name: bad\ntasks: []\n");
    remote
        .run(&["flows", "register", s(&bad)])
        .await
        .code(2)
        .err_has("\n  definition: ");

    let (stop, w) = worker(&server);
    let ada = remote
        .run(&[
            "--json",
            "flows",
            "start",
            "greeting",
            "--key",
            "ada",
            "--input",
            r#"{"who":"ada"}"#,
        ])
        .await
        .ok()
        .json();
    let id = ada["id"].as_str().unwrap().to_owned();
    eventually("ada's instance to complete", || async {
        let v = remote.run(&["--json", "instances", "show", &id]).await;
        (v.code == 0 && v.json()["status"] == "completed").then_some(())
    })
    .await;

    // The same views through the server and on the database.
    for args in [
        &["--json", "instances", "show", id.as_str()][..],
        &["--json", "instances", "timeline", id.as_str()][..],
        &["--json", "instances", "list", "--flow", "greeting"][..],
        &["--json", "flows", "list"][..],
        &["--json", "flows", "show", "greeting", "--format", "toml"][..],
        &["--json", "projections", "list"][..],
    ] {
        let r = remote.run(args).await.ok().json();
        let l = local.run(args).await.ok().json();
        assert_eq!(r, l, "{args:?}");
    }
    remote
        .run(&["instances", "show", &id])
        .await
        .ok()
        .out_has("completed")
        .out_has("hello");

    // Exit codes through the server.
    remote
        .run(&["instances", "show", &uuid::Uuid::new_v4().to_string()])
        .await
        .code(3);
    remote.run(&["flows", "show", "nope"]).await.code(3);
    remote
        .run(&["flows", "start", "greeting", "--input", "{}"])
        .await
        .code(2)
        .err_has("  input: ");
    remote
        .run(&["instances", "list", "--status", "bogus"])
        .await
        .code(2)
        .err_has("error: status: ");

    // An incident: a step that fails and pauses its instance.
    let nobody = remote
        .run(&[
            "--json",
            "flows",
            "start",
            "greeting",
            "--key",
            "nobody",
            "--input",
            r#"{"who":"nobody"}"#,
        ])
        .await
        .ok()
        .json();
    let nid = nobody["id"].as_str().unwrap().to_owned();
    let groups = eventually("an incident group", || async {
        let g = remote
            .run(&["--json", "incidents", "list", "--flow", "greeting"])
            .await
            .json();
        g["items"]
            .as_array()?
            .iter()
            .find(|g| g["task"] == "shout" && g["kind"] == "exhausted")
            .cloned()
    })
    .await;
    let gid = groups["id"].as_str().unwrap().to_owned();
    remote
        .run(&["incidents", "list", "--unacknowledged"])
        .await
        .ok()
        .out_has("shout")
        .out_has("exhausted");
    let detail = remote
        .run(&["--json", "incidents", "show", &gid])
        .await
        .ok()
        .json();
    assert_eq!(
        detail,
        local
            .run(&["--json", "incidents", "show", &gid])
            .await
            .ok()
            .json()
    );
    let iid = detail["incidents"][0]["id"].as_str().unwrap().to_owned();
    assert!(iid.contains('/'), "{iid}");
    remote
        .run(&["incidents", "show", &gid])
        .await
        .ok()
        .out_has(&iid);
    let handled = remote
        .run(&[
            "--json",
            "incidents",
            "handle",
            &iid,
            "--note",
            "customer notified",
        ])
        .await
        .ok()
        .json();
    assert_eq!(
        (
            handled["note"].as_str(),
            handled["acknowledged_by"].as_str()
        ),
        (Some("customer notified"), Some("tester"))
    );
    remote
        .run(&["incidents", "handle", &iid, "--note", ""])
        .await
        .code(2);
    remote
        .run(&["incidents", "handle", "nope/x", "--note", "n"])
        .await
        .code(3);

    // The paused instance: a stale --seen is refused (exit 4); then retry the step.
    let view = remote
        .run(&["--json", "instances", "show", &nid])
        .await
        .ok()
        .json();
    assert_eq!(view["status"], "paused", "{view}");
    let stale = (view["seen"].as_i64().unwrap() - 1).to_string();
    remote
        .run(&[
            "instances",
            "retry",
            &nid,
            "--seen",
            &stale,
            "--reason",
            "again",
        ])
        .await
        .code(4)
        .err_has("seen");
    let retried = remote
        .run(&[
            "--json",
            "instances",
            "retry",
            &nid,
            "--step",
            "shout",
            "--reason",
            "again",
        ])
        .await
        .ok();
    let retried = retried.err_has("using --seen");
    let _ = retried.json();
    let retried = remote
        .run(&[
            "--json",
            "incidents",
            "retry",
            &iid,
            "--reason",
            "once more",
        ])
        .await;
    assert!(matches!(retried.code, 0 | 3 | 4), "{retried:?}");

    // Bulk through the server: the count first, then the result.
    let dry = remote
        .run(&[
            "--json",
            "instances",
            "bulk",
            "abort",
            "--flow",
            "greeting",
            "--dry-run",
            "--reason",
            "r",
        ])
        .await
        .ok()
        .json();
    assert_eq!(dry["matched"], 2, "{dry}");
    let done = remote
        .run(&[
            "--json",
            "instances",
            "bulk",
            "pause",
            "--key",
            "ada",
            "--reason",
            "r",
        ])
        .await
        .ok();
    let done = done.err_has("1 instances match");
    assert_eq!(
        done.json()["refused"][0]["code"],
        "not_allowed",
        "a completed instance cannot be paused"
    );
    reader
        .run(&[
            "instances",
            "bulk",
            "pause",
            "--key",
            "ada",
            "--dry-run",
            "--reason",
            "r",
        ])
        .await
        .code(6);

    remote
        .run(&["dlq", "list"])
        .await
        .ok()
        .out_has("no dead letters");
    remote.run(&["dlq", "discard", "7"]).await.code(3);
    remote.run(&["migrate"]).await.code(2);
    stop.cancel();
    w.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_runs_until_sigterm_and_says_what_it_drained() {
    let cli = Cli::fresh();
    let flows = cli.dir.join("flows");
    std::fs::create_dir_all(&flows).unwrap();
    std::fs::write(flows.join("shipping.yaml"), SHIPPING).unwrap();
    std::fs::write(
        &cli.config,
        format!(
            "[database]\nschema = \"{}\"\npool_size = 4\n\n[flows]\npaths = [\"flows\"]\n\n[workers]\ncount = 1\nshutdown_grace_ms = 500\n",
            cli.schema
        ),
    )
    .unwrap();
    let mut child = cli
        .command(&["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            if let Some(rest) = line.split("dcbflow listening on ").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("serve ended before listening: {seen:?}");
    })
    .await
    .expect("serve listens");
    assert!(
        seen.iter().any(|l| l.contains("registered flow shipping")),
        "{seen:?}"
    );

    let remote = Cli::remote(&url, None);
    remote
        .run(&["flows", "list"])
        .await
        .ok()
        .out_has("shipping");
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("serve stops")
        .unwrap();
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(status.success(), "{status:?} {rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("drained: 1 workers stopped")),
        "{rest:?}"
    );
}

/// Runs `read --follow` until it has printed `count` events; `append` runs
/// once it has started tailing.
async fn follow(cli: &Cli, args: &[&str], count: usize, append: impl AsyncFnOnce()) -> Vec<Value> {
    let mut c = cli.command(args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    if !args.contains(&"--after") {
        let line = tokio::time::timeout(Duration::from_secs(30), err.next_line())
            .await
            .expect("the tail starts")
            .unwrap()
            .unwrap_or_default();
        assert!(
            line.contains("following new events after position"),
            "{line}"
        );
    }
    append().await;
    let mut events = Vec::new();
    while events.len() < count {
        let line = tokio::time::timeout(Duration::from_secs(30), out.next_line())
            .await
            .unwrap_or_else(|_| panic!("{count} events from the tail, got {events:?}"))
            .unwrap()
            .expect("a line");
        events.push(serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("--limit ends the tail")
        .unwrap();
    assert!(status.success(), "{status:?}");
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn append_and_read_on_the_database_and_through_a_server() {
    let server = TestServer::start().await;
    let local = Cli::on_schema(&server.schema);
    let remote = Cli::remote(&server.url, None);

    local
        .run(&[
            "append",
            "--type",
            "SeatBooked",
            "--tag",
            "seat:A1",
            "--tag",
            "show:1",
            "--data",
            r#"{"by":"ada"}"#,
        ])
        .await
        .ok()
        .out_has("appended 1 events at positions");
    let page = remote
        .run(&["--json", "read", "--type", "SeatBooked", "--tag", "seat:A1"])
        .await
        .ok()
        .json();
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["events"][0]["data"]["by"], "ada");
    let cursor = page["cursor"].as_str().unwrap().to_owned();
    local
        .run(&["read", "--tag", "show:1"])
        .await
        .ok()
        .out_has("SeatBooked")
        .out_has("seat:A1")
        .out_has("cursor: ");

    // A condition after the read's cursor: the first decision wins, the second conflicts (exit 4).
    for (cli, code) in [(&remote, 0), (&local, 4), (&remote, 4)] {
        let r = cli
            .run(&[
                "--json",
                "append",
                "--type",
                "SeatBooked",
                "--tag",
                "seat:A1",
                "--data",
                r#"{"by":"bob"}"#,
                "--condition-types",
                "SeatBooked",
                "--condition-tags",
                "seat:A1",
                "--after",
                &cursor,
            ])
            .await
            .code(code);
        if code == 4 {
            r.err_has("error: the append condition failed");
        } else {
            assert_eq!(r.json()["positions"].as_array().unwrap().len(), 1);
        }
    }
    local
        .run(&["append", "--type", "T", "--after", "1"])
        .await
        .code(2)
        .err_has("--condition-types");

    // Files: an array of events, an idempotent append, a bad field.
    let id = uuid::Uuid::new_v4();
    let file = local.file(
        "events.json",
        &json!([
            {"type": "Tick", "tags": ["clock:1"], "data": {"n": 1}, "id": id},
            {"type": "Tick", "tags": ["clock:1"], "data": {"n": 2}, "metadata": {"by": "test"}, "id": uuid::Uuid::new_v4()},
        ])
        .to_string(),
    );
    let first = local
        .run(&["--json", "append", "--file", s(&file)])
        .await
        .ok()
        .json();
    assert_eq!(first["positions"].as_array().unwrap().len(), 2);
    let again = remote
        .run(&["--json", "append", "--file", s(&file)])
        .await
        .ok()
        .json();
    assert_eq!(
        (again["replayed"].as_bool(), &again["positions"]),
        (Some(true), &first["positions"])
    );
    let bad = local.file(
        "bad.json",
        r#"[{"type": "Tick", "data": 1, "colour": "red"}]"#,
    );
    local
        .run(&["append", "--file", s(&bad)])
        .await
        .code(2)
        .err_has("colour");
    remote
        .run(&["append", "--file", s(&bad)])
        .await
        .code(2)
        .err_has("colour");
    local.run(&["append", "--tag", "x"]).await.code(2);
    local.run(&["append", "--type", ""]).await.code(2);
    remote
        .run(&["append", "--type", "T", "--data", "{oops"])
        .await
        .code(2)
        .err_has("data: not JSON");

    // Paging, direction, the same events either way.
    let one = local
        .run(&["read", "--type", "SeatBooked", "--limit", "1"])
        .await
        .ok();
    one.out_has("more: pass --after");
    let last = remote
        .run(&["--json", "read", "--backwards", "--limit", "1"])
        .await
        .ok()
        .json();
    assert_eq!(last["events"][0]["data"]["n"], 2, "{last}");
    let all_l = local
        .run(&["--json", "read", "--type", "SeatBooked,Tick"])
        .await
        .ok()
        .json();
    let all_r = remote
        .run(&["--json", "read", "--type", "SeatBooked", "--type", "Tick"])
        .await
        .ok()
        .json();
    assert_eq!(all_l["events"], all_r["events"]);
    assert_eq!(all_l["events"].as_array().unwrap().len(), 4);
    for cli in [&local, &remote] {
        cli.run(&["read", "--after", "garbage"])
            .await
            .code(2)
            .err_has("error: after: ");
        cli.run(&["read", "--limit", "5000"])
            .await
            .code(2)
            .err_has("error: limit: ");
    }

    // Live tails, on the database and through the server's SSE endpoint.
    for cli in [&local, &remote] {
        let tag = format!("run:{}", uuid::Uuid::new_v4().simple());
        let got = follow(
            cli,
            &["--json", "read", "--follow", "--tag", &tag, "--limit", "2"],
            2,
            async || {
                for n in 0..2 {
                    let data = format!(r#"{{"n":{n}}}"#);
                    local
                        .run(&["append", "--type", "Live", "--tag", &tag, "--data", &data])
                        .await
                        .ok();
                }
            },
        )
        .await;
        assert_eq!(
            (got[0]["data"]["n"].as_i64(), got[1]["data"]["n"].as_i64()),
            (Some(0), Some(1)),
            "{got:?}"
        );
        assert!(got[0]["position"].as_i64() < got[1]["position"].as_i64());
        // From the start of the log: what is there already.
        let old = follow(
            cli,
            &[
                "--json",
                "read",
                "--follow",
                "--after",
                "0",
                "--type",
                "SeatBooked",
                "--limit",
                "2",
            ],
            2,
            async || {},
        )
        .await;
        assert_eq!(old[1]["data"]["by"], "bob");
    }
}
