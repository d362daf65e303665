//! Queries of the flow engine: instances (filtered, keyset-paginated, counted),
//! timelines, incidents (grouped, paginated by a stable group id, one by one).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::flow::FlowError;
use crate::flow::model::events::StepId;
use crate::flow::model::state::{Acknowledgement, InstanceState, InstanceStatus};
use crate::flow::runtime::{Flows, instance_query};
use crate::store::{Position, ReadOptions, SequencedEvent};

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
    /// Position of its newest event (as of the read model): what an operator
    /// looked at, to pass as `seen` to a manual operation.
    pub last_position: Position,
}

impl InstanceSummary {
    /// The cursor that continues a listing after this row
    /// ([`InstanceFilter::page_after`]).
    pub fn cursor(&self) -> InstanceCursor {
        InstanceCursor {
            started_at: self.started_at,
            id: self.id,
        }
    }
}

/// Where a page of [`Flows::instances`] ends: the `(started_at, id)` of its last
/// row. The next page starts strictly after it in the listing's order
/// (`started_at DESC, id DESC`), so rows are neither repeated nor skipped, even
/// while new instances start.
///
/// Its text form (`Display`, `FromStr`, and serde) is opaque to clients:
/// `<microseconds since the Unix epoch>.<instance id, 32 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InstanceCursor {
    /// The row's start time (microsecond precision, as stored).
    pub started_at: DateTime<Utc>,
    /// The row's instance id.
    pub id: Uuid,
}

impl fmt::Display for InstanceCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            self.started_at.timestamp_micros(),
            self.id.simple()
        )
    }
}

/// A text that is not an [`InstanceCursor`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid instance cursor {input:?}: {problem}")]
pub struct ParseInstanceCursorError {
    input: String,
    problem: &'static str,
}

impl FromStr for InstanceCursor {
    type Err = ParseInstanceCursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |problem| ParseInstanceCursorError {
            // Bounded: the text may come from anyone.
            input: s.chars().take(80).collect(),
            problem,
        };
        let (micros, id) = s
            .split_once('.')
            .ok_or_else(|| err("expected <micros>.<id>"))?;
        let micros: i64 = micros
            .parse()
            .map_err(|_| err("the time is not an integer"))?;
        let started_at = DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| err("the time is out of range"))?;
        if id.len() != 32 {
            return Err(err("the id is not 32 hex digits"));
        }
        let id = Uuid::try_parse(id).map_err(|_| err("the id is not 32 hex digits"))?;
        Ok(InstanceCursor { started_at, id })
    }
}

impl Serialize for InstanceCursor {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InstanceCursor {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Filter of [`Flows::instances`] and [`Flows::count_instances`]. Every filter
/// set must hold (they are combined with AND).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct InstanceFilter {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only this status.
    pub status: Option<InstanceStatus>,
    /// Only this business key (exactly).
    pub business_key: Option<String>,
    /// Only instances started at or after this time (inclusive).
    pub started_after: Option<DateTime<Utc>>,
    /// Only instances started before this time (exclusive), so that
    /// `[started_after, started_before)` windows tile without overlap.
    pub started_before: Option<DateTime<Utc>>,
    /// Only instances whose business key contains this text, ignoring case.
    /// The text is taken literally (`%`, `_` and `\` are not wildcards);
    /// `Some("")` matches every instance that has a business key.
    pub key_contains: Option<String>,
    /// Continue after this row (the [`InstanceSummary::cursor`] of the last row
    /// of the previous page). Ignored by [`Flows::count_instances`].
    pub page_after: Option<InstanceCursor>,
    /// At most this many rows (default 100, clamped to 1..=1000). Ignored by
    /// [`Flows::count_instances`].
    pub limit: Option<i64>,
}

/// Rows of [`Flows::instances`] when the filter sets no limit.
const DEFAULT_INSTANCE_LIMIT: i64 = 100;
/// Most rows of one [`Flows::instances`] call.
const MAX_INSTANCE_LIMIT: i64 = 1000;

impl InstanceFilter {
    /// Everything (the same as `Default`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Instances of `flow`.
    pub fn flow(flow: impl Into<String>) -> Self {
        InstanceFilter {
            flow: Some(flow.into()),
            ..Default::default()
        }
    }

