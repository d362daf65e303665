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

use std::sync::Mutex;

use serde::Serialize;
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
        Migration {
            version: 5,
            name: "0005_lean_append.sql",
            sql: include_str!("../../sql/store/0005_lean_append.sql"),
        },
        Migration {
            version: 6,
            name: "0006_index_plans.sql",
            sql: include_str!("../../sql/store/0006_index_plans.sql"),
        },
        Migration {
            version: 7,
            name: "0007_lean_checks.sql",
            sql: include_str!("../../sql/store/0007_lean_checks.sql"),
        },
    ],
};

/// Whether a store's schema is what this binary expects (see
/// [`Store::migration_status`](super::Store::migration_status)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// `true` if every installed layer this process knows has all of its
    /// migrations applied, with the checksums of this binary's files, and none
    /// newer; the store layer always counts as installed.
    pub current: bool,
    /// Every layer this process knows, and every other layer recorded in the
    /// schema: the store first, then by name.
    pub layers: Vec<LayerStatus>,
}

/// The migrations of one layer: recorded in the schema, and known to this binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LayerStatus {
    /// The layer's name (`store`, `projection`, `command`, `outbox`, `flow`).
    pub layer: String,
    /// Migrations of the layer recorded as applied in the schema (0: not installed).
    pub applied: u32,
    /// Migrations of the layer this process knows (0: a layer recorded by another
    /// build, which this one leaves alone).
    pub known: u32,
    /// Versions whose recorded checksum differs from this binary's file.
    pub changed: Vec<u32>,
    /// Whether this layer is current: not installed (upper layers install on
    /// first use), or installed with exactly the known migrations and checksums.
    /// Always `true` for a layer this process does not know.
    pub current: bool,
}

/// The upper layers this process has installed or checked on some store (see
/// [`register`]); the store layer is always known.
static KNOWN: Mutex<Vec<&'static Layer>> = Mutex::new(Vec::new());

/// Makes `layer` known to [`status`] in this process. The migrator cannot name
/// the layers above the store (they own their SQL and sit above it), so each is
/// registered when it first goes through
/// [`Store::ensure_layer`](super::Store::ensure_layer): every upper layer's
/// `migrate()` and first use does.
pub(crate) fn register(layer: &'static Layer) {
    let mut known = KNOWN.lock().expect("known layers lock");
    if !known.iter().any(|l| l.name == layer.name) {
        known.push(layer);
    }
}

/// The layers this process knows: the store, then the registered ones by name.
fn known_layers() -> Vec<&'static Layer> {
    let mut upper = KNOWN.lock().expect("known layers lock").clone();
    upper.sort_by_key(|l| l.name);
    std::iter::once(&STORE).chain(upper).collect()
}

/// The migration status of `schema` against the layers this process knows.
pub(crate) async fn status(
    client: &deadpool_postgres::Object,
    schema: &str,
) -> Result<MigrationStatus> {
    let sql = format!(
        "SELECT layer, version, checksum FROM \"{schema}\".migrations ORDER BY layer, version"
    );
    let rows = match client.query(&sql, &[]).await {
        Ok(rows) => rows,
        // Nothing installed yet: no migrations table.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let recorded: Vec<(String, i32, Vec<u8>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(compare(&known_layers(), &recorded))
}

/// Compares `(layer, version, checksum)` rows with the `known` layers.
fn compare(known: &[&Layer], recorded: &[(String, i32, Vec<u8>)]) -> MigrationStatus {
    let mut layers: Vec<LayerStatus> = known
        .iter()
        .map(|layer| {
            let rows: Vec<_> = recorded.iter().filter(|r| r.0 == layer.name).collect();
            let changed: Vec<u32> = layer
                .migrations
                .iter()
                .filter(|m| {
                    rows.iter().any(|r| {
                        r.1 == m.version && r.2 != Sha256::digest(m.sql.as_bytes()).as_slice()
                    })
                })
                .map(|m| m.version as u32)
                .collect();
            let in_step = rows.len() == layer.migrations.len()
                && rows
                    .iter()
                    .zip(layer.migrations)
                    .all(|(r, m)| r.1 == m.version);
            // The store layer is required; upper layers install on first use.
            let installed = !rows.is_empty() || layer.name == STORE.name;
            LayerStatus {
                layer: layer.name.to_owned(),
                applied: rows.len() as u32,
                known: layer.migrations.len() as u32,
                current: !installed || (in_step && changed.is_empty()),
                changed,
            }
        })
        .collect();
    let mut others: Vec<&str> = recorded
        .iter()
        .map(|r| r.0.as_str())
        .filter(|name| !known.iter().any(|l| l.name == *name))
        .collect();
    others.dedup();
    for name in others {
        layers.push(LayerStatus {
            layer: name.to_owned(),
            applied: recorded.iter().filter(|r| r.0 == name).count() as u32,
            known: 0,
            changed: Vec::new(),
            current: true,
        });
    }
    // The store first (it is first of `known`), the others by name.
    let first = layers.len().min(1);
    layers[first..].sort_by(|a, b| a.layer.cmp(&b.layer));
    MigrationStatus {
        current: layers.iter().all(|l| l.current),
        layers,
    }
}

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

    const UPPER: Layer = Layer {
        name: "upper",
        migrations: &[
            Migration {
                version: 1,
                name: "0001_a.sql",
                sql: "SELECT 1",
            },
            Migration {
                version: 2,
                name: "0002_b.sql",
                sql: "SELECT 2",
            },
        ],
    };

    fn rows(layer: &Layer, n: usize) -> Vec<(String, i32, Vec<u8>)> {
        layer.migrations[..n]
            .iter()
            .map(|m| {
                let sum = Sha256::digest(m.sql.as_bytes()).to_vec();
                (layer.name.to_owned(), m.version, sum)
            })
            .collect()
    }

    #[test]
    fn status_compares_installed_layers_with_the_known_ones() {
        let known = [&STORE, &UPPER];
        let store = rows(&STORE, STORE.migrations.len());
        // Upper layer not installed: current (it installs on first use).
        let s = compare(&known, &store);
        assert!(s.current, "{s:?}");
        assert_eq!(s.layers[1].applied, 0);
        assert_eq!(s.layers[1].known, 2);
        // Installed with fewer migrations than known: not current.
        let mut r = store.clone();
        r.extend(rows(&UPPER, 1));
        let s = compare(&known, &r);
        assert!(!s.current && !s.layers[1].current, "{s:?}");
        // All applied: current.
        let mut r = store.clone();
        r.extend(rows(&UPPER, 2));
        assert!(compare(&known, &r).current);
        // A changed checksum: not current, and named.
        r.last_mut().unwrap().2 = vec![0];
        let s = compare(&known, &r);
        assert!(!s.current, "{s:?}");
        assert_eq!(s.layers[1].changed, vec![2]);
        // The store layer is required.
        let s = compare(&known, &[]);
        assert!(!s.current && !s.layers[0].current, "{s:?}");
        // A layer this process does not know: listed, left alone.
        let mut r = store.clone();
        r.push(("zzz".into(), 1, vec![1]));
        let s = compare(&[&STORE], &r);
        assert!(s.current);
        assert_eq!(s.layers[1].layer, "zzz");
        assert_eq!((s.layers[1].applied, s.layers[1].known), (1, 0));
    }

    #[test]
    fn store_versions_are_dense() {
        for (i, m) in STORE.migrations.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
    }
}
