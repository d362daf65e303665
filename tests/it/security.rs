//! Security (issue 11, docs/security.md): SQL is built only from validated
//! identifiers, spans and logs carry no secrets, the documented least-privilege
//! roles work (and refuse what they should), and HTTP tasks reach only what the
//! engine's `HttpPolicy` allows, read bounded responses and send templated URL
//! parts percent-encoded.

use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// Source scans (no database).
// ---------------------------------------------------------------------------

/// Every `.rs` file under `src/`.
fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out.sort();
    assert!(out.len() > 20, "src/ not found");
    out
}

fn relative(path: &Path) -> String {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The byte offset just past the string literal (plain or raw) starting at `i`,
/// and its content; `None` if there is none at `i`.
fn string_literal(s: &[u8], mut i: usize) -> Option<(usize, String)> {
    if s.get(i) == Some(&b'r') {
        let mut hashes = 0;
        i += 1;
        while s.get(i) == Some(&b'#') {
            hashes += 1;
            i += 1;
        }
        if s.get(i) != Some(&b'"') {
            return None;
        }
        let start = i + 1;
        let close: Vec<u8> = std::iter::once(b'"')
            .chain(std::iter::repeat_n(b'#', hashes))
            .collect();
        let len = s[start..].windows(close.len()).position(|w| w == close)?;
        let content = String::from_utf8_lossy(&s[start..start + len]).into_owned();
        return Some((start + len + close.len(), content));
    }
    if s.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let mut j = start;
    while j < s.len() {
        match s[j] {
            b'\\' => j += 2,
            b'"' => return Some((j + 1, String::from_utf8_lossy(&s[start..j]).into_owned())),
            _ => j += 1,
        }
    }
    None
}

/// Splits the macro arguments starting at `i` (just after the literal) into
/// expressions, up to the macro's closing parenthesis.
fn macro_args(s: &[u8], mut i: usize) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    while i < s.len() {
        let c = s[i];
        if (c == b'"' || (c == b'r' && matches!(s.get(i + 1), Some(b'"' | b'#'))))
            && let Some((end, _)) = string_literal(s, i)
        {
            current.push_str(&String::from_utf8_lossy(&s[i..end]));
            i = end;
            continue;
        }
        if c == b'\'' && s.get(i + 2) == Some(&b'\'') {
            current.push_str(&String::from_utf8_lossy(&s[i..i + 3]));
            i += 3;
            continue;
        }
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' if depth == 0 => {
                args.push(std::mem::take(&mut current));
                break;
            }
            b')' | b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                args.push(std::mem::take(&mut current));
                i += 1;
                continue;
            }
            _ => {}
        }
        current.push(c as char);
        i += 1;
    }
    args.into_iter()
        .map(|a| a.split_whitespace().collect::<String>())
        .filter(|a| !a.is_empty())
        .collect()
}

/// `(name, preceded by '$')` of every `{...}` placeholder in a format string.
fn placeholders(literal: &str) -> Vec<(String, bool)> {
    let b = literal.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => i += 2,
            b'}' if b.get(i + 1) == Some(&b'}') => i += 2,
            b'{' => {
                let end = literal[i..].find('}').map_or(b.len(), |e| i + e);
                let inner = &literal[i + 1..end];
                let name = inner.split(':').next().unwrap_or("").trim().to_owned();
                out.push((name, i > 0 && b[i - 1] == b'$'));
                i = end + 1;
            }
            _ => i += 1,
        }
    }
    out
}

fn has_word(text: &str, word: &str) -> bool {
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    text.match_indices(word).any(|(i, _)| {
        !ident(text[..i].chars().next_back()) && !ident(text[i + word.len()..].chars().next())
    })
}

/// Words that make a format string SQL.
const SQL_WORDS: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "CREATE",
    "DROP",
    "ALTER",
    "TRUNCATE",
    "GRANT",
    "REVOKE",
    "SET LOCAL",
    "WHERE",
    "FROM",
    "LIMIT",
    "ORDER BY",
    "UNION",
    "AND",
];

/// What may be interpolated into SQL text, and why each is safe. Values never are:
/// they go as `$n` parameters.
const SQL_IDENTIFIER_SOURCES: &[(&str, &str)] = &[
    (
        "self.inner.schema",
        "the store's schema name, validated by StoreBuilder::build (a-z 0-9 _)",
    ),
    (
        "self.schema",
        "the same schema name, kept by group commit and the builder",
    ),
    (
        "schema",
        "the validated schema name (migrator), or the TCC barrier's validated, quoted one",
    ),
    ("s", "the validated schema name in StoreBuilder::build"),
    (
        "name",
        "the TCC barrier's validated schema name, in a literal",
    ),
    (
        "table",
        "a schema-qualified table: Store::table(<literal>) or the TCC barrier's",
    ),
    ("events", "the schema-qualified events table"),
    (
        "lock_calls",
        "the one-event append's lock calls, pg_advisory_xact_lock_shared($n::bigint) per lock: literals and parameter numbers only",
    ),
    (
        "self.inner.sql.events",
        "the schema-qualified events table, built at build time",
    ),
    (
        "self.inner.sql.append",
        "the store's call of append_checked, built at build time from the schema name",
    ),
    (
        "then",
        "Store::append_and_then's call (crate-internal): its one caller builds it from \
         Store::table(<literal>) and $n placeholders, checked here where it is built",
    ),
    (
        "filter",
        "the WHERE clause of filter_sql: column names and $n placeholders only",
    ),
    ("order", "ASC or DESC"),
    (
        "wakeups",
        "the event waker's Store::table(\"flow_wakeups\")",
    ),
    ("awaits", "the event waker's Store::table(\"flow_awaits\")"),
    (
        "upsert",
        "the event waker's ON CONFLICT clause, built from `wakeups` only",
    ),
    ("limit", "\" LIMIT $n\" or nothing"),
    ("after_col", "`position` or `position + 0`"),
    ("up_to_col", "`position` or `position + 0`"),
    ("work.timeout_ms", "a u64, the step's timeout"),
    ("lock", "an i64 advisory-lock key"),
    ("self.store_key", "an i64 advisory-lock key"),
];