    /// Only instances of `flow`.
    #[must_use]
    pub fn in_flow(mut self, flow: impl Into<String>) -> Self {
        self.flow = Some(flow.into());
        self
    }

    /// Only those with `status`.
    #[must_use]
    pub fn status(mut self, status: InstanceStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only the one with business key `key`.
    #[must_use]
    pub fn business_key(mut self, key: impl Into<String>) -> Self {
        self.business_key = Some(key.into());
        self
    }

    /// Only those started at or after `at`.
    #[must_use]
    pub fn started_after(mut self, at: DateTime<Utc>) -> Self {
        self.started_after = Some(at);
        self
    }

    /// Only those started before `at`.
    #[must_use]
    pub fn started_before(mut self, at: DateTime<Utc>) -> Self {
        self.started_before = Some(at);
        self
    }

    /// Only those whose business key contains `text` (ignoring case, literally).
    #[must_use]
    pub fn key_contains(mut self, text: impl Into<String>) -> Self {
        self.key_contains = Some(text.into());
        self
    }

    /// The page after `cursor`.
    #[must_use]
    pub fn page_after(mut self, cursor: InstanceCursor) -> Self {
        self.page_after = Some(cursor);
        self
    }

    /// At most `n` rows (clamped to 1..=1000).
    #[must_use]
    pub fn limit(mut self, n: i64) -> Self {
        self.limit = Some(n);
        self
    }

    /// The limit applied: the one set (clamped to 1..=1000), or 100.
    pub fn effective_limit(&self) -> i64 {
        self.limit
            .unwrap_or(DEFAULT_INSTANCE_LIMIT)
            .clamp(1, MAX_INSTANCE_LIMIT)
    }

    /// The `ILIKE` pattern of `key_contains`: the text with `\`, `%` and `_`
    /// escaped, between `%`s.
    fn key_pattern(&self) -> Option<String> {
        self.key_contains.as_deref().map(|text| {
            let mut p = String::with_capacity(text.len() + 2);
            p.push('%');
            for c in text.chars() {
                if matches!(c, '\\' | '%' | '_') {
                    p.push('\\');
                }
                p.push(c);
            }
            p.push('%');
            p
        })
    }
}

/// The conditions of [`InstanceFilter`] on `flow_instances` (`$1`..`$6`: flow,
/// status, business key, started after, started before, key pattern).
const INSTANCE_WHERE: &str = "($1::text IS NULL OR flow = $1) \
     AND ($2::text IS NULL OR status = $2) \
     AND ($3::text IS NULL OR business_key = $3) \
     AND ($4::timestamptz IS NULL OR started_at >= $4) \
     AND ($5::timestamptz IS NULL OR started_at < $5) \
     AND ($6::text IS NULL OR business_key ILIKE $6 ESCAPE '\\')";

/// A row of [`Flows::instance_counts`]: how many instances of a flow have a status.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StatusCount {
    /// Flow name.
    pub flow: String,
    /// Status (as stored: `running`, `paused`, ...; see [`InstanceStatus::as_str`]).
    pub status: String,
    /// How many instances.
    pub count: i64,
}

/// A group of [`Flows::incident_groups`]: open incidents of one flow, task,
/// kind and error.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentGroup {
    /// The group's stable id: 16 hex digits of a hash of (flow, task, kind,
    /// error), the same in every process and on every call. The groups are
    /// ordered by it; pass the last one as [`IncidentFilter::after`] for the
    /// next page, or to [`Flows::group_incidents`] for its incidents.
    pub id: String,
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
    /// How many of them have an acknowledged incident of this group.
    pub acknowledged: i64,
    /// Failed attempts in all.
    pub occurrences: i64,
    /// First seen.
    pub first_seen: DateTime<Utc>,
    /// Last seen (the last time an incident of the group changed).
    pub last_seen: DateTime<Utc>,
}

