//! The command line: `dcbflow serve`, `migrate`, and the operator commands
//! (flows, instances, incidents, dead letters, projections, events).
//!
//! Every operator command runs the same operation the REST API runs, either
//! directly on the database (`--config FILE` / `DATABASE_URL`) or through a
//! running server (`--server URL --token T`), and prints the same view: as a
//! table, or as JSON with `--json`. Errors print `error: <detail>` and each
//! field problem on its own line to stderr; the exit code says what kind of
//! failure it was (see [`ApiError::exit_code`] and `docs/cli.md`).

pub mod backend;
pub mod events;
pub mod progress;
pub mod render;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;

use crate::api::incidents::{self, HandleRequest, RetryRequest};
use crate::api::instances::{
    self, BulkRequest, Operation, OperationRequest, SignalRequest, SkipRequest, StartRequest,
    parse_id,
};
use crate::api::relays::DeadLetterParams;
use crate::app::App;
use crate::config::{Config, ConfigError};
use crate::error::{ApiError, ApiResult};
use backend::{Backend, Remote};
use progress::Progress;
use render::Human;

/// The dcbflow service and its operator command line.
#[derive(Debug, Parser)]
#[command(name = "dcbflow", version, about, long_about = None)]
pub struct Cli {
    /// The configuration file (TOML): the database, relays and projections.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "DCBFLOW_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Go through a running server's REST API instead of the database.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "DCBFLOW_SERVER",
        value_name = "URL"
    )]
    pub server: Option<String>,
    /// The server's bearer token (with --server).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "DCBFLOW_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print the result as JSON (the API's view) instead of a table.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: the flow engine, relays and the HTTP API, until SIGTERM or Ctrl-C.
    Serve {
        /// The address to listen on (overrides `listen`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Register the order-saga demo and start a trickle of orders.
        #[arg(long)]
        demo: bool,
    },
    /// Install or upgrade every layer's tables in the configured schema, and show the migration status.
    Migrate,
    /// Append events (one from --type/--tag/--data, or many from --file).
    Append(events::AppendArgs),
    /// Read events by type and tag; --follow tails the log live.
    Read(events::ReadArgs),
    /// Flow definitions.
    #[command(subcommand)]
    Flows(FlowsCommand),
    /// Flow instances and operations on them.
    #[command(subcommand)]
    Instances(InstancesCommand),
    /// Incidents: failed or stuck steps, grouped.
    #[command(subcommand)]
    Incidents(IncidentsCommand),
    /// Dead letters of the outbox relays.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Relays and projections with checkpoint and lag.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Cron schedules that start flow instances.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
}

/// `dcbflow schedules ...`.
#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// List the schedules with their last and next tick.
    List,
    /// Create or change a schedule.
    Set {
        /// Its name.
        name: String,
        /// The flow it starts.
        #[arg(long, required = true)]
        flow: String,
        /// A cron expression, seconds first: "0 */5 * * * *".
        #[arg(long, required = true)]
        cron: String,
        /// An IANA time zone (default UTC).
        #[arg(long)]
        timezone: Option<String>,
        /// Each instance's input, JSON (or @FILE). Default: {}.
        #[arg(long, value_name = "JSON")]
        input: Option<String>,
        /// skip (default) or run_once: ticks missed while no worker ran.
        #[arg(long)]
        missed: Option<String>,
        /// Who (default: $USER).
        #[arg(long)]
        actor: Option<String>,
    },
    /// Pause a schedule: no tick starts an instance until it is resumed.
    Pause {
        /// Its name.
        name: String,
        /// Who (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        /// Why.
        #[arg(long, required = true)]
        reason: String,
    },
    /// Resume a paused schedule.
    Resume {
        /// Its name.
        name: String,
        /// Who (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        /// Why.
        #[arg(long, required = true)]
        reason: String,
    },
}

