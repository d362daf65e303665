//! What the operator API reads: `Store::settled_head` (a position below which
//! the log can no longer change, even with late committers in flight), the
//! migration status, checkpoints and dead letters.

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

/// A fresh store is current; an installed layer behind this binary, or with a
/// changed checksum, is not; a schema with nothing installed is not either.
#[tokio::test]
async fn migration_status_reports_layers_behind_or_changed() {
    let t = TestStore::new().await;
    let checkpoints = dcbflow::Checkpoints::new(t.store.clone());
    checkpoints.migrate().await.unwrap();
    let status = t.store.migration_status().await.unwrap();
    assert!(status.current, "{status:?}");
    assert_eq!(status.layers[0].layer, "store");
    let projection = status
        .layers
        .iter()
        .find(|l| l.layer == "projection")
        .expect("the projection layer is known once migrated");
    assert_eq!((projection.applied, projection.known), (1, 1));

    let raw = t.raw().await;
    let s = &t.schema;
    raw.execute(
        &format!("UPDATE \"{s}\".migrations SET checksum = '\\x00' WHERE layer = 'projection'"),
        &[],
    )
    .await
    .unwrap();
    let status = t.store.migration_status().await.unwrap();
    assert!(!status.current, "{status:?}");
    let projection = status
        .layers
        .iter()
        .find(|l| l.layer == "projection")
        .unwrap();
    assert_eq!(projection.changed, vec![1]);

    raw.execute(
        &format!("DELETE FROM \"{s}\".migrations WHERE layer = 'store' AND version = 4"),
        &[],
    )
    .await
    .unwrap();
    let status = t.store.migration_status().await.unwrap();
    assert!(!status.layers[0].current, "{status:?}");
    assert_eq!(status.layers[0].applied + 1, status.layers[0].known);

    let empty = Store::builder_for_url(&t.url, Some(2))
        .unwrap()
        .schema(format!("{}_none", t.schema))
        .migrate(false)
        .build()
        .await
        .unwrap();
    let status = empty.migration_status().await.unwrap();
    assert!(!status.current, "{status:?}");
    assert_eq!(status.layers[0].applied, 0);
}

#[tokio::test]
async fn checkpoints_are_listed_by_name() {
    let t = TestStore::new().await;
    let checkpoints = dcbflow::Checkpoints::new(t.store.clone());
    assert!(checkpoints.list().await.unwrap().is_empty());
    for name in ["b-relay", "a-projection"] {
        checkpoints.get(name).await.unwrap();
    }
    let listed = checkpoints.list().await.unwrap();
    let names: Vec<&str> = listed.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a-projection", "b-relay"]);
    assert!(listed.iter().all(|c| c.position == Position(0)));
}

#[cfg(feature = "outbox")]
#[tokio::test]
async fn dead_letters_are_listed_by_id_counted_and_fetched() {
    use dcbflow::outbox::DeadLetters;
    let t = TestStore::new().await;
    let dead = DeadLetters::new(t.store.clone());
    dead.migrate().await.unwrap();
    assert_eq!(dead.count().await.unwrap(), 0);
    let raw = t.raw().await;
    for (relay, position) in [("r1", 3i64), ("r2", 1), ("r1", 2), ("r2", 7), ("r3", 5)] {
        raw.execute(
            &format!(
                "INSERT INTO \"{}\".dead_letters (subscription, position, message_id, error, attempts) \
                 VALUES ($1, $2, 'm', 'boom', 3)",
                t.schema
            ),
            &[&relay, &position],
        )
        .await
        .unwrap();
    }
    assert_eq!(dead.count().await.unwrap(), 5);
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = dead.list_all(after, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|l| l.id);
        pages.push(page);
    }
    assert_eq!(pages.len(), 3);
    let all: Vec<_> = pages.into_iter().flatten().collect();
    let relays: Vec<&str> = all.iter().map(|l| l.subscription.as_str()).collect();
    assert_eq!(relays, ["r1", "r2", "r1", "r2", "r3"], "every relay, by id");
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(dead.get(all[3].id).await.unwrap().as_ref(), Some(&all[3]));
    assert_eq!(dead.get(-1).await.unwrap(), None);
    assert!(dead.list_all(None, 0).await.unwrap().is_empty());
}
