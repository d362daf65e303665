//! Integration tests against a real PostgreSQL (see `tests/it/support`).

mod support;

mod append;
mod command;
mod conditions;
mod flow;
mod group_commit;
mod input;
mod migrate;
mod outbox;
mod read;
mod resilience;
mod send;
mod subscription;
mod tcc_barrier;
