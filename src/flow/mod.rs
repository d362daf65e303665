//! The flow engine: distributed transactions as flows of tasks, every instance
//! and step transition an event in the store's log (feature `flow`).
//!
//! Three rooms, with arrows only downward:
//! - `model`: the pure, database-free core: definitions, validation, templates,
//!   events, the state fold and every planning decision;
//! - `runtime`: the engine ([`Flows`]), transitions (commands of the command
//!   layer), workers and executors;
//! - `admin`: manual operations and queries.
//!
//! Depends on the command, projection, outbox and store layers. Owns
//! `sql/flow/` (the read models) and its [`FlowError`].

mod admin;
mod error;
mod model;
mod runtime;

pub use admin::{
    Incident, IncidentFilter, IncidentGroup, InstanceCursor, InstanceFilter, InstanceSummary,
    MAX_SIGNAL_ID, Operator, ParseInstanceCursorError, Signal, StatusCount, incident_id,
    parse_incident_id,
};
pub use error::{DefinitionError, FlowError};
pub use model::definition::{
    Action, AwaitEvent, FlowBuilder, FlowDefinition, ForEach, InputField, InputSpec,
    MAX_FOR_EACH_ITEMS, OnExhausted, SignalWait, SqlStatement, SubFlow, TaskDefinition, TaskRetry,
    Tcc, TccParticipant, ValueType, Wait,
};
pub use model::events::{self, FlowEvent, Phase, StepId};
pub use model::failure::TaskError;
pub use model::schedule::{MissedTicks, Schedule};
pub use model::state::{
    Acknowledgement, FanOut, InstanceState, InstanceStatus, ReceivedSignal, StepState, StepStatus,
    StepTimings,
};
pub use model::template;
pub use model::validate::{ALL_EXECUTORS, validate, validate_for};
#[cfg(feature = "grpc")]
pub use runtime::{DescriptorSetError, check_descriptor_set};
pub use runtime::{
    Drained, FlowStats, Flows, HttpPolicy, HttpRuleError, ScheduleState, StartedInstance,
    TaskContext, TaskExecutor, Worker, WorkerOptions,
};

use crate::store::migrate::{Layer, Migration};

/// The flow layer's schema: the read models of instances, wake-ups, incidents
/// (and, from 0002, the admin queries' indexes and incident acknowledgements;
/// from 0003, an index that lets most updates of an instance's row be HOT;
/// from 0004, the queries of waiting await_event tasks).
pub(crate) const SCHEMA: Layer = Layer {
    name: "flow",
    migrations: &[
        Migration {
            version: 1,
            name: "0001_flows.sql",
            sql: include_str!("../../sql/flow/0001_flows.sql"),
        },
        Migration {
            version: 2,
            name: "0002_admin.sql",
            sql: include_str!("../../sql/flow/0002_admin.sql"),
        },
        Migration {
            version: 3,
            name: "0003_hot_updates.sql",
            sql: include_str!("../../sql/flow/0003_hot_updates.sql"),
        },
        Migration {
            version: 4,
            name: "0004_await_event.sql",
            sql: include_str!("../../sql/flow/0004_await_event.sql"),
        },
    ],
};
