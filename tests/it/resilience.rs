//! Cancellation, killed connections, overload.

use std::time::Duration;

use dcbflow::{AppendCondition, Error, Query, QueryItem, ReadOptions};
use rand::Rng;

use crate::support::{DEADLINE, TestStore, ev, eventually};

async fn batch_sizes(t: &TestStore, batches: usize) -> Vec<usize> {
    let all = t
        .store
        .read_all(&Query::all(), ReadOptions::default())
        .await
        .unwrap();
    let mut sizes = vec![0; batches];
    for e in &all.events {
        let tag = e.tags().iter().find(|t| t.starts_with("batch:")).unwrap();
        sizes[tag[6..].parse::<usize>().unwrap()] += 1;
    }
    sizes
}

/// Property 8a: dropping `append` futures at arbitrary points leaves whole batches
/// or nothing, and no open transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_appends_leave_no_partial_write_or_open_transaction() {
    let t = TestStore::new().await;
    let batches = 200;
    for b in 0..batches {
        let store = t.store.clone();
        let tag = format!("batch:{b}");
        let task = tokio::spawn(async move {
            let events = (0..5)
                .map(|i| ev("E", &[&tag, &format!("i:{i}")]))
                .collect();
            store
                .append(
                    events,
                    Some(AppendCondition::new(Query::from_items([
                        QueryItem::new().tags([tag.clone()])
                    ]))),
                )
                .await
        });
        let delay = rand::rng().random_range(0..3000);
        tokio::time::sleep(Duration::from_micros(delay)).await;
        task.abort();
        let _ = task.await;
    }
    // Same, inside caller transactions dropped mid-way.
    for b in batches..batches + 50 {
        let store = t.store.clone();
        let tag = format!("batch:{b}");
        let task = tokio::spawn(async move {
            let mut client = store.pool().get().await?;
            let tx = client.transaction().await?;
            let events = (0..5)
                .map(|i| ev("E", &[&tag, &format!("i:{i}")]))
                .collect();
            store.append_in_tx(&tx, events, None).await?;
            tokio::time::sleep(Duration::from_micros(500)).await;
            tx.commit().await?;
            Ok::<_, Error>(())
        });
        tokio::time::sleep(Duration::from_micros(rand::rng().random_range(0..3000))).await;
        task.abort();
        let _ = task.await;
    }
    // Every aborted append has come to an end in the database (rolled back, or
    // committed whole): no session of this test is inside a transaction any more,
    // so the checks below see the final state.
    let raw = t.raw().await;
    eventually("the aborted appends' transactions end", DEADLINE, {
        let (raw, schema) = (&raw, &t.schema);
        move || async move {
            let in_transaction: i64 = raw
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                     AND xact_start IS NOT NULL AND pid <> pg_backend_pid()",
                    &[schema],
                )
                .await
                .unwrap()
                .get(0);
            (in_transaction == 0).then_some(())
        }
    })
    .await;
    let sizes = batch_sizes(&t, batches + 50).await;
    assert!(
        sizes.iter().all(|n| *n == 0 || *n == 5),
        "partial batch: {sizes:?}"
    );
    assert_eq!(t.open_transactions().await, 0);
    // The pool still works afterwards.
    t.store
        .append(vec![ev("E", &["batch:0"])], None)
        .await
        .unwrap();
}

/// Property 8b: killing the connection of an append in flight writes nothing and the
/// store recovers.
#[tokio::test]
async fn terminated_connection_writes_nothing() {
    let t = TestStore::new().await;
    // Block the victim: an open transaction holds the scope of seat:1.
    let mut blocker = t.store.pool().get().await.unwrap();
    let tx = blocker.transaction().await.unwrap();
    t.store
        .append_in_tx(&tx, vec![ev("Held", &["seat:1"])], None)
        .await
        .unwrap();

    let store = t.store.clone();
    let victim = tokio::spawn(async move {
        let q = Query::items_of(["Booked"], ["seat:1"]);
        let events = (0..3)
            .map(|i| ev("Booked", &["seat:1", &format!("victim:{i}")]))
            .collect();
        store.append(events, Some(AppendCondition::new(q))).await
    });
    let raw = t.raw().await;
    let killed = eventually("the victim waits on its scope lock", DEADLINE, {
        let (raw, schema) = (&raw, &t.schema);
        move || async move {
            let killed = raw
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                    &[schema],
                )
                .await
                .unwrap()
                .len();
            (killed > 0).then_some(killed)
        }
    })
    .await;
    assert_eq!(killed, 1, "the victim must be waiting on its scope lock");
    let err = victim.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Database(_)) && err.is_retryable(),
        "{err:?}"
    );
    tx.rollback().await.unwrap();
    drop(blocker);
    assert_eq!(t.count().await, 0);
    assert_eq!(t.open_transactions().await, 0);
    // The dead connection is discarded by the pool; later appends work.
    for _ in 0..30 {
        t.store
            .append(vec![ev("After", &["seat:1"])], None)
            .await
            .unwrap();
    }
    assert_eq!(t.count().await, 30);
}

/// Above the in-flight limit, operations fail at once instead of queueing.
#[tokio::test]
async fn overload_fails_fast() {
    let t = TestStore::with_limits(Default::default(), Some(2)).await;
    t.store.append(vec![ev("A", &[])], None).await.unwrap();
    let s1 = t
        .store
        .read(&Query::all(), ReadOptions::default())
        .await
        .unwrap();
    let s2 = t
        .store
        .read(&Query::all(), ReadOptions::default())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = t.store.append(vec![ev("A", &[])], None).await.unwrap_err();
    assert!(matches!(err, Error::Overloaded { limit: 2 }), "{err:?}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(1));
    drop((s1, s2));
    t.store.append(vec![ev("A", &[])], None).await.unwrap();
    assert_eq!(t.count().await, 2);
}