/// `dcbflow flows ...`.
#[derive(Debug, Subcommand)]
pub enum FlowsCommand {
    /// List the registered flows.
    List {
        /// At most this many (default 100).
        #[arg(long)]
        limit: Option<usize>,
        /// From a previous page (`more: pass --cursor ...`).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show a flow: versions, tasks and dependencies, source.
    Show {
        /// Flow name.
        name: String,
        /// A version (default: the newest).
        #[arg(long)]
        version: Option<String>,
        /// Print only the definition, in this format (ready to save and register).
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Register definition files (.yaml, .yml, .json, .toml).
    Register {
        /// The files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Start an instance of a flow (its newest version).
    Start {
        /// Flow name.
        flow: String,
        /// A business key: starting again with the same key returns the first instance.
        #[arg(long)]
        key: Option<String>,
        /// The input, JSON (or @FILE). Default: {}.
        #[arg(long, value_name = "JSON")]
        input: Option<String>,
    },
}

/// A definition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// YAML.
    Yaml,
    /// JSON.
    Json,
    /// TOML.
    Toml,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Yaml => "yaml",
            Format::Json => "json",
            Format::Toml => "toml",
        }
    }
}

/// Filters of the instance list and of bulk operations.
#[derive(Debug, Clone, Default, Args)]
pub struct InstanceFilters {
    /// Only this flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// Only this status: running, compensating, paused, completed, compensated, compensation_failed, failed.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this business key.
    #[arg(long)]
    pub key: Option<String>,
    /// Business keys containing this text (case-insensitive).
    #[arg(long)]
    pub search: Option<String>,
    /// Started at or after: RFC 3339, a date (2025-01-31), or an age (30m, 2h, 7d ago).
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub started_after: Option<DateTime<Utc>>,
    /// Started before: RFC 3339, a date, or an age.
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub started_before: Option<DateTime<Utc>>,
}

impl InstanceFilters {
    fn params(&self) -> instances::ListParams {
        instances::ListParams {
            flow: self.flow.clone(),
            status: self.status.clone(),
            business_key: self.key.clone(),
            q: self.search.clone(),
            started_after: self.started_after,
            started_before: self.started_before,
            cursor: None,
            limit: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.flow.is_none()
            && self.status.is_none()
            && self.key.is_none()
            && self.search.is_none()
            && self.started_after.is_none()
            && self.started_before.is_none()
    }
}

/// Who does an operation and why, and what they saw.
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// The instance's `seen` when you looked: refused (exit 4) if it changed
    /// since. Default: its current one, read first.
    #[arg(long)]
    pub seen: Option<i64>,
    /// Who (default: $USER).
    #[arg(long)]
    pub actor: Option<String>,
    /// Why (recorded on the instance).
    #[arg(long, required = true)]
    pub reason: String,
}

