//! Projecting a decision model from the store.

use futures::TryStreamExt;

use super::DecisionModel;
use crate::{AppendCondition, ReadOptions, Result, Store};

/// The states of a decision model and the condition that protects a decision
/// taken on them.
#[derive(Debug, Clone)]
pub struct Decision<S> {
    /// The projected states.
    pub states: S,
    /// Fails an append if any event matching the model's query appeared that this
    /// projection did not see (including late committers).
    pub condition: AppendCondition,
}

impl Store {
    /// Projects `model` in one streaming pass over the union of its queries and
    /// returns the states with the append condition protecting a decision on them.
    ///
    /// Memory is that of the states: events are folded as they stream in.
    ///
    /// ```no_run
    /// # async fn demo(store: dcbflow::Store) -> dcbflow::Result<()> {
    /// use dcbflow::{Projector, Query};
    /// let capacity = Projector::new(Query::items_of(["CourseDefined"], ["course:c1"]), 0i64, |c, e| {
    ///     *c = e.data()["capacity"].as_i64().unwrap_or(0)
    /// });
    /// let enrolled = Projector::new(Query::items_of(["StudentEnrolled"], ["course:c1"]), 0i64, |n, _| *n += 1);
    /// let decision = store.project(&(capacity, enrolled)).await?;
    /// let (capacity, enrolled) = decision.states;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`read`](Store::read).
    pub async fn project<M: DecisionModel>(&self, model: &M) -> Result<Decision<M::States>> {
        let query = model.query();
        let stream = self.read(&query, ReadOptions::default()).await?;
        fold(model, query, stream).await
    }

    /// Like [`project`](Self::project), inside the caller's transaction (used by the
    /// pessimistic command mode after it has locked the scope).
    ///
    /// # Errors
    /// As [`read`](Store::read).
    pub async fn project_in_tx<M: DecisionModel>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        model: &M,
    ) -> Result<Decision<M::States>> {
        let query = model.query();
        let stream = self.read_in_tx(tx, &query, ReadOptions::default()).await?;
        fold(model, query, stream).await
    }
}

async fn fold<M: DecisionModel>(
    model: &M,
    query: crate::Query,
    mut stream: crate::EventStream,
) -> Result<Decision<M::States>> {
    let mut states = model.initial_states();
    while let Some(event) = stream.try_next().await? {
        model.apply(&mut states, &event);
    }
    let cursor = stream.drain_cursor().await?;
    Ok(Decision {
        states,
        condition: AppendCondition::new(query).after(cursor),
    })
}
