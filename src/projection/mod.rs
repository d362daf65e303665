//! The projection layer: decision models (several projectors folded in one
//! streaming pass), gap-free subscriptions, and named, checkpointed consumers
//! (the projection runner, and the lease the outbox relay also uses).
//!
//! Depends on the store only. Owns `sql/projection/` (the checkpoints table).

pub(crate) mod checkpoint;
mod decision;
mod projector;
mod runner;
mod subscription;

pub use checkpoint::{Checkpoint, Checkpoints, Lag};
pub use decision::{Projected, project, project_in_tx};
pub(crate) use projector::union as union_queries;
pub use projector::{DecisionModel, Projector};
#[cfg(feature = "outbox")]
pub(crate) use runner::Lease;
pub use runner::{BoxError, ProjectionHandler, ProjectionRunner, RunnerError};
pub use subscription::{Subscription, SubscriptionOptions};

use crate::store::migrate::{Layer, Migration};

/// The projection layer's schema: named checkpoints.
pub(crate) const SCHEMA: Layer = Layer {
    name: "projection",
    migrations: &[Migration {
        version: 1,
        name: "0001_checkpoints.sql",
        sql: include_str!("../../sql/projection/0001_checkpoints.sql"),
    }],
};
