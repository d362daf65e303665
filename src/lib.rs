#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod command;
mod error;
mod flow;
mod outbox;
mod projection;
mod store;

pub use command::testing;
pub use command::{
    Command, CommandError, CommandExecutor, CommandOutcome, Concurrency, Decided, RetryPolicy,
};
pub use error::{Error, InvalidInput, Result};
pub use flow::{
    Action, BarrierOutcome, DefinitionError, FlowBuilder, FlowDefinition, FlowError, FlowStats,
    Flows, IncidentGroup, InstanceFilter, InstanceState, InstanceStatus, InstanceSummary,
    OnExhausted, Operator, Phase, SqlStatement, StartedInstance, StepId, StepState, StepStatus,
    TaskContext, TaskDefinition, TaskError, TaskExecutor, TaskRetry, Tcc, TccBarrier,
    TccParticipant, TccPhase, ValueType, Worker, WorkerOptions, events as flow_events, template,
    validate,
};
pub use outbox::{
    DeadLetter, NatsPublisher, OutboxMessage, OutboxRelay, PublishFailure, Publisher, RelayOptions,
    WebhookPublisher,
};
pub use projection::{
    BoxError, Decision, DecisionModel, Lag, ProjectionHandler, ProjectionRunner, Projector,
    RunnerError, Subscription, SubscriptionOptions,
};
pub use store::{
    AppendCondition, AppendResult, Cursor, DEFAULT_SCHEMA, Event, EventStream, Limits,
    ParseCursorError, Position, Query, QueryItem, ReadOptions, ReadResult, SequencedEvent,
    Snapshot, Store, StoreBuilder, TransactionId, pool_from_url,
};

pub use async_nats;
pub use deadpool_postgres;
pub use tokio_postgres;
pub use tokio_util::sync::CancellationToken;