/// Filter and page of [`Flows::incident_groups`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncidentFilter {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only the group with this [`IncidentGroup::id`].
    pub group: Option<String>,
    /// Only groups whose id is greater than this one (the last
    /// [`IncidentGroup::id`] of the previous page).
    pub after: Option<String>,
    /// At most this many groups (default 50, clamped to 1..=100).
    pub limit: Option<u32>,
    /// Count acknowledged incidents too (default `true`). With `false`,
    /// acknowledged incidents are left out: the groups show only what nobody
    /// has taken on yet, and a group whose incidents are all acknowledged is
    /// not listed.
    pub include_acknowledged: bool,
}

impl Default for IncidentFilter {
    fn default() -> Self {
        IncidentFilter {
            flow: None,
            group: None,
            after: None,
            limit: None,
            include_acknowledged: true,
        }
    }
}

/// Groups of [`Flows::incident_groups`] when the filter sets no limit.
const DEFAULT_INCIDENT_GROUPS: u32 = 50;
/// Most groups [`Flows::incident_groups`] (and [`Flows::incidents`]) returns.
const MAX_INCIDENT_GROUPS: u32 = 100;
/// Most instances an [`IncidentGroup`] names.
const MAX_INSTANCES_PER_GROUP: u32 = 100;
/// Most incidents one [`Flows::group_incidents`] call returns.
const MAX_GROUP_INCIDENTS: u32 = 1000;

impl IncidentFilter {
    /// Every group (the same as `Default`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Groups of `flow`.
    pub fn flow(flow: impl Into<String>) -> Self {
        IncidentFilter {
            flow: Some(flow.into()),
            ..Default::default()
        }
    }

    /// Only groups of `flow`.
    #[must_use]
    pub fn in_flow(mut self, flow: impl Into<String>) -> Self {
        self.flow = Some(flow.into());
        self
    }

    /// Only the group `id`.
    #[must_use]
    pub fn group(mut self, id: impl Into<String>) -> Self {
        self.group = Some(id.into());
        self
    }

    /// The page after group `id`.
    #[must_use]
    pub fn after(mut self, id: impl Into<String>) -> Self {
        self.after = Some(id.into());
        self
    }

    /// At most `n` groups (clamped to 1..=100).
    #[must_use]
    pub fn limit(mut self, n: u32) -> Self {
        self.limit = Some(n);
        self
    }

    /// Whether to count acknowledged incidents.
    #[must_use]
    pub fn include_acknowledged(mut self, include: bool) -> Self {
        self.include_acknowledged = include;
        self
    }

    /// The limit applied: the one set (clamped to 1..=100), or 50.
    pub fn effective_limit(&self) -> u32 {
        self.limit
            .unwrap_or(DEFAULT_INCIDENT_GROUPS)
            .clamp(1, MAX_INCIDENT_GROUPS)
    }
}

/// One open incident: a step of an instance that needs an operator (or an
/// instance an operator paused).
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    /// `<instance>/<step key>` (see [`incident_id`] and [`parse_incident_id`]);
    /// `<instance>/` for a paused instance.
    pub id: String,
    /// The instance.
    pub instance: Uuid,
    /// The step's key, `<task>[.<participant>]/<phase>` (empty for a paused
    /// instance).
    pub step: String,
    /// The step itself, as the instance's state has it (`None` for a paused
    /// instance): pass it to [`Flows::retry_now`] or [`Flows::acknowledge`].
    pub step_id: Option<StepId>,
    /// The id of its [`IncidentGroup`].
    pub group_id: String,
    /// Flow name.
    pub flow: String,
    /// Task name (empty for a paused instance).
    pub task: String,
    /// `exhausted`, `compensation_failed`, `timed_out`, `paused`.
    pub kind: String,
    /// The last error (or the pause's reason).
    pub error: String,
    /// Attempts made.
    pub occurrences: i64,
    /// When the incident appeared.
    pub first_seen: DateTime<Utc>,
    /// When it last changed.
    pub last_seen: DateTime<Utc>,
    /// The operator's acknowledgement, if any.
    pub acknowledged: Option<Acknowledgement>,
}

