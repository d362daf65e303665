//! `/api/v1/relays`: projections and outbox relays with their checkpoints and
//! lag; dead letters to list, replay or discard.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use dcbflow::Checkpoints;
use dcbflow::outbox::DeadLetters;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::Params;
use crate::app::App;
use crate::error::{ApiError, ApiResult};

/// A projection or relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Consumer {
    /// Checkpoint name.
    pub name: String,
    /// `relay`, `projection`, or `checkpoint` (in the store but not in the configuration).
    pub kind: String,
    /// Where a relay delivers.
    pub target: Option<String>,
    /// Position processed up to.
    pub checkpoint: i64,
    /// When the checkpoint last moved.
    pub updated_at: Option<DateTime<Utc>>,
    /// Matching events after the checkpoint (configured ones only).
    pub lag_events: Option<i64>,
    /// Age of the oldest of them, in seconds.
    pub lag_seconds: Option<f64>,
    /// Dead letters.
    pub dead_letters: i64,
}

/// Projections and relays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConsumerList {
    /// By name.
    pub items: Vec<Consumer>,
    /// The log's head.
    pub head: i64,
    /// Dead letters of every relay.
    pub dead_letters_total: i64,
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// Id.
    pub id: i64,
    /// The relay.
    pub relay: String,
    /// The event's position.
    pub position: i64,
    /// The message id it was published with.
    pub message_id: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
    /// When it was given up on.
    pub created_at: DateTime<Utc>,
}

impl From<dcbflow::outbox::DeadLetter> for DeadLetterView {
    fn from(d: dcbflow::outbox::DeadLetter) -> Self {
        DeadLetterView {
            id: d.id,
            relay: d.subscription,
            position: d.position.0,
            message_id: d.message_id,
            error: d.error,
            attempts: d.attempts,
            created_at: d.created_at,
        }
    }
}

/// A page of dead letters, by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterPage {
    /// The dead letters.
    pub items: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Dead letters in all.
    pub total: i64,
}

/// Paging of dead letters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterParams {
    /// Only this relay.
    pub relay: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// At most this many (default 100, at most 500).
    pub limit: Option<u32>,
}

/// What replaying or discarding did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterAction {
    /// The dead letter.
    pub id: i64,
    /// `replayed` or `discarded`.
    pub outcome: String,
}

/// Lists projections and relays with checkpoint and lag.
#[utoipa::path(get, path = "/api/v1/relays", tag = "relays",
    responses((status = 200, body = ConsumerList)))]
pub async fn list(State(app): State<App>) -> ApiResult<Json<ConsumerList>> {
    Ok(Json(consumers(&app).await?))
}

/// Every checkpoint, configured relays and projections with their lag.
///
/// # Errors
/// Store errors.
pub async fn consumers(app: &App) -> ApiResult<ConsumerList> {
    let checkpoints = Checkpoints::new(app.store.clone());
    let stored = checkpoints.list().await?;
    let per_relay = dead_letter_counts(app).await?;
    let count = |name: &str| per_relay.get(name).copied().unwrap_or(0);
    let mut items = Vec::new();
    for w in app.watched() {
        let lag = checkpoints.lag(&w.name, &w.query).await?;
        let row = stored.iter().find(|c| c.name == w.name);
        items.push(Consumer {
            checkpoint: lag.checkpoint.0,
            updated_at: row.map(|c| c.updated_at),
            lag_events: Some(lag.events_behind),
            lag_seconds: Some(lag.oldest_age().as_secs_f64()),
            dead_letters: count(&w.name),
            kind: w.kind.into(),
            target: w.target,
            name: w.name,
        });
    }
    for c in stored {
        if items.iter().any(|i| i.name == c.name) {
            continue;
        }
        items.push(Consumer {
            dead_letters: count(&c.name),
            name: c.name,
            kind: "checkpoint".into(),
            target: None,
            checkpoint: c.position.0,
            updated_at: Some(c.updated_at),
            lag_events: None,
            lag_seconds: None,
        });
    }
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ConsumerList {
        items,
        head: app.store.head().await?.map_or(0, |p| p.0),
        dead_letters_total: per_relay.values().sum(),
    })
}

