//! Group commit: batched appends keep every per-append guarantee.

use std::collections::HashSet;

use dcbflow::{AppendCondition, Error, InvalidInput, Query, Store};
use uuid::Uuid;

use crate::support::{DEADLINE, TestStore, ev, eventually, race};

/// Batches a group-commit store may have in flight at once.
const WRITERS: usize = 2;

async fn grouped(t: &TestStore) -> Store {
    Store::builder_for_url(&t.url, Some(8))
        .unwrap()
        .schema(&t.schema)
        .group_commit(64)
        .group_commit_writers(WRITERS)
        .max_in_flight(1024)
        .build()
        .await
        .unwrap()
}

/// Holds every writer of `store` up: `held` locks the scopes of `types`
/// exclusively, then one append of the first type runs alone (unbatched) and one
/// more per batch writer, each waiting for the lock, so that whatever is queued
/// next is committed in one batch once `held` ends. Returns the blocked appends.
async fn hold_writers(
    t: &TestStore,
    held: &deadpool_postgres::Transaction<'_>,
    store: &Store,
    types: &[&str],
) -> Vec<tokio::task::JoinHandle<dcbflow::Result<dcbflow::AppendResult>>> {
    let scope = Query::from_items([dcbflow::QueryItem::new().types(types.iter().copied())]);
    t.store.lock_scope_in_tx(held, &scope).await.unwrap();
    let mut blocked = Vec::new();
    for n in 1..=1 + WRITERS {
        let (store, ty) = (store.clone(), types[0].to_owned());
        blocked.push(tokio::spawn(async move {
            store.append(vec![ev(&ty, &[])], None).await
        }));
        eventually(
            "the blocked appends wait for the scope lock",
            DEADLINE,
            || async { (t.lock_waits().await == n as i64).then_some(()) },
        )
        .await;
    }
    blocked
}

/// Awaits `append`, a grouped append, counting it in `queued` as soon as it is
/// queued: its first poll hands the request to the writer's channel (or it is done).
async fn counted<T>(
    append: impl std::future::Future<Output = T>,
    queued: &std::sync::atomic::AtomicUsize,
) -> T {
    let mut append = std::pin::pin!(append);
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(append.as_mut(), cx))
    })
    .await;
    queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    match first {
        std::task::Poll::Ready(result) => result,
        std::task::Poll::Pending => append.await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_transactions_and_keep_their_conditions() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    // An open transaction holds the scope of every racer's events until all 64
    // appends are queued, so the writers cannot commit them one by one, however
    // the racers are scheduled: a writer that does not batch fails this test.
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    let blocked = hold_writers(&t, &held, &store, &["Deposited"]).await;
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let racers = race(64, |i| {
        let (store, queued) = (store.clone(), queued.clone());
        async move {
            let q = Query::items_of(["Deposited"], [format!("account:{i}")]);
            let cursor = store.read_all(&q, Default::default()).await?.cursor;
            let append = store.append(
                vec![ev("Deposited", &[&format!("account:{i}")])],
                Some(AppendCondition::new(q).after(cursor)),
            );
            counted(append, &queued).await
        }
    });
    let release = async {
        eventually("all 64 appends are queued", DEADLINE, {
            let queued = &queued;
            move || async move {
                let n = queued.load(std::sync::atomic::Ordering::SeqCst);
                (n == 64).then_some(())
            }
        })
        .await;
        held.rollback().await.unwrap();
    };
    let (results, ()) = tokio::join!(racers, release);
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    let positions: HashSet<_> = results.iter().flat_map(|r| r.positions.clone()).collect();
    assert_eq!(positions.len(), 64);
    let transactions: HashSet<_> = results.iter().map(|r| r.transaction_id).collect();
    // The 64 were queued behind the blocked writers: one batch of all of them.
    assert_eq!(
        transactions.len(),
        1,
        "appends were batched ({} transactions)",
        transactions.len()
    );
    assert_eq!(t.count().await, 64 + 1 + WRITERS as i64);
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
    // The writers wait for scope locks held by an open transaction while the 32
    // requests queue behind them: they are the next batch, all of them, however
    // they are scheduled.
    t.store
        .append(vec![ev("A", &[]).with_id(taken)], None)
        .await
        .unwrap();
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    let blocked = hold_writers(&t, &held, &store, &["A", "B"]).await;
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let racers = race(32, |i| {
        let (store, queued) = (store.clone(), queued.clone());
        let events = if i == 7 {
            // Overlaps a stored id with a new one: refused by the database.
            vec![
                ev("A", &[]).with_id(taken),
                ev("A", &[]).with_id(Uuid::new_v4()),
            ]
        } else {
            vec![ev("B", &[&format!("k:{i}")])]
        };
        async move { counted(store.append(events, None), &queued).await }
    });
    let release = async {
        eventually("all 32 requests are queued", DEADLINE, {
            let queued = &queued;
            move || async move {
                let n = queued.load(std::sync::atomic::Ordering::SeqCst);
                (n == 32).then_some(())
            }
        })
        .await;
        held.rollback().await.unwrap();
    };
    let (results, ()) = tokio::join!(racers, release);
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    let mut transactions = HashSet::new();
    for (i, r) in results.into_iter().enumerate() {
        match (i, r) {
            (7, Err(Error::InvalidInput(InvalidInput::IdsAlreadyStored))) => {}
            (7, other) => panic!("expected IdsAlreadyStored, got {other:?}"),
            (_, r) => {
                transactions.insert(r.unwrap().transaction_id);
            }
        }
    }
    assert_eq!(
        transactions.len(),
        1,
        "the others were committed in one batch"
    );
    assert_eq!(t.count().await, 1 + 1 + WRITERS as i64 + 31);
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
    // Hold the writers up: an open transaction locks the scopes they write.
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    let blocked = hold_writers(&t, &held, &store, &["Warmup", "SeatBooked", "Audit"]).await;
    // These queue up behind the blocked batch and are committed together.
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let (store, queued) = (store.clone(), queued.clone());
            let condition = AppendCondition::new(q.clone()).after(cursor.clone());
            let events = vec![
                ev("SeatBooked", &["seat:1", &format!("buyer:{i}")]),
                ev("Audit", &[&format!("a:{i}")]),
            ];
            tokio::spawn(
                async move { counted(store.append(events, Some(condition)), &queued).await },
            )
        })
        .collect();
    let unrelated = {
        let (store, queued) = (store.clone(), queued.clone());
        tokio::spawn(async move {
            counted(
                store.append(vec![ev("SeatBooked", &["seat:2"])], None),
                &queued,
            )
            .await
        })
    };
    eventually(
        "the racers and the unrelated append are queued",
        DEADLINE,
        {
            let queued = &queued;
            move || async move {
                let n = queued.load(std::sync::atomic::Ordering::SeqCst);
                (n == 9).then_some(())
            }
        },
    )
    .await;
    held.commit().await.unwrap();
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    let unrelated = unrelated.await.unwrap().unwrap();
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
    assert_eq!(
        winners[0].transaction_id, unrelated.transaction_id,
        "the racers and the unrelated append were committed in one batch"
    );
    assert_eq!(t.events(&q).await.len(), 1);
}

