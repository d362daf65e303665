//! The append-condition properties of DESIGN.md, each raced on real connections.

use std::sync::Arc;
use std::time::Duration;

use dcbflow::{AppendCondition, Error, Position, Query, QueryItem, ReadOptions};
use tokio::sync::Barrier;

use crate::support::{TestStore, ev};

/// Property 1: 16 clients race one boundary (same condition, same cursor), 50 rounds:
/// exactly one winner per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_per_round_among_16_racers() {
    let t = TestStore::new().await;
    for round in 0..50 {
        let tag = format!("seat:{round}");
        let q = Query::items_of(["SeatBooked"], [tag.clone()]);
        let cursor = t
            .store
            .read_all(&q, ReadOptions::default())
            .await
            .unwrap()
            .cursor;
        let barrier = Arc::new(Barrier::new(16));
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (store, q, cursor, barrier, tag) = (
                    t.store.clone(),
                    q.clone(),
                    cursor.clone(),
                    barrier.clone(),
                    tag.clone(),
                );
                tokio::spawn(async move {
                    barrier.wait().await;
                    let booking = ev("SeatBooked", &[&tag, &format!("buyer:{i}")]);
                    store
                        .append(vec![booking], Some(AppendCondition::new(q).after(cursor)))
                        .await
                })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(Error::Conflict { .. }) => {}
                Err(e) => panic!("unexpected error: {e:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one booking must win");
        let booked = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
        assert_eq!(booked.events.len(), 1, "round {round}");
    }
}

/// Property 2: a two-item condition fails when either item matches.
#[tokio::test]
async fn two_item_condition_fails_when_either_item_matches() {
    let t = TestStore::new().await;
    // The decision "enrol s1 in c1" depends on the course's enrolments (capacity)
    // and on the student's enrolments (course limit).
    let decision = Query::from_items([
        QueryItem::new()
            .types(["StudentEnrolled"])
            .tags(["course:c1"]),
        QueryItem::new()
            .types(["StudentEnrolled"])
            .tags(["student:s1"]),
    ]);
    let stale = t
        .store
        .read_all(&decision, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    let enrol = |s: &str, c: &str| {
        ev(
            "StudentEnrolled",
            &[&format!("student:{s}"), &format!("course:{c}")],
        )
    };

    // Only the first item matches: another student took c1.
    let p = t
        .store
        .append(vec![enrol("s2", "c1")], None)
        .await
        .unwrap()
        .positions[0];
    let err = t
        .store
        .append(
            vec![enrol("s1", "c1")],
            Some(AppendCondition::new(decision.clone()).after(stale.clone())),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { position } if position == p),
        "{err:?}"
    );

    // Only the second item matches: s1 enrolled elsewhere.
    let fresh = t
        .store
        .read_all(&decision, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    let p = t
        .store
        .append(vec![enrol("s1", "c9")], None)
        .await
        .unwrap()
        .positions[0];
    let err = t
        .store
        .append(
            vec![enrol("s1", "c1")],
            Some(AppendCondition::new(decision.clone()).after(fresh)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { position } if position == p),
        "{err:?}"
    );

    // Neither matches (other type, other student and course): the append goes through.
    let fresh = t
        .store
        .read_all(&decision, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    t.store
        .append(
            vec![enrol("s3", "c3"), ev("CourseRenamed", &["course:c1"])],
            None,
        )
        .await
        .unwrap();
    t.store
        .append(
            vec![enrol("s1", "c1")],
            Some(AppendCondition::new(decision).after(fresh)),
        )
        .await
        .unwrap();
}

/// Property 2, raced: a capacity-1 course, two students, both items in the condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_item_condition_race_has_one_winner() {
    let t = TestStore::new().await;
    for round in 0..20 {
        let course = format!("course:r{round}");
        let tasks: Vec<_> = (0..4)
            .map(|s| {
                let (store, course) = (t.store.clone(), course.clone());
                tokio::spawn(async move {
                    let student = format!("student:{round}-{s}");
                    let q = Query::from_items([
                        QueryItem::new()
                            .types(["StudentEnrolled"])
                            .tags([course.clone()]),
                        QueryItem::new()
                            .types(["StudentEnrolled"])
                            .tags([student.clone()]),
                    ]);
                    let read = store.read_all(&q, ReadOptions::default()).await?;
                    let taken = read.events.iter().any(|e| e.tags().contains(&course));
                    if taken {
                        return Ok(false);
                    }
                    store
                        .append(
                            vec![ev("StudentEnrolled", &[&course, &student])],
                            Some(AppendCondition::new(q).after(read.cursor)),
                        )
                        .await
                        .map(|_| true)
                })
            })
            .collect();
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) | Err(Error::Conflict { .. }) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        let q = Query::items_of(["StudentEnrolled"], [course]);
        assert_eq!(
            t.store
                .read_all(&q, ReadOptions::default())
                .await
                .unwrap()
                .events
                .len(),
            1
        );
    }
}

