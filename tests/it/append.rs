//! Append basics, idempotency, transactions, large imports, metacharacters.

use dcbflow::{AppendCondition, Event, InvalidInput, Query, QueryItem, ReadOptions};
use serde_json::json;
use uuid::Uuid;

use crate::support::{TestStore, ev};

#[tokio::test]
async fn append_returns_positions_and_one_transaction_id() {
    let t = TestStore::new().await;
    let r = t
        .store
        .append(
            vec![
                ev("A", &["x:1"]).with_metadata(json!({"correlation": "c1"})),
                ev("B", &["x:1", "y:2"]),
                ev("C", &[]),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.positions.len(), 3);
    assert!(r.positions.windows(2).all(|w| w[0] < w[1]));
    assert!(!r.replayed);
    let all = t
        .store
        .read_all(&Query::all(), ReadOptions::default())
        .await
        .unwrap();
    assert_eq!(all.events.len(), 3);
    for (e, p) in all.events.iter().zip(&r.positions) {
        assert_eq!(e.position, *p);
        assert_eq!(e.transaction_id, r.transaction_id);
    }
    assert_eq!(
        all.events[0].event.metadata,
        Some(json!({"correlation": "c1"}))
    );
    assert_eq!(all.events[1].tags(), ["x:1", "y:2"]);
    assert!(all.events[2].tags().is_empty());
    let r2 = t.store.append(vec![ev("A", &[])], None).await.unwrap();
    assert!(r2.transaction_id > r.transaction_id);
}

#[tokio::test]
async fn idempotent_append_stores_once_and_returns_original_positions() {
    let t = TestStore::new().await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let events = || -> Vec<Event> {
        ids.iter()
            .map(|id| ev("Paid", &["order:1"]).with_id(*id))
            .collect()
    };
    let first = t.store.append(events(), None).await.unwrap();
    assert!(!first.replayed);
    // The response was "lost": the client sends the same append again.
    let again = t.store.append(events(), None).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.positions, first.positions);
    assert_eq!(again.transaction_id, first.transaction_id);
    assert_eq!(t.count().await, 3);

    // A retried conditional append is a replay, not a conflict with itself.
    let q = Query::items_of(["Shipped"], ["order:2"]);
    let cursor = t
        .store
        .read_all(&q, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    let id = Uuid::new_v4();
    let cond = AppendCondition::new(q).after(cursor);
    let a = t
        .store
        .append(
            vec![ev("Shipped", &["order:2"]).with_id(id)],
            Some(cond.clone()),
        )
        .await
        .unwrap();
    let b = t
        .store
        .append(vec![ev("Shipped", &["order:2"]).with_id(id)], Some(cond))
        .await
        .unwrap();
    assert!(b.replayed);
    assert_eq!(a.positions, b.positions);
    assert_eq!(t.count().await, 4);

    // Overlapping, but different, appends are refused and write nothing.
    let err = t
        .store
        .append(
            vec![
                ev("Paid", &[]).with_id(ids[0]),
                ev("Paid", &[]).with_id(Uuid::new_v4()),
            ],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            dcbflow::Error::InvalidInput(InvalidInput::IdsAlreadyStored)
        ),
        "{err:?}"
    );
    assert_eq!(t.count().await, 4);
}

#[tokio::test]
async fn concurrent_duplicates_are_stored_once() {
    let t = TestStore::new().await;
    for round in 0..10 {
        let ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = t.store.clone();
                let events: Vec<Event> = ids
                    .iter()
                    .map(|id| ev("E", &["k:1"]).with_id(*id))
                    .collect();
                tokio::spawn(async move { store.append(events, None).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap().unwrap());
        }
        assert!(
            results.iter().all(|r| r.positions == results[0].positions),
            "round {round}"
        );
        assert_eq!(
            results.iter().filter(|r| !r.replayed).count(),
            1,
            "round {round}"
        );
        assert_eq!(t.count().await, 2 * (round + 1));
    }
}

