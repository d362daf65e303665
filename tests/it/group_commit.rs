//! Group commit: batched appends keep every per-append guarantee.

use std::collections::HashSet;

use dcbflow::{AppendCondition, Error, InvalidInput, Query, Store};
use uuid::Uuid;

use crate::support::{TestStore, ev, race};

async fn grouped(t: &TestStore) -> Store {
    Store::builder_for_url(&t.url, Some(8))
        .unwrap()
        .schema(&t.schema)
        .group_commit(64)
        .max_in_flight(1024)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_transactions_and_keep_their_conditions() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    let results = race(64, |i| {
        let store = store.clone();
        async move {
            let q = Query::items_of(["Deposited"], [format!("account:{i}")]);
            let cursor = store.read_all(&q, Default::default()).await?.cursor;
            store
                .append(
                    vec![ev("Deposited", &[&format!("account:{i}")])],
                    Some(AppendCondition::new(q).after(cursor)),
                )
                .await
        }
    })
    .await;
    let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    let positions: HashSet<_> = results.iter().flat_map(|r| r.positions.clone()).collect();
    assert_eq!(positions.len(), 64);
    let transactions: HashSet<_> = results.iter().map(|r| r.transaction_id).collect();
    assert!(
        transactions.len() < 64,
        "appends were batched ({} transactions)",
        transactions.len()
    );
    assert_eq!(t.count().await, 64);
}

/// Racers on one boundary, some batched together, some through a second process
/// without group commit: exactly one winner per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_per_boundary_within_and_across_batches() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    for round in 0..20 {
        let tag = format!("seat:{round}");
        let q = Query::items_of(["SeatBooked"], [tag.clone()]);
        let cursor = t.cursor(&q).await;
        let results = race(16, |i| {
            // Half the racers go through the group-commit store, half not.
            let target = if i % 2 == 0 {
                store.clone()
            } else {
                t.store.clone()
            };
            let condition = AppendCondition::new(q.clone()).after(cursor.clone());
            let event = ev("SeatBooked", &[&tag, &format!("buyer:{i}")]);
            async move { target.append(vec![event], Some(condition)).await }
        })
        .await;
        let mut wins = 0;
        for r in results {
            match r {
                Ok(_) => wins += 1,
                Err(Error::Conflict { .. }) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}");
        assert_eq!(t.events(&q).await.len(), 1);
    }
}

/// A request that fails with an error in a batch fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_request_does_not_sink_its_batch() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    let taken = Uuid::new_v4();
    store
        .append(vec![ev("A", &[]).with_id(taken)], None)
        .await
        .unwrap();
    let results = race(32, |i| {
        let store = store.clone();
        let events = if i == 7 {
            // Overlaps a stored id with a new one: refused by the database.
            vec![
                ev("A", &[]).with_id(taken),
                ev("A", &[]).with_id(Uuid::new_v4()),
            ]
        } else {
            vec![ev("B", &[&format!("k:{i}")])]
        };
        async move { store.append(events, None).await }
    })
    .await;
    for (i, r) in results.into_iter().enumerate() {
        match (i, r) {
            (7, Err(Error::InvalidInput(InvalidInput::IdsAlreadyStored))) => {}
            (7, other) => panic!("expected IdsAlreadyStored, got {other:?}"),
            (_, r) => {
                r.unwrap();
            }
        }
    }
    assert_eq!(t.count().await, 1 + 31);
}

/// The same append sent concurrently (a client retrying) is stored once, inside or
/// across batches, and every sender gets the same positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_in_a_batch_are_replays() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    for round in 0..10 {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let results = race(8, |_| {
            let store = store.clone();
            let events = ids
                .iter()
                .map(|id| ev("Paid", &["order:1"]).with_id(*id))
                .collect();
            async move { store.append(events, None).await }
        })
        .await;
        let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        assert!(
            results.iter().all(|r| r.positions == results[0].positions),
            "round {round}"
        );
        assert_eq!(
            results.iter().filter(|r| !r.replayed).count(),
            1,
            "round {round}"
        );
        assert_eq!(t.count().await, 3 * (round + 1) as i64);
    }
}

/// Racers that land in the same batch: the first wins, the others conflict with its
/// (not yet committed) event, and no scope outside the race is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_inside_one_batch_fail_alone() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    let q = Query::items_of(["SeatBooked"], ["seat:1"]);
    let cursor = t.cursor(&q).await;
    // Hold the writer up: an open transaction that appended keeps the store lock.
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    t.store
        .append_in_tx(&held, vec![ev("Other", &[])], None)
        .await
        .unwrap();
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.append(vec![ev("Warmup", &[])], None).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // These queue up behind the blocked batch and are committed together.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let condition = AppendCondition::new(q.clone()).after(cursor.clone());
            let events = vec![
                ev("SeatBooked", &["seat:1", &format!("buyer:{i}")]),
                ev("Audit", &[&format!("a:{i}")]),
            ];
            tokio::spawn(async move { store.append(events, Some(condition)).await })
        })
        .collect();
    let unrelated = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append(vec![ev("SeatBooked", &["seat:2"])], None)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    held.commit().await.unwrap();
    first.await.unwrap().unwrap();
    unrelated.await.unwrap().unwrap();
    let mut winners = Vec::new();
    let mut conflicts = Vec::new();
    for r in racers {
        match r.await.unwrap() {
            Ok(r) => winners.push(r),
            Err(Error::Conflict { position }) => conflicts.push(position),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(conflicts.len(), 7);
    // The losers name the winner's booking, which shares their batch's transaction.
    assert!(conflicts.iter().all(|p| *p == winners[0].positions[0]));
    assert_eq!(t.events(&q).await.len(), 1);
}
