//! Zero-configuration PostgreSQL for the examples, tests and benches.
//!
//! 1. `DATABASE_URL` set: use it.
//! 2. Otherwise, PostgreSQL server binaries installed (`initdb` and `postgres` on
//!    `PATH`, or under `pg_config --bindir`, or `/usr/lib/postgresql/*/bin`): start a
//!    throwaway server in a temporary directory with `pgtemp`, removed at the end.
//! 3. Otherwise, or when running as root without `sudo` (PostgreSQL refuses to run
//!    as root and `pgtemp` switches users with `sudo`): use a throwaway database on a
//!    server already listening on 127.0.0.1:5432 (user `postgres`), dropped at the end.
//! 4. Otherwise: an error saying what to install.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use dcbflow::Store;

/// The error type of the examples.
pub type BoxError = Box<dyn std::error::Error>;

/// Starts (or finds) the database, says which one, runs `body` on it, and removes
/// whatever was throwaway, whatever `body` returned.
pub async fn run(
    body: impl AsyncFnOnce(&Database) -> Result<(), BoxError>,
) -> Result<(), BoxError> {
    let db = Database::start().await?;
    println!("database: {}", db.origin);
    let result = body(&db).await;
    db.close().await;
    result
}

/// What to do when no database can be found.
pub const INSTALL_HINT: &str = "no PostgreSQL found. Either set DATABASE_URL=postgres://user:password@host:port/db, \
or install the PostgreSQL server binaries (Debian/Ubuntu: `apt-get install postgresql`; \
Fedora: `dnf install postgresql-server`; macOS: `brew install postgresql`), \
or start the bundled one with `docker compose up -d` and set \
DATABASE_URL=postgres://postgres:postgres@localhost:5432/postgres";

const LOCAL_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database to use; throwaway resources go away on [`Database::close`] or drop.
pub struct Database {
    /// Connection URL.
    pub url: String,
    /// Where it came from, for printing.
    pub origin: String,
    temp: Option<pgtemp::PgTempDB>,
    throwaway_db: Option<String>,
}

impl Database {
    /// Finds or starts a database (see the module docs).
    pub async fn start() -> Result<Database, String> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Ok(Database {
                url,
                origin: "DATABASE_URL".into(),
                temp: None,
                throwaway_db: None,
            });
        }
        if let Some(bin) = server_bin_dir()
            && (!is_root() || on_path("sudo"))
        {
            let temp = tokio::task::spawn_blocking(move || {
                std::panic::catch_unwind(|| {
                    pgtemp::PgTempDBBuilder::new()
                        .with_bin_path(&bin)
                        .with_config_param("max_connections", "200")
                        .start()
                })
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| {
                format!("starting a throwaway PostgreSQL server failed; {INSTALL_HINT}")
            })?;
            return Ok(Database {
                url: temp.connection_uri(),
                origin: format!("throwaway server in {}", temp.data_dir().display()),
                temp: Some(temp),
                throwaway_db: None,
            });
        }
        if admin(LOCAL_SERVER, "SELECT 1").await.is_ok() {
            let name = format!("dcbflow_tmp_{}", uuid::Uuid::new_v4().simple());
            admin(LOCAL_SERVER, &format!("CREATE DATABASE {name}")).await?;
            return Ok(Database {
                url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                origin: format!("throwaway database {name} on the local server at 127.0.0.1:5432"),
                temp: None,
                throwaway_db: Some(name),
            });
        }
        Err(INSTALL_HINT.to_string())
    }

    /// Like [`start`](Self::start), but for a whole test process: reuses one server,
    /// never makes a throwaway database (each test makes its own schema), and stops a
    /// throwaway server when the process exits.
    pub fn shared_url() -> &'static str {
        static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        URL.get_or_init(|| {
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let db = Database::start().await.unwrap_or_else(|e| panic!("{e}"));
                    let url = match &db.throwaway_db {
                        Some(_) => LOCAL_SERVER.to_string(),
                        None => db.url.clone(),
                    };
                    if let Some(temp) = &db.temp {
                        stop_when_process_exits(temp);
                    }
                    if db.throwaway_db.is_some() {
                        db.close().await;
                    } else {
                        std::mem::forget(db);
                    }
                    url
                })
            })
            .join()
            .expect("database setup thread")
        })
    }

    /// Runs `body` on a store in a fresh schema named `<prefix>_<uuid>` (so an example
    /// can run again and again) with a pool of `pool_size` connections, then drops
    /// the schema, whatever `body` returned.
    pub async fn with_store(
        &self,
        prefix: &str,
        pool_size: Option<usize>,
        body: impl AsyncFnOnce(Store) -> Result<(), BoxError>,
    ) -> Result<(), BoxError> {
        let schema = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let store = Store::builder_for_url(&self.url, pool_size)?
            .schema(&schema)
            .build()
            .await?;
        let result = body(store.clone()).await;
        store
            .pool()
            .get()
            .await?
            .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .await?;
        result
    }

    /// Drops a throwaway database and stops a throwaway server.
    pub async fn close(mut self) {
        if let Some(name) = self.throwaway_db.take() {
            let _ = admin(
                LOCAL_SERVER,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
            .await;
        }
        if let Some(temp) = self.temp.take() {
            let _ = tokio::task::spawn_blocking(move || drop(temp)).await;
        }
    }
}

async fn admin(url: &str, sql: &str) -> Result<(), String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let r = client.batch_execute(sql).await.map_err(|e| e.to_string());
    drop(client);
    let _ = task.await;
    r
}

/// A watchdog shell that stops the throwaway server and removes its directory once
/// this process has exited (a static server is never dropped).
fn stop_when_process_exits(temp: &pgtemp::PgTempDB) {
    let data = temp.data_dir();
    let dir = data.parent().unwrap_or(&data).to_path_buf();
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         kill -INT $(head -1 '{data}/postmaster.pid') 2>/dev/null; sleep 3; rm -rf '{dir}'",
        pid = std::process::id(),
        data = data.display(),
        dir = dir.display(),
    );
    let _ = Command::new("sh").arg("-c").arg(script).spawn();
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

fn has_server(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

fn server_bin_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&p) {
            if has_server(&d) {
                return Some(d);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&d) {
            return Some(d);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| has_server(d))
        .collect();
    dirs.sort();
    dirs.pop()
}
