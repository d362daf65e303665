//! Subscriptions and projection runners: no skipped event, no stall, exactly-once
//! read models, competing consumers.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dcbflow::{
    BoxError, CancellationToken, Position, ProjectionHandler, ProjectionRunner, Query,
    SequencedEvent, Store, SubscriptionOptions,
};
use rand::Rng;

use crate::support::{DEADLINE, TestStore, ev, eventually, race};

/// What a subscription delivered so far: positions and arrival times.
type Seen = Arc<std::sync::Mutex<Vec<(Position, Instant)>>>;

/// Collects everything a subscription delivers, in order, until cancelled; what
/// arrived so far is in the returned `Seen`.
fn collect(
    store: &Store,
    query: Query,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Vec<(Position, Instant)>>,
    Seen,
) {
    let cancel = CancellationToken::new();
    let seen = Seen::default();
    let (store, token, so_far) = (store.clone(), cancel.clone(), seen.clone());
    let task = tokio::spawn(async move {
        let mut sub =
            dcbflow::Subscription::connect(&store, query, None, SubscriptionOptions::default())
                .await
                .unwrap();
        while let Some(batch) = sub.next_batch_or_cancel(&token).await.unwrap() {
            let now = Instant::now();
            so_far
                .lock()
                .unwrap()
                .extend(batch.iter().map(|e| (e.position, now)));
        }
        so_far.lock().unwrap().clone()
    });
    (cancel, task, seen)
}

/// Waits until the subscription collecting into `seen` has delivered `position`.
async fn delivered(seen: &Seen, position: Position) {
    eventually(
        &format!("position {position} is delivered"),
        DEADLINE,
        move || async move {
            let seen = seen.lock().unwrap();
            seen.iter().any(|(p, _)| *p == position).then_some(())
        },
    )
    .await;
}

/// 16 writers that take their positions early and commit late, while a subscriber
/// runs: every event is delivered exactly once, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_commits_are_delivered_exactly_once_in_order() {
    let t = TestStore::new().await;
    let (cancel, subscriber, so_far) = collect(&t.store, Query::all());
    let mut written = Vec::new();
    for round in 0..4 {
        let positions = race(16, |w| {
            let store = t.store.clone();
            async move {
                let mut mine = Vec::new();
                for i in 0..8 {
                    let mut client = store.pool().get().await.unwrap();
                    let tx = client.transaction().await.unwrap();
                    let r = store
                        .append_in_tx(&tx, vec![ev("E", &[&format!("w:{round}-{w}-{i}")])], None)
                        .await
                        .unwrap();
                    let delay = rand::rng().random_range(0..25);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    tx.commit().await.unwrap();
                    mine.extend(r.positions);
                }
                mine
            }
        })
        .await;
        written.extend(positions.into_iter().flatten());
    }
    let expected: HashSet<Position> = written.iter().copied().collect();
    // A marker appended after every writer committed: once it is delivered, so is
    // every event before it that ever will be (delivery is in position order).
    let marker = t
        .store
        .append(vec![ev("Marker", &[])], None)
        .await
        .unwrap()
        .positions[0];
    delivered(&so_far, marker).await;
    cancel.cancel();
    let mut seen: Vec<Position> = subscriber
        .await
        .unwrap()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "delivered out of order or twice"
    );
    assert_eq!(seen.pop(), Some(marker), "the marker comes last");
    assert_eq!(seen.len(), expected.len(), "every event exactly once");
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
}

