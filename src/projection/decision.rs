//! Projecting a decision model from the store.

use futures::TryStreamExt;

use super::DecisionModel;
use crate::store::{AppendCondition, EventStream, Query, ReadOptions, Result, Store};

/// The states of a decision model and the condition that protects a decision
/// taken on them: what [`project`] returns.
#[derive(Debug, Clone)]
pub struct Projected<S> {
    /// The projected states.
    pub states: S,
    /// Fails an append if any event matching the model's query appeared that this
    /// projection did not see (including late committers).
    pub condition: AppendCondition,
}

/// Projects `model` from `store` in one streaming pass over the union of its
/// queries and returns the states with the append condition protecting a
/// decision on them.
///
/// Memory is that of the states: events are folded as they stream in.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store) -> dcbflow::Result<()> {
/// use dcbflow::{Projector, Query, project};
/// let capacity = Projector::new(Query::items_of(["CourseDefined"], ["course:c1"]), 0i64, |c, e| {
///     *c = e.data()["capacity"].as_i64().unwrap_or(0)
/// });
/// let enrolled = Projector::new(Query::items_of(["StudentEnrolled"], ["course:c1"]), 0i64, |n, _| *n += 1);
/// let projected = project(&store, &(capacity, enrolled)).await?;
/// let (capacity, enrolled) = projected.states;
/// # Ok(()) }
/// ```
///
/// # Errors
/// As [`Store::read`].
#[tracing::instrument(name = "dcbflow.project", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %store.schema()))]
pub async fn project<M: DecisionModel>(store: &Store, model: &M) -> Result<Projected<M::States>> {
    let query = model.query();
    let stream = store.read(&query, ReadOptions::default()).await?;
    fold(model, query, stream).await
}

/// Like [`project`], inside the caller's transaction (the pessimistic command
/// mode uses it after it has locked the scope).
///
/// # Errors
/// As [`Store::read`].
#[tracing::instrument(name = "dcbflow.project_in_tx", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %store.schema()))]
pub async fn project_in_tx<M: DecisionModel>(
    store: &Store,
    tx: &deadpool_postgres::Transaction<'_>,
    model: &M,
) -> Result<Projected<M::States>> {
    let query = model.query();
    let stream = store.read_in_tx(tx, &query, ReadOptions::default()).await?;
    fold(model, query, stream).await
}

async fn fold<M: DecisionModel>(
    model: &M,
    query: Query,
    mut stream: EventStream,
) -> Result<Projected<M::States>> {
    let mut states = model.initial_states();
    while let Some(event) = stream.try_next().await? {
        model.apply(&mut states, &event);
    }
    let cursor = stream.drain_cursor().await?;
    Ok(Projected {
        states,
        condition: AppendCondition::new(query).after(cursor),
    })
}
