//! Zero configuration: `database.url` (or `DCBFLOW_DATABASE_URL` /
//! `DATABASE_URL`) when set, otherwise a throwaway local PostgreSQL, found or
//! started the way the library's examples do it (`examples/support/mod.rs`).

#[path = "../../examples/support/mod.rs"]
#[allow(missing_docs, clippy::all)]
mod support;

use crate::config::Config;

/// The database the service runs on.
pub struct Database {
    /// Connection URL.
    pub url: String,
    /// Where it came from.
    pub origin: String,
    throwaway: Option<support::Database>,
}

impl Database {
    /// The configured database, or a throwaway one.
    ///
    /// # Errors
    /// What to install when no PostgreSQL can be found.
    pub async fn for_config(config: &Config) -> Result<Database, String> {
        if let Some(url) = &config.database.url {
            return Ok(Database {
                url: url.clone(),
                origin: "configured (database.url, DCBFLOW_DATABASE_URL or DATABASE_URL)".into(),
                throwaway: None,
            });
        }
        let db = support::Database::start().await?;
        Ok(Database {
            url: db.url.clone(),
            origin: format!("{}, removed when the server stops", db.origin),
            throwaway: Some(db),
        })
    }

    /// Removes a throwaway database.
    pub async fn close(self) {
        if let Some(db) = self.throwaway {
            db.close().await;
        }
    }
}
