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
            &format!("SELECT count(*) FROM \"{schema}\".migrations WHERE layer = 'store'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/store"))
        .unwrap()
        .count();
    assert_eq!(
        n as usize, files,
        "each migration in sql/store applied once"
    );
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
            "INSERT INTO \"{}\".migrations VALUES ('store', 999, 'future.sql', '\\x00')",
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

/// Each layer records its own migrations; upper layers install on first use; a
/// handle that does not migrate refuses with a typed error instead of failing on
/// a missing table; rows of layers this build does not have are left alone.
#[tokio::test]
async fn layers_migrate_on_first_use_and_non_migrating_handles_refuse() {
    let t = TestStore::new().await;
    let c = t.store.pool().get().await.unwrap();
    let layers = |c: deadpool_postgres::Object, schema: String| async move {
        let rows = c
            .query(
                &format!("SELECT DISTINCT layer FROM \"{schema}\".migrations ORDER BY layer"),
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    assert_eq!(layers(c, t.schema.clone()).await, ["store"]);

    // A second handle on the schema that runs no DDL.
    let other = Store::builder_for_url(&t.url, Some(2))
        .unwrap()
        .schema(&t.schema)
        .migrate(false)
        .build()
        .await
        .unwrap();
    let err = dcbflow::CommandExecutor::new(other.clone())
        .migrate()
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::SchemaNotInstalled {
                layer: "command",
                ..
            }
        ),
        "{err:?}"
    );

    dcbflow::CommandExecutor::new(t.store.clone())
        .migrate()
        .await
        .unwrap();
    let c = t.store.pool().get().await.unwrap();
    assert_eq!(layers(c, t.schema.clone()).await, ["command", "store"]);
    // Now installed: the non-migrating handle finds it current.
    dcbflow::CommandExecutor::new(other)
        .migrate()
        .await
        .unwrap();

    // A layer of a newer, fuller build does not stop this one.
    let c = t.store.pool().get().await.unwrap();
    c.execute(
        &format!(
            "INSERT INTO \"{}\".migrations VALUES ('from_the_future', 1, 'x.sql', '\\x00')",
            t.schema
        ),
        &[],
    )
    .await
    .unwrap();
    t.store.migrate().await.unwrap();
}