/// `dcbflow instances ...`.
#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// List instances, newest first.
    List {
        /// Filters.
        #[command(flatten)]
        filters: InstanceFilters,
        /// At most this many (default 50, at most 1000).
        #[arg(long)]
        limit: Option<i64>,
        /// From a previous page (`more: pass --cursor ...`).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show an instance: status, steps, outputs.
    Show {
        /// Instance id.
        id: String,
    },
    /// An instance's events, oldest first.
    Timeline {
        /// Instance id.
        id: String,
    },
    /// Retry a failed or waiting step now, with a fresh budget of attempts.
    Retry {
        /// Instance id.
        id: String,
        /// The step (a step key or a task name); default: the one failed or waiting step.
        #[arg(long)]
        step: Option<String>,
        /// Operator.
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Mark a task done with an output, without running it.
    Skip {
        /// Instance id.
        id: String,
        /// The task.
        #[arg(long, required = true)]
        task: String,
        /// Its output, JSON (or @FILE). Default: {}.
        #[arg(long, value_name = "JSON")]
        output: Option<String>,
        /// Operator.
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Send a signal: a `signal` task waiting for its name completes with its
    /// payload (one not reached yet consumes it when it is).
    Signal {
        /// Instance id.
        id: String,
        /// The signal's name.
        name: String,
        /// Its payload, JSON (or @FILE). Default: null.
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
        /// Your id for it: sending the same id again changes nothing. Default:
        /// a new UUID.
        #[arg(long = "signal-id", value_name = "ID")]
        signal_id: Option<String>,
        /// Who sends it.
        #[arg(long)]
        actor: Option<String>,
        /// Why (recorded with the signal).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Abort: no new task starts, completed ones are compensated.
    Abort {
        /// Instance id.
        id: String,
        /// Operator.
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Pause: no new step starts.
    Pause {
        /// Instance id.
        id: String,
        /// Operator.
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Resume a paused instance.
    Resume {
        /// Instance id.
        id: String,
        /// Operator.
        #[command(flatten)]
        op: OperatorArgs,
    },
    /// Retry, abort, pause or resume every instance matching filters.
    Bulk {
        /// The operation.
        #[arg(value_enum)]
        operation: BulkOperation,
        /// Filters (at least one, or --all).
        #[command(flatten)]
        filters: InstanceFilters,
        /// Act on every instance (no filter).
        #[arg(long)]
        all: bool,
        /// Only count the instances it would act on.
        #[arg(long)]
        dry_run: bool,
        /// Who (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        /// Why (recorded on each instance).
        #[arg(long, required = true)]
        reason: String,
    },
}

/// The operations of `instances bulk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BulkOperation {
    /// Retry the failed or waiting step.
    Retry,
    /// Abort.
    Abort,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
}

impl BulkOperation {
    fn operation(self) -> Operation {
        match self {
            BulkOperation::Retry => Operation::Retry,
            BulkOperation::Abort => Operation::Abort,
            BulkOperation::Pause => Operation::Pause,
            BulkOperation::Resume => Operation::Resume,
        }
    }
}

/// `dcbflow incidents ...`.
#[derive(Debug, Subcommand)]
pub enum IncidentsCommand {
    /// List open incidents, grouped by flow, task, kind and error.
    List {
        /// Only this flow.
        #[arg(long)]
        flow: Option<String>,
        /// Leave out groups whose every instance is acknowledged.
        #[arg(long)]
        unacknowledged: bool,
        /// At most this many groups (default 50, at most 100).
        #[arg(long)]
        limit: Option<u32>,
        /// From a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show a group with its incidents.
    Show {
        /// Group id.
        group: String,
    },
    /// Acknowledge an incident with a note (an event on its instance).
    Handle {
        /// Incident id (`<instance>/<step key>`).
        id: String,
        /// What was done or decided.
        #[arg(long, required = true)]
        note: String,
        /// Who (default: $USER).
        #[arg(long)]
        actor: Option<String>,
        /// The instance's `seen`: refused (exit 4) if it changed since.
        #[arg(long)]
        seen: Option<i64>,
    },
    /// Retry an incident's step now.
    Retry {
        /// Incident id (`<instance>/<step key>`).
        id: String,
        /// Operator.
        #[command(flatten)]
        op: OperatorArgs,
    },
}

/// `dcbflow dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        /// Only this relay.
        #[arg(long)]
        relay: Option<String>,
        /// At most this many (default 100, at most 500).
        #[arg(long)]
        limit: Option<u32>,
        /// From a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Publish a dead letter again through its relay (configured in --config).
    Replay {
        /// Dead letter id.
        id: i64,
    },
    /// Drop a dead letter.
    Discard {
        /// Dead letter id.
        id: i64,
    },
}

/// `dcbflow projections ...`.
#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Relays, projections and other checkpoints with their position and lag.
    List,
}

/// Runs the command line with the process's arguments and environment.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    init_tracing(serving);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(run(cli));
    // Background tasks (pool connections, listeners) need not finish.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    ExitCode::from(code)
}

/// Logs to stderr: `info` when serving, `warn` otherwise; `RUST_LOG` (a
/// level: error, warn, info, debug, trace) overrides.
fn init_tracing(serving: bool) {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|l| l.trim().parse::<tracing::Level>().ok())
        .unwrap_or(if serving {
            tracing::Level::INFO
        } else {
            tracing::Level::WARN
        });
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .try_init();
}

/// Runs `cli`: the exit code.
pub async fn run(mut cli: Cli) -> u8 {
    // An empty DCBFLOW_SERVER (or --server "") means none.
    cli.server = cli.server.filter(|s| !s.trim().is_empty());
    let remote = cli.server.is_some();
    match dispatch(cli).await {
        Ok(()) => 0,
        Err(Failure::Config(e)) => {
            eprintln!("error: {e}");
            2
        }
        Err(Failure::Api(e)) => {
            print_error(&e, remote);
            u8::try_from(e.exit_code()).unwrap_or(1)
        }
    }
}

/// Prints `error: <detail>` and each field problem on its own line.
pub fn print_error(e: &ApiError, remote: bool) {
    let mut err = std::io::stderr().lock();
    let detail = if e.code == "internal" && !remote {
        "internal error (the details are logged above)"
    } else {
        &e.detail
    };
    let _ = writeln!(err, "error: {detail}");
    for f in &e.errors {
        let line = format!("{}: {}", f.field, f.message);
        // A single bad field is the detail already.
        if line != *detail {
            let _ = writeln!(err, "  {line}");
        }
    }
    if let Some(s) = e
        .retry_after
        .filter(|s| *s > 0 && matches!(e.code, "overloaded" | "timeout"))
    {
        let _ = writeln!(err, "  (retry in {s}s)");
    }
}

/// What a command can fail with.
#[derive(Debug)]
pub enum Failure {
    /// The configuration file is invalid (exit 2).
    Config(ConfigError),
    /// An operation failed.
    Api(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

/// Loads the configuration: `--config` (or `DCBFLOW_CONFIG`) and the environment.
///
/// # Errors
/// Every problem of the configuration.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    Config::load(path, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// Prints `view`: as JSON with `--json`, readable otherwise.
pub fn emit<T: Serialize + Human>(json: bool, view: &T) -> ApiResult<()> {
    let text = if json {
        let mut s = serde_json::to_string_pretty(view).map_err(ApiError::internal)?;
        s.push('\n');
        s
    } else {
        view.human()
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error of the command.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    Ok(())
}

/// A note for a person on stderr (not in `--json` output).
pub fn note(text: impl std::fmt::Display) {
    eprintln!("{text}");
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    match cli.command {
        Command::Serve { listen, demo } => {
            if cli.server.is_some() {
                return Err(ApiError::bad_field(
                    "--server",
                    "serve runs the server; it does not talk to one",
                )
                .into());
            }
            let config = load_config(cli.config.as_deref())?;
            serve(config, listen, demo).await
        }
        Command::Migrate => {
            if cli.server.is_some() {
                return Err(ApiError::bad_field(
                    "--server",
                    "migrate works on the database (--config / DATABASE_URL), not through a server",
                )
                .into());
            }
            let mut config = load_config(cli.config.as_deref())?;
            config.database.migrate = true;
            let url = database_url(&config)?;
            let schema = config.database.schema.clone();
            let app = App::connect(&url, config).await?;
            // The layers App::connect leaves to their first use.
            dcbflow::Checkpoints::new(app.store.clone())
                .migrate()
                .await
                .map_err(ApiError::from)?;
            dcbflow::outbox::DeadLetters::new(app.store.clone())
                .migrate()
                .await
                .map_err(ApiError::from)?;
            let status = app.store.migration_status().await.map_err(ApiError::from)?;
            if !json {
                note(format!("schema {schema:?} migrated"));
            }
            emit(json, &status)?;
            Ok(())
        }
        command => {
            let backend = connect(cli.config.as_deref(), cli.server.as_deref(), cli.token).await?;
            let r = command_on(&backend, command, json).await;
            if let Backend::Local(app) = &backend {
                app.store.pool().close();
            }
            r.map_err(Failure::Api)
        }
    }
}

async fn serve(config: Config, listen: Option<SocketAddr>, demo: bool) -> Result<(), Failure> {
    let options = crate::serve::ServeOptions { listen, demo };
    match crate::serve::serve(config, options).await {
        Ok(_drained) => Ok(()),
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                return Err(Failure::Config(c.clone()));
            }
            if let Some(a) = e.downcast_ref::<ApiError>() {
                return Err(Failure::Api(a.clone()));
            }
            Err(Failure::Api(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "error",
                e.to_string(),
            )))
        }
    }
}

/// The configured database URL: the CLI never starts a throwaway database.
///
/// # Errors
/// 503 `unavailable` (exit 5) without one.
pub fn database_url(config: &Config) -> ApiResult<String> {
    config.database.url.clone().ok_or_else(|| {
        ApiError::unavailable(
            "unavailable",
            "no database: set database.url in the --config file, DCBFLOW_DATABASE_URL or DATABASE_URL, or go through a server with --server URL",
            0,
        )
    })
}

/// The backend of an operator command: the server when `server` is given,
/// otherwise the configured database (its schema checked, never migrated).
///
/// # Errors
/// A bad configuration; no database, or one that cannot be reached.
pub async fn connect(
    config: Option<&Path>,
    server: Option<&str>,
    token: Option<String>,
) -> Result<Backend, Failure> {
    if let Some(server) = server {
        return Ok(Backend::Remote(Remote::new(server, token)?));
    }
    let mut config = load_config(config)?;
    let url = database_url(&config)?;
    // Only `dcbflow migrate` (and `serve`) change the schema.
    config.database.migrate = false;
    config.database.pool_size = config.database.pool_size.min(4);
    let schema = config.database.schema.clone();
    let app = App::connect(&url, config).await?;
    let status = app.store.migration_status().await.map_err(ApiError::from)?;
    if !status.current {
        let layers = status
            .layers
            .iter()
            .map(|l| format!("{} {}/{}", l.layer, l.applied, l.known))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ApiError::unavailable(
            "unavailable",
            format!("the schema {schema:?} is not installed or not current ({layers}): run `dcbflow migrate`"),
            0,
        )
        .into());
    }
    Ok(Backend::Local(Box::new(app)))
}

