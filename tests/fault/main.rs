//! Fault injection against a PostgreSQL this test process owns (a throwaway
//! cluster per scenario, started from the installed server binaries, which the
//! scenarios restart, kill and cut off). Never the shared server on 5432.
//!
//! `cargo test --test fault -- --nocapture` prints every figure and verdict;
//! `DCBFLOW_FAULT_LONG=1` runs longer and heavier variants. See
//! `docs/reliability.md`, section "Fault injection".

mod support;

mod backend_kill;
mod crash_restart;
mod killed_processes;
mod network;
mod pool_exhaustion;
