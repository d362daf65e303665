//! `Store::settled_head`: a position below which the log can no longer change,
//! even with late committers in flight.

use std::time::Duration;

use dcbflow::{Error, Position, Query, ReadOptions, Store};

use crate::support::{DEADLINE, TestStore, ev, eventually};

/// Whether a pooled session of this test has run `writers_finished`, the look
/// `settled_head` takes while it waits (the session keeps the query's text in
/// `pg_stat_activity` after it ends).
async fn settled_head_is_waiting(t: &TestStore) -> bool {
    let c = t.raw().await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND query LIKE '%writers_finished%' AND pid <> pg_backend_pid()",
            &[&t.schema],
        )
        .await
        .unwrap()
        .get(0);
    n > 0
}

#[tokio::test]
async fn empty_log_is_settled_at_zero() {
    let t = TestStore::new().await;
    assert_eq!(t.store.settled_head().await.unwrap(), Position(0));
    t.store.append(vec![ev("A", &["a:1"])], None).await.unwrap();
    assert_eq!(t.store.settled_head().await.unwrap(), Position(1));
}

/// An append drew position 1 and stays open; another commits position 2 above
/// it. The settled head is not handed out until the first has committed, and a
/// read up to it then contains the late event. (If `settled_head` returned the
/// allocated head without waiting, it would be finished while the writer is
/// still open, and the first assertion fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_head_waits_for_late_committers_below_it() {
    let t = TestStore::new().await;
    let mut client = t.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let late = t
        .store
        .append_in_tx(&tx, vec![ev("Late", &["x:1"])], None)
        .await
        .unwrap()
        .last_position();
    let early = t
        .store
        .append(vec![ev("Early", &["x:2"])], None)
        .await
        .unwrap()
        .last_position();
    assert!(late < early, "the open writer drew the lower position");

    let settled = {
        let store = t.store.clone();
        tokio::spawn(async move { store.settled_head().await })
    };
    // Until the call either returned or is seen waiting on the writer.
    eventually("settled_head returns or waits", DEADLINE, || async {
        (settled.is_finished() || settled_head_is_waiting(&t).await).then_some(())
    })
    .await;
    assert!(
        !settled.is_finished(),
        "settled_head returned while a writer below it was in flight"
    );
    tx.commit().await.unwrap();
    drop(client);

    let p = settled.await.unwrap().unwrap();
    assert_eq!(p, early);
    let seen: Vec<Position> = t
        .store
        .read_all(&Query::all(), ReadOptions::default().up_to(p))
        .await
        .unwrap()
        .events
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(
        seen,
        vec![late, early],
        "the late event is below the settled head"
    );
}

/// A writer that does not end within the call timeout: `Error::Timeout`, and
/// the store works on once it has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_head_times_out_on_a_writer_that_stays_open() {
    let t = TestStore::new().await;
    let store = Store::builder_for_url(&t.url, Some(4))
        .unwrap()
        .schema(&t.schema)
        .call_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let mut client = t.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    t.store
        .append_in_tx(&tx, vec![ev("Late", &["x:1"])], None)
        .await
        .unwrap();
    match store.settled_head().await {
        Err(Error::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    tx.rollback().await.unwrap();
    // The rolled-back position is a gap: settled, and nothing will fill it.
    assert_eq!(store.settled_head().await.unwrap(), Position(1));
    assert!(t.events(&Query::all()).await.is_empty());
}
