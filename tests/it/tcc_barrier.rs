//! The participant-side TCC barrier: idempotent, reorder-safe try/confirm/cancel.

use std::sync::Arc;

use dcbflow::deadpool_postgres::Pool;
use dcbflow::tcc::{BarrierOutcome, TccBarrier, TccPhase};

use crate::support::{self, db};

/// A barrier and a small business table in a schema of their own, dropped afterwards.
struct Fixture {
    pool: Pool,
    barrier: TccBarrier,
    schema: String,
}

impl Fixture {
    async fn new() -> Self {
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let pool = dcbflow::pool_from_url(db::Database::shared_url(), Some(12)).unwrap();
        let barrier = TccBarrier::new(&schema).unwrap();
        let client = pool.get().await.unwrap();
        barrier.install(&client).await.unwrap();
        // Installing again is a no-op.
        barrier.install(&client).await.unwrap();
        client
            .batch_execute(&format!(
                "CREATE TABLE \"{schema}\".stock (sku text PRIMARY KEY, reserved int NOT NULL, \
                 sold int NOT NULL); INSERT INTO \"{schema}\".stock VALUES ('apple', 0, 0)"
            ))
            .await
            .unwrap();
        Fixture {
            pool,
            barrier,
            schema,
        }
    }

    /// Handles one request: the business effect of `phase` runs only on `Run`.
    async fn request(&self, branch: &str, phase: TccPhase) -> BarrierOutcome {
        let mut client = self.pool.get().await.unwrap();
        let sql = match phase {
            TccPhase::Try => "UPDATE {s}.stock SET reserved = reserved + 1 WHERE sku = 'apple'",
            TccPhase::Confirm => {
                "UPDATE {s}.stock SET reserved = reserved - 1, sold = sold + 1 WHERE sku = 'apple'"
            }
            TccPhase::Cancel => "UPDATE {s}.stock SET reserved = reserved - 1 WHERE sku = 'apple'",
        }
        .replace("{s}", &format!("\"{}\"", self.schema));
        let (outcome, ran) = self
            .barrier
            .run(&mut client, branch, phase, move |tx| {
                Box::pin(async move {
                    assert_eq!(tx.execute(&sql, &[]).await?, 1);
                    Ok::<_, dcbflow::Error>("ran")
                })
            })
            .await
            .unwrap();
        assert_eq!(ran.is_some(), outcome == BarrierOutcome::Run);
        outcome
    }

