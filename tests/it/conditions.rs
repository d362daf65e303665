//! The append-condition properties (docs/architecture.md), each raced on real connections.

use dcbflow::{AppendCondition, Cursor, Error, Position, Query, QueryItem, ReadOptions};

use crate::support::{DEADLINE, TestStore, assert_conflict_at, ev, eventually, race};

fn enrol(student: &str, course: &str) -> dcbflow::Event {
    ev(
        "StudentEnrolled",
        &[&format!("student:{student}"), &format!("course:{course}")],
    )
}

/// The decision "enrol `student` in `course`": the course's enrolments (capacity)
/// OR the student's enrolments (course limit).
fn enrolment_decision(student: &str, course: &str) -> Query {
    Query::from_items([
        QueryItem::new()
            .types(["StudentEnrolled"])
            .tags([format!("course:{course}")]),
        QueryItem::new()
            .types(["StudentEnrolled"])
            .tags([format!("student:{student}")]),
    ])
}

/// Property 1: 16 clients race one boundary (same condition, same cursor), 50 rounds:
/// exactly one winner per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_winner_per_round_among_16_racers() {
    let t = TestStore::new().await;
    for round in 0..50 {
        let tag = format!("seat:{round}");
        let q = Query::items_of(["SeatBooked"], [tag.clone()]);
        let cursor = t.cursor(&q).await;
        let results = race(16, |i| {
            let (store, condition) = (
                t.store.clone(),
                AppendCondition::new(q.clone()).after(cursor.clone()),
            );
            let booking = ev("SeatBooked", &[&tag, &format!("buyer:{i}")]);
            async move { store.append(vec![booking], Some(condition)).await }
        })
        .await;
        let mut wins = 0;
        for r in results {
            match r {
                Ok(_) => wins += 1,
                Err(Error::Conflict { .. }) => {}
                Err(e) => panic!("unexpected error: {e:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one booking must win");
        assert_eq!(t.events(&q).await.len(), 1, "round {round}");
    }
}

/// Property 2: a two-item condition fails when either item matches.
#[tokio::test]
async fn two_item_condition_fails_when_either_item_matches() {
    let t = TestStore::new().await;
    let decision = enrolment_decision("s1", "c1");
    let stale = t.cursor(&decision).await;

    // Only the first item matches: another student took c1.
    let p = t
        .store
        .append(vec![enrol("s2", "c1")], None)
        .await
        .unwrap()
        .positions[0];
    assert_conflict_at(
        t.append_if(vec![enrol("s1", "c1")], &decision, stale).await,
        p,
    );

    // Only the second item matches: s1 enrolled elsewhere.
    let fresh = t.cursor(&decision).await;
    let p = t
        .store
        .append(vec![enrol("s1", "c9")], None)
        .await
        .unwrap()
        .positions[0];
    assert_conflict_at(
        t.append_if(vec![enrol("s1", "c1")], &decision, fresh).await,
        p,
    );

    // Neither matches (other type, other student and course): the append goes through.
    let fresh = t.cursor(&decision).await;
    t.store
        .append(
            vec![enrol("s3", "c3"), ev("CourseRenamed", &["course:c1"])],
            None,
        )
        .await
        .unwrap();
    t.append_if(vec![enrol("s1", "c1")], &decision, fresh)
        .await
        .unwrap();
}

/// Property 2, raced: a capacity-1 course, four students, both items in the condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_item_condition_race_has_one_winner() {
    let t = TestStore::new().await;
    for round in 0..20 {
        let course = format!("r{round}");
        let results = race(4, |s| {
            let (store, course, student) =
                (t.store.clone(), course.clone(), format!("{round}-{s}"));
            async move {
                let q = enrolment_decision(&student, &course);
                let read = store.read_all(&q, ReadOptions::default()).await?;
                let course_tag = format!("course:{course}");
                if read.events.iter().any(|e| e.tags().contains(&course_tag)) {
                    return Ok(false);
                }
                let condition = AppendCondition::new(q).after(read.cursor);
                store
                    .append(vec![enrol(&student, &course)], Some(condition))
                    .await
                    .map(|_| true)
            }
        })
        .await;
        for r in results {
            match r {
                Ok(_) | Err(Error::Conflict { .. }) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        let q = Query::items_of(["StudentEnrolled"], [format!("course:{course}")]);
        assert_eq!(t.events(&q).await.len(), 1);
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
    assert_conflict_at(
        t.append_if(
            vec![ev("SeatBooked", &["seat:1", "buyer:me"])],
            &q,
            read.cursor,
        )
        .await,
        p1,
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
    let condition = AppendCondition::new(q2.clone()).after(t.cursor(&q2).await);
    let store = t.store.clone();
    let waiting = tokio::spawn(async move {
        store
            .append(vec![ev("SeatBooked", &["seat:2"])], Some(condition))
            .await
    });
    // It must block on the in-flight writer's scope lock, and not finish before.
    eventually(
        "the conditional append waits on the in-flight writer's lock",
        DEADLINE,
        {
            let (t, waiting) = (&t, &waiting);
            move || async move {
                assert!(
                    !waiting.is_finished(),
                    "the conditional append must wait for the in-flight writer"
                );
                (t.lock_waits().await == 1).then_some(())
            }
        },
    )
    .await;
    assert!(
        !waiting.is_finished(),
        "the conditional append must wait for the in-flight writer"
    );
    late_tx.commit().await.unwrap();
    assert_conflict_at(waiting.await.unwrap(), p3);
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
    let before = t.cursor(&q).await;
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
    assert_conflict_at(
        t.append_if(vec![ev("Withdrawn", &["account:1"])], &q, before)
            .await,
        p,
    );
    // And no false conflict for a reader that did see it.
    t.append_if(vec![ev("Withdrawn", &["account:1"])], &q, after.cursor)
        .await
        .unwrap();
    unrelated.batch_execute("ROLLBACK").await.unwrap();
}

/// Property 5: a match-all condition fails if anything at all was appended after `after`.
#[tokio::test]
async fn match_all_condition_checks_everything() {
    let t = TestStore::new().await;
    let all = Query::all();
    t.store.append(vec![ev("A", &["x"])], None).await.unwrap();
    let cursor = t.cursor(&all).await;
    // Nothing new: succeeds.
    let r = t
        .append_if(vec![ev("B", &["y"])], &all, cursor.clone())
        .await
        .unwrap();
    // Something unrelated was appended after the cursor: fails.
    assert_conflict_at(
        t.append_if(vec![ev("C", &["z"])], &all, cursor).await,
        r.positions[0],
    );
    // Without a cursor, any event at all fails it.
    let err = t
        .store
        .append(vec![ev("C", &[])], Some(AppendCondition::new(all.clone())))
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
    t.append_if(vec![ev("D", &[])], &all, head).await.unwrap();
    let err = t
        .append_if(vec![ev("D", &[])], &all, Position(head.0))
        .await
        .unwrap_err();
    assert!(err.is_conflict());
}

/// Property 6: 16 clients with conditions on disjoint tags never conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disjoint_scopes_never_conflict() {
    let t = TestStore::new().await;
    let conflicts = race(16, |i| {
        let store = t.store.clone();
        async move {
            let tag = format!("account:{i}");
            let q = Query::items_of(["Deposited", "Withdrawn"], [tag.clone()]);
            let mut conflicts = 0;
            for _ in 0..25 {
                let read = store.read_all(&q, ReadOptions::default()).await.unwrap();
                let condition = AppendCondition::new(q.clone()).after(read.cursor);
                match store
                    .append(vec![ev("Deposited", &[&tag, "bank:1"])], Some(condition))
                    .await
                {
                    Ok(_) => {}
                    Err(Error::Conflict { .. }) => conflicts += 1,
                    Err(e) => panic!("{e:?}"),
                }
            }
            conflicts
        }
    })
    .await;
    assert_eq!(conflicts.iter().sum::<i32>(), 0);
    assert_eq!(t.count().await, 16 * 25);
}

/// The condition check scans the events after a near cursor (at most 64 behind the
/// head) by position, uses the tag index for a cursor further behind, and probes
/// the tag index alone when there is no cursor: a match near, far and anywhere, and
/// none at all near, far and anywhere, are each decided correctly, for a typed and
/// a match-all item. Cursors are bare positions, so only the position test can
/// catch the match.
#[tokio::test]
async fn condition_is_decided_inside_and_beyond_the_scan_window() {
    let t = TestStore::new().await;
    let q = Query::items_of(["Booked"], ["seat:w"]);
    let head = || async { Cursor::at(t.store.head().await.unwrap().unwrap()) };
    let filler = |n: usize, tag: &str| (0..n).map(|_| ev("Other", &[tag])).collect::<Vec<_>>();
    let booked = || vec![ev("Booked", &["seat:w", "x:1"])];
    t.store.append(filler(10, "other:0"), None).await.unwrap();

    let cursor = head().await;
    t.store.append(filler(20, "other:1"), None).await.unwrap();
    let near = t.store.append(booked(), None).await.unwrap().positions[0];
    assert_conflict_at(t.append_if(booked(), &q, cursor).await, near);

    let cursor = head().await;
    t.store.append(filler(2500, "other:2"), None).await.unwrap();
    let far = t.store.append(booked(), None).await.unwrap().positions[0];
    assert_conflict_at(t.append_if(booked(), &q, cursor).await, far);

    // Nothing matching after the cursor, near and far.
    let cursor = head().await;
    t.store.append(filler(25, "other:5"), None).await.unwrap();
    t.append_if(booked(), &q, cursor)
        .await
        .expect("no matching event after the cursor");
    let cursor = head().await;
    t.store.append(filler(2500, "other:3"), None).await.unwrap();
    t.append_if(booked(), &q, cursor)
        .await
        .expect("no matching event after the cursor");

    // No cursor: any matching event at all conflicts (the first is named), and a
    // tag with no events, or only events of other types, does not.
    let none = |q: &Query| Some(dcbflow::AppendCondition::new(q.clone()));
    let first_booked = t.events(&q).await[0].position;
    assert_conflict_at(t.store.append(booked(), none(&q)).await, first_booked);
    let fresh = Query::items_of(["Booked"], ["seat:fresh"]);
    t.store
        .append(vec![ev("Other", &["seat:fresh"])], None)
        .await
        .unwrap();
    t.store
        .append(vec![ev("Booked", &["seat:fresh"])], none(&fresh))
        .await
        .expect("no Booked event on a fresh seat");
    assert!(t.store.append(booked(), none(&fresh)).await.is_err());

    // A match-all item conflicts on any event after the cursor, far or near.
    let cursor = head().await;
    let first = t
        .store
        .append(filler(20, "other:6"), None)
        .await
        .unwrap()
        .positions[0];
    assert_conflict_at(t.append_if(booked(), &Query::all(), cursor).await, first);
    let cursor = head().await;
    let first = t
        .store
        .append(filler(3000, "other:4"), None)
        .await
        .unwrap()
        .positions[0];
    assert_conflict_at(t.append_if(booked(), &Query::all(), cursor).await, first);
}

/// A complete forward read's cursor is the log's head as of its snapshot, past
/// unrelated events: an append after it does not conflict with them, conflicts
/// with a matching event appended since, and still catches a matching writer that
/// was in flight during the read (below the cursor) once it commits.
#[tokio::test]
async fn a_complete_read_covers_up_to_the_head_of_its_snapshot() {
    let t = TestStore::new().await;
    let q = Query::items_of(["SeatBooked"], ["seat:h"]);
    t.store
        .append(vec![ev("SeatBooked", &["seat:h"])], None)
        .await
        .unwrap();
    // In flight during the read: a matching event, taken before the unrelated ones.
    let mut late = t.store.pool().get().await.unwrap();
    let late_tx = late.transaction().await.unwrap();
    let p_late = t
        .store
        .append_in_tx(&late_tx, vec![ev("SeatBooked", &["seat:h", "late"])], None)
        .await
        .unwrap()
        .positions[0];
    let unrelated = t
        .store
        .append(vec![ev("Other", &["x:1"]), ev("Other", &["x:2"])], None)
        .await
        .unwrap();
    let head = *unrelated.positions.last().unwrap();

    let read = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
    assert_eq!(read.events.len(), 1);
    assert_eq!(
        read.cursor.position,
        Some(head),
        "past the unrelated events"
    );
    // A limited read covers only what it yielded.
    let limited = t
        .store
        .read_all(&q, ReadOptions::default().limit(5))
        .await
        .unwrap();
    assert_eq!(limited.cursor.position, Some(read.events[0].position));

    // The in-flight writer commits below the cursor: the snapshot catches it.
    late_tx.commit().await.unwrap();
    assert_conflict_at(
        t.append_if(vec![ev("SeatBooked", &["seat:h"])], &q, read.cursor.clone())
            .await,
        p_late,
    );

    // Without it, nothing matching after the read: holds; after a matching append: fails.
    let q2 = Query::items_of(["SeatBooked"], ["seat:h2"]);
    t.store
        .append(vec![ev("SeatBooked", &["seat:h2"])], None)
        .await
        .unwrap();
    t.store
        .append(vec![ev("Other", &["x:3"])], None)
        .await
        .unwrap();
    let read = t.store.read_all(&q2, ReadOptions::default()).await.unwrap();
    let r = t
        .append_if(
            vec![ev("SeatBooked", &["seat:h2"])],
            &q2,
            read.cursor.clone(),
        )
        .await
        .expect("nothing matching since the read");
    assert_conflict_at(
        t.append_if(vec![ev("SeatBooked", &["seat:h2"])], &q2, read.cursor)
            .await,
        r.positions[0],
    );
}

/// An unconditional append of an event in a locked scope waits for the scope's
/// holder, so a decision taken under the scope lock cannot be overtaken by an
/// event it did not see (the plain `INSERT` takes the same shared scope locks
/// as every other append, before its events get positions); an append outside
/// the scope does not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unconditional_append_into_a_locked_scope_waits_for_the_decision() {
    let t = TestStore::new().await;
    let q = Query::items_of(["SeatBooked"], ["seat:1"]);
    let mut client = t.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    t.store.lock_scope_in_tx(&tx, &q).await.unwrap();
    // Outside the scope: goes through at once.
    t.store
        .append(vec![ev("SeatBooked", &["seat:2"])], None)
        .await
        .unwrap();
    let store = t.store.clone();
    let inside = tokio::spawn(async move {
        store
            .append(vec![ev("SeatBooked", &["seat:1"])], None)
            .await
    });
    eventually(
        "the append into the locked scope waits",
        DEADLINE,
        || async { (t.lock_waits().await == 1).then_some(()) },
    )
    .await;
    assert!(!inside.is_finished());
    // The decision, taken with the scope held: nothing in the scope yet.
    let seen = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
    assert!(seen.events.is_empty());
    t.store
        .append_in_tx(
            &tx,
            vec![ev("SeatBooked", &["seat:1"])],
            Some(AppendCondition::new(q.clone()).after(seen.cursor)),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let waited = inside.await.unwrap().unwrap();
    let booked = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
    assert_eq!(booked.events.len(), 2);
    assert_eq!(
        booked.events[1].position, waited.positions[0],
        "the waiting append comes after the decision"
    );
}

/// A conditional append with a bare cursor at the head waits for the scope's
/// lock, held by a transaction that has drawn no position yet; that transaction
/// then appends a matching event and commits. The event lies beyond the head
/// the waiting append saw when it started, and the append must still fail: the
/// window after the cursor is read up to the head as it stands once the locks
/// are held, not as it stood before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_matching_event_committed_while_the_append_waited_for_its_lock_fails_it() {
    let t = TestStore::new().await;
    let q = Query::items_of(["SeatBooked"], ["seat:1"]);
    t.store
        .append(vec![ev("Other", &["seat:0"])], None)
        .await
        .unwrap();
    let head = t.store.head().await.unwrap().expect("one event");
    let mut client = t.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    t.store.lock_scope_in_tx(&tx, &q).await.unwrap();
    let store = t.store.clone();
    let condition = AppendCondition::new(q.clone()).after(Cursor::at(head));
    let waiting = tokio::spawn(async move {
        store
            .append(vec![ev("SeatBooked", &["seat:1"])], Some(condition))
            .await
    });
    eventually(
        "the conditional append waits for the scope",
        DEADLINE,
        || async { (t.lock_waits().await == 1).then_some(()) },
    )
    .await;
    t.store
        .append_in_tx(&tx, vec![ev("SeatBooked", &["seat:1"])], None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    match waiting.await.unwrap() {
        Err(Error::Conflict { .. }) => {}
        other => panic!("the waiting append must see the committed booking: {other:?}"),
    }
    assert_eq!(t.events(&q).await.len(), 1, "one booking");
}

/// The condition's checks read through the indexes however small the table was
/// when the connection first planned them. PL/pgSQL caches each statement's plan
/// per connection; planned on a near-empty table (every new store, until the
/// first ANALYZE), "the events after the cursor, in order" became a sequential
/// scan and a sort, and every later conditional append on that connection read
/// the whole table. One connection plans the checks on an empty store, the table
/// grows to 20,000 events without an ANALYZE, and conditional appends on that
/// connection, with a bare cursor (decided by the window after it) and with a
/// read's cursor (its snapshot, condition_conflict), must not scan the table.
#[tokio::test]
async fn conditional_appends_use_the_indexes_after_the_table_grows_from_empty() {
    let ts = TestStore::new().await;
    let store = &ts.store;
    let q = Query::items_of(["Booked"], ["seat:1"]);
    let mut c = store.pool().get().await.unwrap();
    // More calls than PostgreSQL's five custom plans before a generic one.
    for _ in 0..8 {
        booking_on(store, &mut c, &q, false).await;
        booking_on(store, &mut c, &q, true).await;
    }
    // Grow the table on the same connection, with no ANALYZE in between.
    for batch in 0..20 {
        let tx = c.transaction().await.unwrap();
        let filler = (0..1000)
            .map(|i| ev("Filler", &[&format!("filler:{batch}:{i}")]))
            .collect();
        store.append_in_tx(&tx, filler, None).await.unwrap();
        tx.commit().await.unwrap();
    }
    for snapshot in [false, true] {
        let scans = booking_on(store, &mut c, &q, snapshot).await;
        assert_eq!(
            scans,
            0,
            "a conditional append ({} cursor) scanned the events table",
            if snapshot { "a read's" } else { "a bare" }
        );
    }
}

/// A conditional booking of seat 1 in a transaction on `c`, after a read of `q`
/// (its cursor with the read's snapshot, or bare); the sequential scans of the
/// events table the transaction made.
async fn booking_on(
    store: &dcbflow::Store,
    c: &mut deadpool_postgres::Object,
    q: &Query,
    snapshot: bool,
) -> i64 {
    let read = store.read_all(q, ReadOptions::default()).await.unwrap();
    let cursor = match (snapshot, read.cursor.position) {
        (false, Some(p)) => Cursor::at(p),
        _ => read.cursor,
    };
    // The backend's counts not yet reported include earlier transactions':
    // the difference across the append is the append's own.
    let scans = async |tx: &deadpool_postgres::Transaction<'_>| -> i64 {
        tx.query_one(
            "SELECT coalesce(sum(seq_scan), 0)::bigint FROM pg_stat_xact_user_tables \
             WHERE schemaname = $1 AND relname = 'events'",
            &[&store.schema()],
        )
        .await
        .unwrap()
        .get(0)
    };
    let tx = c.transaction().await.unwrap();
    let before = scans(&tx).await;
    store
        .append_in_tx(
            &tx,
            vec![ev("Booked", &["seat:1"])],
            Some(AppendCondition::new(q.clone()).after(cursor)),
        )
        .await
        .expect("no conflict: nothing else books seat 1");
    let scans = scans(&tx).await - before;
    tx.commit().await.unwrap();
    scans
}
