//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`).
//!
//! dcbflow records into whatever recorder the application installs (for
//! example `metrics-exporter-prometheus`); without one, recording does nothing.
//! Without the feature, dcbflow has no `metrics` dependency and makes no call
//! at all. Names are stable; label sets are small and bounded (never instance
//! ids):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `dcbflow_appends_total` | counter | `result` = `ok`, `conflict`, `invalid`, `error` | appends by outcome, over every append path (plain, group commit, in the caller's transaction, commands and flow transitions) |
//! | `dcbflow_append_duration_seconds` | histogram | none | time of one append call, from the in-flight permit to its result |
//! | `dcbflow_step_attempts_total` | counter | `flow`, `task`, `outcome` = `succeeded`, `failed`, `timed_out` | finished attempts of flow steps (feature `flow`) |
//! | `dcbflow_step_duration_seconds` | histogram | `flow`, `task` | time an attempt's action took (a SQL step: with its transaction) |
//! | `dcbflow_step_queue_wait_seconds` | histogram | `flow` | from when a step became due to when a worker started it |
//!
//! Call [`describe`] once after installing the recorder, so that exporters know
//! the units and help texts.
//!
//! The layers record with these names themselves (each defines its own, this
//! module only gathers them): like `lib.rs`, this module sits above the layers.

/// `dcbflow_appends_total`: appends, by `result`.
pub const APPENDS_TOTAL: &str = crate::store::APPENDS_TOTAL;
/// `dcbflow_append_duration_seconds`: append durations.
pub const APPEND_DURATION_SECONDS: &str = crate::store::APPEND_DURATION_SECONDS;
/// `dcbflow_step_attempts_total`: flow step attempts, by `flow`, `task`, `outcome`.
#[cfg(feature = "flow")]
pub const STEP_ATTEMPTS_TOTAL: &str = crate::flow::Worker::STEP_ATTEMPTS_TOTAL;
/// `dcbflow_step_duration_seconds`: flow step attempt durations, by `flow`, `task`.
#[cfg(feature = "flow")]
pub const STEP_DURATION_SECONDS: &str = crate::flow::Worker::STEP_DURATION_SECONDS;
/// `dcbflow_step_queue_wait_seconds`: how long due steps waited for a worker, by `flow`.
#[cfg(feature = "flow")]
pub const STEP_QUEUE_WAIT_SECONDS: &str = crate::flow::Worker::STEP_QUEUE_WAIT_SECONDS;
/// Histogram of the delays before flow step retries, by flow and task.
#[cfg(feature = "flow")]
pub const STEP_RETRY_BACKOFF_SECONDS: &str = crate::flow::Worker::STEP_RETRY_BACKOFF_SECONDS;

/// Describes every dcbflow metric (unit and help text) to the installed
/// recorder. Call it once, after installing the recorder.
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        APPENDS_TOTAL,
        Unit::Count,
        "Appends to the event store, by result: ok, conflict (the append condition matched), invalid (refused input) or error."
    );
    describe_histogram!(
        APPEND_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one append to the event store, whatever its result."
    );
    #[cfg(feature = "flow")]
    {
        describe_counter!(
            STEP_ATTEMPTS_TOTAL,
            Unit::Count,
            "Finished attempts of flow steps, by flow, task and outcome: succeeded, failed or timed_out."
        );
        describe_histogram!(
            STEP_DURATION_SECONDS,
            Unit::Seconds,
            "Duration of one flow step attempt's action (SQL steps including their transaction), by flow and task."
        );
        describe_histogram!(
            STEP_QUEUE_WAIT_SECONDS,
            Unit::Seconds,
            "Time from when a flow step became due (its retry time, or the instance's previous event) to when a worker started it, by flow."
        );
        describe_histogram!(
            STEP_RETRY_BACKOFF_SECONDS,
            Unit::Seconds,
            "The delay a failed flow step attempt scheduled before its retry (backoff with jitter, or the executor's Retry-After), by flow and task."
        );
    }
}
