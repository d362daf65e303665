//! The participant side of try/confirm/cancel (feature `tcc`): a barrier table that makes a
//! service's `try`, `confirm` and `cancel` handlers idempotent and safe against
//! requests that are retried or arrive out of order.
//!
//! Every request of a TCC participant carries an idempotency key
//! `<instance>/<task>.<participant>/<phase>`. Its first part,
//! `<instance>/<task>.<participant>`, names the *branch*. The barrier records, in
//! the same transaction as the business effect, which phases of a branch have run,
//! and tells the handler whether the effect must be applied now:
//!
//! - a retried request is a [`Duplicate`](BarrierOutcome::Duplicate): do nothing;
//! - a `cancel` whose `try` never ran is a [`NullCancel`](BarrierOutcome::NullCancel):
//!   there is nothing to release, and the branch is closed so that a late `try`
//!   is [`Rejected`](BarrierOutcome::Rejected) instead of reserving something that
//!   nobody would ever release;
//! - a `confirm` of a cancelled branch, or a `cancel` of a confirmed one, is
//!   [`Rejected`](BarrierOutcome::Rejected).
//!
//! It needs only a `tokio_postgres` / `deadpool_postgres` transaction on the
//! participant's own database: no [`Store`](crate::Store), no flow engine.

use deadpool_postgres::{GenericClient, Transaction};
use futures::future::BoxFuture;

use crate::store::{Error, Result};

/// Name of the barrier table inside the schema given to [`TccBarrier::new`].
const TABLE: &str = "tcc_barrier";

/// The phase of a TCC request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TccPhase {
    /// Reserve the resources of the branch.
    Try,
    /// Make the reservation final.
    Confirm,
    /// Release the reservation.
    Cancel,
}

impl TccPhase {
    /// Lower-case name, as in idempotency keys and in the barrier table.
    pub fn as_str(self) -> &'static str {
        match self {
            TccPhase::Try => "try",
            TccPhase::Confirm => "confirm",
            TccPhase::Cancel => "cancel",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "try" => Some(TccPhase::Try),
            "confirm" => Some(TccPhase::Confirm),
            "cancel" => Some(TccPhase::Cancel),
            _ => None,
        }
    }
}

impl std::fmt::Display for TccPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`TccBarrier::enter`] decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarrierOutcome {
    /// First time this phase is seen for the branch: apply the business effect in
    /// the same transaction, then commit.
    Run,
    /// This phase already ran for the branch (a retry or a duplicate delivery):
    /// do nothing and answer as the first request did.
    Duplicate,
    /// A `cancel` arrived before its `try` had run (for example because the `try`
    /// timed out in the network): nothing was reserved, so there is nothing to
    /// release. Commit anyway: the recorded cancel makes a late `try`
    /// [`Rejected`](Self::Rejected).
    NullCancel,
    /// The phase must not run: a `try` after its branch was cancelled, a `confirm`
    /// of a cancelled branch, or a `cancel` of a confirmed branch. Do nothing.
    Rejected,
}