/// Dead letters per relay, in one aggregate query.
async fn dead_letter_counts(app: &App) -> ApiResult<std::collections::BTreeMap<String, i64>> {
    let client = app.store.pool().get().await.map_err(dcbflow::Error::from)?;
    let sql = format!(
        "SELECT subscription, count(*) FROM \"{}\".dead_letters GROUP BY 1",
        app.store.schema()
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(dcbflow::Error::from)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Lists dead letters, oldest first.
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "relays", params(DeadLetterParams),
    responses((status = 200, body = DeadLetterPage)))]
pub async fn dead_letters(
    State(app): State<App>,
    Params(p): Params<DeadLetterParams>,
) -> ApiResult<Json<DeadLetterPage>> {
    Ok(Json(list_dead_letters(&app, &p).await?))
}

/// A page of dead letters.
///
/// # Errors
/// 400 for a bad cursor or limit.
pub async fn list_dead_letters(app: &App, p: &DeadLetterParams) -> ApiResult<DeadLetterPage> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_field("limit", "must be 1 to 500"));
    }
    let after = p
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::bad_field("cursor", "not a cursor this server handed out"))
        })
        .transpose()?;
    let dead = DeadLetters::new(app.store.clone());
    let mut items: Vec<DeadLetterView> = Vec::new();
    let mut next = after;
    // Filtering by relay may skip rows: read on until the page is full.
    loop {
        let page = dead.list_all(next, limit).await?;
        let full = page.len() == limit as usize;
        next = page.last().map(|d| d.id);
        items.extend(
            page.into_iter()
                .filter(|d| p.relay.as_ref().is_none_or(|r| &d.subscription == r))
                .map(DeadLetterView::from),
        );
        if !full || items.len() >= limit as usize {
            break;
        }
    }
    items.truncate(limit as usize);
    let next_cursor = (items.len() == limit as usize)
        .then(|| items.last().map(|d| d.id.to_string()))
        .flatten();
    Ok(DeadLetterPage {
        items,
        next_cursor,
        total: dead.count().await?,
    })
}

fn dead_letter_id(id: &str) -> ApiResult<i64> {
    id.parse()
        .map_err(|_| ApiError::bad_field("id", format!("{id:?} is not a dead letter id")))
}

/// Replays a dead letter through its relay's publisher.
#[utoipa::path(post, path = "/api/v1/dead-letters/{id}/replay", tag = "relays",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses(
        (status = 200, body = DeadLetterAction),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The destination refused it again (it stays)", body = crate::error::Problem, content_type = "application/problem+json"),
    ))]
pub async fn replay(
    State(app): State<App>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeadLetterAction>> {
    Ok(Json(replay_dead_letter(&app, dead_letter_id(&id)?).await?))
}

/// Replays a dead letter.
///
/// # Errors
/// 404; 409 when its relay is not configured here; 503 when publishing fails.
pub async fn replay_dead_letter(app: &App, id: i64) -> ApiResult<DeadLetterAction> {
    let dead = DeadLetters::new(app.store.clone());
    let letter = dead
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no dead letter {id}")))?;
    let relay = app
        .config
        .relays
        .iter()
        .find(|r| r.name == letter.subscription)
        .ok_or_else(|| {
            ApiError::conflict(
                "not_allowed",
                format!(
                    "relay {:?} is not configured in this server, so it has no publisher to replay with",
                    letter.subscription
                ),
            )
        })?;
    let publisher = crate::serve::publisher(relay).await?;
    let replayed = dead.replay(id, &publisher).await?;
    if !replayed {
        return Err(ApiError::not_found(format!("no dead letter {id}")));
    }
    Ok(DeadLetterAction {
        id,
        outcome: "replayed".into(),
    })
}

/// Discards a dead letter.
#[utoipa::path(post, path = "/api/v1/dead-letters/{id}/discard", tag = "relays",
    params(("id" = i64, Path, description = "Dead letter id")),
    responses((status = 200, body = DeadLetterAction), (status = 404, body = crate::error::Problem, content_type = "application/problem+json")))]
pub async fn discard(
    State(app): State<App>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeadLetterAction>> {
    Ok(Json(discard_dead_letter(&app, dead_letter_id(&id)?).await?))
}

/// Discards a dead letter.
///
/// # Errors
/// 404.
pub async fn discard_dead_letter(app: &App, id: i64) -> ApiResult<DeadLetterAction> {
    if !DeadLetters::new(app.store.clone()).discard(id).await? {
        return Err(ApiError::not_found(format!("no dead letter {id}")));
    }
    Ok(DeadLetterAction {
        id,
        outcome: "discarded".into(),
    })
}
