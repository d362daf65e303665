//! Versioned schema migrations, layer by layer.
//!
//! Every layer of the crate owns its SQL (`sql/<layer>/NNNN_name.sql`) and hands
//! it to this one migrator as a [`Layer`]: the store's own layer when a store is
//! built, the layers above it the first time they are used on a store (see
//! [`Store::ensure_layer`](super::Store::ensure_layer)). Each file runs in its own
//! transaction under a database-wide advisory lock derived from the schema name,
//! with `search_path` set to the schema, and is recorded with its layer, version
//! and SHA-256 checksum. Processes starting at once wait for each other; a file
//! that changed after it was applied is refused, and so is a version of a layer
//! newer than this build knows. Rows of layers this build does not have (a
//! store-only build looking at a schema a full build migrated) are left alone.

use sha2::{Digest, Sha256};

use super::error::{Error, Result};
use super::locks::{self, Kind};

/// One migration file of a layer.
#[derive(Debug)]
pub(crate) struct Migration {
    /// Its version within the layer, from 1, without gaps.
    pub(crate) version: i32,
    /// Its file name (recorded, and shown in errors).
    pub(crate) name: &'static str,
    /// Its SQL, run with `search_path` set to the store's schema.
    pub(crate) sql: &'static str,
}

/// The migrations of one layer, applied in order.
#[derive(Debug)]
pub(crate) struct Layer {
    /// The layer's name (`store`, `projection`, `command`, `outbox`, `flow`).
    pub(crate) name: &'static str,
    /// Its files, in version order.
    pub(crate) migrations: &'static [Migration],
}

/// The store's own layer: the event log, the conditional append, the horizon.
pub(crate) const STORE: Layer = Layer {
    name: "store",
    migrations: &[
        Migration {
            version: 1,
            name: "0001_events.sql",
            sql: include_str!("../../sql/store/0001_events.sql"),
        },
        Migration {
            version: 2,
            name: "0002_append.sql",
            sql: include_str!("../../sql/store/0002_append.sql"),
        },
        Migration {
            version: 3,
            name: "0003_horizon.sql",
            sql: include_str!("../../sql/store/0003_horizon.sql"),
        },
        Migration {
            version: 4,
            name: "0004_guards.sql",
            sql: include_str!("../../sql/store/0004_guards.sql"),
        },
    ],
};

/// Applies `layer`'s migrations to `schema` that are not applied yet.
pub(crate) async fn run(
    client: &mut deadpool_postgres::Object,
    schema: &str,
    layer: &Layer,
) -> Result<()> {
    if is_current(client, schema, layer).await {
        return Ok(());
    }
    let lock = locks::key(schema, Kind::Migrate, "");
    let newest_known = layer.migrations.last().map_or(0, |m| m.version);
    for m in layer.migrations {
        let checksum = Sha256::digest(m.sql.as_bytes()).to_vec();
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
            .await?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS \"{schema}\".migrations (
                 layer      text NOT NULL,
                 version    int NOT NULL,
                 name       text NOT NULL,
                 checksum   bytea NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (layer, version)
             );
             SET LOCAL search_path TO \"{schema}\";"
        ))
        .await?;
        let applied = tx
            .query(
                "SELECT version, checksum FROM migrations WHERE layer = $1 ORDER BY version",
                &[&layer.name],
            )
            .await?;
        if let Some(row) = applied.last() {
            let newest: i32 = row.get(0);
            if newest > newest_known {
                return Err(Error::MigrationUnknown {
                    schema: schema.to_owned(),
                    layer: layer.name,
                    version: newest,
                });
            }
        }
        match applied.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            Some(row) => {
                if row.get::<_, Vec<u8>>(1) != checksum {
                    return Err(Error::MigrationChanged {
                        schema: schema.to_owned(),
                        layer: layer.name,
                        version: m.version,
                        name: m.name.to_owned(),
                    });
                }
            }
            None => {
                tracing::info!(
                    db.namespace = schema,
                    layer = layer.name,
                    version = m.version,
                    name = m.name,
                    "applying migration"
                );
                tx.batch_execute(m.sql).await?;
                tx.execute(
                    "INSERT INTO migrations (layer, version, name, checksum) VALUES ($1, $2, $3, $4)",
                    &[&layer.name, &m.version, &m.name, &checksum],
                )
                .await?;
            }
        }
        tx.commit().await?;
    }
    Ok(())
}

/// `true` if every migration of `layer` is applied with its checksum and nothing
/// newer is: the common case at start-up, answered with one query and no lock.
/// Anything else (including a missing table) goes through the locked path, which
/// reports errors.
pub(crate) async fn is_current(
    client: &deadpool_postgres::Object,
    schema: &str,
    layer: &Layer,
) -> bool {
    let sql = format!(
        "SELECT version, checksum FROM \"{schema}\".migrations WHERE layer = $1 ORDER BY version"
    );
    let Ok(rows) = client.query(&sql, &[&layer.name]).await else {
        return false;
    };
    rows.len() == layer.migrations.len()
        && rows.iter().zip(layer.migrations).all(|(row, m)| {
            row.get::<_, i32>(0) == m.version
                && row.get::<_, Vec<u8>>(1) == Sha256::digest(m.sql.as_bytes()).to_vec()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_versions_are_dense() {
        for (i, m) in STORE.migrations.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
    }
}
