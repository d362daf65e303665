#![doc = include_str!("../README.md")]
//!
//! # Namespaces
//!
//! | path | what | feature |
//! |---|---|---|
//! | `dcbflow::*` | the DCB vocabulary: [`Store`], [`Event`], [`Query`], [`AppendCondition`], reads and cursors, decision models ([`Projector`], [`project`]), [`Subscription`]s, the [`ProjectionRunner`], the [`CommandExecutor`] | always |
//! | [`dcbflow::outbox`](outbox) | the relay, publishers, dead letters, consumer dedupe, the typed [`Envelope`](outbox::Envelope) | `outbox` |
//! | [`dcbflow::flow`](flow) | the flow engine: definitions, events, templates, workers, operations | `flow` |
//! | [`dcbflow::tcc`](tcc) | the participant-side try/confirm/cancel barrier | `tcc` |
//! | `dcbflow::metrics` | metric names and `describe()`, for the `metrics` facade | `metrics` |
//! | [`dcbflow::testing`](testing) | given / when / then tests of commands | always |
//!
//! Layers depend only downward: store → projection → command → outbox → flow
//! (see `docs/architecture.md`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod command;
#[cfg(feature = "flow")]
pub mod flow;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "outbox")]
pub mod outbox;
mod projection;
mod store;
#[cfg(feature = "tcc")]
pub mod tcc;

pub use backoff::Backoff;
pub use command::testing;
pub use command::{
    Command, CommandError, CommandExecutor, CommandOutcome, CommandRetry, Concurrency, Decided,
};
pub use projection::{
    BoxError, Checkpoint, Checkpoints, DecisionModel, Lag, Projected, ProjectionHandler,
    ProjectionRunner, Projector, RunnerError, Subscription, SubscriptionOptions, project,
    project_in_tx,
};
pub use store::{
    AppendCondition, AppendResult, Cursor, DEFAULT_GROUP_COMMIT, DEFAULT_SCHEMA, Error, Event,
    EventStream, InvalidInput, LayerStatus, Limits, MigrationStatus, ParseCursorError, Position,
    Query, QueryItem, ReadOptions, ReadResult, Result, SequencedEvent, Snapshot, Store,
    StoreBuilder, StoreStats, TransactionId, pool_from_url, sqlstate,
};

#[cfg(feature = "nats")]
pub use async_nats;
pub use deadpool_postgres;
pub use tokio_postgres;
pub use tokio_util::sync::CancellationToken;
