//! Operating flows: manual operations (each an event with who and why, refused
//! if the instance moved since the operator looked) and queries.

mod ops;
mod query;

pub use ops::Operator;
pub use query::{IncidentGroup, InstanceFilter, InstanceSummary};
