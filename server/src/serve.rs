//! `dcbflow serve`: the engine from a config file, the HTTP API, graceful
//! shutdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dcbflow::CancellationToken;
use dcbflow::flow::WorkerOptions;
use dcbflow::outbox::{
    NatsPublisher, OutboxMessage, OutboxRelay, PublishFailure, Publisher, RelayOptions,
    WebhookPublisher,
};
use tokio::task::JoinSet;

use crate::app::{App, query_of};
use crate::config::{Config, Relay};
use crate::database::Database;
use crate::error::{ApiError, ApiResult};

/// What `serve` was asked to do beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Overrides `listen`.
    pub listen: Option<SocketAddr>,
    /// Register the order-saga demo and start a trickle of orders.
    pub demo: bool,
}

/// What a graceful shutdown drained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drained {
    /// Workers stopped.
    pub workers: usize,
    /// Steps that finished within the grace period.
    pub steps_finished: usize,
    /// Steps abandoned when it ran out (their leases expire; another worker retries them).
    pub steps_abandoned: usize,
    /// Claims released.
    pub instances_released: usize,
    /// Relays stopped.
    pub relays: usize,
}

impl std::fmt::Display for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drained: {} workers stopped, {} running steps finished, {} abandoned (their leases expire, another worker takes them), {} claims released; {} relays stopped",
            self.workers,
            self.steps_finished,
            self.steps_abandoned,
            self.instances_released,
            self.relays
        )
    }
}

/// A relay's publisher: NATS JetStream or a webhook.
#[derive(Debug, Clone)]
pub enum AnyPublisher {
    /// NATS JetStream.
    Nats(Box<NatsPublisher>),
    /// A webhook.
    Webhook(WebhookPublisher),
}

impl Publisher for AnyPublisher {
    fn system(&self) -> &'static str {
        match self {
            AnyPublisher::Nats(p) => p.as_ref().system(),
            AnyPublisher::Webhook(p) => p.system(),
        }
    }

    async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
        match self {
            AnyPublisher::Nats(p) => p.as_ref().publish(messages).await,
            AnyPublisher::Webhook(p) => p.publish(messages).await,
        }
    }
}

/// The publisher of a configured relay.
///
/// # Errors
/// 503 when NATS cannot be reached.
pub async fn publisher(relay: &Relay) -> ApiResult<AnyPublisher> {
    if let Some(n) = &relay.nats {
        let client = dcbflow::async_nats::connect(&n.url).await.map_err(|e| {
            ApiError::unavailable("unavailable", format!("NATS at {}: {e}", n.url), 5)
        })?;
        return Ok(AnyPublisher::Nats(Box::new(NatsPublisher::new(
            client,
            &n.prefix,
            Duration::from_secs(5),
        ))));
    }
    let w = relay
        .webhook
        .as_ref()
        .ok_or_else(|| ApiError::internal("a relay without a target"))?;
    WebhookPublisher::new(&w.url, Duration::from_millis(w.timeout_ms))
        .map(AnyPublisher::Webhook)
        .map_err(ApiError::internal)
}

/// Runs the service until SIGTERM or Ctrl-C, then drains.
///
/// # Errors
/// Configuration, database and bind errors.
pub async fn serve(
    config: Config,
    options: ServeOptions,
) -> Result<Drained, Box<dyn std::error::Error>> {
    let mut config = config;
    if options.demo && !config.flows.http_allow.iter().any(|a| a == "loopback") {
        // The demo's shop service runs on 127.0.0.1.
        config.flows.http_allow.push("loopback".into());
    }
    if let Some(l) = options.listen {
        config.listen = Some(l);
        let problems = config.check();
        if !problems.is_empty() {
            return Err(crate::config::ConfigError {
                source_name: None,
                problems,
            }
            .into());
        }
    }
    let tokens = config.auth.operator_token.is_some();
    let addr = config.listen_addr();
    let db = Database::for_config(&config).await?;
    println!("database: {}", db.origin);
    let result = run(&db.url, config, options, addr, tokens).await;
    db.close().await;
    result
}

async fn run(
    url: &str,
    config: Config,
    options: ServeOptions,
    addr: SocketAddr,
    tokens: bool,
) -> Result<Drained, Box<dyn std::error::Error>> {
    let grace = Duration::from_millis(config.workers.shutdown_grace_ms);
    let mut app = App::connect(url, config).await?;
    app.metrics = Some(crate::metrics::install());
    for (name, version) in app.register_configured_flows().await? {
        println!("registered flow {name} version {version}");
    }
    for name in app.apply_configured_schedules().await? {
        println!("set schedule {name}");
    }
    let stop = CancellationToken::new();
    let mut background = JoinSet::new();
    if options.demo {
        crate::demo::start(&app, stop.clone(), &mut background).await?;
    }
    background.spawn(app.samples.clone().run(app.clone(), stop.clone()));
    let mut workers = JoinSet::new();
    for i in 0..app.config.workers.count {
        let mut o = WorkerOptions::default().id(format!("{}-{i}", hostname()));
        o.concurrency = app.config.workers.concurrency;
        let worker = app.flows.worker(o);
        let stop = stop.clone();
        let running = app.workers_running.clone();
        workers.spawn(async move {
            running.fetch_add(1, Ordering::Relaxed);
            let r = worker.run_until(stop, grace).await;
            running.fetch_sub(1, Ordering::Relaxed);
            r
        });
    }
    let mut relays = JoinSet::new();
    for r in &app.config.relays {
        let publisher = publisher(r).await?;
        let mut o = RelayOptions::default();
        o.max_attempts = r.max_attempts;
        let relay = OutboxRelay::new(
            app.store.clone(),
            &r.name,
            query_of(&r.types, &r.tags),
            publisher,
        )
        .options(o);
        let stop = stop.clone();
        let name = r.name.clone();
        relays.spawn(async move {
            if let Err(e) = relay.run(stop).await {
                tracing::error!(relay = %name, error = %e, "relay stopped");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    if !tokens {
        println!(
            "no tokens configured: listening on loopback only, every request may read and operate"
        );
    }
    println!(
        "dcbflow listening on http://{local}  (API http://{local}/api/v1, OpenAPI http://{local}/api/openapi.json)"
    );
    let router = crate::api::router(app.clone());
    let shutdown = {
        let (stop, app) = (stop.clone(), app.clone());
        async move {
            signal().await;
            // Live tails (SSE) would keep the server open until every client left.
            crate::api::events::end_live_tails(&app);
            println!(
                "shutting down: no new work is claimed; running steps have {} ms to finish",
                grace.as_millis()
            );
            stop.cancel();
        }
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await?;
    stop.cancel();
    let mut drained = Drained::default();
    while let Some(r) = workers.join_next().await {
        drained.workers += 1;
        match r {
            Ok(Ok(d)) => {
                drained.steps_finished += d.steps_finished;
                drained.steps_abandoned += d.steps_abandoned;
                drained.instances_released += d.instances_released;
            }
            Ok(Err(e)) => tracing::error!(error = %e, "worker failed"),
            Err(e) => tracing::error!(error = %e, "worker panicked"),
        }
    }
    while relays.join_next().await.is_some() {
        drained.relays += 1;
    }
    background.shutdown().await;
    app.store.pool().close();
    println!("{drained}");
    Ok(drained)
}

/// SIGTERM or Ctrl-C.
async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "dcbflow".into())
}
