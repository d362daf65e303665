//! The service's configuration: a TOML file, environment overrides for
//! secrets, and command-line overrides, checked as a whole.
//!
//! [`Config::load`] reports every problem at once, each with its key path
//! (`workers.concurrency: must be at least 1`), and the process does not start.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//!
//! [database]
//! url = "postgres://postgres@127.0.0.1:5432/postgres"  # or DCBFLOW_DATABASE_URL / DATABASE_URL
//! schema = "dcbflow"
//! pool_size = 16
//! group_commit = 128        # largest batch; 0 = off
//!
//! [flows]
//! paths = ["flows/"]        # files or folders of .yaml/.yml/.json/.toml definitions
//! http_allow = ["loopback"] # HttpPolicy entries for HTTP and gRPC tasks (default: public addresses)
//! grpc_descriptor_sets = { inventory = "protos/inventory.pb" } # for `executor: grpc`
//!
//! [workers]
//! count = 1
//! concurrency = 8
//! shutdown_grace_ms = 10000
//!
//! [[relays]]
//! name = "orders-to-nats"
//! types = ["OrderPlaced"]
//! nats = { url = "nats://127.0.0.1:4222", prefix = "shop" }
//!
//! [[schedules]]
//! name = "nightly-report"
//! flow = "report"
//! cron = "0 0 2 * * *"      # seconds first: 02:00:00 every day
//! timezone = "Europe/Amsterdam"
//! missed = "run_once"       # or "skip" (default)
//! input = { kind = "daily" }
//!
//! [[projections]]
//! name = "order-summary"    # a checkpoint your own process advances
//! types = ["OrderPlaced", "OrderShipped"]
//!
//! [auth]
//! operator_token = "..."    # or DCBFLOW_OPERATOR_TOKEN
//! read_token = "..."        # or DCBFLOW_READ_TOKEN
//!
//! [api]
//! body_limit_bytes = 1048576
//! dcb_endpoints = true
//! max_in_flight = 256
//! bulk_per_second = 50
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// The address to listen on (default 127.0.0.1:8080).
    pub listen: Option<SocketAddr>,
    /// The database.
    pub database: Database,
    /// Flow definitions to register at start.
    pub flows: FlowsConfig,
    /// The flow workers.
    pub workers: Workers,
    /// Outbox relays.
    pub relays: Vec<Relay>,
    /// Projections to watch (checkpoints advanced by your own processes).
    pub projections: Vec<Projection>,
    /// Cron schedules that start flow instances (`[[schedules]]`).
    pub schedules: Vec<dcbflow::flow::Schedule>,
    /// Tokens.
    pub auth: Auth,
    /// The HTTP API.
    pub api: Api,
}

/// `[database]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Database {
    /// Connection URL; `DCBFLOW_DATABASE_URL` or `DATABASE_URL` override it.
    /// None: a throwaway local PostgreSQL.
    pub url: Option<String>,
    /// The store's schema.
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Group commit: the largest batch (0: off).
    pub group_commit: usize,
    /// Install or upgrade the schema at start.
    pub migrate: bool,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            url: None,
            schema: dcbflow::DEFAULT_SCHEMA.to_owned(),
            pool_size: 16,
            group_commit: dcbflow::DEFAULT_GROUP_COMMIT,
            migrate: true,
        }
    }
}

/// `[flows]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowsConfig {
    /// Definition files, or folders of them (`.yaml`, `.yml`, `.json`, `.toml`).
    pub paths: Vec<PathBuf>,
    /// What HTTP tasks may call, as `HttpPolicy::allow` entries (`loopback`,
    /// `private`, `public`, a host, `host:port` or a CIDR network). Empty: public
    /// addresses only.
    pub http_allow: Vec<String>,
    /// Protobuf descriptor sets for `executor: grpc` actions, by the name
    /// their `descriptor_set` gives: files written by `protoc --include_imports
    /// --descriptor_set_out=FILE`.
    pub grpc_descriptor_sets: BTreeMap<String, PathBuf>,
}

