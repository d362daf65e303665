//! Migrations: concurrent starts, checksums, independent schemas.

use dcbflow::{AppendCondition, Error, Query, ReadOptions, Store, pool_from_url};

use crate::support::{DEADLINE, TestStore, db, ev, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_migrate_once() {
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let url = db::Database::shared_url();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (schema, url) = (schema.clone(), url.to_string());
            tokio::spawn(async move {
                Store::builder(pool_from_url(&url, Some(2)).unwrap())
                    .schema(schema)
                    .build()
                    .await
            })
        })
        .collect();
    let mut stores = Vec::new();
    for task in tasks {
        stores.push(task.await.unwrap().expect("every process starts"));
    }
    stores[0].append(vec![ev("A", &[])], None).await.unwrap();
    let c = stores[0].pool().get().await.unwrap();
    let n: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".migrations"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .unwrap()
        .count();
    assert_eq!(n as usize, files, "each migration in sql/ applied once");
    c.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

#[tokio::test]
async fn changed_migration_is_refused() {
    let t = TestStore::new().await;
    let c = t.store.pool().get().await.unwrap();
    c.execute(
        &format!("UPDATE \"{}\".migrations SET checksum = '\\x00'", t.schema),
        &[],
    )
    .await
    .unwrap();
    let err = t.store.migrate().await.unwrap_err();
    assert!(
        matches!(err, Error::MigrationChanged { version: 1, .. }),
        "{err:?}"
    );
    c.execute(
        &format!(
            "INSERT INTO \"{}\".migrations VALUES (999, 'future.sql', '\\x00')",
            t.schema
        ),
        &[],
    )
    .await
    .unwrap();
    let err = t.store.migrate().await.unwrap_err();
    assert!(
        matches!(err, Error::MigrationUnknown { version: 999, .. }),
        "{err:?}"
    );
}

/// Two stores in one database share nothing: not events, not locks.
#[tokio::test]
async fn stores_in_different_schemas_are_independent() {
    let a = TestStore::new().await;
    let b = TestStore::new().await;
    a.store.append(vec![ev("A", &["k:1"])], None).await.unwrap();
    assert_eq!(b.count().await, 0);

    // A holds the scope of k:1 in an open transaction; B's conditional append on the
    // same tag does not wait for it.
    let mut client = a.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    a.store
        .append_in_tx(&tx, vec![ev("A", &["k:1"])], None)
        .await
        .unwrap();
    let q = Query::items_of(["A"], ["k:1"]);
    let cursor = b
        .store
        .read_all(&q, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    let store = b.store.clone();
    let append = tokio::spawn(async move {
        store
            .append(
                vec![ev("A", &["k:1"])],
                Some(AppendCondition::new(q).after(cursor)),
            )
            .await
    });
    // It completes, and never waits for a lock on the way.
    eventually("B's conditional append completes", DEADLINE, {
        let (b, append) = (&b, &append);
        move || async move {
            assert_eq!(b.lock_waits().await, 0, "no cross-schema blocking");
            append.is_finished().then_some(())
        }
    })
    .await;
    append.await.unwrap().unwrap();
    tx.rollback().await.unwrap();
}
