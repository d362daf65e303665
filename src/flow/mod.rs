//! The flow engine: distributed transactions as flows of tasks, all state in events.

mod definition;
mod engine;
mod error;
pub mod events;
mod executor;
mod messages;
mod ops;
mod participant;
mod plan;
mod query;
mod state;
pub mod template;
mod validate;
mod worker;

pub use definition::{
    Action, FlowBuilder, FlowDefinition, OnExhausted, SqlStatement, TaskDefinition, TaskRetry, Tcc,
    TccParticipant, ValueType,
};
pub use engine::{FlowStats, Flows, StartedInstance};
pub use error::{DefinitionError, FlowError};
pub use events::{Phase, StepId};
pub use executor::{TaskContext, TaskError, TaskExecutor};
pub use ops::Operator;
pub use participant::{BarrierOutcome, TccBarrier, TccPhase};
pub use query::{IncidentGroup, InstanceFilter, InstanceSummary};
pub use state::{InstanceState, InstanceStatus, StepState, StepStatus};
pub use validate::validate;
pub use worker::{Worker, WorkerOptions};