/// The actor: `--actor`, else `$USER` (`$USERNAME`).
///
/// # Errors
/// 400 naming `--actor` when neither is set.
pub fn actor(given: Option<String>) -> ApiResult<String> {
    given
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("USERNAME").ok())
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| ApiError::bad_field("--actor", "who does this: pass --actor or set $USER"))
}

/// A JSON argument: the text, or `@FILE`'s contents.
///
/// # Errors
/// 400 naming `field`.
pub fn json_arg(field: &str, text: &str) -> ApiResult<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| ApiError::bad_field(field, format!("cannot read {path}: {e}")))?,
        None => text.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| ApiError::bad_field(field, format!("not JSON: {e}")))
}

/// A time: RFC 3339, a date (midnight UTC), or an age before now (`90s`,
/// `30m`, `2h`, `7d`).
///
/// # Errors
/// What is accepted.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    let age = s.strip_suffix(" ago").unwrap_or(s);
    let split = age.find(|c: char| !c.is_ascii_digit()).unwrap_or(age.len());
    let (n, unit) = age.split_at(split);
    if let Ok(n) = n.parse::<i64>() {
        let secs = match unit {
            "s" => Some(1),
            "m" => Some(60),
            "h" => Some(3600),
            "d" => Some(86_400),
            _ => None,
        };
        if let Some(secs) = secs
            && let Some(d) = n.checked_mul(secs).and_then(chrono::TimeDelta::try_seconds)
        {
            return Ok(Utc::now() - d);
        }
    }
    Err(format!(
        "{s:?} is not a time: use RFC 3339 (2025-01-31T12:00:00Z), a date (2025-01-31) or an age (90s, 30m, 2h, 7d)"
    ))
}

