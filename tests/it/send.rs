//! Compile-time checks: every public future and stream can cross threads (so it
//! can be `tokio::spawn`ed), and the handles are `Send + Sync + 'static`.

use dcbflow::{
    BoxError, CancellationToken, Checkpoints, Command, CommandExecutor, Decided, EventStream,
    Position, ProjectionHandler, ProjectionRunner, Projector, Query, ReadOptions, SequencedEvent,
    Store, Subscription, SubscriptionOptions,
};

fn is_send<T: Send>(_: &T) {}
fn is_send_static<T: Send + 'static>() {}
fn is_sync<T: Sync>() {}

struct Noop;

impl ProjectionHandler for Noop {
    async fn apply(
        &self,
        _tx: &dcbflow::deadpool_postgres::Transaction<'_>,
        _events: &[SequencedEvent],
    ) -> Result<(), BoxError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

struct Touch;

impl Command for Touch {
    type Model = Projector<bool>;
    type Error = Never;
    fn command_type(&self) -> &str {
        "Touch"
    }
    fn model(&self) -> Projector<bool> {
        Projector::new(Query::items_of(["T"], ["t:1"]), false, |b, _| *b = true)
    }
    fn decide(&self, _: bool) -> Result<Decided, Never> {
        Ok(Decided::default())
    }
}

#[allow(dead_code)]
fn store_futures_and_streams_are_send(store: Store) {
    is_send_static::<EventStream>();
    is_send_static::<Store>();
    is_send(&store.append(vec![], None));
    let q = Query::all();
    is_send(&store.read(&q, ReadOptions::default()));
    is_send(&store.read_all(&q, ReadOptions::default()));
    is_send(&store.read_last(&q));
    is_send(&store.head());
    is_send(&store.migrate());
}

#[allow(dead_code)]
async fn projection_and_command_futures_are_send(store: Store) {
    let model = Projector::new(Query::all(), 0u64, |n, _| *n += 1);
    is_send(&dcbflow::project(&store, &model));
    is_send(&Subscription::connect(
        &store,
        Query::all(),
        None,
        SubscriptionOptions::default(),
    ));
    is_send_static::<Subscription>();
    let mut sub = Subscription::connect(&store, Query::all(), None, SubscriptionOptions::default())
        .await
        .unwrap();
    is_send(&sub.poll_batch());
    is_send(&sub.next_batch());
    let cancel = CancellationToken::new();
    is_send(&sub.next_batch_or_cancel(&cancel));
    is_send(&sub.into_stream());
    let checkpoints = Checkpoints::new(store.clone());
    is_send(&checkpoints.get("x"));
    is_send(&checkpoints.lag("x", &Query::all()));
    is_send(&checkpoints.wait_until_processed("x", Position(1), std::time::Duration::ZERO));
    let runner = ProjectionRunner::new(store.clone(), "x", Query::all(), Noop);
    is_send(&runner.run(cancel.clone()));
    let executor = CommandExecutor::new(store);
    is_send(&executor.execute(&Touch));
    is_send(&executor.migrate());
}

#[cfg(feature = "outbox")]
#[allow(dead_code)]
fn outbox_futures_are_send(store: Store, publisher: impl dcbflow::outbox::Publisher + 'static) {
    use dcbflow::outbox::{DeadLetters, OutboxRelay};
    let dead = DeadLetters::new(store.clone());
    is_send(&dead.list("x"));
    is_send(&dead.replay(1, &publisher));
    is_send(&dead.discard(1));
    let relay = OutboxRelay::new(store, "x", Query::all(), publisher);
    is_send(&relay.run(CancellationToken::new()));
}

#[cfg(feature = "flow")]
#[allow(dead_code)]
fn flow_futures_are_send(flows: dcbflow::flow::Flows, definition: dcbflow::flow::FlowDefinition) {
    use dcbflow::flow::{Operator, StepId, WorkerOptions};
    let id = uuid::Uuid::nil();
    let by = Operator::new("me", "test");
    let step = StepId::new("t", dcbflow::flow::Phase::Action);
    is_send(&flows.register(&definition));
    is_send(&flows.start("f", None, serde_json::json!({})));
    is_send(&flows.definition("f", None));
    is_send(&flows.instance(id));
    is_send(&flows.timeline(id));
    is_send(&flows.instances(&dcbflow::flow::InstanceFilter::default()));
    is_send(&flows.incidents());
    is_send(&flows.rebuild_read_models());
    is_send(&flows.retry_now(id, &step, Position(1), &by));
    is_send(&flows.skip(id, "t", serde_json::json!(null), Position(1), &by));
    is_send(&flows.abort(id, Position(1), &by));
    is_send(&flows.pause(id, Position(1), &by));
    is_send(&flows.resume(id, Position(1), &by));
    is_send(&flows.migrate());
    is_send(
        &flows
            .worker(WorkerOptions::default())
            .run(CancellationToken::new()),
    );
}

#[cfg(feature = "tcc")]
#[allow(dead_code)]
fn tcc_futures_are_send(
    barrier: dcbflow::tcc::TccBarrier,
    tx: &dcbflow::deadpool_postgres::Transaction<'_>,
) {
    is_send(&barrier.install(tx));
    is_send(&barrier.enter(tx, "i/t.p", dcbflow::tcc::TccPhase::Try));
}

#[test]
fn handles_are_sync() {
    is_sync::<Store>();
    is_sync::<CommandExecutor>();
    is_sync::<Checkpoints>();
    #[cfg(feature = "flow")]
    is_sync::<dcbflow::flow::Flows>();
}