/// The barrier table of a TCC participant: makes `try`, `confirm` and `cancel`
/// handlers idempotent and safe against reordering.
///
/// The table is `<schema>.tcc_barrier`, one row per branch and phase. Call
/// [`install`](Self::install) once, then in every handler either
/// [`enter`](Self::enter) inside the transaction that applies the business effect,
/// or let [`run`](Self::run) manage that transaction.
///
/// All decisions for one branch are serialized with a transaction-scoped advisory
/// lock, so concurrent duplicates, and a `confirm` racing a `cancel`, are safe.
/// The lock is held until the caller's transaction ends.
///
/// ```no_run
/// use dcbflow::tcc::{BarrierOutcome, TccBarrier, TccPhase};
///
/// # async fn example(pool: dcbflow::deadpool_postgres::Pool) -> dcbflow::Result<()> {
/// let barrier = TccBarrier::new("inventory")?;
/// let mut client = pool.get().await?;
/// barrier.install(&client).await?;
///
/// // In the handler of `POST /reserve` with `Idempotency-Key: <key>`:
/// let key = "0b7c.../order.stock/try";
/// let Some((branch, phase)) = TccBarrier::parse_key(key) else {
///     return Ok(()); // answer 400
/// };
/// let (outcome, _) = barrier
///     .run(&mut client, branch, phase, |tx| {
///         Box::pin(async move {
///             tx.execute(
///                 "UPDATE stock SET reserved = reserved + 1 WHERE sku = 'apple'",
///                 &[],
///             )
///             .await?;
///             Ok::<_, dcbflow::Error>(())
///         })
///     })
///     .await?;
/// // Rejected: answer with a failure so the coordinator does not count on it.
/// let ok = outcome != BarrierOutcome::Rejected;
/// # let _ = ok;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TccBarrier {
    /// The quoted schema name.
    schema: String,
    /// The quoted, schema-qualified table name.
    table: String,
    /// `SELECT` of every row of a branch.
    sql_state: String,
    /// `INSERT` of one row `(branch, phase, origin = phase)`.
    sql_record: String,
    /// `INSERT` of the two rows of a null cancel.
    sql_null_cancel: String,
}