/// Whether `expr` may go into SQL text (`param`: it is a `$n` number).
fn allowed_in_sql(expr: &str, param: bool) -> bool {
    let expr = expr.trim_start_matches('&');
    if param {
        return expr == "params.len()";
    }
    if SQL_IDENTIFIER_SOURCES.iter().any(|(e, _)| *e == expr) {
        return true;
    }
    // A constant (SCREAMING_CASE).
    if !expr.is_empty()
        && expr
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return true;
    }
    // `<receiver>.table("<lowercase literal>")`: Store::table with a literal name.
    if let Some((recv, arg)) = expr.rsplit_once(".table(\"") {
        return !recv.is_empty()
            && arg.strip_suffix("\")").is_some_and(|t| {
                !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            });
    }
    false
}

/// Every interpolation into SQL text in `src/` comes from the list of validated
/// identifier sources above (schema and table names, constants, the pieces of the
/// generated WHERE clause); values always go as `$n` parameters. A new
/// interpolation fails this test with its file and line: make it a parameter, or
/// (for an identifier that is validated) add it to the list with the reason.
#[test]
fn sql_is_built_only_from_validated_identifiers() {
    let mut checked = 0;
    let mut offenders = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).unwrap();
        let bytes = text.as_bytes();
        for mac in ["format!(", "write!(", "writeln!("] {
            for (at, _) in text.match_indices(mac) {
                if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                    continue;
                }
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                if text[line_start..at].contains("//") {
                    continue;
                }
                let mut i = at + mac.len();
                if mac != "format!(" {
                    // Skip the destination.
                    let Some(comma) = text[i..].find(',') else {
                        continue;
                    };
                    i += comma + 1;
                }
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                let Some((end, literal)) = string_literal(bytes, i) else {
                    continue;
                };
                if !SQL_WORDS.iter().any(|w| has_word(&literal, w)) {
                    continue;
                }
                checked += 1;
                let args = macro_args(bytes, end);
                let named = |n: &str| {
                    args.iter().find_map(|a| {
                        a.strip_prefix(n)
                            .and_then(|r| r.strip_prefix('='))
                            .filter(|r| !r.starts_with('='))
                            .map(str::to_owned)
                    })
                };
                let line = text[..at].matches('\n').count() + 1;
                let mut next = 0;
                for (name, param) in placeholders(&literal) {
                    let expr = if name.is_empty() {
                        next += 1;
                        args.get(next - 1).cloned()
                    } else if let Ok(n) = name.parse::<usize>() {
                        args.get(n).cloned()
                    } else {
                        Some(named(&name).unwrap_or(name.clone()))
                    };
                    let expr = expr.unwrap_or_else(|| format!("<argument {name:?} not found>"));
                    if !allowed_in_sql(&expr, param) {
                        offenders.push(format!(
                            "{}:{line}: `{{{name}}}` = `{expr}` in SQL text",
                            relative(&path)
                        ));
                    }
                }
            }
        }
        // Store::table is only ever given a literal name.
        for (at, _) in text.match_indices(".table(") {
            let rest = &text[at + ".table(".len()..];
            if rest.starts_with(')') || rest.starts_with('"') {
                continue;
            }
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            if text[line_start..at].contains("//") {
                continue;
            }
            let line = text[..at].matches('\n').count() + 1;
            offenders.push(format!(
                "{}:{line}: a table name that is not a literal",
                relative(&path)
            ));
        }
    }
    assert!(
        checked >= 30,
        "only {checked} SQL format strings found: the scanner is broken"
    );
    assert!(
        offenders.is_empty(),
        "SQL built from values that are not validated identifiers (use $n parameters):\n{}",
        offenders.join("\n")
    );
}

/// The scanner itself: it finds interpolations in every form.
#[test]
fn the_sql_scanner_sees_every_form_of_interpolation() {
    let literal = r#"SELECT {} FROM "{0}".t WHERE a = ${} AND b = '{value}' {{not}} {x:?}"#;
    assert_eq!(
        placeholders(literal),
        vec![
            (String::new(), false),
            ("0".into(), false),
            (String::new(), true),
            ("value".into(), false),
            ("x".into(), false),
        ]
    );
    let src = br#"format!("SELECT {} FROM {t}", self.f(a, b), t = x.table("events"))"#;
    let start = b"format!(".len();
    let (end, lit) = string_literal(src, start).unwrap();
    assert_eq!(lit, "SELECT {} FROM {t}");
    assert_eq!(
        macro_args(src, end),
        vec!["self.f(a,b)".to_owned(), "t=x.table(\"events\")".to_owned()]
    );
    assert!(allowed_in_sql("store.table(\"flow_sync\")", false));
    assert!(allowed_in_sql(
        "self.store().table(\"flow_incidents\")",
        false
    ));
    assert!(allowed_in_sql("MAX_INCIDENT_GROUPS", false));
    assert!(!allowed_in_sql("store.table(name)", false));
    assert!(!allowed_in_sql("input.id", false));
    assert!(!allowed_in_sql("business_key", false));
    assert!(!allowed_in_sql("n", true));
}