/// A session idle in a transaction (holding a transaction id, as the xmin horizon
/// sees it) for 10 s while appends go on: deliveries keep flowing within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_elsewhere_does_not_stall_delivery() {
    let t = TestStore::new().await;
    let idle = t.raw().await;
    idle.batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();
    let (cancel, subscriber, so_far) =
        collect(&t.store, Query::items_of(["Tick"], Vec::<String>::new()));
    let mut appended = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let r = t.store.append(vec![ev("Tick", &[])], None).await.unwrap();
        appended.push((r.positions[0], Instant::now()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The last tick arrives while the session is still idle (a delivery stalled
    // behind it would wait for the ROLLBACK below, which comes only after this).
    delivered(&so_far, appended.last().unwrap().0).await;
    cancel.cancel();
    let seen = subscriber.await.unwrap();
    assert_eq!(
        seen.len(),
        appended.len(),
        "every tick delivered while the session was idle"
    );
    for ((p, sent), (q, got)) in appended.iter().zip(&seen) {
        assert_eq!(p, q);
        // Within ten poll intervals: prompt, with room for a loaded machine.
        let latency = got.saturating_duration_since(*sent);
        assert!(
            latency < Duration::from_secs(5),
            "event {p} took {latency:?}"
        );
    }
    idle.batch_execute("ROLLBACK").await.unwrap();
}

/// Records every event in a read-model table whose primary key rejects duplicates;
/// flags overlapping batches.
struct Recorder {
    table: String,
    busy: Arc<AtomicBool>,
    overlaps: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
}

impl ProjectionHandler for Recorder {
    async fn apply(
        &self,
        tx: &dcbflow::deadpool_postgres::Transaction<'_>,
        events: &[SequencedEvent],
    ) -> Result<(), BoxError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        for e in events {
            tx.execute(
                &format!("INSERT INTO {} (position) VALUES ($1)", self.table),
                &[&e.position.0],
            )
            .await?;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.busy.store(false, Ordering::SeqCst);
        Ok(())
    }
}

async fn read_model_count(t: &TestStore, table: &str) -> i64 {
    let c = t.store.pool().get().await.unwrap();
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projection_runner_applies_each_event_once_and_resumes_from_its_checkpoint() {
    let t = TestStore::new().await;
    let table = format!("\"{}\".read_model", t.schema);
    let c = t.store.pool().get().await.unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE {table} (position bigint PRIMARY KEY)"
    ))
    .await
    .unwrap();
    let recorder = || Recorder {
        table: table.clone(),
        busy: Default::default(),
        overlaps: Default::default(),
        batches: Default::default(),
    };
    let q = Query::items_of(["Order"], Vec::<String>::new());
    for _ in 0..30 {
        t.store
            .append(vec![ev("Order", &[]), ev("Other", &[])], None)
            .await
            .unwrap();
    }
    let cancel = CancellationToken::new();
    let runner = ProjectionRunner::new(t.store.clone(), "orders", q.clone(), recorder());
    let token = cancel.clone();
    let task = tokio::spawn(async move { runner.run(token).await });
    // Read-your-writes: wait for the runner to pass the last append.
    let last = t
        .store
        .append(vec![ev("Other", &[])], None)
        .await
        .unwrap()
        .positions[0];
    assert!(
        dcbflow::Checkpoints::new(t.store.clone())
            .wait_until_processed("orders", last, DEADLINE)
            .await
            .unwrap()
    );
    assert_eq!(read_model_count(&t, &table).await, 30);
    cancel.cancel();
    task.await.unwrap().unwrap();

    // More events while it is down; a new runner resumes from the checkpoint.
    for _ in 0..10 {
        t.store.append(vec![ev("Order", &[])], None).await.unwrap();
    }
    let lag = dcbflow::Checkpoints::new(t.store.clone())
        .lag("orders", &q)
        .await
        .unwrap();
    assert_eq!(lag.events_behind, 10);
    assert!(lag.oldest_undelivered.is_some());
    let cancel = CancellationToken::new();
    let runner = ProjectionRunner::new(t.store.clone(), "orders", q.clone(), recorder());
    let token = cancel.clone();
    let task = tokio::spawn(async move { runner.run(token).await });
    let last = t.store.head().await.unwrap().unwrap();
    assert!(
        dcbflow::Checkpoints::new(t.store.clone())
            .wait_until_processed("orders", last, DEADLINE)
            .await
            .unwrap()
    );
    assert_eq!(read_model_count(&t, &table).await, 40);
    assert_eq!(
        dcbflow::Checkpoints::new(t.store.clone())
            .lag("orders", &q)
            .await
            .unwrap()
            .events_behind,
        0
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Two processes run the same named subscription: never both at once; when the
/// active one dies, the other takes over within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn competing_consumers_take_turns_and_fail_over() {
    let t = TestStore::new().await;
    let table = format!("\"{}\".read_model", t.schema);
    let c = t.store.pool().get().await.unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE {table} (position bigint PRIMARY KEY)"
    ))
    .await
    .unwrap();
    let busy = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let batches: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Default::default()).collect();
    let mut tasks = Vec::new();
    for counter in &batches {
        // A second store = a second process (its own pool and connections).
        let store = Store::builder_for_url(&t.url, Some(4))
            .unwrap()
            .schema(&t.schema)
            .build()
            .await
            .unwrap();
        let runner = ProjectionRunner::new(
            store,
            "shared",
            Query::all(),
            Recorder {
                table: table.clone(),
                busy: busy.clone(),
                overlaps: overlaps.clone(),
                batches: counter.clone(),
            },
        )
        .lease_retry(Duration::from_millis(200));
        tasks.push(tokio::spawn(async move {
            runner.run(CancellationToken::new()).await
        }));
    }
    for _ in 0..100 {
        t.store.append(vec![ev("E", &[])], None).await.unwrap();
    }
    let last = t.store.head().await.unwrap().unwrap();
    assert!(
        dcbflow::Checkpoints::new(t.store.clone())
            .wait_until_processed("shared", last, DEADLINE)
            .await
            .unwrap()
    );
    let active = if batches[0].load(Ordering::SeqCst) > 0 {
        0
    } else {
        1
    };
    assert_eq!(
        batches[1 - active].load(Ordering::SeqCst),
        0,
        "only the lease holder processes"
    );

    // Kill the active process: its task and connections go away.
    tasks[active].abort();
    let killed_at = Instant::now();
    for _ in 0..50 {
        t.store.append(vec![ev("E", &[])], None).await.unwrap();
    }
    let last = t.store.head().await.unwrap().unwrap();
    assert!(
        dcbflow::Checkpoints::new(t.store.clone())
            .wait_until_processed("shared", last, DEADLINE)
            .await
            .unwrap()
    );
    // Within seconds: the lease is the dead session's lock, free as soon as
    // PostgreSQL sees the session end (no expiry to wait for); room for a loaded machine.
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "took over in {:?}",
        killed_at.elapsed()
    );
    assert!(
        batches[1 - active].load(Ordering::SeqCst) > 0,
        "the survivor took over"
    );
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "never two batches at once"
    );
    assert_eq!(read_model_count(&t, &table).await, 150);
    tasks[1 - active].abort();
}