    /// `(reserved, sold)` of the apple.
    async fn stock(&self) -> (i32, i32) {
        let client = self.pool.get().await.unwrap();
        let row = client
            .query_one(
                &format!(
                    "SELECT reserved, sold FROM \"{}\".stock WHERE sku = 'apple'",
                    self.schema
                ),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// The barrier rows of `branch`, as `phase:origin`, sorted.
    async fn rows(&self, branch: &str) -> Vec<String> {
        let client = self.pool.get().await.unwrap();
        client
            .query(
                &format!(
                    "SELECT phase || ':' || origin FROM {} WHERE branch = $1 ORDER BY 1",
                    self.barrier.table()
                ),
                &[&branch],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        support::drop_schema(&self.schema);
    }
}

fn branch() -> String {
    format!("{}/order.stock", uuid::Uuid::new_v4())
}

#[tokio::test]
async fn try_then_confirm_runs_each_once() {
    let f = Fixture::new().await;
    let b = branch();

    assert_eq!(f.request(&b, TccPhase::Try).await, BarrierOutcome::Run);
    assert_eq!(f.stock().await, (1, 0));
    assert_eq!(
        f.request(&b, TccPhase::Try).await,
        BarrierOutcome::Duplicate
    );
    assert_eq!(f.stock().await, (1, 0));

    assert_eq!(f.request(&b, TccPhase::Confirm).await, BarrierOutcome::Run);
    assert_eq!(f.stock().await, (0, 1));
    assert_eq!(
        f.request(&b, TccPhase::Confirm).await,
        BarrierOutcome::Duplicate
    );
    // A retried try after the confirm is still a duplicate.
    assert_eq!(
        f.request(&b, TccPhase::Try).await,
        BarrierOutcome::Duplicate
    );
    // A confirmed branch cannot be cancelled.
    assert_eq!(
        f.request(&b, TccPhase::Cancel).await,
        BarrierOutcome::Rejected
    );
    assert_eq!(f.stock().await, (0, 1));
    assert_eq!(f.rows(&b).await, ["confirm:confirm", "try:try"]);
}

#[tokio::test]
async fn try_then_cancel_releases_once() {
    let f = Fixture::new().await;
    let b = branch();

    assert_eq!(f.request(&b, TccPhase::Try).await, BarrierOutcome::Run);
    assert_eq!(f.stock().await, (1, 0));
    assert_eq!(f.request(&b, TccPhase::Cancel).await, BarrierOutcome::Run);
    assert_eq!(f.stock().await, (0, 0));
    assert_eq!(
        f.request(&b, TccPhase::Cancel).await,
        BarrierOutcome::Duplicate
    );
    assert_eq!(
        f.request(&b, TccPhase::Try).await,
        BarrierOutcome::Duplicate
    );
    // A cancelled branch cannot be confirmed.
    assert_eq!(
        f.request(&b, TccPhase::Confirm).await,
        BarrierOutcome::Rejected
    );
    assert_eq!(f.stock().await, (0, 0));
    assert_eq!(f.rows(&b).await, ["cancel:cancel", "try:try"]);
}

#[tokio::test]
async fn cancel_before_try_blocks_the_late_try() {
    let f = Fixture::new().await;
    let b = branch();

    assert_eq!(
        f.request(&b, TccPhase::Cancel).await,
        BarrierOutcome::NullCancel
    );
    assert_eq!(f.stock().await, (0, 0), "nothing released");
    assert_eq!(f.rows(&b).await, ["cancel:cancel", "try:cancel"]);

    assert_eq!(f.request(&b, TccPhase::Try).await, BarrierOutcome::Rejected);
    assert_eq!(f.stock().await, (0, 0), "nothing reserved");
    assert_eq!(
        f.request(&b, TccPhase::Confirm).await,
        BarrierOutcome::Rejected
    );
    assert_eq!(
        f.request(&b, TccPhase::Cancel).await,
        BarrierOutcome::Duplicate
    );
    assert_eq!(f.stock().await, (0, 0));
    assert_eq!(f.rows(&b).await, ["cancel:cancel", "try:cancel"]);
}

#[tokio::test]
async fn concurrent_duplicate_tries_run_once() {
    let f = Arc::new(Fixture::new().await);
    let b = branch();

    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (f, b) = (f.clone(), b.clone());
            tokio::spawn(async move { f.request(&b, TccPhase::Try).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.unwrap());
    }
    let runs = outcomes
        .iter()
        .filter(|o| **o == BarrierOutcome::Run)
        .count();
    assert_eq!(runs, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, BarrierOutcome::Run | BarrierOutcome::Duplicate)),
        "{outcomes:?}"
    );
    assert_eq!(f.stock().await, (1, 0));
}

#[tokio::test]
async fn concurrent_confirm_and_cancel_never_both_run() {
    let f = Arc::new(Fixture::new().await);
    for _ in 0..10 {
        let b = branch();
        assert_eq!(f.request(&b, TccPhase::Try).await, BarrierOutcome::Run);
        let confirm = tokio::spawn({
            let (f, b) = (f.clone(), b.clone());
            async move { f.request(&b, TccPhase::Confirm).await }
        });
        let cancel = tokio::spawn({
            let (f, b) = (f.clone(), b.clone());
            async move { f.request(&b, TccPhase::Cancel).await }
        });
        let outcomes = (confirm.await.unwrap(), cancel.await.unwrap());
        assert!(
            matches!(
                outcomes,
                (BarrierOutcome::Run, BarrierOutcome::Rejected)
                    | (BarrierOutcome::Rejected, BarrierOutcome::Run)
            ),
            "{outcomes:?}"
        );
    }
    let (reserved, sold) = f.stock().await;
    assert_eq!(reserved, 0);
    assert!((0..=10).contains(&sold));
}

#[tokio::test]
async fn rolled_back_barrier_row_does_not_survive() {
    let f = Fixture::new().await;
    let b = branch();

    let mut client = f.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert_eq!(
        f.barrier.enter(&tx, &b, TccPhase::Try).await.unwrap(),
        BarrierOutcome::Run
    );
    tx.rollback().await.unwrap();
    assert!(f.rows(&b).await.is_empty());

    // A failing action rolls back the barrier row as well.
    let failed = f
        .barrier
        .run(&mut client, &b, TccPhase::Try, |_tx| {
            Box::pin(async { Err::<(), _>(dcbflow::Error::Config("out of stock".into())) })
        })
        .await;
    assert!(matches!(failed, Err(dcbflow::Error::Config(_))));
    assert!(f.rows(&b).await.is_empty());

    assert_eq!(f.request(&b, TccPhase::Try).await, BarrierOutcome::Run);
    assert_eq!(f.stock().await, (1, 0));
}

#[tokio::test]
async fn needs_read_committed() {
    let f = Fixture::new().await;
    let mut client = f.pool.get().await.unwrap();
    let tx = client
        .build_transaction()
        .isolation_level(dcbflow::tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let err = f
        .barrier
        .enter(&tx, &branch(), TccPhase::Try)
        .await
        .unwrap_err();
    assert!(matches!(err, dcbflow::Error::Config(_)), "{err:?}");
    tx.rollback().await.unwrap();
}

#[test]
fn parse_key() {
    assert_eq!(
        TccBarrier::parse_key("0b7c/order.stock/try"),
        Some(("0b7c/order.stock", TccPhase::Try))
    );
    assert_eq!(
        TccBarrier::parse_key("0b7c/order.stock/confirm"),
        Some(("0b7c/order.stock", TccPhase::Confirm))
    );
    assert_eq!(
        TccBarrier::parse_key("0b7c/order.v2.stock/cancel"),
        Some(("0b7c/order.v2.stock", TccPhase::Cancel))
    );
    for bad in [
        "",
        "0b7c",
        "0b7c/order.stock",
        "0b7c/order.stock/",
        "0b7c/order/action",
        "0b7c/order/try",
        "0b7c/order.stock/compensate",
        "0b7c/order.stock/TRY",
        "/order.stock/try",
        "0b7c//try",
        "0b7c/order./try",
        "x/0b7c/order.stock/try",
    ] {
        assert_eq!(TccBarrier::parse_key(bad), None, "{bad}");
    }
    assert!(TccBarrier::new("bad name").is_err());
}

#[tokio::test]
async fn concurrent_installs_succeed() {
    for _ in 0..3 {
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let pool = dcbflow::pool_from_url(db::Database::shared_url(), Some(6)).unwrap();
        let barrier = TccBarrier::new(&schema).unwrap();
        let installs: Vec<_> = (0..6)
            .map(|_| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                tokio::spawn(async move {
                    let client = pool.get().await.unwrap();
                    barrier.install(&client).await
                })
            })
            .collect();
        for i in installs {
            i.await.unwrap().unwrap();
        }
        let client = pool.get().await.unwrap();
        client
            .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .await
            .unwrap();
    }
}