/// The format of a definition file, by its extension.
fn format_of_file(path: &Path) -> ApiResult<&'static str> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("yaml" | "yml") => Ok("yaml"),
        Some("json") => Ok("json"),
        Some("toml") => Ok("toml"),
        _ => Err(ApiError::bad_field(
            "file",
            format!(
                "{}: a definition file ends in .yaml, .yml, .json or .toml",
                path.display()
            ),
        )),
    }
}

/// The request of an operation: `seen` given, or the instance's current one
/// (read first, and said so).
async fn operation_request(
    backend: &Backend,
    id: uuid::Uuid,
    op: OperatorArgs,
    step: Option<String>,
) -> ApiResult<OperationRequest> {
    let actor = actor(op.actor)?;
    let seen = match op.seen {
        Some(s) => s,
        None => {
            let now = backend.show_instance(id).await?;
            note(format!(
                "using --seen {} (the instance's current version, status {}); pass --seen to refuse if it changes after you looked",
                now.seen, now.status
            ));
            now.seen
        }
    };
    Ok(OperationRequest {
        seen,
        actor,
        reason: op.reason,
        step,
    })
}

async fn command_on(backend: &Backend, command: Command, json: bool) -> ApiResult<()> {
    match command {
        Command::Serve { .. } | Command::Migrate => unreachable!("handled before connecting"),
        Command::Append(args) => events::append(backend, args, json).await,
        Command::Read(args) => events::read(backend, args, json).await,
        Command::Flows(c) => flows(backend, c, json).await,
        Command::Instances(c) => instances(backend, c, json).await,
        Command::Incidents(c) => incidents(backend, c, json).await,
        Command::Dlq(c) => dlq(backend, c, json).await,
        Command::Projections(ProjectionsCommand::List) => emit(json, &backend.consumers().await?),
        Command::Schedules(c) => schedules(backend, c, json).await,
    }
}