/// Appends commit without notifying and the wake-up follows the commit: through
/// the pool, group commit, the command executor and a caller's transaction, each
/// append wakes a subscriber (of another store handle, as in another process) whose
/// fallback poll would not come for a minute.
#[tokio::test]
async fn every_append_path_wakes_a_sleeping_subscriber() {
    let t = TestStore::new().await;
    let mut options = SubscriptionOptions::default();
    options.poll_interval = Duration::from_secs(60);
    let mut sub = dcbflow::Subscription::connect(&t.store, Query::all(), None, options)
        .await
        .unwrap();
    assert!(sub.poll_batch().await.unwrap().is_empty());
    // The writers below do not migrate: the command log comes from this handle.
    dcbflow::CommandExecutor::new(t.store.clone())
        .migrate()
        .await
        .unwrap();
    let writer = || {
        Store::builder_for_url(&t.url, Some(4))
            .unwrap()
            .schema(&t.schema)
            .migrate(false)
    };
    let plain = writer().group_commit(0).build().await.unwrap();
    let grouped = writer().group_commit(8).build().await.unwrap();
    let executor = dcbflow::CommandExecutor::new(plain.clone());
    for path in ["pool", "group commit", "command", "caller's transaction"] {
        // The subscriber has looked and found nothing, so it only looks again when
        // woken (or after a minute): the append may come any time from now on.
        assert!(sub.poll_batch().await.unwrap().is_empty(), "{path}");
        let (plain, grouped, executor) = (plain.clone(), grouped.clone(), executor.clone());
        let append = tokio::spawn(async move {
            // Most likely once the subscriber sleeps; if sooner, its wake-up waits for it.
            tokio::time::sleep(Duration::from_millis(300)).await;
            match path {
                "pool" => drop(plain.append(vec![ev("E", &["p:1"])], None).await.unwrap()),
                "group commit" => {
                    drop(grouped.append(vec![ev("E", &["p:2"])], None).await.unwrap())
                }
                "command" => drop(
                    executor
                        .execute(&crate::command::take("woken", 10))
                        .await
                        .unwrap(),
                ),
                _ => {
                    let mut client = plain.pool().get().await.unwrap();
                    let tx = client.transaction().await.unwrap();
                    plain
                        .append_in_tx(&tx, vec![ev("E", &["p:3"])], None)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            }
        });
        // 30 s, half the poll interval: only a wake-up gets the event here in time.
        let woken = async {
            loop {
                sub.wait().await;
                let batch = sub.poll_batch().await.unwrap();
                if !batch.is_empty() {
                    return batch;
                }
            }
        };
        let batch = tokio::time::timeout(Duration::from_secs(30), woken)
            .await
            .unwrap_or_else(|_| panic!("an append through {path} did not wake the subscriber"));
        append.await.unwrap();
        assert_eq!(batch.len(), 1, "{path}");
    }
}

/// Wake-ups go out only while someone else listens on the store's channel: a
/// writer with no listener anywhere sends none, nor does one whose only listener
/// is its own (its subscription is woken in memory, within 30 s where its poll
/// interval is a minute); once a subscription of another handle listens, the
/// writer's wake-ups reach it (as fast: only a wake-up delivers in time).
#[tokio::test]
async fn wakeups_are_sent_only_while_someone_listens() {
    let t = TestStore::new().await;
    let writer = Store::builder_for_url(&t.url, Some(4))
        .unwrap()
        .schema(&t.schema)
        .migrate(false)
        .group_commit(0)
        .build()
        .await
        .unwrap();
    for _ in 0..5 {
        writer.append(vec![ev("E", &["w:1"])], None).await.unwrap();
    }
    eventually("a wake-up skipped", DEADLINE, || async {
        (writer.stats().wakeups_skipped > 0).then_some(())
    })
    .await;
    assert_eq!(writer.stats().wakeups_sent, 0, "no one listens");

    let mut options = SubscriptionOptions::default();
    options.poll_interval = Duration::from_secs(60);
    let head = t.store.head().await.unwrap();
    let mut own = dcbflow::Subscription::connect(&writer, Query::all(), head, options.clone())
        .await
        .unwrap();
    assert!(own.poll_batch().await.unwrap().is_empty());
    let skipped = writer.stats().wakeups_skipped;
    let appended = tokio::spawn({
        let writer = writer.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            writer.append(vec![ev("E", &["w:1"])], None).await.unwrap();
        }
    });
    let woken = async {
        loop {
            own.wait().await;
            if !own.poll_batch().await.unwrap().is_empty() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), woken)
        .await
        .expect("the writer's own subscription is woken in memory");
    appended.await.unwrap();
    eventually("the wake-up skipped", DEADLINE, || async {
        (writer.stats().wakeups_skipped > skipped).then_some(())
    })
    .await;
    assert_eq!(
        writer.stats().wakeups_sent,
        0,
        "only the writer's own listener"
    );
    drop(own);

    let head = t.store.head().await.unwrap();
    let mut sub = dcbflow::Subscription::connect(&t.store, Query::all(), head, options)
        .await
        .unwrap();
    assert!(sub.poll_batch().await.unwrap().is_empty());
    // The writer may still hold its last "no one listens" for a moment: it
    // appends until the subscriber is woken.
    let stop = CancellationToken::new();
    let appender = tokio::spawn({
        let (writer, stop) = (writer.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                writer.append(vec![ev("E", &["w:2"])], None).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let woken = async {
        loop {
            sub.wait().await;
            if !sub.poll_batch().await.unwrap().is_empty() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), woken)
        .await
        .expect("a listener appeared, but the writer's wake-ups did not reach it");
    stop.cancel();
    appender.await.unwrap();
    assert!(writer.stats().wakeups_sent > 0);
}

/// A live subscription hands out each of 1,000 appends, one after the other, with
/// the next append only once the previous event arrived: none is lost or left to
/// wait (30 s is sixty poll intervals, room for a loaded machine; the diagnostics
/// show who held what).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscription_delivers_every_append_in_turn() {
    let t = TestStore::new().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Position>();
    let store = t.store.clone();
    let head = store.head().await.unwrap();
    let live = tokio::spawn(async move {
        let mut sub = dcbflow::Subscription::connect(
            &store,
            Query::items_of(["Live"], Vec::<String>::new()),
            head,
            SubscriptionOptions::default(),
        )
        .await
        .unwrap();
        loop {
            for e in sub.next_batch().await.unwrap() {
                let _ = tx.send(e.position);
            }
        }
    });
    for i in 0..1000 {
        let p = t
            .store
            .append(vec![ev("Live", &["l"])], None)
            .await
            .unwrap()
            .positions[0];
        let r = tokio::time::timeout(Duration::from_secs(30), async {
            while rx.recv().await.unwrap() < p {}
        })
        .await;
        if r.is_err() {
            let c = t.raw().await;
            let rows = c
                .query(
                    "SELECT a.pid, a.state, coalesce(a.wait_event, ''), left(a.query, 120), \
                     coalesce((SELECT string_agg(l.locktype || ':' || l.mode || ':' || l.granted, ',') FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'), '') \
                     FROM pg_stat_activity a WHERE a.application_name = $1 AND a.pid <> pg_backend_pid()",
                    &[&t.schema],
                )
                .await
                .unwrap();
            for r in rows {
                let (pid, state, wait, q, locks): (i32, String, String, String, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                eprintln!("{pid} {state} {wait} [{locks}] {q}");
            }
            let late = tokio::time::timeout(Duration::from_secs(5), async {
                while rx.recv().await.unwrap() < p {}
            })
            .await;
            panic!(
                "iteration {i}: position {p} not delivered in 30 s; 5 s later: {}",
                late.is_ok()
            );
        }
    }
    live.abort();
}
