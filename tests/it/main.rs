//! Integration tests against a real PostgreSQL (see `tests/it/support`).

mod support;

mod append;
mod command;
mod conditions;
#[cfg(feature = "flow")]
mod drain;
#[cfg(feature = "flow")]
mod flow;
mod group_commit;
mod hostile;
#[cfg(all(feature = "flow", feature = "http"))]
mod https;
mod input;
#[cfg(feature = "metrics")]
mod metrics;
mod migrate;
#[cfg(feature = "nats")]
mod outbox;
mod read;
mod resilience;
mod security;
mod send;
mod settled;
mod subscription;
#[cfg(feature = "tcc")]
mod tcc_barrier;
