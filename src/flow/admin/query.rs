//! Queries of the flow engine: instances, timelines, incidents.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::flow::FlowError;
use crate::flow::model::state::{InstanceState, InstanceStatus};
use crate::flow::runtime::{Flows, instance_query};
use crate::store::{ReadOptions, SequencedEvent};

/// A row of [`Flows::instances`].
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSummary {
    /// Instance id.
    pub id: Uuid,
    /// Flow name.
    pub flow: String,
    /// The definition version (content hash) it runs on.
    pub definition_version: String,
    /// Business key.
    pub business_key: Option<String>,
    /// Status.
    pub status: String,
    /// Start time.
    pub started_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// Filter of [`Flows::instances`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct InstanceFilter {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only this status.
    pub status: Option<InstanceStatus>,
    /// Only this business key.
    pub business_key: Option<String>,
    /// At most this many (default 100), newest first.
    pub limit: Option<i64>,
}

impl InstanceFilter {
    /// Instances of `flow`.
    pub fn flow(flow: impl Into<String>) -> Self {
        InstanceFilter {
            flow: Some(flow.into()),
            ..Default::default()
        }
    }

    /// Only those with `status`.
    #[must_use]
    pub fn status(mut self, status: InstanceStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// A group of [`Flows::incidents`]: open incidents of one flow, task, kind and error.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentGroup {
    /// Flow name.
    pub flow: String,
    /// Task name.
    pub task: String,
    /// `exhausted`, `compensation_failed`, `timed_out`, `paused`.
    pub kind: String,
    /// The error.
    pub error: String,
    /// Instances affected (the first 100 by id).
    pub instances: Vec<Uuid>,
    /// How many instances are affected.
    pub instance_count: i64,
    /// Failed attempts in all.
    pub occurrences: i64,
    /// First seen.
    pub first_seen: DateTime<Utc>,
    /// Last seen.
    pub last_seen: DateTime<Utc>,
}

/// Most groups [`Flows::incidents`] returns.
const MAX_INCIDENT_GROUPS: u32 = 100;
/// Most instances an [`IncidentGroup`] names.
const MAX_INSTANCES_PER_GROUP: u32 = 100;

impl Flows {
    /// The instance's state, folded from its events.
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.instance", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema(), instance = %id))]
    pub async fn instance(&self, id: Uuid) -> Result<Option<InstanceState>, FlowError> {
        let events = self.timeline(id).await?;
        Ok(InstanceState::fold(&events))
    }

    /// Every event of the instance, oldest first (its audit trail).
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.timeline", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema(), instance = %id))]
    pub async fn timeline(&self, id: Uuid) -> Result<Vec<SequencedEvent>, FlowError> {
        Ok(self
            .store()
            .read_all(&instance_query(id), ReadOptions::default())
            .await?
            .events)
    }

    /// Instances by flow, status and business key, newest first.
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.instances", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema()))]
    pub async fn instances(
        &self,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceSummary>, FlowError> {
        self.ready().await?;
        let client = self.store().pool().get().await?;
        let sql = format!(
            "SELECT id, flow, definition_version, business_key, status, started_at, updated_at FROM {} \
             WHERE ($1::text IS NULL OR flow = $1) AND ($2::text IS NULL OR status = $2) \
               AND ($3::text IS NULL OR business_key = $3) \
             ORDER BY started_at DESC LIMIT $4",
            self.store().table("flow_instances")
        );
        let rows = client
            .query(
                &sql,
                &[
                    &filter.flow,
                    &filter.status.map(InstanceStatus::as_str),
                    &filter.business_key,
                    &filter.limit.unwrap_or(100),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| InstanceSummary {
                id: r.get(0),
                flow: r.get(1),
                definition_version: r.get(2),
                business_key: r.get(3),
                status: r.get(4),
                started_at: r.get(5),
                updated_at: r.get(6),
            })
            .collect())
    }

    /// Open incidents grouped by flow, task, kind and error, most recent first:
    /// at most 100 groups, each naming at most 100 of its instances (all of them
    /// are counted in [`IncidentGroup::instance_count`]).
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.incidents", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema()))]
    pub async fn incidents(&self) -> Result<Vec<IncidentGroup>, FlowError> {
        self.ready().await?;
        let client = self.store().pool().get().await?;
        let sql = format!(
            "SELECT flow, task, kind, error, \
                    (array_agg(instance ORDER BY instance))[1:{MAX_INSTANCES_PER_GROUP}], \
                    sum(occurrences)::bigint, min(first_seen), max(last_seen), count(*) \
             FROM {} GROUP BY flow, task, kind, error ORDER BY max(last_seen) DESC \
             LIMIT {MAX_INCIDENT_GROUPS}",
            self.store().table("flow_incidents")
        );
        let rows = client.query(&sql, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| IncidentGroup {
                flow: r.get(0),
                task: r.get(1),
                kind: r.get(2),
                error: r.get(3),
                instances: r.get(4),
                occurrences: r.get(5),
                first_seen: r.get(6),
                last_seen: r.get(7),
                instance_count: r.get(8),
            })
            .collect())
    }
}
