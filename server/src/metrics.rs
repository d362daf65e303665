//! `/metrics`: the Prometheus recorder, and the gauges sampled at each scrape.
//!
//! Counters and histograms (appends, step attempts and durations) are recorded
//! by the library where they happen (its `metrics` feature); gauges that
//! describe the database (head, lag, instances by status, incidents, outbox
//! age, dead letters) are read when Prometheus scrapes, so they are never stale.

use std::collections::{BTreeMap, BTreeSet};

use metrics::gauge;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::app::App;

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
///
/// # Panics
/// If another recorder was installed first.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ])
                .expect("buckets")
                .install_recorder()
                .expect("the Prometheus recorder is the first one installed");
            dcbflow::metrics::describe();
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_gauge};
    describe_gauge!(
        "dcbflow_head_position",
        "The position of the newest event in the log"
    );
    describe_gauge!(
        "dcbflow_consumer_lag_events",
        "Events a projection or relay has yet to process"
    );
    describe_gauge!(
        "dcbflow_consumer_lag_seconds",
        Unit::Seconds,
        "Age of the oldest event a projection or relay has yet to process"
    );
    describe_gauge!(
        "dcbflow_outbox_oldest_unpublished_seconds",
        Unit::Seconds,
        "Age of the oldest event an outbox relay has yet to publish"
    );
    describe_gauge!("dcbflow_dead_letters", "Dead letters of every relay");
    describe_gauge!("dcbflow_instances", "Flow instances by flow and status");
    describe_gauge!("dcbflow_incidents_open", "Open incidents by flow");
    describe_gauge!(
        "dcbflow_workers_running",
        "Flow workers running in this process"
    );
}

/// Samples the gauges and renders every metric.
pub async fn render(app: &App) -> String {
    if let Err(e) = sample(app).await {
        tracing::warn!(error = %e, "sampling metrics failed");
    }
    app.metrics
        .as_ref()
        .map_or_else(String::new, PrometheusHandle::render)
}

async fn sample(app: &App) -> Result<(), crate::error::ApiError> {
    let head = app.store.head().await?.map_or(0, |p| p.0);
    gauge!("dcbflow_head_position").set(head as f64);
    gauge!("dcbflow_workers_running").set(app.workers() as f64);
    let checkpoints = dcbflow::Checkpoints::new(app.store.clone());
    for w in app.watched() {
        let lag = checkpoints.lag(&w.name, &w.query).await?;
        let labels = [("consumer", w.name.clone()), ("kind", w.kind.to_owned())];
        gauge!("dcbflow_consumer_lag_events", &labels).set(lag.events_behind as f64);
        gauge!("dcbflow_consumer_lag_seconds", &labels).set(lag.oldest_age().as_secs_f64());
        if w.kind == "relay" {
            gauge!("dcbflow_outbox_oldest_unpublished_seconds", "relay" => w.name.clone())
                .set(lag.oldest_age().as_secs_f64());
        }
    }
    let dead = dcbflow::outbox::DeadLetters::new(app.store.clone())
        .count()
        .await?;
    gauge!("dcbflow_dead_letters").set(dead as f64);
    // A flow and status with no instances left is reported as 0, not as its
    // last value: remember every series set so far.
    static SERIES: std::sync::Mutex<BTreeSet<(String, String)>> =
        std::sync::Mutex::new(BTreeSet::new());
    static FLOWS: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    let counts = app.flows.instance_counts().await?;
    let mut open: BTreeMap<String, i64> = BTreeMap::new();
    for g in app.flows.incidents().await? {
        *open.entry(g.flow).or_default() += g.instance_count;
    }
    {
        let mut series = SERIES.lock().expect("series");
        let now: BTreeMap<(String, String), i64> = counts
            .into_iter()
            .map(|c| ((c.flow, c.status), c.count))
            .collect();
        series.extend(now.keys().cloned());
        for key in series.iter() {
            let n = now.get(key).copied().unwrap_or(0);
            gauge!("dcbflow_instances", "flow" => key.0.clone(), "status" => key.1.clone())
                .set(n as f64);
        }
        let mut flows = FLOWS.lock().expect("flows");
        flows.extend(open.keys().cloned());
        for flow in flows.iter() {
            let n = open.get(flow).copied().unwrap_or(0);
            gauge!("dcbflow_incidents_open", "flow" => flow.clone()).set(n as f64);
        }
    }
    Ok(())
}
