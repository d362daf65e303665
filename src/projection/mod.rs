//! Decision models: several projectors folded in one streaming pass.

mod decision;
mod projector;
mod runner;
mod subscription;

pub use decision::Decision;
pub(crate) use projector::union as union_queries;
pub use projector::{DecisionModel, Projector};
pub(crate) use runner::Lease;
pub use runner::{BoxError, Lag, ProjectionHandler, ProjectionRunner, RunnerError};
pub use subscription::{Subscription, SubscriptionOptions};