async fn schedules(backend: &Backend, c: SchedulesCommand, json: bool) -> ApiResult<()> {
    use crate::api::schedules::ScheduleRequest;
    match c {
        SchedulesCommand::List => emit(json, &backend.schedules().await?),
        SchedulesCommand::Set {
            name,
            flow,
            cron,
            timezone,
            input,
            missed,
            actor: who,
        } => {
            let input = input.map(|t| json_arg("input", &t)).transpose()?;
            let req = ScheduleRequest {
                flow,
                cron,
                timezone,
                input,
                missed,
                actor: Some(actor(who)?),
            };
            let view = backend.set_schedule(&name, &req).await?;
            if !json {
                note(format!("set schedule {name}"));
            }
            emit(json, &view)
        }
        SchedulesCommand::Pause {
            name,
            actor: who,
            reason,
        } => change_schedule(backend, &name, true, who, reason, json).await,
        SchedulesCommand::Resume {
            name,
            actor: who,
            reason,
        } => change_schedule(backend, &name, false, who, reason, json).await,
    }
}

async fn change_schedule(
    backend: &Backend,
    name: &str,
    pause: bool,
    who: Option<String>,
    reason: String,
    json: bool,
) -> ApiResult<()> {
    let req = crate::api::schedules::ScheduleChange {
        actor: actor(who)?,
        reason,
    };
    let view = backend.change_schedule(name, pause, &req).await?;
    if !json {
        note(format!(
            "{} schedule {name}",
            if pause { "paused" } else { "resumed" }
        ));
    }
    emit(json, &view)
}

