//! Decision models: several projectors folded in one streaming pass.

mod decision;
mod projector;

pub use decision::Decision;
pub(crate) use projector::union as union_queries;
pub use projector::{DecisionModel, Projector};
