//! `/api/v1/whoami` and `/api/v1/overview`: what the dashboard's first page
//! shows, in one call.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use dcbflow::CancellationToken;
use dcbflow::flow::StatusCount;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::relays::{Consumer, consumers};
use crate::app::App;
use crate::auth::{Granted, Role};
use crate::error::ApiResult;

/// Who the caller is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// `operator` or `reader`.
    pub role: String,
    /// Whether the server checks tokens (false: everyone is operator, loopback only).
    pub tokens: bool,
}

/// Instances of one flow in one status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Count {
    /// Flow.
    pub flow: String,
    /// Status.
    pub status: String,
    /// Instances.
    pub count: i64,
}

impl From<StatusCount> for Count {
    fn from(c: StatusCount) -> Self {
        Count {
            flow: c.flow,
            status: c.status,
            count: c.count,
        }
    }
}

/// One sample of the log and the instances, taken every [`SAMPLE_EVERY`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sample {
    /// When.
    pub at: DateTime<Utc>,
    /// The head then.
    pub head: i64,
    /// Instances in a final status (completed, compensated, failed) then.
    pub finished: i64,
    /// Instances by status then.
    pub by_status: BTreeMap<String, i64>,
}

/// The overview.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Overview {
    /// The newest position.
    pub head: i64,
    /// Appends per second over the last sample interval (events per second).
    pub appends_per_second: f64,
    /// Instances by flow and status.
    pub instances: Vec<Count>,
    /// Open incidents (instances with one).
    pub open_incidents: i64,
    /// Dead letters of every relay.
    pub dead_letters: i64,
    /// Projections and relays with their lag.
    pub consumers: Vec<Consumer>,
    /// Samples of the last 15 minutes, oldest first.
    pub series: Vec<Sample>,
}

/// How often the sampler looks.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How many samples are kept (15 minutes).
pub const SAMPLES_KEPT: usize = 180;

/// The samples, newest last.
#[derive(Debug, Clone, Default)]
pub struct Samples(Arc<Mutex<VecDeque<Sample>>>);

impl Samples {
    /// Takes one sample now.
    ///
    /// # Errors
    /// Store errors.
    pub async fn take(&self, app: &App) -> ApiResult<()> {
        let head = app.store.head().await?.map_or(0, |p| p.0);
        let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
        for c in app.flows.instance_counts().await? {
            *by_status.entry(c.status).or_default() += c.count;
        }
        let finished = ["completed", "compensated", "failed"]
            .iter()
            .map(|s| by_status.get(*s).copied().unwrap_or(0))
            .sum();
        let mut q = self.0.lock().expect("samples");
        q.push_back(Sample {
            at: Utc::now(),
            head,
            finished,
            by_status,
        });
        while q.len() > SAMPLES_KEPT {
            q.pop_front();
        }
        Ok(())
    }

    /// Samples every [`SAMPLE_EVERY`] until `stop`.
    pub async fn run(self, app: App, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.take(&app).await {
                tracing::warn!(error = %e, "sampling the overview failed");
            }
        }
    }

    fn snapshot(&self) -> Vec<Sample> {
        self.0.lock().expect("samples").iter().cloned().collect()
    }
}

/// The caller's role.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "health",
    responses((status = 200, body = WhoAmI)))]
pub async fn whoami(
    State(app): State<App>,
    Extension(Granted(role)): Extension<Granted>,
) -> Json<WhoAmI> {
    Json(WhoAmI {
        role: match role {
            Role::Operator => "operator".into(),
            Role::Reader => "reader".into(),
        },
        tokens: app.config.auth.operator_token.is_some() || app.config.auth.read_token.is_some(),
    })
}

/// Everything the dashboard's overview shows.
#[utoipa::path(get, path = "/api/v1/overview", tag = "health",
    responses((status = 200, body = Overview)))]
pub async fn overview(State(app): State<App>) -> ApiResult<Json<Overview>> {
    Ok(Json(overview_of(&app).await?))
}

/// The overview of `app`.
///
/// # Errors
/// Store errors.
pub async fn overview_of(app: &App) -> ApiResult<Overview> {
    let head = app.store.head().await?.map_or(0, |p| p.0);
    let series = app.samples.snapshot();
    let appends_per_second = match (series.iter().rev().nth(1), series.last()) {
        (Some(a), Some(b)) => {
            let dt = (b.at - a.at).num_milliseconds() as f64 / 1000.0;
            if dt > 0.0 {
                (b.head - a.head) as f64 / dt
            } else {
                0.0
            }
        }
        _ => 0.0,
    };
    let instances = app
        .flows
        .instance_counts()
        .await?
        .into_iter()
        .map(Count::from)
        .collect();
    let open_incidents = app
        .flows
        .incidents()
        .await?
        .iter()
        .map(|g| g.instance_count)
        .sum();
    let list = consumers(app).await?;
    Ok(Overview {
        head,
        appends_per_second,
        instances,
        open_incidents,
        dead_letters: list.dead_letters_total,
        consumers: list.items,
        series,
    })
}