async fn flows(backend: &Backend, c: FlowsCommand, json: bool) -> ApiResult<()> {
    match c {
        FlowsCommand::List { limit, cursor } => {
            emit(json, &backend.list_flows(cursor, limit).await?)
        }
        FlowsCommand::Show {
            name,
            version,
            format,
        } => {
            let detail = backend
                .flow_detail(&name, version.as_deref(), format.map(Format::as_str))
                .await?;
            if format.is_some() && !json {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(detail.source.as_bytes());
                if !detail.source.ends_with('\n') {
                    let _ = out.write_all(b"\n");
                }
                Ok(())
            } else {
                emit(json, &detail)
            }
        }
        FlowsCommand::Register { files } => {
            let mut done = Vec::new();
            for f in &files {
                let format = format_of_file(f)?;
                let text = std::fs::read_to_string(f).map_err(|e| {
                    ApiError::bad_field("file", format!("cannot read {}: {e}", f.display()))
                })?;
                match backend.register(&text, format).await {
                    Ok(r) => {
                        if !json {
                            print!("{}: {}", f.display(), r.human());
                        }
                        done.push(r);
                    }
                    Err(mut e) => {
                        e.detail = format!("{}: {}", f.display(), e.detail);
                        if json && !done.is_empty() {
                            emit(true, &done)?;
                        }
                        return Err(e);
                    }
                }
            }
            if json {
                emit(true, &done)?;
            }
            Ok(())
        }
        FlowsCommand::Start { flow, key, input } => {
            let input = match input {
                Some(t) => json_arg("input", &t)?,
                None => Value::Object(Default::default()),
            };
            let req = StartRequest {
                flow,
                business_key: key,
                input,
            };
            emit(json, &backend.start(&req).await?)
        }
    }
}

async fn instances(backend: &Backend, c: InstancesCommand, json: bool) -> ApiResult<()> {
    match c {
        InstancesCommand::List {
            filters,
            limit,
            cursor,
        } => {
            let mut p = filters.params();
            p.limit = limit;
            p.cursor = cursor;
            emit(json, &backend.list_instances(&p).await?)
        }
        InstancesCommand::Show { id } => emit(json, &backend.show_instance(parse_id(&id)?).await?),
        InstancesCommand::Timeline { id } => emit(json, &backend.timeline(parse_id(&id)?).await?),
        InstancesCommand::Retry { id, step, op } => {
            operate(backend, &id, Operation::Retry, op, step, json).await
        }
        InstancesCommand::Abort { id, op } => {
            operate(backend, &id, Operation::Abort, op, None, json).await
        }
        InstancesCommand::Pause { id, op } => {
            operate(backend, &id, Operation::Pause, op, None, json).await
        }
        InstancesCommand::Resume { id, op } => {
            operate(backend, &id, Operation::Resume, op, None, json).await
        }
        InstancesCommand::Skip {
            id,
            task,
            output,
            op,
        } => {
            let id = parse_id(&id)?;
            let output = match output {
                Some(t) => json_arg("output", &t)?,
                None => Value::Object(Default::default()),
            };
            let r = operation_request(backend, id, op, None).await?;
            let req = SkipRequest {
                task,
                output,
                seen: r.seen,
                actor: r.actor,
                reason: r.reason,
            };
            let view = backend.skip(id, &req).await?;
            if !json {
                note(format!("skipped task {} of {id}", req.task));
            }
            emit(json, &view)
        }
        InstancesCommand::Signal {
            id,
            name,
            payload,
            signal_id,
            actor,
            reason,
        } => {
            let id = parse_id(&id)?;
            let payload = match payload {
                Some(t) => json_arg("payload", &t)?,
                None => Value::Null,
            };
            let req = SignalRequest {
                name,
                id: signal_id,
                payload,
                actor,
                reason,
            };
            let view = backend.signal(id, &req).await?;
            if !json {
                note(format!("sent signal {} to {id}", req.name));
            }
            emit(json, &view)
        }
        InstancesCommand::Bulk {
            operation,
            filters,
            all,
            dry_run,
            actor: who,
            reason,
        } => {
            if filters.is_empty() && !all {
                return Err(ApiError::bad_field(
                    "filter",
                    "name which instances (--flow, --status, --key, --search, --started-after, --started-before), or pass --all",
                ));
            }
            let req = BulkRequest {
                operation: backend::operation_name(operation.operation()).to_owned(),
                filter: filters.params(),
                dry_run,
                actor: actor(who)?,
                reason,
            };
            let result = bulk(backend, &req).await?;
            emit(json, &result)
        }
    }
}