impl TccBarrier {
    /// A barrier using the table `<schema>.tcc_barrier`.
    ///
    /// # Errors
    /// [`Error::Config`] unless `schema` is 1-63 bytes of `A-Z`, `a-z`, `0-9` and
    /// `_`, not starting with a digit. (The name is quoted, so its case is kept.)
    pub fn new(schema: &str) -> Result<Self> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && !schema.as_bytes()[0].is_ascii_digit()
            && schema
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(Error::Config(format!(
                "TCC barrier schema name {schema:?} must be 1-63 bytes of A-Z, a-z, 0-9 and _, \
                 not starting with a digit"
            )));
        }
        let quoted = format!("\"{schema}\"");
        let table = format!("{quoted}.{TABLE}");
        Ok(TccBarrier {
            sql_state: format!("SELECT phase, origin FROM {table} WHERE branch = $1"),
            sql_record: format!(
                "INSERT INTO {table} (branch, phase, origin) VALUES ($1, $2, $2) \
                 ON CONFLICT DO NOTHING"
            ),
            sql_null_cancel: format!(
                "INSERT INTO {table} (branch, phase, origin) \
                 VALUES ($1, 'try', 'cancel'), ($1, 'cancel', 'cancel') ON CONFLICT DO NOTHING"
            ),
            schema: quoted,
            table,
        })
    }

    /// The quoted, schema-qualified name of the barrier table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the schema (if missing) and the barrier table (if missing).
    ///
    /// Safe to run concurrently from several processes: the creation is serialized
    /// with an advisory lock, and a concurrent creation that still slips through is
    /// tolerated. Needs no privilege when both already exist. Runs in `client`'s
    /// transaction if it is one.
    ///
    /// # Errors
    /// [`Error::Database`] if PostgreSQL refuses (for example for lack of privileges).
    pub async fn install(&self, client: &impl GenericClient) -> Result<()> {
        let lock = lock_key("install", &self.table);
        let name = self.schema.trim_matches('"');
        let (schema, table) = (&self.schema, &self.table);
        // One statement, so it is atomic on its own and also runs unchanged inside
        // a caller's transaction. The names were validated in `new`, so they are
        // safe inside the literals and the dollar quotes.
        let sql = format!(
            "DO $tcc_barrier$
BEGIN
    PERFORM pg_advisory_xact_lock({lock});
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = '{name}') THEN
        BEGIN
            CREATE SCHEMA {schema};
        EXCEPTION WHEN duplicate_schema OR unique_violation THEN NULL;
        END;
    END IF;
    IF to_regclass('{table}') IS NULL THEN
        BEGIN
            CREATE TABLE {table} (
                branch text NOT NULL,
                phase text NOT NULL,
                origin text NOT NULL,
                recorded_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (branch, phase)
            );
        EXCEPTION WHEN duplicate_table OR duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
END
$tcc_barrier$"
        );
        client.batch_execute(&sql).await?;
        Ok(())
    }

    /// Records `phase` for `branch` inside the caller's transaction `tx` and says
    /// whether the business effect must be applied ([`BarrierOutcome::Run`]).
    ///
    /// - `try`: [`Run`](BarrierOutcome::Run) the first time;
    ///   [`Rejected`](BarrierOutcome::Rejected) if the branch was cancelled before
    ///   its `try` (a null cancel); else [`Duplicate`](BarrierOutcome::Duplicate).
    /// - `confirm`: [`Rejected`](BarrierOutcome::Rejected) if the branch was
    ///   cancelled; else `Run` the first time and `Duplicate` afterwards.
    /// - `cancel`: [`NullCancel`](BarrierOutcome::NullCancel) if the `try` never
    ///   ran (a late `try` is then rejected); `Rejected` if the branch was
    ///   confirmed; else `Run` the first time and `Duplicate` afterwards.
    ///
    /// The barrier rows are written in `tx`, so they commit together with the
    /// business effect, or neither does: if `tx` rolls back, the next request for
    /// this phase runs again. Commit `tx` for every outcome (a `NullCancel` writes
    /// rows too).
    ///
    /// The branch is locked (a transaction-scoped advisory lock) until `tx` ends,
    /// so a concurrent request for the same branch waits and then sees what this
    /// one recorded.
    ///
    /// # Errors
    /// [`Error::Config`] if `tx` is not READ COMMITTED (a snapshot older than the
    /// lock could miss a concurrent cancel or confirm); [`Error::Database`] for a
    /// failed statement, for example when the table was not
    /// [installed](Self::install).
    pub async fn enter(
        &self,
        tx: &Transaction<'_>,
        branch: &str,
        phase: TccPhase,
    ) -> Result<BarrierOutcome> {
        let (lock_stmt, state_stmt) = futures::try_join!(
            tx.prepare_cached(
                "SELECT current_setting('transaction_isolation') FROM pg_advisory_xact_lock($1)"
            ),
            tx.prepare_cached(&self.sql_state),
        )?;
        let lock = lock_key(&self.table, branch);
        // Pipelined, one round trip: take the branch's lock, then read its rows. The
        // read is a statement of its own so that, under READ COMMITTED, its snapshot
        // is taken after the lock and sees what the previous holder committed.
        let (lock_params, state_params) = ([&lock as _], [&branch as _]);
        let (isolation, rows) = futures::try_join!(
            tx.query_one(&lock_stmt, &lock_params),
            tx.query(&state_stmt, &state_params),
        )?;
        let isolation: &str = isolation.get(0);
        if !matches!(isolation, "read committed" | "read uncommitted") {
            return Err(Error::Config(format!(
                "the TCC barrier needs a READ COMMITTED transaction, not {isolation}"
            )));
        }

        let mut seen = Seen::default();
        for row in &rows {
            let origin: String = row.get(1);
            match row.get::<_, &str>(0) {
                "try" => seen.try_origin = Some(origin),
                "confirm" => seen.confirm = true,
                "cancel" => seen.cancel = true,
                _ => {}
            }
        }

        match decide(phase, &seen) {
            Decision::Done(outcome) => Ok(outcome),
            Decision::Record => {
                let stmt = tx.prepare_cached(&self.sql_record).await?;
                let n = tx.execute(&stmt, &[&branch, &phase.as_str()]).await?;
                // The lock makes a conflict impossible; count one as a duplicate.
                Ok(if n == 1 {
                    BarrierOutcome::Run
                } else {
                    BarrierOutcome::Duplicate
                })
            }
            Decision::NullCancel => {
                let stmt = tx.prepare_cached(&self.sql_null_cancel).await?;
                let n = tx.execute(&stmt, &[&branch]).await?;
                Ok(if n == 2 {
                    BarrierOutcome::NullCancel
                } else {
                    BarrierOutcome::Duplicate
                })
            }
        }
    }

    /// Runs one TCC request end to end: opens a transaction on `client`,
    /// [`enter`](Self::enter)s the barrier, runs `action` in that transaction only
    /// when the outcome is [`Run`](BarrierOutcome::Run), and commits. Returns the
    /// outcome and `action`'s value (`None` unless it ran).
    ///
    /// If `action` fails, the transaction rolls back (barrier row included) and its
    /// error is returned, so a retry of the request runs `action` again.
    ///
    /// `action` gets the transaction and returns a boxed future:
    /// `|tx| Box::pin(async move { ...; Ok::<_, dcbflow::Error>(value) })`. Its error
    /// type is any `E: From<dcbflow::Error>`, so a business refusal can roll back
    /// the request with an error of the caller's own type.
    ///
    /// # Errors
    /// `action`'s error, or an [`Error`] from the barrier, the transaction or the
    /// commit.
    pub async fn run<T, E, F>(
        &self,
        client: &mut deadpool_postgres::Client,
        branch: &str,
        phase: TccPhase,
        action: F,
    ) -> std::result::Result<(BarrierOutcome, Option<T>), E>
    where
        E: From<Error>,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> BoxFuture<'a, std::result::Result<T, E>>,
    {
        let tx = client.transaction().await.map_err(Error::from)?;
        let outcome = self.enter(&tx, branch, phase).await?;
        let value = if outcome == BarrierOutcome::Run {
            Some(action(&tx).await?)
        } else {
            None
        };
        tx.commit().await.map_err(Error::from)?;
        Ok((outcome, value))
    }

    /// Splits an idempotency key `<instance>/<task>.<participant>/<phase>` into the
    /// branch `<instance>/<task>.<participant>` and the phase. `None` unless the
    /// key has exactly these three non-empty parts, the middle one has a
    /// participant, and the phase is `try`, `confirm` or `cancel`.
    ///
    /// ```
    /// use dcbflow::tcc::{TccBarrier, TccPhase};
    ///
    /// assert_eq!(
    ///     TccBarrier::parse_key("i1/order.stock/cancel"),
    ///     Some(("i1/order.stock", TccPhase::Cancel))
    /// );
    /// assert_eq!(TccBarrier::parse_key("i1/order/action"), None);
    /// ```
    pub fn parse_key(key: &str) -> Option<(&str, TccPhase)> {
        let (branch, phase) = key.rsplit_once('/')?;
        let phase = TccPhase::parse(phase)?;
        let (instance, step) = branch.split_once('/')?;
        // Task names may contain dots, so any dot with text on both sides will do.
        let has_participant = step
            .char_indices()
            .any(|(i, c)| c == '.' && i > 0 && i + 1 < step.len());
        (!instance.is_empty() && !step.contains('/') && has_participant).then_some((branch, phase))
    }
}