/// `[workers]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Workers {
    /// Workers in this process (0: none; the API still works).
    pub count: usize,
    /// Instances each worker handles at once.
    pub concurrency: usize,
    /// How long running steps may take to finish at shutdown.
    pub shutdown_grace_ms: u64,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            count: 1,
            concurrency: 8,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// `[[relays]]`: an outbox relay.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Relay {
    /// Its name (its checkpoint and dead letters go by it).
    pub name: String,
    /// Event types to relay (empty: every type).
    #[serde(default)]
    pub types: Vec<String>,
    /// Tags every relayed event carries.
    #[serde(default)]
    pub tags: Vec<String>,
    /// To NATS JetStream.
    pub nats: Option<NatsTarget>,
    /// To a webhook.
    pub webhook: Option<WebhookTarget>,
    /// Attempts before a message becomes a dead letter.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_attempts() -> u32 {
    5
}

/// A relay's NATS JetStream target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NatsTarget {
    /// Server URL.
    pub url: String,
    /// Subject prefix: an event of type `T` goes to `<prefix>.T`.
    pub prefix: String,
}

/// A relay's webhook target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WebhookTarget {
    /// The URL each message is POSTed to.
    pub url: String,
    /// Per-request timeout.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
}

fn default_webhook_timeout() -> u64 {
    10_000
}

