//! The dcbflow service: one binary, `dcbflow`, that runs the flow engine from a
//! config file with a REST API (OpenAPI 3.1), dcb.events-compatible endpoints,
//! Prometheus metrics, bearer-token auth and a CLI.
//!
//! See `docs/service.md` and `docs/api.md` in the repository.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod database;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod serve;
pub mod ui;