/// What the barrier table holds for one branch.
#[derive(Debug, Default)]
struct Seen {
    /// The `try` row's origin: `try` if the try ran, `cancel` if a cancel came first.
    try_origin: Option<String>,
    confirm: bool,
    cancel: bool,
}

/// What to do for a request, given what the branch has seen.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Answer without writing.
    Done(BarrierOutcome),
    /// Record the phase; run the business effect.
    Record,
    /// Record the `try` (as done by a cancel) and the `cancel`.
    NullCancel,
}

fn decide(phase: TccPhase, seen: &Seen) -> Decision {
    use BarrierOutcome::{Duplicate, Rejected};
    match phase {
        TccPhase::Try => match seen.try_origin.as_deref() {
            None => Decision::Record,
            Some("cancel") => Decision::Done(Rejected),
            Some(_) => Decision::Done(Duplicate),
        },
        TccPhase::Confirm if seen.cancel => Decision::Done(Rejected),
        TccPhase::Confirm if seen.confirm => Decision::Done(Duplicate),
        TccPhase::Confirm => Decision::Record,
        TccPhase::Cancel if seen.try_origin.is_none() => Decision::NullCancel,
        TccPhase::Cancel if seen.cancel => Decision::Done(Duplicate),
        TccPhase::Cancel if seen.confirm => Decision::Done(Rejected),
        TccPhase::Cancel => Decision::Record,
    }
}

