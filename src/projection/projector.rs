//! Projectors and their composition into decision models.

use std::fmt;
use std::sync::Arc;

use crate::store::{Query, SequencedEvent};

type Fold<S> = Arc<dyn Fn(&mut S, &SequencedEvent) + Send + Sync>;

/// A query, an initial state and a fold over the matching events.
///
/// ```
/// use dcbflow::{Projector, Query};
/// // How many students are enrolled in course c1?
/// let enrolled = Projector::new(
///     Query::items_of(["StudentEnrolled"], ["course:c1"]),
///     0u32,
///     |n, _event| *n += 1,
/// );
/// # let _ = enrolled;
/// ```
pub struct Projector<S> {
    query: Query,
    initial: S,
    fold: Fold<S>,
}

impl<S: Clone> Clone for Projector<S> {
    fn clone(&self) -> Self {
        Projector {
            query: self.query.clone(),
            initial: self.initial.clone(),
            fold: self.fold.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Projector<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Projector")
            .field("query", &self.query)
            .field("initial", &self.initial)
            .finish_non_exhaustive()
    }
}

impl<S> Projector<S> {
    /// A projector folding the events that match `query` into a state starting at `initial`.
    pub fn new(
        query: Query,
        initial: S,
        fold: impl Fn(&mut S, &SequencedEvent) + Send + Sync + 'static,
    ) -> Self {
        Projector {
            query,
            initial,
            fold: Arc::new(fold),
        }
    }

    /// The query.
    pub fn query(&self) -> &Query {
        &self.query
    }
}

/// Something that can be projected from the log in one pass: a [`Projector`], a
/// tuple of decision models (up to 8), or a `Vec` of projectors of one state type.
///
/// Each event of the pass goes only to the projectors whose query it matches.
pub trait DecisionModel: Send + Sync {
    /// The projected states (a tuple for a tuple of projectors).
    type States: Send;

    /// The union of the projectors' queries: what the pass reads, and what the
    /// append condition protecting the decision checks.
    fn query(&self) -> Query;

    /// The states before any event.
    fn initial_states(&self) -> Self::States;

    /// Folds one event into the states of the projectors whose query it matches.
    fn apply(&self, states: &mut Self::States, event: &SequencedEvent);
}

impl<S: Clone + Send + Sync> DecisionModel for Projector<S> {
    type States = S;

    fn query(&self) -> Query {
        self.query.clone()
    }

    fn initial_states(&self) -> S {
        self.initial.clone()
    }

    fn apply(&self, state: &mut S, event: &SequencedEvent) {
        if self.query.matches_sequenced(event) {
            (self.fold)(state, event);
        }
    }
}

impl<S: Clone + Send + Sync> DecisionModel for Vec<Projector<S>> {
    type States = Vec<S>;

    fn query(&self) -> Query {
        union(self.iter().map(|p| p.query.clone()))
    }

    fn initial_states(&self) -> Vec<S> {
        self.iter().map(|p| p.initial.clone()).collect()
    }

    fn apply(&self, states: &mut Vec<S>, event: &SequencedEvent) {
        for (p, s) in self.iter().zip(states.iter_mut()) {
            p.apply(s, event);
        }
    }
}

/// The union (OR) of queries; "all" if any of them is.
pub(crate) fn union(queries: impl IntoIterator<Item = Query>) -> Query {
    let mut items = Vec::new();
    for q in queries {
        if q.is_all() {
            return Query::all();
        }
        for item in q.items() {
            if !items.contains(item) {
                items.push(item.clone());
            }
        }
    }
    Query::from_items(items)
}

macro_rules! tuple_model {
    ($($name:ident $idx:tt),+) => {
        impl<$($name: DecisionModel),+> DecisionModel for ($($name,)+) {
            type States = ($($name::States,)+);

            fn query(&self) -> Query {
                union([$(self.$idx.query()),+])
            }

            fn initial_states(&self) -> Self::States {
                ($(self.$idx.initial_states(),)+)
            }

            fn apply(&self, states: &mut Self::States, event: &SequencedEvent) {
                $(self.$idx.apply(&mut states.$idx, event);)+
            }
        }
    };
}

tuple_model!(A 0);
tuple_model!(A 0, B 1);
tuple_model!(A 0, B 1, C 2);
tuple_model!(A 0, B 1, C 2, D 3);
tuple_model!(A 0, B 1, C 2, D 3, E 4);
tuple_model!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_model!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_model!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Event, Position, QueryItem, TransactionId};
    use serde_json::json;

    fn seq(p: i64, ty: &str, tags: &[&str]) -> SequencedEvent {
        SequencedEvent {
            position: Position(p),
            transaction_id: TransactionId(1),
            recorded_at: chrono::Utc::now(),
            event: Event::new(ty, tags.iter().copied(), json!({})),
        }
    }

    #[test]
    fn events_reach_only_matching_projectors() {
        let course = Projector::new(
            Query::items_of(["Enrolled"], ["course:c1"]),
            0,
            |n: &mut i32, _| *n += 1,
        );
        let student = Projector::new(
            Query::items_of(["Enrolled"], ["student:s1"]),
            0,
            |n: &mut i32, _| *n += 1,
        );
        let model = (course, student);
        let mut states = model.initial_states();
        for e in [
            seq(1, "Enrolled", &["course:c1", "student:s2"]),
            seq(2, "Enrolled", &["course:c2", "student:s1"]),
            seq(3, "Enrolled", &["course:c1", "student:s1"]),
            seq(4, "Other", &["course:c1", "student:s1"]),
        ] {
            model.apply(&mut states, &e);
        }
        assert_eq!(states, (2, 2));
        assert_eq!(model.query().items().len(), 2);
    }

    #[test]
    fn union_deduplicates_and_absorbs_all() {
        let a = Query::from_items([QueryItem::new().tags(["x"])]);
        assert_eq!(union([a.clone(), a.clone()]).items().len(), 1);
        assert!(union([a, Query::all()]).is_all());
        assert!(union(Vec::<Query>::new()).is_empty());
    }
}