/// Property 3: a writer that took its position before the read but commits after it
/// must still make a condition built from that read fail.
#[tokio::test]
async fn late_committer_makes_the_condition_fail() {
    let t = TestStore::new().await;
    let q = Query::items_of(["SeatBooked"], ["seat:1"]);

    // The late writer takes position p1 inside a transaction it keeps open.
    let mut late = t.store.pool().get().await.unwrap();
    let late_tx = late.transaction().await.unwrap();
    let p1 = t
        .store
        .append_in_tx(
            &late_tx,
            vec![ev("SeatBooked", &["seat:1", "buyer:late"])],
            None,
        )
        .await
        .unwrap()
        .positions[0];
    // Another writer commits p2 > p1.
    let p2 = t
        .store
        .append(vec![ev("SeatBooked", &["seat:1", "buyer:early"])], None)
        .await
        .unwrap()
        .positions[0];
    assert!(p2 > p1);
    // The reader sees p2 only: its cursor is at p2.
    let read = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
    assert_eq!(
        read.events.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![p2]
    );
    assert_eq!(read.cursor.position, Some(p2));
    // Now the late writer commits. Position p1 < cursor, yet the reader never saw it.
    late_tx.commit().await.unwrap();
    let err = t
        .store
        .append(
            vec![ev("SeatBooked", &["seat:1", "buyer:me"])],
            Some(AppendCondition::new(q.clone()).after(read.cursor)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { position } if position == p1),
        "{err:?}"
    );

    // Same, but the late writer commits while the conditional append waits for it.
    let q2 = Query::items_of(["SeatBooked"], ["seat:2"]);
    let late_tx = late.transaction().await.unwrap();
    let p3 = t
        .store
        .append_in_tx(&late_tx, vec![ev("SeatBooked", &["seat:2"])], None)
        .await
        .unwrap()
        .positions[0];
    let cursor = t
        .store
        .read_all(&q2, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    let store = t.store.clone();
    let waiting = tokio::spawn(async move {
        store
            .append(
                vec![ev("SeatBooked", &["seat:2"])],
                Some(AppendCondition::new(q2).after(cursor)),
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the conditional append must wait for the in-flight writer"
    );
    late_tx.commit().await.unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Conflict { position } if position == p3),
        "{err:?}"
    );
}

/// Property 4: the check is not filtered by an xmin horizon; an unrelated open
/// transaction hides nothing.
#[tokio::test]
async fn unrelated_open_transaction_does_not_hide_committed_events() {
    let t = TestStore::new().await;
    let unrelated = t.raw().await;
    unrelated
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .unwrap();

    let q = Query::items_of(["Deposited"], ["account:1"]);
    let before = t
        .store
        .read_all(&q, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    let p = t
        .store
        .append(vec![ev("Deposited", &["account:1"])], None)
        .await
        .unwrap()
        .positions[0];
    // Reads see it while the unrelated transaction is open...
    let after = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
    assert_eq!(after.events.len(), 1);
    // ...and the condition check does too.
    let err = t
        .store
        .append(
            vec![ev("Withdrawn", &["account:1"])],
            Some(AppendCondition::new(q.clone()).after(before)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { position } if position == p),
        "{err:?}"
    );
    // And no false conflict for a reader that did see it.
    t.store
        .append(
            vec![ev("Withdrawn", &["account:1"])],
            Some(AppendCondition::new(q).after(after.cursor)),
        )
        .await
        .unwrap();
    unrelated.batch_execute("ROLLBACK").await.unwrap();
}

/// Property 5: a match-all condition fails if anything at all was appended after `after`.
#[tokio::test]
async fn match_all_condition_checks_everything() {
    let t = TestStore::new().await;
    t.store.append(vec![ev("A", &["x"])], None).await.unwrap();
    let cursor = t
        .store
        .read_all(&Query::all(), ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    // Nothing new: succeeds.
    let r = t
        .store
        .append(
            vec![ev("B", &["y"])],
            Some(AppendCondition::new(Query::all()).after(cursor.clone())),
        )
        .await
        .unwrap();
    // Something unrelated was appended after the cursor: fails.
    let err = t
        .store
        .append(
            vec![ev("C", &["z"])],
            Some(AppendCondition::new(Query::all()).after(cursor)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { position } if position == r.positions[0]),
        "{err:?}"
    );
    // Without a cursor, any event at all fails it.
    let err = t
        .store
        .append(vec![ev("C", &[])], Some(AppendCondition::new(Query::all())))
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    // An empty query (no items) matches nothing and never fails.
    t.store
        .append(
            vec![ev("C", &[])],
            Some(AppendCondition::new(Query::default())),
        )
        .await
        .unwrap();
    // A bare position as cursor: only later positions count.
    let head = t.store.head().await.unwrap().unwrap();
    t.store
        .append(
            vec![ev("D", &[])],
            Some(AppendCondition::new(Query::all()).after(head)),
        )
        .await
        .unwrap();
    let err = t
        .store
        .append(
            vec![ev("D", &[])],
            Some(AppendCondition::new(Query::all()).after(Position(head.0))),
        )
        .await
        .unwrap_err();
    assert!(err.is_conflict());
}

/// Property 6: 16 clients with conditions on disjoint tags never conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disjoint_scopes_never_conflict() {
    let t = TestStore::new().await;
    let barrier = Arc::new(Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (store, barrier) = (t.store.clone(), barrier.clone());
            tokio::spawn(async move {
                let tag = format!("account:{i}");
                let q = Query::items_of(["Deposited", "Withdrawn"], [tag.clone()]);
                barrier.wait().await;
                let mut conflicts = 0;
                for _ in 0..25 {
                    let read = store.read_all(&q, ReadOptions::default()).await.unwrap();
                    match store
                        .append(
                            vec![ev("Deposited", &[&tag, "bank:1"])],
                            Some(AppendCondition::new(q.clone()).after(read.cursor)),
                        )
                        .await
                    {
                        Ok(_) => {}
                        Err(Error::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("{e:?}"),
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.unwrap();
    }
    assert_eq!(conflicts, 0);
    assert_eq!(t.count().await, 16 * 25);
}