/// Batches of disjoint scopes run side by side: while one batch waits for a
/// scope held elsewhere, a batch of another scope is taken by the next writer
/// and commits (a batch holding the store lock exclusively, or a single writer,
/// would make it wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_batch_does_not_hold_up_other_scopes() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    t.store
        .lock_scope_in_tx(&held, &Query::items_of(["Held"], ["x:1"]))
        .await
        .unwrap();
    let mut blocked = Vec::new();
    // One alone (unbatched), one in a batch: both wait for the scope.
    for n in 1..=2 {
        let store = store.clone();
        blocked.push(tokio::spawn(async move {
            store.append(vec![ev("Held", &["x:1"])], None).await
        }));
        eventually("the appends wait for the held scope", DEADLINE, || async {
            (t.lock_waits().await == n).then_some(())
        })
        .await;
    }
    let other = tokio::time::timeout(DEADLINE, store.append(vec![ev("Free", &["y:1"])], None))
        .await
        .expect("a batch of another scope commits meanwhile")
        .unwrap();
    assert!(blocked.iter().all(|b| !b.is_finished()));
    held.rollback().await.unwrap();
    for b in blocked {
        assert!(b.await.unwrap().unwrap().last_position() != other.last_position());
    }
    assert_eq!(t.count().await, 3);
}

/// A batch with no condition, cursor or id is one plain statement: its appends
/// share one transaction, and each gets the positions of its own events, in
/// its own order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unconditional_appends_are_one_statement_with_their_own_positions() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    let blocked = hold_writers(&t, &held, &store, &["P"]).await;
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let appends = race(20, |i| {
        let (store, queued) = (store.clone(), queued.clone());
        let events: Vec<_> = (0..1 + i % 3)
            .map(|k| {
                dcbflow::Event::new("P", [format!("p:{i}")], serde_json::json!({"i": i, "k": k}))
            })
            .collect();
        async move { counted(store.append(events, None), &queued).await }
    });
    let release = async {
        eventually("all 20 appends are queued", DEADLINE, || async {
            (queued.load(std::sync::atomic::Ordering::SeqCst) == 20).then_some(())
        })
        .await;
        held.rollback().await.unwrap();
    };
    let (results, ()) = tokio::join!(appends, release);
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    let transactions: HashSet<_> = results.iter().map(|r| r.transaction_id).collect();
    assert_eq!(transactions.len(), 1, "one batch");
    let all = t
        .events(&Query::items_of(["P"], Vec::<String>::new()))
        .await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.positions.len(), 1 + i % 3);
        for (k, p) in r.positions.iter().enumerate() {
            let e = all.iter().find(|e| e.position == *p).expect("stored");
            assert_eq!(e.data()["i"], i);
            assert_eq!(e.data()["k"], k);
        }
    }
}