/// A 64-bit advisory lock key for `value` in the namespace `scope`.
fn lock_key(scope: &str, value: &str) -> i64 {
    let text = format!("dcbflow.tcc_barrier\0{scope}\0{value}");
    xxhash_rust::xxh3::xxh3_64(text.as_bytes()) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["dcbflow", "t_1", "_x", "Inventory"] {
            assert!(TccBarrier::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "a\"b", "a;drop", "a b", "a$b", &"x".repeat(64)] {
            assert!(
                matches!(TccBarrier::new(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
        assert_eq!(
            TccBarrier::new("Inventory").unwrap().table(),
            "\"Inventory\".tcc_barrier"
        );
    }

    #[test]
    fn decisions() {
        use BarrierOutcome::*;
        let seen = |try_origin: Option<&str>, confirm, cancel| Seen {
            try_origin: try_origin.map(str::to_owned),
            confirm,
            cancel,
        };
        let fresh = seen(None, false, false);
        assert_eq!(decide(TccPhase::Try, &fresh), Decision::Record);
        assert_eq!(decide(TccPhase::Cancel, &fresh), Decision::NullCancel);

        let tried = seen(Some("try"), false, false);
        assert_eq!(decide(TccPhase::Try, &tried), Decision::Done(Duplicate));
        assert_eq!(decide(TccPhase::Confirm, &tried), Decision::Record);
        assert_eq!(decide(TccPhase::Cancel, &tried), Decision::Record);

        let confirmed = seen(Some("try"), true, false);
        assert_eq!(
            decide(TccPhase::Confirm, &confirmed),
            Decision::Done(Duplicate)
        );
        assert_eq!(
            decide(TccPhase::Cancel, &confirmed),
            Decision::Done(Rejected)
        );

        let cancelled = seen(Some("try"), false, true);
        assert_eq!(
            decide(TccPhase::Cancel, &cancelled),
            Decision::Done(Duplicate)
        );
        assert_eq!(
            decide(TccPhase::Confirm, &cancelled),
            Decision::Done(Rejected)
        );

        let null_cancelled = seen(Some("cancel"), false, true);
        assert_eq!(
            decide(TccPhase::Try, &null_cancelled),
            Decision::Done(Rejected)
        );
        assert_eq!(
            decide(TccPhase::Confirm, &null_cancelled),
            Decision::Done(Rejected)
        );
        assert_eq!(
            decide(TccPhase::Cancel, &null_cancelled),
            Decision::Done(Duplicate)
        );
    }

    #[test]
    fn keys() {
        let ok = [
            ("i1/order.stock/try", "i1/order.stock", TccPhase::Try),
            (
                "i1/order.stock/confirm",
                "i1/order.stock",
                TccPhase::Confirm,
            ),
            ("i1/a.b.c/cancel", "i1/a.b.c", TccPhase::Cancel),
        ];
        for (key, branch, phase) in ok {
            assert_eq!(TccBarrier::parse_key(key), Some((branch, phase)), "{key}");
        }
        for bad in [
            "",
            "try",
            "i1/order.stock",
            "i1/order.stock/",
            "i1/order.stock/Try",
            "i1/order/try",
            "i1/order./try",
            "i1/.stock/try",
            "/order.stock/try",
            "i1//try",
            "a/i1/order.stock/try",
            "i1/order.stock/action",
        ] {
            assert_eq!(TccBarrier::parse_key(bad), None, "{bad}");
        }
    }
}