async fn operate(
    backend: &Backend,
    id: &str,
    op: Operation,
    args: OperatorArgs,
    step: Option<String>,
    json: bool,
) -> ApiResult<()> {
    let id = parse_id(id)?;
    let req = operation_request(backend, id, args, step).await?;
    let view = backend.operate(id, op, &req).await?;
    if !json {
        note(format!("{} {id}: done", backend::operation_name(op)));
    }
    emit(json, &view)
}

/// A bulk operation with its progress on stderr: per instance when local;
/// a server answers at the end, so remotely the matching count comes first
/// (a dry run) and then the time it has been working.
async fn bulk(backend: &Backend, req: &BulkRequest) -> ApiResult<instances::BulkResult> {
    let label = format!("bulk {}", req.operation);
    if req.dry_run {
        return backend.bulk(req, &mut |_, _| {}).await;
    }
    match backend {
        Backend::Local(_) => {
            let mut p = Progress::new(label);
            let r = backend
                .bulk(req, &mut |done, total| p.update(done, total))
                .await;
            p.finish();
            r
        }
        Backend::Remote(_) => {
            let mut dry = req.clone();
            dry.dry_run = true;
            let matched = backend.bulk(&dry, &mut |_, _| {}).await?.matched;
            note(format!(
                "{label}: {matched} instances match; the server acts on them at its pace (api.bulk_per_second)"
            ));
            let mut p = Progress::new(label);
            let what = format!("{matched} instances, the server is working");
            let mut quiet = |_: usize, _: i64| {};
            let call = backend.bulk(req, &mut quiet);
            tokio::pin!(call);
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
            let r = loop {
                tokio::select! {
                    r = &mut call => break r,
                    _ = tick.tick() => p.waiting(&what),
                }
            };
            p.finish();
            r
        }
    }
}

async fn incidents(backend: &Backend, c: IncidentsCommand, json: bool) -> ApiResult<()> {
    match c {
        IncidentsCommand::List {
            flow,
            unacknowledged,
            limit,
            cursor,
        } => {
            let p = incidents::ListParams {
                flow,
                unacknowledged,
                cursor,
                limit,
            };
            emit(json, &backend.incident_groups(&p).await?)
        }
        IncidentsCommand::Show { group } => emit(json, &backend.group_detail(&group).await?),
        IncidentsCommand::Handle {
            id,
            note: text,
            actor: who,
            seen,
        } => {
            let req = HandleRequest {
                actor: actor(who)?,
                note: text,
                seen,
            };
            emit(json, &backend.handle_incident(&id, &req).await?)
        }
        IncidentsCommand::Retry { id, op } => {
            if op.seen.is_none() {
                note("using the instance's current --seen (read by the operation itself)");
            }
            let req = RetryRequest {
                actor: actor(op.actor)?,
                reason: op.reason,
                seen: op.seen,
            };
            emit(json, &backend.retry_incident(&id, &req).await?)
        }
    }
}

async fn dlq(backend: &Backend, c: DlqCommand, json: bool) -> ApiResult<()> {
    match c {
        DlqCommand::List {
            relay,
            limit,
            cursor,
        } => {
            let p = DeadLetterParams {
                relay,
                cursor,
                limit,
            };
            emit(json, &backend.dead_letters(&p).await?)
        }
        DlqCommand::Replay { id } => emit(json, &backend.replay_dead_letter(id).await?),
        DlqCommand::Discard { id } => emit(json, &backend.discard_dead_letter(id).await?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn times() {
        assert_eq!(
            parse_time("2025-01-31T12:00:00Z").unwrap().to_rfc3339(),
            "2025-01-31T12:00:00+00:00"
        );
        assert_eq!(
            parse_time("2025-01-31").unwrap().to_rfc3339(),
            "2025-01-31T00:00:00+00:00"
        );
        let two_hours = Utc::now() - parse_time("2h").unwrap();
        assert!((two_hours.num_seconds() - 7200).abs() < 5);
        assert!(parse_time("7d ago").is_ok());
        assert!(parse_time("soon").is_err());
        assert!(parse_time("5y").is_err());
    }
}