#[tokio::test]
async fn append_in_tx_commits_or_rolls_back_with_the_caller() {
    let t = TestStore::new().await;
    let mut client = t.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    t.store
        .append_in_tx(&tx, vec![ev("A", &["t:1"])], None)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(t.count().await, 0);

    let tx = client.transaction().await.unwrap();
    let r = t
        .store
        .append_in_tx(&tx, vec![ev("A", &["t:1"])], None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(t.count().await, 1);
    assert_eq!(t.store.head().await.unwrap(), Some(r.positions[0]));

    // REPEATABLE READ would let the condition check miss concurrent writers: refused.
    let tx = client
        .build_transaction()
        .isolation_level(dcbflow::tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let err = t
        .store
        .append_in_tx(&tx, vec![ev("A", &[])], None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            dcbflow::Error::InvalidInput(InvalidInput::IsolationLevel)
        ),
        "{err:?}"
    );
    drop(tx);
    assert_eq!(t.count().await, 1);

    // The same on the store's own connections when the server's default is
    // another level: the plain unconditional append, the conditional one.
    let sep = if t.url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{sep}options=-c%20default_transaction_isolation%3Drepeatable%5C%20read",
        t.url
    );
    let other = dcbflow::Store::builder_for_url(&url, Some(2))
        .unwrap()
        .schema(&t.schema)
        .migrate(false)
        .build()
        .await
        .unwrap();
    let plain = other.append(vec![ev("A", &[])], None).await;
    assert!(
        matches!(
            plain,
            Err(dcbflow::Error::InvalidInput(InvalidInput::IsolationLevel))
        ),
        "{plain:?}"
    );
    let conditional = other
        .append(
            vec![ev("A", &["t:9"])],
            Some(AppendCondition::new(Query::items_of(["A"], ["t:9"]))),
        )
        .await;
    assert!(
        matches!(
            conditional,
            Err(dcbflow::Error::InvalidInput(InvalidInput::IsolationLevel))
        ),
        "{conditional:?}"
    );
    assert_eq!(t.count().await, 1);
}

#[tokio::test]
async fn large_import_with_distinct_tags_does_not_exhaust_the_lock_table() {
    // 10,000 distinct tags would need 10,000 advisory locks in one transaction, more
    // than PostgreSQL's default lock table holds; the append falls back to one lock.
    let t = TestStore::new().await;
    let events: Vec<Event> = (0..10_000)
        .map(|i| {
            Event::new(
                "Imported",
                [format!("item:{i}"), format!("batch:{}", i % 7)],
                json!({"i": i}),
            )
        })
        .collect();
    let r = t.store.append(events, None).await.unwrap();
    assert_eq!(r.positions.len(), 10_000);
    let q = Query::from_items([QueryItem::new().tags(["item:9999"])]);
    let found = t.store.read_all(&q, ReadOptions::default()).await.unwrap();
    assert_eq!(found.events.len(), 1);
    assert_eq!(found.events[0].data()["i"], 9999);
}

#[tokio::test]
async fn metacharacters_in_tags_and_types_round_trip_and_stay_inert() {
    let t = TestStore::new().await;
    let nasty = [
        "a'b",
        "c\\d",
        "e,f",
        "{g}",
        "h i",
        "ünïcødé:日本",
        "\"quoted\"",
        "x' OR '1'='1",
        "'); DROP TABLE events; --",
        "NULL",
        "[]",
        "$1",
        "tab\there",
        "new\nline",
    ];
    for (i, s) in nasty.iter().enumerate() {
        t.store
            .append(
                vec![Event::new(*s, [*s, "shared"], json!({"i": i, "s": s}))],
                None,
            )
            .await
            .unwrap();
    }
    // "shared" alone must not match a tag like "shared" inside braces etc.
    for (i, s) in nasty.iter().enumerate() {
        let by_tag = t
            .store
            .read_all(
                &Query::from_items([QueryItem::new().tags([*s])]),
                ReadOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(by_tag.events.len(), 1, "tag {s:?}");
        let e = &by_tag.events[0];
        assert_eq!(e.event_type(), *s);
        let mut expected = vec![s.to_string(), "shared".to_string()];
        expected.sort();
        assert_eq!(e.tags(), expected.as_slice());
        assert_eq!(e.data()["i"], i);
        let by_type = t
            .store
            .read_all(
                &Query::from_items([QueryItem::new().types([*s])]),
                ReadOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(by_type.events.len(), 1, "type {s:?}");
    }
    // Conditions with such tags work too, and the table is intact.
    let q = Query::from_items([QueryItem::new().tags(["x' OR '1'='1"])]);
    let err = t
        .store
        .append(vec![ev("Z", &["z"])], Some(AppendCondition::new(q)))
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    assert_eq!(t.count().await, nasty.len() as i64);
}
