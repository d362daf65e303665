//! `await_event` at run time: the event waker and the look for the event.
//!
//! While an `await_event` task waits, its query is a row of `flow_awaits`
//! (written by `flow_sync` in the transition that reached the task). The
//! waker is a subscription on the whole log, which delivers every event in
//! position order below the writer horizon, late committers in their place.
//! It matches each batch of events against `flow_awaits` in one statement and
//! makes the matching instances due at once in `flow_wakeups`. The worker that
//! claims such an instance reads the log for the first matching event and
//! records it as the task's output.
//!
//! Nothing is missed between the waker's start and an instance's wait:
//! - the waker subscribes after the settled head, and first makes every waiting
//!   instance due (so an event appended before it started is found by the
//!   worker's read);
//! - a worker reads the log right after the transition that reached the task
//!   (so an event committed before that is found), and an event committed
//!   after it finds the task's row in `flow_awaits`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::engine::Flows;
use crate::flow::FlowError;
use crate::flow::model::events::StepId;
use crate::flow::model::state::{InstanceState, InstanceStatus, StepStatus};
use crate::projection::{Subscription, SubscriptionOptions};
use crate::store::{Query, QueryItem, ReadOptions, SequencedEvent};

/// One worker run's event waker, started on first need.
pub(crate) struct EventWaker {
    flows: Flows,
    /// The worker loop's wake-up: claim now.
    wake: Arc<Notify>,
    stop: CancellationToken,
    started: AtomicBool,
}

impl EventWaker {
    pub(crate) fn new(flows: Flows, wake: Arc<Notify>, stop: CancellationToken) -> Arc<Self> {
        Arc::new(EventWaker {
            flows,
            wake,
            stop,
            started: AtomicBool::new(false),
        })
    }

    /// Starts the waker unless it runs already (it runs until the worker stops).
    pub(crate) fn ensure(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(
            async move {
                while !me.stop.is_cancelled() {
                    match me.run().await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "the await_event waker failed; restarting");
                            tokio::select! {
                                () = me.stop.cancelled() => break,
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            }
            .instrument(tracing::debug_span!("dcbflow.worker.event_waker")),
        );
    }

    /// Whether any await_event task waits now (the waker is started at once then).
    pub(crate) async fn any_waiting(flows: &Flows) -> Result<bool, FlowError> {
        let client = flows.store().pool().get().await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {})",
                    flows.store().table("flow_awaits")
                ),
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    async fn run(&self) -> Result<(), FlowError> {
        let store = self.flows.store();
        let awaits = store.table("flow_awaits");
        let wakeups = store.table("flow_wakeups");
        let upsert = format!(
            "ON CONFLICT (instance) DO UPDATE SET due_at = LEAST({wakeups}.due_at, EXCLUDED.due_at)"
        );
        let head = store.settled_head().await?;
        // Whatever was appended before now is found by the workers' reads.
        let client = store.pool().get().await?;
        let swept = client
            .execute(
                &format!(
                    "INSERT INTO {wakeups} (instance, due_at) \
                     SELECT DISTINCT instance, now() FROM {awaits} {upsert}"
                ),
                &[],
            )
            .await?;
        drop(client);
        if swept > 0 {
            self.wake.notify_one();
        }
        let mut sub = Subscription::connect(
            store,
            Query::all(),
            Some(head),
            SubscriptionOptions::default(),
        )
        .await?;
        let matched = format!(
            "INSERT INTO {wakeups} (instance, due_at) \
             SELECT DISTINCT a.instance, now() \
               FROM {awaits} a \
               JOIN jsonb_to_recordset($1::jsonb) AS e(type text, tags text[]) \
                 ON (cardinality(a.types) = 0 OR e.type = ANY (a.types)) AND a.tags <@ e.tags \
             {upsert}"
        );
        while let Some(batch) = sub.next_batch_or_cancel(&self.stop).await? {
            // The engine's own events are not facts anyone awaits, but for an
            // instance's end, which its parent's `flow` task awaits.
            let facts: Vec<Value> = batch
                .iter()
                .filter(|e| {
                    super::worker::FINAL_TYPES.contains(&e.event_type())
                        || !e.tags().iter().any(|t| {
                            t.starts_with("flow_instance:") || t.starts_with("flow_definition:")
                        })
                })
                .map(|e| json!({"type": e.event_type(), "tags": e.tags()}))
                .collect();
            if facts.is_empty() {
                continue;
            }
            let client = store.pool().get().await?;
            let stmt = client.prepare_cached(&matched).await?;
            let n = client.execute(&stmt, &[&Value::Array(facts)]).await?;
            if n > 0 {
                self.wake.notify_one();
            }
        }
        Ok(())
    }
}

/// The first event in the log matching a waiting await_event step of `state`,
/// with the step.
pub(crate) async fn awaited(
    flows: &Flows,
    state: &InstanceState,
) -> Result<Option<(StepId, SequencedEvent)>, FlowError> {
    if state.status != InstanceStatus::Running {
        return Ok(None);
    }
    for (key, wanted) in &state.awaiting {
        let Some(step) = state
            .steps
            .get(key)
            .filter(|s| s.status == StepStatus::Waiting)
        else {
            continue;
        };
        let mut item = QueryItem::new().tags(wanted.tags.iter().cloned());
        if !wanted.types.is_empty() {
            item = item.types(wanted.types.iter().cloned());
        }
        let found = flows
            .store()
            .read_all(&Query::from_items([item]), ReadOptions::default().limit(1))
            .await?;
        if let Some(e) = found.events.into_iter().next() {
            return Ok(Some((step.step.clone(), e)));
        }
    }
    Ok(None)
}

/// An event as an await_event task's output.
pub(crate) fn output(e: &SequencedEvent) -> Value {
    json!({
        "position": e.position.0,
        "type": e.event_type(),
        "tags": e.tags(),
        "data": e.data(),
        "recorded_at": e.recorded_at,
    })
}
