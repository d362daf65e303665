//! Given / when / then tests for decision logic, without a database.
//!
//! ```
//! use dcbflow::testing::given;
//! # use dcbflow::{Command, Decided, Event, Projector, Query};
//! # use serde_json::json;
//! # struct BookSeat;
//! # #[derive(Debug, PartialEq, thiserror::Error)] #[error("taken")] struct Taken;
//! # impl Command for BookSeat {
//! #     type Model = Projector<bool>; type Error = Taken;
//! #     fn command_type(&self) -> &str { "BookSeat" }
//! #     fn model(&self) -> Projector<bool> { Projector::new(Query::items_of(["SeatBooked"], ["seat:A1"]), false, |b, _| *b = true) }
//! #     fn decide(&self, taken: bool) -> Result<Decided, Taken> {
//! #         if taken { Err(Taken) } else { Ok(vec![Event::new("SeatBooked", ["seat:A1"], json!({}))].into()) }
//! #     }
//! # }
//! let booked = Event::new("SeatBooked", ["seat:A1"], json!({}));
//! given([]).when(&BookSeat).then([booked.clone()]);
//! given([booked]).when(&BookSeat).then_error(|e| *e == Taken);
//! ```

use chrono::Utc;

use super::{Command, Decided};
use crate::projection::DecisionModel;
use crate::store::{Event, Position, SequencedEvent, TransactionId};

/// Starts a test with the events already in the log.
pub fn given(events: impl IntoIterator<Item = Event>) -> Given {
    Given {
        events: events
            .into_iter()
            .enumerate()
            .map(|(i, event)| SequencedEvent {
                position: Position(i as i64 + 1),
                transaction_id: TransactionId(1),
                recorded_at: Utc::now(),
                event,
            })
            .collect(),
    }
}

/// The log of a given/when/then test.
#[derive(Debug, Clone)]
pub struct Given {
    events: Vec<SequencedEvent>,
}

impl Given {
    /// Projects the command's decision model over the given events (with the store's
    /// matching rules) and runs its decision.
    pub fn when<C: Command>(&self, command: &C) -> Then<C::Error> {
        let model = command.model();
        let query = model.query();
        let mut states = model.initial_states();
        for e in self.events.iter().filter(|e| query.matches_sequenced(e)) {
            model.apply(&mut states, e);
        }
        Then {
            result: command.decide(states),
        }
    }
}

/// The decision of a given/when/then test.
#[derive(Debug)]
pub struct Then<E> {
    result: Result<Decided, E>,
}

impl<E: std::fmt::Debug> Then<E> {
    /// Asserts the command decided to append exactly `expected` (type, tag set and
    /// data compared; ids and metadata ignored).
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = Event>) {
        let decided = match self.result {
            Ok(d) => d,
            Err(e) => panic!("expected events, the command was rejected: {e:?}"),
        };
        let norm = |e: &Event| {
            let mut tags = e.tags.clone();
            tags.sort();
            tags.dedup();
            (e.event_type.clone(), tags, e.data.clone())
        };
        let got: Vec<_> = decided.events.iter().map(norm).collect();
        let want: Vec<_> = expected.into_iter().map(|e| norm(&e)).collect();
        assert_eq!(got, want, "decided events differ");
    }

    /// Asserts the command was rejected with an error satisfying `check`.
    #[track_caller]
    pub fn then_error(self, check: impl FnOnce(&E) -> bool) {
        match self.result {
            Ok(d) => panic!("expected a rejection, the command decided {:?}", d.events),
            Err(e) => assert!(check(&e), "unexpected rejection: {e:?}"),
        }
    }

    /// The raw decision, for custom assertions.
    pub fn into_result(self) -> Result<Decided, E> {
        self.result
    }
}