/// The id of the incident of `step` of `instance`: `<instance>/<step key>`.
pub fn incident_id(instance: Uuid, step: &StepId) -> String {
    format!("{instance}/{}", step.key())
}

/// The instance and step of an incident id (`None`: not an incident id, or the
/// incident of a paused instance, which has no step). A TCC step key is read as
/// [`StepId::parse_key`] does; [`Incident::step_id`] is always exact.
pub fn parse_incident_id(id: &str) -> Option<(Uuid, StepId)> {
    let (instance, step) = split_incident_id(id)?;
    Some((instance, StepId::parse_key(step)?))
}

/// `<instance>/<step key>` as its instance and step key (possibly empty).
fn split_incident_id(id: &str) -> Option<(Uuid, &str)> {
    let (instance, step) = id.split_once('/')?;
    Some((Uuid::try_parse(instance).ok()?, step))
}

/// The columns of an [`Incident`] (`i`: `flow_incidents`, `f`: `flow_instances`).
const INCIDENT_COLUMNS: &str = "i.instance, i.step, i.flow, i.task, i.kind, i.error, \
     i.occurrences::bigint, i.first_seen, i.last_seen, i.acknowledged_by, i.acknowledged_note, \
     i.acknowledged_at, i.group_id, f.state -> 'steps' -> i.step -> 'step'";

