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
