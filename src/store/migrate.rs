//! Versioned schema migrations, embedded from `sql/`.
//!
//! Each file runs in its own transaction under a database-wide advisory lock derived
//! from the schema name, with `search_path` set to the schema, and is recorded with
//! its SHA-256 checksum. Processes starting at once wait for each other; a file that
//! changed after it was applied is refused.

use sha2::{Digest, Sha256};

use super::locks::{self, Kind};
use crate::error::{Error, Result};

/// A migration: version, file name, SQL.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_events.sql",
        sql: include_str!("../../sql/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "0002_commands.sql",
        sql: include_str!("../../sql/0002_commands.sql"),
    },
    Migration {
        version: 3,
        name: "0003_subscriptions.sql",
        sql: include_str!("../../sql/0003_subscriptions.sql"),
    },
    Migration {
        version: 4,
        name: "0004_condition_window.sql",
        sql: include_str!("../../sql/0004_condition_window.sql"),
    },
    Migration {
        version: 5,
        name: "0005_flows.sql",
        sql: include_str!("../../sql/0005_flows.sql"),
    },
    Migration {
        version: 6,
        name: "0006_deferred_notify.sql",
        sql: include_str!("../../sql/0006_deferred_notify.sql"),
    },
];

pub(crate) async fn run(client: &mut deadpool_postgres::Object, schema: &str) -> Result<()> {
    if is_current(client, schema).await {
        return Ok(());
    }
    let lock = locks::key(schema, Kind::Migrate, "");
    for m in MIGRATIONS {
        let checksum = Sha256::digest(m.sql.as_bytes()).to_vec();
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
            .await?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS \"{schema}\".migrations (
                 version    int PRIMARY KEY,
                 name       text NOT NULL,
                 checksum   bytea NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );
             SET LOCAL search_path TO \"{schema}\";"
        ))
        .await?;
        let applied = tx
            .query(
                "SELECT version, checksum FROM migrations ORDER BY version",
                &[],
            )
            .await?;
        if let Some(row) = applied.last() {
            let newest: i32 = row.get(0);
            if newest > MIGRATIONS.last().map_or(0, |m| m.version) {
                return Err(Error::MigrationUnknown {
                    schema: schema.to_owned(),
                    version: newest,
                });
            }
        }
        match applied.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            Some(row) => {
                if row.get::<_, Vec<u8>>(1) != checksum {
                    return Err(Error::MigrationChanged {
                        schema: schema.to_owned(),
                        version: m.version,
                        name: m.name.to_owned(),
                    });
                }
            }
            None => {
                tracing::info!(
                    schema,
                    version = m.version,
                    name = m.name,
                    "applying migration"
                );
                tx.batch_execute(m.sql).await?;
                tx.execute(
                    "INSERT INTO migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[&m.version, &m.name, &checksum],
                )
                .await?;
            }
        }
        tx.commit().await?;
    }
    Ok(())
}

/// `true` if every migration is applied with its checksum and nothing else is: the
/// common case at start-up, answered with one query and no lock. Anything else
/// (including a missing table) goes through the locked path, which reports errors.
async fn is_current(client: &deadpool_postgres::Object, schema: &str) -> bool {
    let sql = format!("SELECT version, checksum FROM \"{schema}\".migrations ORDER BY version");
    let Ok(rows) = client.query(&sql, &[]).await else {
        return false;
    };
    rows.len() == MIGRATIONS.len()
        && rows.iter().zip(MIGRATIONS).all(|(row, m)| {
            row.get::<_, i32>(0) == m.version
                && row.get::<_, Vec<u8>>(1) == Sha256::digest(m.sql.as_bytes()).to_vec()
        })
}
