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

/// A store created by the migrations of an earlier release (1 to 4) and holding
/// events, with and without ids, upgrades in place: every event is kept, stored
/// ids still replay and still refuse other content, and new appends go on.
#[tokio::test]
async fn a_store_of_the_previous_schema_upgrades_and_keeps_its_events() {
    use sha2::Digest;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let _drop = DropSchema(schema.clone());
    let url = db::Database::shared_url();
    let (raw, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let old = [
        (
            "0001_events.sql",
            include_str!("../../sql/store/0001_events.sql"),
        ),
        (
            "0002_append.sql",
            include_str!("../../sql/store/0002_append.sql"),
        ),
        (
            "0003_horizon.sql",
            include_str!("../../sql/store/0003_horizon.sql"),
        ),
        (
            "0004_guards.sql",
            include_str!("../../sql/store/0004_guards.sql"),
        ),
    ];
    raw.batch_execute(&format!(
        "CREATE SCHEMA \"{schema}\";
         CREATE TABLE \"{schema}\".migrations (
             layer text NOT NULL, version int NOT NULL, name text NOT NULL,
             checksum bytea NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (layer, version));
         SET search_path TO \"{schema}\";"
    ))
    .await
    .unwrap();
    for (i, (name, sql)) in old.iter().enumerate() {
        raw.batch_execute(sql).await.unwrap();
        let checksum = sha2::Sha256::digest(sql.as_bytes()).to_vec();
        raw.execute(
            "INSERT INTO migrations (layer, version, name, checksum) VALUES ('store', $1, $2, $3)",
            &[&(i as i32 + 1), name, &checksum],
        )
        .await
        .unwrap();
    }
    // Events written by the old entry point: one with an id, two without.
    let id = uuid::Uuid::new_v4();
    raw.batch_execute(&format!(
        "SELECT * FROM append_guarded('{{}}', '{{}}', ARRAY['Old', 'Old'], ARRAY['k:1', 'k:2'], \
             ARRAY[1, 2], ARRAY[1, 1], ARRAY['{{\"n\": 1}}'::jsonb, '{{\"n\": 2}}'], \
             ARRAY[NULL::jsonb, NULL], ARRAY[NULL::uuid, NULL], NULL, NULL, NULL, NULL, 0); \
         SELECT * FROM append_guarded('{{}}', '{{}}', ARRAY['Paid'], ARRAY['k:3'], ARRAY[1], ARRAY[1], \
             ARRAY['{{\"n\": 3}}'::jsonb], ARRAY[NULL::jsonb], ARRAY['{id}'::uuid], NULL, NULL, NULL, NULL, 0);"
    ))
    .await
    .unwrap();

    let store = Store::builder(pool_from_url(url, Some(2)).unwrap())
        .schema(&schema)
        .build()
        .await
        .expect("the upgrade runs");
    assert!(store.migration_status().await.unwrap().current);
    let all = store
        .read_all(&Query::all(), ReadOptions::default())
        .await
        .unwrap()
        .events;
    assert_eq!(
        all.iter().map(|e| e.event_type()).collect::<Vec<_>>(),
        ["Old", "Old", "Paid"],
        "every event is kept"
    );
    // The stored id replays, and refuses other content.
    let paid = dcbflow::Event::new("Paid", ["k:3"], serde_json::json!({"n": 3})).with_id(id);
    let replay = store.append(vec![paid.clone()], None).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.positions, vec![all[2].position]);
    let other = dcbflow::Event::new("Paid", ["k:3"], serde_json::json!({"n": 4})).with_id(id);
    assert!(matches!(
        store.append(vec![other], None).await,
        Err(Error::InvalidInput(dcbflow::InvalidInput::IdReused { .. }))
    ));
    // Ids stay unique at the index, whatever the path: a raw duplicate fails.
    let dup = raw
        .batch_execute(&format!(
            "INSERT INTO events (transaction_id, type, tags, data, id) \
             VALUES (pg_current_xact_id(), 'X', '{{}}', '{{}}', '{id}')"
        ))
        .await;
    assert_eq!(
        dup.unwrap_err().code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    // New appends, plain and conditional, go on after the old events.
    let q = Query::items_of(["Old"], ["k:1"]);
    let cursor = store
        .read_all(&q, ReadOptions::default())
        .await
        .unwrap()
        .cursor;
    assert!(matches!(
        store
            .append(
                vec![ev("Old", &["k:1"])],
                Some(AppendCondition::new(q.clone()))
            )
            .await,
        Err(Error::Conflict { .. })
    ));
    let r = store
        .append(
            vec![ev("Old", &["k:1"])],
            Some(AppendCondition::new(q).after(cursor)),
        )
        .await
        .unwrap();
    assert!(r.last_position() > all[2].position);
}

struct DropSchema(String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        crate::support::drop_schema(&self.0);
    }
}
