//! The running service's parts: the store, the flow engine, the configuration
//! and what the operator API reports on (workers, relays, projections).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dcbflow::flow::{FlowDefinition, Flows, HttpPolicy};
use dcbflow::{Query, QueryItem, Store};

use crate::config::{Config, Projection, Relay};
use crate::error::{ApiError, ApiResult};

/// Everything a request handler or a CLI command needs.
#[derive(Clone)]
pub struct App {
    /// The event store.
    pub store: Store,
    /// The flow engine on it.
    pub flows: Flows,
    /// The configuration it runs with.
    pub config: Arc<Config>,
    /// Workers currently running in this process.
    pub workers_running: Arc<AtomicUsize>,
    /// The Prometheus recorder's handle (the server only).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The overview's samples (taken by the server every 5 s).
    pub samples: crate::api::overview::Samples,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("schema", &self.store.schema())
            .finish_non_exhaustive()
    }
}

/// A relay or projection the API reports on: a checkpoint name and its query.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Checkpoint name.
    pub name: String,
    /// `relay` or `projection`.
    pub kind: &'static str,
    /// What it consumes.
    pub query: Query,
    /// Where it delivers (relays).
    pub target: Option<String>,
}

impl App {
    /// Connects to the database named by `url` with the configuration's store
    /// settings, migrating if the configuration says so.
    ///
    /// # Errors
    /// Database and configuration errors.
    pub async fn connect(url: &str, config: Config) -> ApiResult<App> {
        let db = &config.database;
        let builder = Store::builder_for_url(url, Some(db.pool_size))?
            .schema(&db.schema)
            .migrate(db.migrate);
        let store = builder.group_commit(db.group_commit).build().await?;
        let mut policy = HttpPolicy::default();
        for entry in &config.flows.http_allow {
            policy = allow(policy, entry)
                .map_err(|e| ApiError::bad_field("flows.http_allow", e.to_string()))?;
        }
        let flows = Flows::new(store.clone()).http_policy(policy);
        for (name, path) in &config.flows.grpc_descriptor_sets {
            let key = format!("flows.grpc_descriptor_sets.{name}");
            let bytes = std::fs::read(path).map_err(|e| {
                ApiError::bad_field(&key, format!("{} cannot be read: {e}", path.display()))
            })?;
            flows
                .grpc_descriptor_set(name, &bytes)
                .map_err(|e| ApiError::bad_field(&key, e.reason))?;
        }
        if db.migrate {
            // Every layer now, so that the readiness probe knows them all and
            // the operator queries find their tables.
            dcbflow::Checkpoints::new(store.clone()).migrate().await?;
            dcbflow::outbox::DeadLetters::new(store.clone())
                .migrate()
                .await?;
            dcbflow::CommandExecutor::new(store.clone())
                .migrate()
                .await?;
            flows.migrate().await?;
        }
        Ok(App {
            store,
            flows,
            config: Arc::new(config),
            workers_running: Arc::new(AtomicUsize::new(0)),
            metrics: None,
            samples: Default::default(),
        })
    }

    /// Registers every definition file named by `flows.paths` (folders: their
    /// `.yaml`, `.yml`, `.json` and `.toml` files, sorted by name).
    ///
    /// # Errors
    /// The first file that cannot be read or is invalid, naming the file.
    pub async fn register_configured_flows(&self) -> ApiResult<Vec<(String, String)>> {
        let mut files = Vec::new();
        for p in &self.config.flows.paths {
            if p.is_dir() {
                let mut found: Vec<_> = std::fs::read_dir(p)
                    .map_err(|e| {
                        ApiError::bad_field("flows.paths", format!("{}: {e}", p.display()))
                    })?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|f| {
                        f.extension()
                            .and_then(|x| x.to_str())
                            .is_some_and(|x| matches!(x, "yaml" | "yml" | "json" | "toml"))
                    })
                    .collect();
                found.sort();
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        let mut registered = Vec::new();
        for f in files {
            let def = FlowDefinition::from_file(&f).map_err(|e| {
                ApiError::invalid(
                    "definition_invalid",
                    format!("{}: {e}", f.display()),
                    Vec::new(),
                )
            })?;
            let version = self.flows.register(&def).await.map_err(|e| {
                let mut e = ApiError::from(e);
                e.detail = format!("{}: {}", f.display(), e.detail);
                e
            })?;
            registered.push((def.name.clone(), version));
        }
        Ok(registered)
    }

    /// Sets every schedule of the configuration that is new or changed
    /// (one that is already as configured keeps its last tick and state,
    /// paused included).
    ///
    /// # Errors
    /// The first schedule that is refused, naming it.
    pub async fn apply_configured_schedules(&self) -> ApiResult<Vec<String>> {
        let mut set = Vec::new();
        for s in &self.config.schedules {
            let current = self.flows.schedule(&s.name).await?;
            if current.as_ref().is_some_and(|c| &c.schedule == s) {
                continue;
            }
            self.flows
                .set_schedule(s, Some("configuration"))
                .await
                .map_err(|e| {
                    let mut e = ApiError::from(e);
                    e.detail = format!("schedules {:?}: {}", s.name, e.detail);
                    e
                })?;
            set.push(s.name.clone());
        }
        Ok(set)
    }

    /// The relays and projections of the configuration.
    pub fn watched(&self) -> Vec<Watched> {
        let relays = self.config.relays.iter().map(|r: &Relay| Watched {
            name: r.name.clone(),
            kind: "relay",
            query: query_of(&r.types, &r.tags),
            target: Some(match (&r.nats, &r.webhook) {
                (Some(n), _) => format!("nats {} {}.<type>", n.url, n.prefix),
                (_, Some(w)) => format!("webhook {}", w.url),
                _ => String::new(),
            }),
        });
        let projections = self
            .config
            .projections
            .iter()
            .map(|p: &Projection| Watched {
                name: p.name.clone(),
                kind: "projection",
                query: query_of(&p.types, &p.tags),
                target: None,
            });
        relays.chain(projections).collect()
    }

    /// Workers running now.
    pub fn workers(&self) -> usize {
        self.workers_running.load(Ordering::Relaxed)
    }
}

/// One query item of `types` and `tags` (both empty: every event).
pub fn query_of(types: &[String], tags: &[String]) -> Query {
    if types.is_empty() && tags.is_empty() {
        return Query::all();
    }
    Query::from_items([QueryItem::new()
        .types(types.iter().cloned())
        .tags(tags.iter().cloned())])
}

/// One `flows.http_allow` entry: `loopback`, `private` or `public` (classes of
/// addresses), or what [`HttpPolicy::allow`] takes (a host, `host:port`,
/// `*.domain`, an address or a CIDR network).
///
/// # Errors
/// An entry that is none of these.
pub fn allow(policy: HttpPolicy, entry: &str) -> Result<HttpPolicy, dcbflow::flow::HttpRuleError> {
    match entry.trim() {
        "loopback" => Ok(policy.allow_loopback(true)),
        "private" => Ok(policy.allow_private(true)),
        "public" => Ok(policy.allow_public(true)),
        other => policy.allow(other),
    }
}