/// The offset of the parenthesis closing the one at `open` (strings skipped).
fn closing_paren(s: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    let mut i = open;
    while i < s.len() {
        if s[i] == b'"' {
            i = string_literal(s, i).map_or(s.len(), |(end, _)| end);
            continue;
        }
        match s[i] {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
        i += 1;
    }
    s.len() - 1
}

/// The text of every `tracing` macro call and `#[tracing::instrument]` attribute
/// in `src/` (with or without the `tracing::` prefix), with its file and line.
fn tracing_calls() -> Vec<(String, String)> {
    const MACROS: &[&str] = &[
        "trace!(",
        "debug!(",
        "info!(",
        "warn!(",
        "error!(",
        "event!(",
        "trace_span!(",
        "debug_span!(",
        "info_span!(",
        "warn_span!(",
        "error_span!(",
        "span!(",
        "instrument(",
    ];
    let mut out = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).unwrap();
        let bytes = text.as_bytes();
        for m in MACROS {
            for (at, _) in text.match_indices(m) {
                let before = &text[..at];
                let prefixed = before.ends_with("tracing::");
                let bare = !before
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '.');
                let ok = if *m == "instrument(" {
                    before.ends_with("#[tracing::") || before.ends_with("#[")
                } else {
                    prefixed || bare
                };
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                if !ok || text[line_start..at].contains("//") {
                    continue;
                }
                let open = at + m.len() - 1;
                let close = closing_paren(bytes, open);
                let line = before.matches('\n').count() + 1;
                out.push((
                    format!("{}:{line}", relative(&path)),
                    text[at..=close].to_owned(),
                ));
            }
        }
    }
    out
}

/// Words that must never name or feed a span field or a log event: secrets,
/// request contents, inputs and connection strings.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "credential",
    "header",
    "headers",
    "body",
    "payload",
    "input",
    "params",
    "data",
    "url",
    "dsn",
    "connection",
    "config",
];

