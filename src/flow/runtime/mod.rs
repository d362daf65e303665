//! The flow engine at work: [`Flows`] (definitions, starts, read models),
//! transitions as commands of the command layer, workers and executors.

mod awaits;
mod engine;
mod executor;
#[cfg(feature = "grpc")]
mod grpc;
mod messages;
mod scheduler;
mod transition;
mod wakeups;
mod worker;

pub use engine::{FlowStats, Flows, StartedInstance};
pub use executor::{HttpPolicy, HttpRuleError, TaskContext, TaskExecutor};
#[cfg(feature = "grpc")]
pub use grpc::{DescriptorSetError, check_descriptor_set};
pub use scheduler::ScheduleState;
pub(crate) use scheduler::Scheduler;
pub(crate) use transition::instance_query;
pub use worker::{Drained, Worker, WorkerOptions};