fn incident_row(r: &Row) -> Incident {
    let instance: Uuid = r.get(0);
    let step: String = r.get(1);
    let kind: String = r.get(4);
    let error: String = r.get(5);
    let step_id = r
        .get::<_, Option<serde_json::Value>>(13)
        .and_then(|v| serde_json::from_value::<StepId>(v).ok())
        .or_else(|| StepId::parse_key(&step));
    let acknowledged = match (r.get(9), r.get(11)) {
        (Some(actor), Some(at)) => Some(Acknowledgement {
            actor,
            note: r.get::<_, Option<String>>(10).unwrap_or_default(),
            at,
            kind: kind.clone(),
            error: error.clone(),
        }),
        _ => None,
    };
    Incident {
        id: format!("{instance}/{step}"),
        instance,
        step,
        step_id,
        group_id: r.get(12),
        flow: r.get(2),
        task: r.get(3),
        kind,
        error,
        occurrences: r.get(6),
        first_seen: r.get(7),
        last_seen: r.get(8),
        acknowledged,
    }
}

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

    /// Instances matching `filter`, newest first by `(started_at DESC, id
    /// DESC)`, at most [`InstanceFilter::effective_limit`] of them, after
    /// [`InstanceFilter::page_after`] if set. A page shorter than the limit is
    /// the last one; otherwise continue with the last row's
    /// [`cursor`](InstanceSummary::cursor).
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
            "SELECT id, flow, definition_version, business_key, status, started_at, updated_at, \
                    last_position \
             FROM {} WHERE {INSTANCE_WHERE} \
               AND ($7::timestamptz IS NULL OR (started_at, id) < ($7, $8::uuid)) \
             ORDER BY started_at DESC, id DESC LIMIT $9",
            self.store().table("flow_instances")
        );
        let pattern = filter.key_pattern();
        let after = filter.page_after.map(|c| c.started_at);
        let after_id = filter.page_after.map(|c| c.id);
        let rows = client
            .query(
                &sql,
                &[
                    &filter.flow,
                    &filter.status.map(InstanceStatus::as_str),
                    &filter.business_key,
                    &filter.started_after,
                    &filter.started_before,
                    &pattern,
                    &after,
                    &after_id,
                    &filter.effective_limit(),
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
                last_position: Position(r.get(7)),
            })
            .collect())
    }

    /// How many instances match `filter` (its page and limit ignored).
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.count_instances", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema()))]
    pub async fn count_instances(&self, filter: &InstanceFilter) -> Result<i64, FlowError> {
        self.ready().await?;
        let client = self.store().pool().get().await?;
        let sql = format!(
            "SELECT count(*) FROM {} WHERE {INSTANCE_WHERE}",
            self.store().table("flow_instances")
        );
        let pattern = filter.key_pattern();
        let row = client
            .query_one(
                &sql,
                &[
                    &filter.flow,
                    &filter.status.map(InstanceStatus::as_str),
                    &filter.business_key,
                    &filter.started_after,
                    &filter.started_before,
                    &pattern,
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// How many instances each flow has in each status (only the pairs with at
    /// least one), ordered by flow and status: for metrics.
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.instance_counts", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema()))]
    pub async fn instance_counts(&self) -> Result<Vec<StatusCount>, FlowError> {
        self.ready().await?;
        let client = self.store().pool().get().await?;
        let sql = format!(
            "SELECT flow, status, count(*) FROM {} GROUP BY flow, status ORDER BY flow, status",
            self.store().table("flow_instances")
        );
        let rows = client.query(&sql, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| StatusCount {
                flow: r.get(0),
                status: r.get(1),
                count: r.get(2),
            })
            .collect())
    }

    /// The first page of every group of open incidents: the same as
    /// [`incident_groups`](Self::incident_groups) with a limit of 100 and no
    /// other filter (ordered by group id, each group naming at most 100 of its
    /// instances).
    ///
    /// # Errors
    /// Store errors.
    pub async fn incidents(&self) -> Result<Vec<IncidentGroup>, FlowError> {
        self.incident_groups(&IncidentFilter::default().limit(MAX_INCIDENT_GROUPS))
            .await
    }

    /// Open incidents grouped by flow, task, kind and error, ordered by the
    /// groups' [`id`](IncidentGroup::id) (stable, so the pages of a listing
    /// neither repeat nor skip a group that exists throughout), after
    /// [`IncidentFilter::after`] if set; each group names at most 100 of its
    /// instances (all of them are counted in [`IncidentGroup::instance_count`]).
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.incident_groups", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema()))]
    pub async fn incident_groups(
        &self,
        filter: &IncidentFilter,
    ) -> Result<Vec<IncidentGroup>, FlowError> {
        self.ready().await?;
        let client = self.store().pool().get().await?;
        let sql = format!(
            "SELECT group_id, flow, task, kind, error, \
                    (array_agg(DISTINCT instance ORDER BY instance))[1:{MAX_INSTANCES_PER_GROUP}], \
                    count(DISTINCT instance), \
                    count(DISTINCT instance) FILTER (WHERE acknowledged_at IS NOT NULL), \
                    sum(occurrences)::bigint, min(first_seen), max(last_seen) \
             FROM {} \
             WHERE ($1::text IS NULL OR flow = $1) AND ($2::text IS NULL OR group_id > $2) \
               AND ($3 OR acknowledged_at IS NULL) AND ($5::text IS NULL OR group_id = $5) \
             GROUP BY group_id, flow, task, kind, error ORDER BY group_id LIMIT $4",
            self.store().table("flow_incidents")
        );
        let limit = i64::from(filter.effective_limit());
        let rows = client
            .query(
                &sql,
                &[
                    &filter.flow,
                    &filter.after,
                    &filter.include_acknowledged,
                    &limit,
                    &filter.group,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| IncidentGroup {
                id: r.get(0),
                flow: r.get(1),
                task: r.get(2),
                kind: r.get(3),
                error: r.get(4),
                instances: r.get(5),
                instance_count: r.get(6),
                acknowledged: r.get(7),
                occurrences: r.get(8),
                first_seen: r.get(9),
                last_seen: r.get(10),
            })
            .collect())
    }

    /// The open incident with id `id` (`<instance>/<step key>`, as in
    /// [`Incident::id`]); `None` if there is none (or `id` is not an incident id).
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.incident", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema()))]
    pub async fn incident(&self, id: &str) -> Result<Option<Incident>, FlowError> {
        let Some((instance, step)) = split_incident_id(id) else {
            return Ok(None);
        };
        self.ready().await?;
        let client = self.store().pool().get().await?;
        let sql = format!(
            "SELECT {INCIDENT_COLUMNS} FROM {} i LEFT JOIN {} f ON f.id = i.instance \
             WHERE i.instance = $1 AND i.step = $2",
            self.store().table("flow_incidents"),
            self.store().table("flow_instances")
        );
        let row = client.query_opt(&sql, &[&instance, &step]).await?;
        Ok(row.as_ref().map(incident_row))
    }

    /// The open incidents of group `group_id` ([`IncidentGroup::id`]), at most
    /// `limit` (clamped to 1..=1000), ordered by instance and step.
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.group_incidents", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.store().schema()))]
    pub async fn group_incidents(
        &self,
        group_id: &str,
        limit: u32,
    ) -> Result<Vec<Incident>, FlowError> {
        self.ready().await?;
        let client = self.store().pool().get().await?;
        let sql = format!(
            "SELECT {INCIDENT_COLUMNS} FROM {} i LEFT JOIN {} f ON f.id = i.instance \
             WHERE i.group_id = $1 ORDER BY i.instance, i.step LIMIT $2",
            self.store().table("flow_incidents"),
            self.store().table("flow_instances")
        );
        let limit = i64::from(limit.clamp(1, MAX_GROUP_INCIDENTS));
        let rows = client.query(&sql, &[&group_id, &limit]).await?;
        Ok(rows.iter().map(incident_row).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::model::events::Phase;

    #[test]
    fn a_cursor_round_trips_through_text_and_serde() {
        let c = InstanceCursor {
            started_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        let text = c.to_string();
        assert_eq!(text, format!("1700000000123456.{}", c.id.simple()));
        assert_eq!(text.parse::<InstanceCursor>(), Ok(c));
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json, serde_json::Value::String(text));
        assert_eq!(serde_json::from_value::<InstanceCursor>(json).unwrap(), c);
        for bad in [
            "",
            "123",
            "x.0123456789abcdef0123456789abcdef",
            "1.0123456789abcdef0123456789abcde",
            "1.0123456789abcdef0123456789abcdeg",
            "99999999999999999999.0123456789abcdef0123456789abcdef",
        ] {
            assert!(bad.parse::<InstanceCursor>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<InstanceCursor>("\"nope\"").is_err());
    }

    #[test]
    fn like_metacharacters_are_escaped() {
        let f = InstanceFilter::new().key_contains(r"50%_off\now");
        assert_eq!(f.key_pattern().as_deref(), Some(r"%50\%\_off\\now%"));
        assert_eq!(InstanceFilter::new().key_pattern(), None);
    }

    #[test]
    fn limits_are_clamped() {
        assert_eq!(InstanceFilter::new().effective_limit(), 100);
        assert_eq!(InstanceFilter::new().limit(0).effective_limit(), 1);
        assert_eq!(InstanceFilter::new().limit(5000).effective_limit(), 1000);
        assert_eq!(IncidentFilter::new().effective_limit(), 50);
        assert_eq!(IncidentFilter::new().limit(0).effective_limit(), 1);
        assert_eq!(IncidentFilter::new().limit(500).effective_limit(), 100);
        assert!(IncidentFilter::default().include_acknowledged);
    }

    #[test]
    fn an_incident_id_reads_back() {
        let id = Uuid::new_v4();
        let step = StepId::participant("book", "hotel", Phase::Cancel);
        let text = incident_id(id, &step);
        assert_eq!(text, format!("{id}/book.hotel/cancel"));
        assert_eq!(parse_incident_id(&text), Some((id, step)));
        assert_eq!(parse_incident_id(&format!("{id}/")), None);
        assert_eq!(parse_incident_id("nope/ship/action"), None);
        assert_eq!(split_incident_id(&format!("{id}/")), Some((id, "")));
    }
}