/// Every `#[tracing::instrument]` skips all arguments (fields are named one by
/// one), and no span field or log event in `src/` names or records a secret, a
/// request's headers or body, a task's or a flow's input, an event's data, or a
/// database URL.
#[test]
fn spans_and_logs_record_no_secrets_inputs_or_urls() {
    let calls = tracing_calls();
    assert!(calls.len() > 40, "only {} tracing calls found", calls.len());
    let mut problems = Vec::new();
    for (at, call) in &calls {
        if call.starts_with("instrument(") && !call.contains("skip_all") {
            problems.push(format!("{at}: #[tracing::instrument] without skip_all"));
        }
        // Identifiers only: the message strings are fixed text.
        let mut code = String::new();
        let mut rest = call.as_str();
        while let Some(q) = rest.find('"') {
            code.push_str(&rest[..q]);
            let after = &rest[q + 1..];
            rest = after.find('"').map_or("", |e| &after[e + 1..]);
        }
        code.push_str(rest);
        for word in SECRET_WORDS {
            // Each part of an identifier (`header_map`: `header`, `map`).
            if code
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w.eq_ignore_ascii_case(word))
            {
                problems.push(format!("{at}: records `{word}`: {call}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Least privilege (docs/security.md).
// ---------------------------------------------------------------------------

mod roles {
    use std::time::Duration;

    use dcbflow::tokio_postgres::{self, error::SqlState};
    use dcbflow::{CommandExecutor, Event, Query, ReadOptions, Store};
    use serde_json::json;

    use crate::support::{TestStore, db};

    /// The owner and application roles of one test, and the schema the owner
    /// migrates; all dropped at the end (also when the test fails).
    pub struct Roles {
        pub owner: String,
        pub app: String,
        pub schema: String,
        password: String,
        database: String,
        host: String,
        port: u16,
    }

    /// The grants of docs/security.md (every SQL block starting with
    /// `-- app grants: <layer>`, for the layers this build has), for `roles`.
    fn documented_grants(roles: &Roles) -> String {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/security.md"))
            .unwrap();
        let layers = [
            ("store", true),
            ("projection", true),
            ("command", true),
            ("outbox", cfg!(feature = "outbox")),
            ("flow", cfg!(feature = "flow")),
            ("functions", true),
        ];
        let mut sql = String::new();
        for (layer, enabled) in layers {
            let marker = format!("-- app grants: {layer}\n");
            let start = doc
                .find(&marker)
                .unwrap_or_else(|| panic!("docs/security.md has no `{marker}` block"));
            let end = start + doc[start..].find("```").expect("end of the SQL block");
            if enabled {
                sql.push_str(&doc[start..end]);
            }
        }
        sql.replace("app_store", &roles.schema)
            .replace("dcbflow_app", &roles.app)
            .replace("dcbflow_owner", &roles.owner)
    }

    async fn admin() -> tokio_postgres::Client {
        let (client, conn) =
            tokio_postgres::connect(db::Database::shared_url(), tokio_postgres::NoTls)
                .await
                .expect("connect as the test's superuser");
        tokio::spawn(conn);
        client
    }

    impl Roles {
        pub async fn create() -> Roles {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let config: tokio_postgres::Config = db::Database::shared_url().parse().unwrap();
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                #[cfg(unix)]
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => "127.0.0.1".into(),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let a = admin().await;
            let database: String = a
                .query_one("SELECT current_database()", &[])
                .await
                .unwrap()
                .get(0);
            let roles = Roles {
                owner: format!("dcbflow_owner_{}", &id[..12]),
                app: format!("dcbflow_app_{}", &id[..12]),
                schema: format!("t_{id}"),
                password: uuid::Uuid::new_v4().simple().to_string(),
                database,
                host,
                port,
            };
            // As in docs/security.md: the owner may create schemas in the
            // database; the application role only logs in.
            a.batch_execute(&format!(
                "CREATE ROLE \"{o}\" LOGIN PASSWORD '{p}'; \
                 CREATE ROLE \"{a}\" LOGIN PASSWORD '{p}'; \
                 GRANT CREATE ON DATABASE \"{d}\" TO \"{o}\";",
                o = roles.owner,
                a = roles.app,
                p = roles.password,
                d = roles.database,
            ))
            .await
            .unwrap();
            roles
        }

        pub fn url(&self, role: &str) -> String {
            format!(
                "host='{}' port={} dbname='{}' user='{role}' password='{}' application_name='{}'",
                self.host, self.port, self.database, self.password, self.schema
            )
        }

        pub async fn store(
            &self,
            role: &str,
            schema: &str,
            migrate: bool,
        ) -> dcbflow::Result<Store> {
            Store::builder_for_url(&self.url(role), Some(8))?
                .schema(schema)
                .migrate(migrate)
                .build()
                .await
        }

        pub async fn connect(&self, role: &str) -> tokio_postgres::Client {
            let (client, conn) = tokio_postgres::connect(&self.url(role), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect as {role}: {e}"));
            tokio::spawn(conn);
            client
        }

        /// Runs the documented grants as the owner.
        pub async fn grant(&self) {
            let owner = self.connect(&self.owner).await;
            owner.batch_execute(&documented_grants(self)).await.unwrap();
        }
    }

    impl Drop for Roles {
        fn drop(&mut self) {
            let (owner, app, schema) = (self.owner.clone(), self.app.clone(), self.schema.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let a = admin().await;
                    let _ = a
                        .execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                             WHERE usename = ANY($1) AND pid <> pg_backend_pid()",
                            &[&vec![owner.clone(), app.clone()]],
                        )
                        .await;
                    let _ = a
                        .batch_execute(&format!(
                            "SET lock_timeout = '10s'; \
                             DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; \
                             DROP OWNED BY \"{owner}\", \"{app}\"; \
                             DROP ROLE \"{app}\"; DROP ROLE \"{owner}\";"
                        ))
                        .await;
                });
            })
            .join()
            .unwrap();
        }
    }

    /// `result` failed for lack of a privilege.
    #[track_caller]
    fn denied<T: std::fmt::Debug>(what: &str, result: Result<T, tokio_postgres::Error>) {
        match result {
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
            other => panic!("{what}: expected a permission error, got {other:?}"),
        }
    }

    /// The documented setup: an owner role migrates every layer and grants; the
    /// application role (a store handle built with `migrate(false)`) appends,
    /// reads, executes commands, keeps checkpoints, relays and runs flows to
    /// completion, but may not alter, drop or create anything in the schema,
    /// rewrite the log, create schemas, migrate a store of its own, or read
    /// another store's schema.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_application_role_runs_everything_and_alters_nothing() {
        let roles = Roles::create().await;
        let other = TestStore::new().await;

        // The owner migrates every layer.
        let owner_store = roles
            .store(&roles.owner, &roles.schema, true)
            .await
            .unwrap();
        CommandExecutor::new(owner_store.clone())
            .migrate()
            .await
            .unwrap();
        dcbflow::Checkpoints::new(owner_store.clone())
            .get("installed")
            .await
            .unwrap();
        #[cfg(feature = "outbox")]
        dcbflow::outbox::DeadLetters::new(owner_store.clone())
            .list("installed")
            .await
            .unwrap();
        #[cfg(feature = "flow")]
        dcbflow::flow::Flows::new(owner_store.clone())
            .migrate()
            .await
            .unwrap();
        drop(owner_store);
        roles.grant().await;

        // The application role does its work.
        let store = roles.store(&roles.app, &roles.schema, false).await.unwrap();
        let q = Query::items_of(["Booked"], ["seat:1"]);
        store
            .append(
                vec![Event::new("Booked", ["seat:1"], json!({"n": 1}))],
                None,
            )
            .await
            .unwrap();
        let read = store.read_all(&q, ReadOptions::default()).await.unwrap();
        assert_eq!(read.events.len(), 1);
        assert!(store.head().await.unwrap().is_some());
        let exec = CommandExecutor::new(store.clone());
        exec.execute(&crate::command::take("c", 5)).await.unwrap();
        let checkpoints = dcbflow::Checkpoints::new(store.clone());
        checkpoints.get("app").await.unwrap();
        #[cfg(feature = "outbox")]
        relay_and_dedupe(&store).await;
        #[cfg(feature = "flow")]
        run_a_flow(&store).await;

        // What it may not do.
        let app = roles.connect(&roles.app).await;
        let s = &roles.schema;
        denied(
            "ALTER TABLE",
            app.batch_execute(&format!("ALTER TABLE \"{s}\".events ADD COLUMN x int"))
                .await,
        );
        denied(
            "DROP TABLE",
            app.batch_execute(&format!("DROP TABLE \"{s}\".events"))
                .await,
        );
        denied(
            "DROP FUNCTION",
            app.batch_execute(&format!("DROP FUNCTION \"{s}\".allocated_head()"))
                .await,
        );
        denied(
            "CREATE TABLE",
            app.batch_execute(&format!("CREATE TABLE \"{s}\".evil (x int)"))
                .await,
        );
        denied(
            "CREATE FUNCTION",
            app.batch_execute(&format!(
                "CREATE FUNCTION \"{s}\".evil() RETURNS int LANGUAGE sql AS 'SELECT 1'"
            ))
            .await,
        );
        denied(
            "UPDATE events",
            app.batch_execute(&format!("UPDATE \"{s}\".events SET data = '{{}}'"))
                .await,
        );
        denied(
            "DELETE events",
            app.batch_execute(&format!("DELETE FROM \"{s}\".events"))
                .await,
        );
        denied(
            "TRUNCATE events",
            app.batch_execute(&format!("TRUNCATE \"{s}\".events")).await,
        );
        denied(
            "UPDATE commands",
            app.batch_execute(&format!("UPDATE \"{s}\".commands SET outcome = 'x'"))
                .await,
        );
        denied(
            "DELETE migrations",
            app.batch_execute(&format!("DELETE FROM \"{s}\".migrations"))
                .await,
        );
        denied(
            "CREATE SCHEMA",
            app.batch_execute("CREATE SCHEMA dcbflow_evil").await,
        );
        // Another store's schema: neither its tables nor its functions.
        let o = &other.schema;
        denied(
            "read another store",
            app.query(&format!("SELECT * FROM \"{o}\".events"), &[])
                .await,
        );
        denied(
            "append to another store",
            app.query(&format!("SELECT \"{o}\".allocated_head()"), &[])
                .await,
        );
        // A store handle of the app role on another schema fails too.
        let foreign = roles.store(&roles.app, o, false).await.unwrap();
        assert!(
            foreign
                .read_all(&Query::all(), ReadOptions::default())
                .await
                .is_err()
        );
        // And it cannot install a store of its own.
        let fresh = format!("t_new_{}", uuid::Uuid::new_v4().simple());
        match roles.store(&roles.app, &fresh, true).await {
            Err(dcbflow::Error::Database(e)) => {
                assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e}")
            }
            other => panic!("the app role migrated a store: {other:?}"),
        }
        drop((store, exec, checkpoints, foreign, app));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// An outbox relay with an in-memory publisher, and consumer-side
    /// deduplication, as the application role.
    #[cfg(feature = "outbox")]
    async fn relay_and_dedupe(store: &Store) {
        use std::sync::{Arc, Mutex};

        use dcbflow::CancellationToken;
        use dcbflow::outbox::{
            OutboxMessage, OutboxRelay, PublishFailure, Publisher, RelayOptions,
        };

        #[derive(Clone, Default)]
        struct Memory(Arc<Mutex<Vec<String>>>);
        impl Publisher for Memory {
            async fn publish(&self, messages: &[OutboxMessage]) -> Result<(), PublishFailure> {
                self.0
                    .lock()
                    .unwrap()
                    .extend(messages.iter().map(|m| m.id.clone()));
                Ok(())
            }
        }
        let memory = Memory::default();
        let mut options = RelayOptions::default();
        options.subscription.poll_interval = Duration::from_millis(50);
        let relay = OutboxRelay::new(
            store.clone(),
            "app-relay",
            Query::items_of(["Booked"], Vec::<String>::new()),
            memory.clone(),
        )
        .options(options);
        let cancel = CancellationToken::new();
        let running = tokio::spawn({
            let cancel = cancel.clone();
            async move { relay.run(cancel).await }
        });
        crate::support::eventually("the relay publishes", crate::support::DEADLINE, || {
            let n = memory.0.lock().unwrap().len();
            async move { (n >= 1).then_some(()) }
        })
        .await;
        cancel.cancel();
        running.await.unwrap().unwrap();

        let mut client = store.pool().get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        assert!(
            dcbflow::outbox::mark_processed(store, &tx, "consumer", "m-1")
                .await
                .unwrap()
        );
        assert!(
            !dcbflow::outbox::mark_processed(store, &tx, "consumer", "m-1")
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        dcbflow::outbox::DeadLetters::new(store.clone())
            .list("app-relay")
            .await
            .unwrap();
    }

    /// A flow with a Rust step and a SQL step, run to completion by a worker of
    /// the application role; then the read models are queried and rebuilt.
    #[cfg(feature = "flow")]
    async fn run_a_flow(store: &Store) {
        use dcbflow::flow::{
            Action, FlowDefinition, Flows, InstanceFilter, InstanceStatus, TaskContext,
            TaskDefinition, TaskError,
        };

        let flows = Flows::new(store.clone());
        flows.function("greet", |ctx: TaskContext| async move {
            Ok::<_, TaskError>(json!({"hello": ctx.input["who"]}))
        });
        let def = FlowDefinition::builder("least_privilege")
            .task(
                TaskDefinition::new("greet", Action::rust("greet"))
                    .input("who", json!("{{flow.input.who}}")),
            )
            .task(
                TaskDefinition::new("check", Action::sql([("SELECT $1::int", vec![json!(1)])]))
                    .after(["greet"]),
            )
            .build();
        flows.register(&def).await.unwrap();
        let workers = crate::flow::Workers::start(&[&flows]);
        let id = flows
            .start("least_privilege", Some("k-1"), json!({"who": "app"}))
            .await
            .unwrap()
            .instance;
        let state = crate::flow::wait_for(&flows, id, InstanceStatus::Completed, 60).await;
        workers.stop().await;
        assert_eq!(state.outputs["greet"], json!({"hello": "app"}));
        assert_eq!(
            flows
                .instances(&InstanceFilter::default())
                .await
                .unwrap()
                .len(),
            1
        );
        flows.incidents().await.unwrap();
        assert_eq!(flows.rebuild_read_models().await.unwrap(), 1);
    }
}

// ---------------------------------------------------------------------------
// HTTP tasks: the policy, bounded responses, secrets (features flow + http).
// ---------------------------------------------------------------------------

#[cfg(all(feature = "flow", feature = "http"))]
mod http {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use dcbflow::flow::{
        Action, FlowDefinition, Flows, HttpPolicy, InstanceStatus, Phase, StepId, TaskDefinition,
        TaskRetry, ValueType, events::types,
    };
    use serde_json::{Value, json};
    use uuid::Uuid;

    use crate::flow::{Workers, wait_for};
    use crate::support::{DEADLINE, TestStore};

    /// What a test server saw.
    type Shared<T> = Arc<Mutex<Vec<T>>>;

    /// A local server; counts the requests it gets.
    struct Server {
        port: u16,
        hits: Arc<AtomicUsize>,
    }

    async fn serve(app: axum::Router) -> Server {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = app.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    next.run(req).await
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { port, hits }
    }

    /// A flow `call` of one HTTP task whose whole URL is the input's `url`
    /// (fatal errors are not retried; retryable ones get 3 attempts).
    async fn call_flow(flows: &Flows) {
        let def = FlowDefinition::builder("call")
            .input("url", ValueType::String)
            .task(
                TaskDefinition::new("call", Action::http("GET", "{{flow.input.url}}", None)).retry(
                    TaskRetry::attempts(3)
                        .backoff(Duration::from_millis(10), Duration::from_millis(20)),
                ),
            )
            .build();
        flows.register(&def).await.unwrap();
    }

    /// Starts `call` for `url` and waits for it to end in `status`; the step's
    /// attempts and last failure `(code, message)`.
    async fn call(
        flows: &Flows,
        url: &str,
        status: InstanceStatus,
    ) -> (Uuid, u32, Option<(Option<String>, String)>) {
        let id = flows
            .start("call", None, json!({"url": url}))
            .await
            .unwrap()
            .instance;
        let state = wait_for(flows, id, status, DEADLINE.as_secs()).await;
        let step = state.step(&StepId::new("call", Phase::Action));
        let failure = flows
            .timeline(id)
            .await
            .unwrap()
            .iter()
            .rev()
            .find(|e| e.event_type() == types::STEP_FAILED)
            .map(|e| {
                (
                    e.data()["code"].as_str().map(str::to_owned),
                    e.data()["error"].as_str().unwrap_or_default().to_owned(),
                )
            });
        (id, step.attempts, failure)
    }

    /// With the default policy, a task may not call loopback (by address, by
    /// name, as an IPv4-mapped or a decimal address), the metadata address, a
    /// private or an unspecified address: each attempt fails at once with the
    /// fatal `http_forbidden`, nothing reaches the server, and the message says
    /// which address and why. Allowing loopback lets the same calls through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn http_tasks_reach_loopback_metadata_and_private_addresses_only_when_allowed() {
        let server = serve(axum::Router::new().route(
            "/ok",
            axum::routing::get(|| async { axum::Json(json!({"ok": true})) }),
        ))
        .await;
        let p = server.port;
        let t = TestStore::new().await;
        let flows = Flows::new(t.store.clone());
        call_flow(&flows).await;
        let workers = Workers::start(&[&flows]);
        for (url, why) in [
            (format!("http://127.0.0.1:{p}/ok"), "loopback"),
            (format!("http://localhost:{p}/ok"), "loopback"),
            (format!("http://[::ffff:127.0.0.1]:{p}/ok"), "loopback"),
            (format!("http://2130706433:{p}/ok"), "loopback"),
            (format!("http://[::1]:{p}/ok"), "loopback"),
            (
                "http://169.254.169.254/latest/meta-data/".to_owned(),
                "metadata",
            ),
            ("http://[fe80::1]/x".to_owned(), "link-local"),
            ("http://10.1.2.3/x".to_owned(), "private"),
            ("http://192.168.0.1/x".to_owned(), "private"),
            (format!("http://0.0.0.0:{p}/ok"), "special-purpose"),
        ] {
            let (_, attempts, failure) = call(&flows, &url, InstanceStatus::Compensated).await;
            let (code, message) = failure.expect("a failure");
            assert_eq!(code.as_deref(), Some("http_forbidden"), "{url}: {message}");
            assert_eq!(attempts, 1, "{url}: a refusal is not retried");
            assert!(message.contains(why), "{url}: {message}");
        }
        assert_eq!(server.hits.load(Ordering::SeqCst), 0, "no request was sent");
        workers.stop().await;

        let allowed =
            Flows::new(t.store.clone()).http_policy(HttpPolicy::default().allow_loopback(true));
        let workers = Workers::start(&[&allowed]);
        for url in [
            format!("http://127.0.0.1:{p}/ok"),
            format!("http://localhost:{p}/ok"),
        ] {
            call(&allowed, &url, InstanceStatus::Completed).await;
        }
        workers.stop().await;
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);

        // A strict allow-list: only the listed host and port.
        let strict = Flows::new(t.store.clone())
            .http_policy(HttpPolicy::deny_all().allow_host_port("127.0.0.1", p));
        let workers = Workers::start(&[&strict]);
        call(
            &strict,
            &format!("http://127.0.0.1:{p}/ok"),
            InstanceStatus::Completed,
        )
        .await;
        let (_, _, failure) = call(
            &strict,
            &format!("http://localhost:{p}/ok"),
            InstanceStatus::Compensated,
        )
        .await;
        assert_eq!(failure.unwrap().0.as_deref(), Some("http_forbidden"));
        workers.stop().await;
        assert_eq!(server.hits.load(Ordering::SeqCst), 3);
    }

    /// A redirect from an allowed target to a refused one is not followed, whether
    /// the refused one is an address or a name that resolves to one; a redirect
    /// within what is allowed is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_redirect_to_a_refused_target_is_not_followed() {
        let inner = serve(
            axum::Router::new().route("/secret", axum::routing::get(|| async { "internal" })),
        )
        .await;
        let ip = inner.port;
        let redirect = |to: String| {
            move || {
                let to = to.clone();
                async move { (StatusCode::FOUND, [("location", to)]).into_response() }
            }
        };
        let outer = serve(
            axum::Router::new()
                .route(
                    "/by-address",
                    axum::routing::get(redirect(format!("http://127.0.0.1:{ip}/secret"))),
                )
                .route(
                    "/by-name",
                    axum::routing::get(redirect(format!("http://localhost:{ip}/secret"))),
                )
                .route(
                    "/metadata",
                    axum::routing::get(redirect("http://169.254.169.254/".into())),
                )
                .route("/here", axum::routing::get(redirect("/landed".into())))
                .route(
                    "/landed",
                    axum::routing::get(|| async { axum::Json(json!({"landed": true})) }),
                ),
        )
        .await;
        let op = outer.port;
        let t = TestStore::new().await;
        // Public addresses, and the outer server only: a name is resolved (and
        // refused by the client's resolver), an address refused at the redirect.
        let flows = Flows::new(t.store.clone())
            .http_policy(HttpPolicy::default().allow_host_port("127.0.0.1", op));
        call_flow(&flows).await;
        let workers = Workers::start(&[&flows]);
        for path in ["by-address", "by-name", "metadata"] {
            let url = format!("http://127.0.0.1:{op}/{path}");
            let (_, attempts, failure) = call(&flows, &url, InstanceStatus::Compensated).await;
            let (code, message) = failure.unwrap();
            assert_eq!(code.as_deref(), Some("http_forbidden"), "{path}: {message}");
            assert_eq!(attempts, 1, "{path}");
        }
        let (id, _, _) = call(
            &flows,
            &format!("http://127.0.0.1:{op}/here"),
            InstanceStatus::Completed,
        )
        .await;
        let state = flows.instance(id).await.unwrap().unwrap();
        assert_eq!(state.outputs["call"], json!({"landed": true}));
        workers.stop().await;
        assert_eq!(
            inner.hits.load(Ordering::SeqCst),
            0,
            "the refused target got nothing"
        );
    }

    /// A response body above the limit (declared, or streamed without end) fails
    /// the attempt with the fatal `http_too_large` after reading at most the limit;
    /// one within it is the output.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_response_above_the_limit_fails_the_task() {
        let server = serve(
            axum::Router::new()
                .route(
                    "/big",
                    axum::routing::get(|| async { vec![b'x'; 2 * 1024 * 1024] }),
                )
                .route(
                    "/endless",
                    axum::routing::get(|| async {
                        let chunks = futures::stream::repeat_with(|| {
                            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 64 * 1024]))
                        });
                        axum::body::Body::from_stream(chunks)
                    }),
                )
                .route(
                    "/fits",
                    axum::routing::get(|| async { axum::Json(json!({"s": "z".repeat(1000)})) }),
                ),
        )
        .await;
        let p = server.port;
        let t = TestStore::new().await;
        let flows =
            Flows::new(t.store.clone()).http_policy(HttpPolicy::default().allow_loopback(true));
        call_flow(&flows).await;
        let workers = Workers::start(&[&flows]);
        for path in ["big", "endless"] {
            let url = format!("http://127.0.0.1:{p}/{path}");
            let (_, attempts, failure) = call(&flows, &url, InstanceStatus::Compensated).await;
            let (code, message) = failure.unwrap();
            assert_eq!(code.as_deref(), Some("http_too_large"), "{path}: {message}");
            assert_eq!(attempts, 1);
        }
        call(
            &flows,
            &format!("http://127.0.0.1:{p}/fits"),
            InstanceStatus::Completed,
        )
        .await;
        workers.stop().await;

        // A policy's own limit.
        let small = Flows::new(t.store.clone()).http_policy(
            HttpPolicy::default()
                .allow_loopback(true)
                .max_response_bytes(512),
        );
        let workers = Workers::start(&[&small]);
        let (_, _, failure) = call(
            &small,
            &format!("http://127.0.0.1:{p}/fits"),
            InstanceStatus::Compensated,
        )
        .await;
        assert_eq!(failure.unwrap().0.as_deref(), Some("http_too_large"));
        workers.stop().await;
    }

    /// A templated path segment and query value reach the server percent-encoded:
    /// `../admin?x=1` stays one segment, `a&b=c` one query value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn templated_url_parts_arrive_encoded() {
        let seen: Shared<(String, Option<String>)> = Arc::default();
        let s = seen.clone();
        let server = serve(axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let s = s.clone();
            async move {
                s.lock()
                    .unwrap()
                    .push((uri.path().to_owned(), uri.query().map(str::to_owned)));
                axum::Json(json!({}))
            }
        }))
        .await;
        let t = TestStore::new().await;
        let flows =
            Flows::new(t.store.clone()).http_policy(HttpPolicy::default().allow_loopback(true));
        let def = FlowDefinition::builder("encoded")
            .input("id", ValueType::String)
            .input("q", ValueType::String)
            .task(TaskDefinition::new(
                "get",
                Action::http(
                    "GET",
                    format!(
                        "http://127.0.0.1:{}/users/{{{{flow.input.id}}}}/orders?q={{{{flow.input.q}}}}",
                        server.port
                    ),
                    None,
                ),
            ))
            .build();
        flows.register(&def).await.unwrap();
        let workers = Workers::start(&[&flows]);
        let id = flows
            .start(
                "encoded",
                None,
                json!({"id": "../admin?x=1", "q": "a&b=c#d"}),
            )
            .await
            .unwrap()
            .instance;
        wait_for(&flows, id, InstanceStatus::Completed, DEADLINE.as_secs()).await;
        workers.stop().await;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(
                "/users/..%2Fadmin%3Fx%3D1/orders".to_owned(),
                Some("q=a%26b%3Dc%23d".to_owned())
            )]
        );
    }

    /// Output of the capturing subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Everything traced at every level (spans opened and closed with their
    /// fields, events) while a flow runs an HTTP task sending `Authorization:
    /// Bearer <token>` (also in the URL's query) and a `password` input field in
    /// its body, failing once (503) and then succeeding: neither secret appears.
    /// (A current-thread runtime: every task of the test runs under the
    /// thread's capturing subscriber.)
    #[tokio::test(flavor = "current_thread")]
    async fn secrets_never_reach_the_logs() {
        const TOKEN: &str = "s3cr3t-token-8f2a";
        const PASSWORD: &str = "s3cr3t-password-c41d";
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
            .with_writer(captured.clone())
            .finish();
        // With a single registered dispatcher, tracing decides a callsite first hit
        // on another thread (another test) by that thread's default alone, and
        // caches "never" for it; a second registered dispatcher makes every
        // callsite consult all of them, this test's included.
        let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let _guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();

        let received: Shared<(Option<String>, Value)> = Arc::default();
        let r = received.clone();
        let server = serve(axum::Router::new().route(
            "/login",
            axum::routing::post(move |headers: HeaderMap, body: axum::Json<Value>| {
                let r = r.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let mut seen = r.lock().unwrap();
                    seen.push((auth, body.0));
                    if seen.len() == 1 {
                        (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response()
                    } else {
                        axum::Json(json!({"session": "ok"})).into_response()
                    }
                }
            }),
        ))
        .await;
        let t = TestStore::new().await;
        let flows =
            Flows::new(t.store.clone()).http_policy(HttpPolicy::default().allow_loopback(true));
        let mut headers = BTreeMap::new();
        headers.insert(
            "Authorization".to_owned(),
            "Bearer {{flow.input.token}}".to_owned(),
        );
        let def = FlowDefinition::builder("login")
            .input("token", ValueType::String)
            .input("password", ValueType::String)
            .task(
                TaskDefinition::new(
                    "login",
                    Action::Http {
                        method: "POST".into(),
                        url: format!(
                            "http://127.0.0.1:{}/login?key={{{{flow.input.token}}}}",
                            server.port
                        ),
                        headers,
                        body: Some(json!({"user": "u", "password": "{{input.password}}"})),
                    },
                )
                .input("password", json!("{{flow.input.password}}"))
                .retry(
                    TaskRetry::attempts(3)
                        .backoff(Duration::from_millis(10), Duration::from_millis(20)),
                ),
            )
            .build();
        flows.register(&def).await.unwrap();
        let workers = Workers::start(&[&flows]);
        let id = flows
            .start(
                "login",
                Some("user-1"),
                json!({"token": TOKEN, "password": PASSWORD}),
            )
            .await
            .unwrap()
            .instance;
        wait_for(&flows, id, InstanceStatus::Completed, DEADLINE.as_secs()).await;
        workers.stop().await;

        let received = received.lock().unwrap().clone();
        assert_eq!(received.len(), 2, "failed once, then succeeded");
        for (auth, body) in &received {
            assert_eq!(auth.as_deref(), Some(format!("Bearer {TOKEN}").as_str()));
            assert_eq!(body["password"], json!(PASSWORD), "the secrets were sent");
        }
        let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        assert!(
            log.contains("dcbflow.step") && log.contains("dcbflow.flow.start"),
            "the capture saw the flow run:\n{log}"
        );
        for secret in [TOKEN, PASSWORD] {
            assert!(!log.contains(secret), "{secret} was logged:\n{log}");
        }
    }
}