/// Conditions with a bare-position cursor in a batch (decided by the window of
/// events after the cursor): an event after the cursor fails its request, none
/// lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_conditions_after_a_position_see_the_events_after_it() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    let mut booked = Vec::new();
    for k in 0..4 {
        let r = t
            .store
            .append(vec![ev("SeatBooked", &[&format!("seat:{k}")])], None)
            .await
            .unwrap();
        booked.push(r.last_position());
    }
    let head = *booked.last().unwrap();
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    let blocked = hold_writers(&t, &held, &store, &["SeatBooked"]).await;
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requests = race(8, |k| {
        let (store, queued) = (store.clone(), queued.clone());
        let q = Query::items_of(["SeatBooked"], [format!("seat:{k}")]);
        // Seats 0-3: the cursor is just before their booking; 4-7: free.
        let after = if k < 4 {
            dcbflow::Position(booked[k].0 - 1)
        } else {
            head
        };
        let condition = AppendCondition::new(q).after(dcbflow::Cursor::at(after));
        let e = ev("SeatBooked", &[&format!("seat:{k}"), "again"]);
        async move { counted(store.append(vec![e], Some(condition)), &queued).await }
    });
    let release = async {
        eventually("all 8 requests are queued", DEADLINE, || async {
            (queued.load(std::sync::atomic::Ordering::SeqCst) == 8).then_some(())
        })
        .await;
        held.rollback().await.unwrap();
    };
    let (results, ()) = tokio::join!(requests, release);
    for b in blocked {
        b.await.unwrap().unwrap();
    }
    let mut transactions = HashSet::new();
    for (k, r) in results.into_iter().enumerate() {
        match (k < 4, r) {
            (true, Err(Error::Conflict { position })) => assert_eq!(position, booked[k]),
            (false, Ok(r)) => {
                transactions.insert(r.transaction_id);
            }
            (_, other) => panic!("seat {k}: {other:?}"),
        }
    }
    assert_eq!(transactions.len(), 1, "the free seats were one batch");
}

/// A batch's conditions read through the indexes however small the table was
/// when the writer's connection planned them (as a lone append's do, see
/// `conditions::conditional_appends_use_the_indexes_after_the_table_grows_from_empty`):
/// batches of conditional appends on a near-empty store, the table grown to
/// 20,000 events without an ANALYZE, then 200 more conditional appends in
/// batches, and no sequential scan of the events table. The statistics of other
/// backends arrive when they report them; every insert being counted says that
/// the writers have reported everything up to their last batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_conditions_use_the_indexes_after_the_table_grows_from_empty() {
    let t = TestStore::new().await;
    let store = grouped(&t).await;
    let rounds = |n: usize, round0: usize| {
        let store = store.clone();
        async move {
            for round in round0..round0 + n {
                let head = store.head().await.unwrap().unwrap_or(dcbflow::Position(0));
                race(4, |i| {
                    let store = store.clone();
                    async move {
                        let tag = format!("seat:{round}:{i}");
                        let condition = AppendCondition::new(Query::items_of(["Booked"], [&tag]))
                            .after(dcbflow::Cursor::at(head));
                        store
                            .append(vec![ev("Booked", &[&tag])], Some(condition))
                            .await
                            .expect("no conflict: every seat is booked once")
                    }
                })
                .await;
            }
        }
    };
    rounds(10, 0).await;
    for batch in 0..20 {
        let filler = (0..1000)
            .map(|i| ev("Filler", &[&format!("filler:{batch}:{i}")]))
            .collect();
        store.append(filler, None).await.unwrap();
    }
    let c = t.raw().await;
    let reported = |rows: i64| {
        let c = &c;
        let schema = t.schema.clone();
        async move {
            eventually("the writers' statistics", DEADLINE, || async {
                let row = c
                    .query_one(
                        "SELECT n_tup_ins, seq_scan FROM pg_stat_user_tables \
                         WHERE schemaname = $1 AND relname = 'events'",
                        &[&schema],
                    )
                    .await
                    .unwrap();
                (row.get::<_, i64>(0) >= rows).then(|| row.get::<_, i64>(1))
            })
            .await
        }
    };
    let before = reported(40 + 20_000).await;
    rounds(50, 10).await;
    let after = reported(40 + 20_000 + 200).await;
    assert_eq!(
        after - before,
        0,
        "batched conditional appends scanned the events table"
    );
}