/// `[[projections]]`: a checkpoint to report with its lag.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Projection {
    /// The checkpoint's name.
    pub name: String,
    /// The projection's event types (empty: every type).
    #[serde(default)]
    pub types: Vec<String>,
    /// Tags its events carry.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `[auth]`.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Auth {
    /// The operator token (everything); `DCBFLOW_OPERATOR_TOKEN` overrides it.
    pub operator_token: Option<String>,
    /// The read-only token (GET only); `DCBFLOW_READ_TOKEN` overrides it.
    pub read_token: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("Auth")
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "***"),
            )
            .field("read_token", &self.read_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `[api]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Api {
    /// Largest request body.
    pub body_limit_bytes: usize,
    /// Serve the dcb.events-compatible `/read` and `/append`.
    pub dcb_endpoints: bool,
    /// Requests handled at once; beyond it, 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Instances a bulk operation acts on per second.
    pub bulk_per_second: u32,
    /// Most instances one bulk operation acts on.
    pub bulk_max: u32,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            body_limit_bytes: 1024 * 1024,
            dcb_endpoints: true,
            max_in_flight: 256,
            bulk_per_second: 50,
            bulk_max: 10_000,
        }
    }
}

/// Every problem of a configuration, each with its key path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration{}:\n{}", .source_name.as_ref().map(|s| format!(" in {s}")).unwrap_or_default(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The file, if any.
    pub source_name: Option<String>,
    /// `key.path: what is wrong`, one per problem.
    pub problems: Vec<String>,
}

/// Environment variables read by [`Config::load`], overriding the file.
pub const ENV_DATABASE_URL: [&str; 2] = ["DCBFLOW_DATABASE_URL", "DATABASE_URL"];
/// See [`ENV_DATABASE_URL`].
pub const ENV_OPERATOR_TOKEN: &str = "DCBFLOW_OPERATOR_TOKEN";
/// See [`ENV_DATABASE_URL`].
pub const ENV_READ_TOKEN: &str = "DCBFLOW_READ_TOKEN";

impl Config {
    /// Reads `path` (None: defaults only), then applies the environment
    /// overrides (`env` is the process environment in production, a map in tests).
    ///
    /// # Errors
    /// Every problem at once.
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let source_name = path.map(|p| p.display().to_string());
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| ConfigError {
                source_name: source_name.clone(),
                problems: vec![format!("cannot read the file: {e}")],
            })?,
            None => String::new(),
        };
        let base = path.and_then(Path::parent).map(Path::to_path_buf);
        let mut config = Self::parse(&text, base.as_deref()).map_err(|problems| ConfigError {
            source_name: source_name.clone(),
            problems,
        })?;
        if let Some(url) = ENV_DATABASE_URL.iter().find_map(|k| env(k)) {
            config.database.url = Some(url);
        }
        if let Some(t) = env(ENV_OPERATOR_TOKEN) {
            config.auth.operator_token = Some(t);
        }
        if let Some(t) = env(ENV_READ_TOKEN) {
            config.auth.read_token = Some(t);
        }
        let problems = config.check();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                source_name,
                problems,
            })
        }
    }

    /// Parses TOML text; relative flow paths are taken from `base`. Reports
    /// syntax, unknown keys and type errors, each with its key path.
    ///
    /// # Errors
    /// The problems found.
    pub fn parse(text: &str, base: Option<&Path>) -> Result<Config, Vec<String>> {
        let table: toml::Table = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        let mut config = Config::default();
        for (key, value) in table {
            match key.as_str() {
                "listen" => match value.as_str().map(str::parse::<SocketAddr>) {
                    Some(Ok(a)) => config.listen = Some(a),
                    _ => problems.push(format!(
                        "listen: must be an address like \"127.0.0.1:8080\", got {value}"
                    )),
                },
                "database" => section(&key, value, &mut problems, &mut config.database),
                "flows" => section(&key, value, &mut problems, &mut config.flows),
                "workers" => section(&key, value, &mut problems, &mut config.workers),
                "auth" => section(&key, value, &mut problems, &mut config.auth),
                "api" => section(&key, value, &mut problems, &mut config.api),
                "relays" => config.relays = list(&key, value, &mut problems),
                "projections" => config.projections = list(&key, value, &mut problems),
                "schedules" => config.schedules = list(&key, value, &mut problems),
                other => problems.push(format!(
                    "{other}: unknown key (expected listen, database, flows, workers, relays, projections, schedules, auth, api)"
                )),
            }
        }
        if let Some(base) = base {
            for p in &mut config.flows.paths {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Checks the values (not their types): every problem with its key path.
    pub fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        let db = &self.database;
        if let Some(url) = &db.url
            && url.parse::<dcbflow::tokio_postgres::Config>().is_err()
        {
            p.push("database.url: not a PostgreSQL connection URL".to_owned());
        }
        if db.schema.is_empty()
            || db.schema.len() > 63
            || !db
                .schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || db.schema.starts_with(|c: char| c.is_ascii_digit())
        {
            p.push(format!(
                "database.schema: {:?} must be 1-63 letters, digits or underscores, not starting with a digit",
                db.schema
            ));
        }
        if db.pool_size < 2 {
            p.push("database.pool_size: must be at least 2".to_owned());
        }
        if db.group_commit == 1 {
            p.push(
                "database.group_commit: a batch of 1 is no batching; use 0 (off) or 2 and more"
                    .to_owned(),
            );
        }
        for (i, path) in self.flows.paths.iter().enumerate() {
            if !path.exists() {
                p.push(format!(
                    "flows.paths[{i}]: {} does not exist",
                    path.display()
                ));
            }
        }
        for (name, path) in &self.flows.grpc_descriptor_sets {
            match std::fs::read(path) {
                Err(e) => p.push(format!(
                    "flows.grpc_descriptor_sets.{name}: {} cannot be read: {e}",
                    path.display()
                )),
                Ok(bytes) => {
                    if let Err(e) = dcbflow::flow::check_descriptor_set(name, &bytes) {
                        p.push(format!(
                            "flows.grpc_descriptor_sets.{name}: {}: {}",
                            path.display(),
                            e.reason
                        ));
                    }
                }
            }
        }
        for (i, entry) in self.flows.http_allow.iter().enumerate() {
            if let Err(e) = crate::app::allow(dcbflow::flow::HttpPolicy::deny_all(), entry) {
                p.push(format!("flows.http_allow[{i}]: {e}"));
            }
        }
        let w = &self.workers;
        if w.count > 0 && w.concurrency == 0 {
            p.push("workers.concurrency: must be at least 1".to_owned());
        }
        if w.count > 64 {
            p.push("workers.count: at most 64 workers per process".to_owned());
        }
        let mut schedules = BTreeMap::new();
        for (i, s) in self.schedules.iter().enumerate() {
            for problem in s.problems() {
                p.push(format!("schedules[{i}]: {problem}"));
            }
            if let Some(j) = schedules.insert(s.name.clone(), i) {
                p.push(format!(
                    "schedules[{i}].name: {:?} is also schedules[{j}]'s name",
                    s.name
                ));
            }
        }
        let mut names = BTreeMap::new();
        for (i, r) in self.relays.iter().enumerate() {
            let key = format!("relays[{i}]");
            if r.name.is_empty() {
                p.push(format!("{key}.name: must not be empty"));
            }
            if let Some(j) = names.insert(r.name.clone(), i) {
                p.push(format!(
                    "{key}.name: {:?} is also relays[{j}]'s name",
                    r.name
                ));
            }
            match (&r.nats, &r.webhook) {
                (None, None) => p.push(format!("{key}: needs a target, nats or webhook")),
                (Some(_), Some(_)) => {
                    p.push(format!("{key}: has two targets; one relay, one target"));
                }
                (Some(n), None) => {
                    if n.url.is_empty() {
                        p.push(format!("{key}.nats.url: must not be empty"));
                    }
                    if n.prefix.is_empty() || n.prefix.contains([' ', '*', '>']) {
                        p.push(format!(
                            "{key}.nats.prefix: {:?} must be a non-empty subject without spaces or wildcards",
                            n.prefix
                        ));
                    }
                }
                (None, Some(h)) => {
                    if !(h.url.starts_with("http://") || h.url.starts_with("https://")) {
                        p.push(format!(
                            "{key}.webhook.url: must be an http:// or https:// URL"
                        ));
                    }
                }
            }
            if r.max_attempts == 0 {
                p.push(format!("{key}.max_attempts: must be at least 1"));
            }
        }
        let mut names = BTreeMap::new();
        for (i, pr) in self.projections.iter().enumerate() {
            if pr.name.is_empty() {
                p.push(format!("projections[{i}].name: must not be empty"));
            }
            if let Some(j) = names.insert(pr.name.clone(), i) {
                p.push(format!(
                    "projections[{i}].name: {:?} is also projections[{j}]'s name",
                    pr.name
                ));
            }
        }
        let a = &self.auth;
        for (key, token) in [
            ("auth.operator_token", &a.operator_token),
            ("auth.read_token", &a.read_token),
        ] {
            if let Some(t) = token
                && t.len() < 16
            {
                p.push(format!("{key}: must be at least 16 characters"));
            }
        }
        if a.operator_token.is_some() && a.operator_token == a.read_token {
            p.push("auth.read_token: must differ from auth.operator_token".to_owned());
        }
        if a.read_token.is_some() && a.operator_token.is_none() {
            p.push(
                "auth.operator_token: a read token alone would leave no way to operate; set both"
                    .to_owned(),
            );
        }
        let api = &self.api;
        if api.body_limit_bytes < 1024 {
            p.push("api.body_limit_bytes: must be at least 1024".to_owned());
        }
        if api.max_in_flight == 0 {
            p.push("api.max_in_flight: must be at least 1".to_owned());
        }
        if api.bulk_per_second == 0 {
            p.push("api.bulk_per_second: must be at least 1".to_owned());
        }
        if let Some(addr) = self.listen
            && !addr.ip().is_loopback()
            && a.operator_token.is_none()
        {
            p.push(format!(
                "listen: {addr} is not a loopback address, and no tokens are configured (set auth.operator_token)"
            ));
        }
        p
    }

    /// The address to listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }
}

/// Deserializes one `[section]`, reporting unknown keys and type errors with
/// their paths.
fn section<T: DeserializeOwned>(
    key: &str,
    value: toml::Value,
    problems: &mut Vec<String>,
    into: &mut T,
) {
    if let Some(v) = typed(key, value, problems) {
        *into = v;
    }
}

/// Deserializes an array of tables (`[[relays]]`), element by element.
fn list<T: DeserializeOwned>(key: &str, value: toml::Value, problems: &mut Vec<String>) -> Vec<T> {
    let toml::Value::Array(items) = value else {
        problems.push(format!("{key}: must be an array of tables ([[{key}]])"));
        return Vec::new();
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| typed(&format!("{key}[{i}]"), v, problems))
        .collect()
}

/// Deserializes `value` as `T`, listing every unknown key and every value of
/// the wrong type with its path. A value of the wrong type is reported, taken
/// out and the rest deserialized again, so one bad key does not hide the next.
fn typed<T: DeserializeOwned>(
    key: &str,
    mut value: toml::Value,
    problems: &mut Vec<String>,
) -> Option<T> {
    let join = |path: &str| {
        if path == "." || path.is_empty() {
            key.to_owned()
        } else {
            format!("{key}.{path}")
        }
    };
    let mut failed = false;
    loop {
        let mut unknown = Vec::new();
        let result: Result<T, _> = serde_path_to_error::deserialize(
            serde_ignored::Deserializer::new(value.clone(), &mut |path: serde_ignored::Path<
                '_,
            >| {
                unknown.push(path.to_string());
            }),
        );
        match result {
            Ok(v) => {
                for u in unknown {
                    problems.push(format!("{}: unknown key", join(&u)));
                }
                return (!failed).then_some(v);
            }
            Err(e) => {
                failed = true;
                let segments: Vec<String> = e.path().iter().map(|s| s.to_string()).collect();
                let inner = e.into_inner().to_string();
                let inner = inner.lines().next().unwrap_or_default().to_owned();
                problems.push(format!("{}: {inner}", join(&segments.join("."))));
                if segments.is_empty() || !remove(&mut value, &segments) {
                    for u in unknown {
                        problems.push(format!("{}: unknown key", join(&u)));
                    }
                    return None;
                }
            }
        }
    }
}

/// Takes the value at `path` out of `value`; `false` if there is none.
fn remove(value: &mut toml::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut v = value;
    for seg in parents {
        v = match v {
            toml::Value::Table(t) => match t.get_mut(seg.as_str()) {
                Some(n) => n,
                None => return false,
            },
            toml::Value::Array(a) => match seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match v {
        toml::Value::Table(t) => t.remove(last.as_str()).is_some(),
        toml::Value::Array(a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, &no_env).unwrap();
        assert_eq!(c.listen_addr().to_string(), "127.0.0.1:8080");
        assert_eq!(c.workers.count, 1);
    }

    #[test]
    fn every_problem_is_listed_with_its_key_path() {
        let text = r#"
listen = "0.0.0.0:80"
colour = "blue"
[database]
pool_size = "many"
schema = "1bad"
group_commit = "x"
unknown = 1
[workers]
concurrency = 0
count = 2
[[relays]]
name = "r"
[[relays]]
name = "r"
webhook = { url = "ftp://x" }
[auth]
operator_token = "short"
"#;
        let err = Config::parse(text, None).unwrap_err();
        let joined = err.join("\n");
        for expected in [
            "colour: unknown key",
            "database.pool_size:",
            "database.group_commit:",
            "database.unknown: unknown key",
        ] {
            assert!(joined.contains(expected), "{expected:?} not in:\n{joined}");
        }
        // Values are checked once the types are right.
        let text = "listen = \"0.0.0.0:80\"\n[database]\nschema = \"1bad\"\n[workers]\nconcurrency = 0\n[[relays]]\nname = \"r\"\n[[relays]]\nname = \"r\"\nwebhook = { url = \"ftp://x\" }\n[auth]\noperator_token = \"short\"\n";
        let dir = std::env::temp_dir().join(format!("dcbflow-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let e = Config::load(Some(&path), &no_env).unwrap_err();
        let joined = e.problems.join("\n");
        for expected in [
            "database.schema:",
            "workers.concurrency: must be at least 1",
            "relays[0]: needs a target",
            "relays[1].name: \"r\" is also relays[0]'s name",
            "relays[1].webhook.url:",
            "auth.operator_token: must be at least 16 characters",
        ] {
            assert!(joined.contains(expected), "{expected:?} not in:\n{joined}");
        }
        assert!(e.to_string().contains("bad.toml"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn grpc_descriptor_sets_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("dcbflow-grpc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pb");
        std::fs::write(&garbage, b"\xff\xff not a descriptor set").unwrap();
        let text = format!(
            "[flows]\ngrpc_descriptor_sets = {{ gone = \"{}\", garbage = \"{}\" }}\n",
            dir.join("gone.pb").display(),
            garbage.display()
        );
        let c = Config::parse(&text, None).unwrap();
        assert_eq!(c.flows.grpc_descriptor_sets.len(), 2);
        let problems = c.check();
        for expected in [
            "flows.grpc_descriptor_sets.gone: ",
            "flows.grpc_descriptor_sets.garbage: ",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected:?} not in {problems:?}"
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn schedules_are_read_and_each_problem_named() {
        let text = "[[schedules]]\nname = \"nightly\"\nflow = \"report\"\ncron = \"0 0 2 * * *\"\ntimezone = \"Europe/Amsterdam\"\nmissed = \"run_once\"\ninput = { kind = \"daily\" }\n[[schedules]]\nname = \"nightly\"\nflow = \"report\"\ncron = \"at two\"\ntimezone = \"Mars/Olympus\"\n";
        let c = Config::parse(text, None).unwrap();
        assert_eq!(c.schedules.len(), 2);
        assert_eq!(c.schedules[0].missed, dcbflow::flow::MissedTicks::RunOnce);
        assert_eq!(c.schedules[0].input["kind"], "daily");
        let problems = c.check();
        for expected in [
            "schedules[1]: cron \"at two\" does not parse",
            "schedules[1]: timezone \"Mars/Olympus\"",
            "schedules[1].name: \"nightly\" is also schedules[0]'s name",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected:?} not in {problems:?}"
            );
        }
        let e = Config::parse(
            "[[schedules]]\nname = \"x\"\nflow = \"f\"\ncron = \"* * * * * *\"\nevery = 5\n",
            None,
        )
        .unwrap_err();
        assert!(
            e.iter()
                .any(|p| p.contains("schedules[0]") && p.contains("every")),
            "{e:?}"
        );
    }

    #[test]
    fn a_public_address_needs_tokens() {
        let c = Config::parse("listen = \"0.0.0.0:8080\"", None).unwrap();
        assert!(c.check().iter().any(|p| p.starts_with("listen:")));
        let env = |k: &str| (k == ENV_OPERATOR_TOKEN).then(|| "a-long-operator-token".to_owned());
        let dir = std::env::temp_dir().join(format!("dcbflow-config-pub-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pub.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:8080\"").unwrap();
        let c = Config::load(Some(&path), &env).unwrap();
        assert_eq!(
            c.auth.operator_token.as_deref(),
            Some("a-long-operator-token")
        );
        assert!(
            !format!("{c:?}").contains("a-long-operator-token"),
            "tokens are never printed"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn environment_overrides_the_database_url() {
        let env = |k: &str| (k == "DATABASE_URL").then(|| "postgres://u@h/db".to_owned());
        let c = Config::load(None, &env).unwrap();
        assert_eq!(c.database.url.as_deref(), Some("postgres://u@h/db"));
    }
}
