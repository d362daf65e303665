//! The command executor: recording, idempotency, retries, rejections, both modes.

use dcbflow::{
    Command, CommandError, CommandExecutor, CommandOutcome, CommandRetry, Concurrency, Decided,
    Event, Projector, Query,
};
use serde_json::json;

use crate::support::{DEADLINE, TestStore, ev, eventually, race};

/// Takes the next number of a counter, up to a limit.
pub(crate) struct Take {
    counter: String,
    limit: i64,
    key: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("counter {0} is exhausted")]
pub(crate) struct Exhausted(String);

impl Command for Take {
    type Model = Projector<i64>;
    type Error = Exhausted;

    fn command_type(&self) -> &str {
        "Take"
    }

    fn payload(&self) -> serde_json::Value {
        json!({"counter": self.counter})
    }

    fn idempotency_key(&self) -> Option<String> {
        self.key.clone()
    }

    fn model(&self) -> Projector<i64> {
        Projector::new(
            Query::items_of(["Taken"], [format!("counter:{}", self.counter)]),
            0,
            |n, e| *n = e.data()["n"].as_i64().unwrap_or(0),
        )
    }

    fn decide(&self, last: i64) -> Result<Decided, Exhausted> {
        if last >= self.limit {
            return Err(Exhausted(self.counter.clone()));
        }
        Ok(vec![Event::new(
            "Taken",
            [format!("counter:{}", self.counter)],
            json!({"n": last + 1}),
        )]
        .into())
    }
}

pub(crate) fn take(counter: &str, limit: i64) -> Take {
    Take {
        counter: counter.into(),
        limit,
        key: None,
    }
}

async fn numbers(t: &TestStore, counter: &str) -> Vec<i64> {
    let q = Query::items_of(["Taken"], [format!("counter:{counter}")]);
    t.events(&q)
        .await
        .iter()
        .map(|e| e.data()["n"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn executes_and_records_the_command_in_the_same_transaction() {
    let t = TestStore::new().await;
    let exec = CommandExecutor::new(t.store.clone());
    let out = exec.execute(&take("a", 10)).await.unwrap();
    assert_eq!(out.positions.len(), 1);
    assert_eq!(out.attempts, 1);
    assert!(!out.replayed);
    let c = t.store.pool().get().await.unwrap();
    let row = c
        .query_one(
            &format!(
                "SELECT c.type, c.payload, c.positions, c.outcome, c.transaction_id = e.transaction_id \
                 FROM \"{s}\".commands c JOIN \"{s}\".events e ON e.position = c.positions[1]",
                s = t.schema
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Take");
    assert_eq!(row.get::<_, serde_json::Value>(1), json!({"counter": "a"}));
    assert_eq!(row.get::<_, Vec<i64>>(2), vec![out.positions[0].0]);
    assert_eq!(row.get::<_, String>(3), "succeeded");
    assert!(
        row.get::<_, bool>(4),
        "command and events share one transaction"
    );
}

#[tokio::test]
async fn domain_error_stops_at_once_and_writes_nothing() {
    let t = TestStore::new().await;
    let exec = CommandExecutor::new(t.store.clone());
    exec.execute(&take("b", 1)).await.unwrap();
    let err = exec.execute(&take("b", 1)).await.unwrap_err();
    assert_eq!(err.rejection(), Some(&Exhausted("b".into())));
    assert!(matches!(err, CommandError::Rejected(_)));
    assert_eq!(numbers(&t, "b").await, vec![1]);
    // Pessimistic mode rejects the same way and releases its locks.
    let exec = exec.concurrency(Concurrency::Pessimistic);
    let err = exec.execute(&take("b", 1)).await.unwrap_err();
    assert!(matches!(err, CommandError::Rejected(Exhausted(_))));
    assert_eq!(t.open_transactions().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_executes_once() {
    let t = TestStore::new().await;
    let exec = CommandExecutor::new(t.store.clone());
    let cmd = Take {
        counter: "c".into(),
        limit: 100,
        key: Some("order-7".into()),
    };
    let first = exec.execute(&cmd).await.unwrap();
    let again = exec.execute(&cmd).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.positions, first.positions);
    assert_eq!(numbers(&t, "c").await, vec![1]);

    // Concurrent executions of one key: one appends, the others get its outcome.
    for round in 0..5 {
        let key = Some(format!("key-{round}"));
        let outcomes = race_take(&exec, 8, &format!("k{round}"), key).await;
        let outcomes: Vec<_> = outcomes.into_iter().map(Result::unwrap).collect();
        assert!(
            outcomes
                .iter()
                .all(|o| o.positions == outcomes[0].positions)
        );
        assert_eq!(
            numbers(&t, &format!("k{round}")).await,
            vec![1],
            "round {round}"
        );
    }
}

/// `n` executions of `Take` on one counter, released at once.
async fn race_take(
    exec: &CommandExecutor,
    n: usize,
    counter: &str,
    key: Option<String>,
) -> Vec<Result<CommandOutcome, CommandError<Exhausted>>> {
    race(n, |_| {
        let exec = exec.clone();
        let cmd = Take {
            counter: counter.into(),
            limit: 1000,
            key: key.clone(),
        };
        async move { exec.execute(&cmd).await }
    })
    .await
}

/// Runs `racers`, `n` executions of `Take` on `counter`, so that every one has read
/// and decided before any appends: an open transaction holds a shared lock on the
/// counter's tag (with an event of another type, which no decision reads) until
/// all `n` wait for the exclusive lock of their condition; then it rolls back.
async fn all_decided_first<T>(
    t: &TestStore,
    counter: &str,
    n: i64,
    racers: impl std::future::Future<Output = T>,
) -> T {
    let mut holder = t.store.pool().get().await.unwrap();
    let held = holder.transaction().await.unwrap();
    t.store
        .append_in_tx(
            &held,
            vec![ev("Held", &[&format!("counter:{counter}")])],
            None,
        )
        .await
        .unwrap();
    let release = async {
        eventually(
            &format!("all {n} commands wait for the lock of counter {counter}"),
            DEADLINE,
            move || async move { (t.lock_waits().await == n).then_some(()) },
        )
        .await;
        held.rollback().await.unwrap();
    };
    tokio::join!(racers, release).0
}

/// Optimistic: contended commands re-read and re-decide until they succeed; every
/// number is taken exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_are_retried_with_a_fresh_decision() {
    let t = TestStore::new().await;
    let exec = CommandExecutor::new(t.store.clone()).retry(CommandRetry::attempts(50));
    // All twelve decide on the same (empty) counter before any appends, so eleven
    // conflict with the first at least once, whatever the scheduling.
    let attempts: u32 = all_decided_first(&t, "hot", 12, race_take(&exec, 12, "hot", None))
        .await
        .into_iter()
        .map(|r| r.unwrap().attempts)
        .sum();
    assert_eq!(numbers(&t, "hot").await, (1..=12).collect::<Vec<_>>());
    assert!(
        attempts > 12,
        "racing commands must have conflicted and retried"
    );
}

/// Without retries, racing commands fail with a typed conflict and only the winners'
/// events exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_retries_report_conflict() {
    let t = TestStore::new().await;
    let exec = CommandExecutor::new(t.store.clone()).retry(CommandRetry::none());
    let (mut ok, mut conflicts) = (0, 0);
    let results = all_decided_first(&t, "once", 12, race_take(&exec, 12, "once", None)).await;
    for r in results {
        match r {
            Ok(_) => ok += 1,
            Err(CommandError::Conflict { attempts: 1 }) => conflicts += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    // All twelve decided on the same empty counter: exactly one wins, the others
    // conflict with it (a check that missed the winner's event lets a second through).
    assert!(ok >= 1 && conflicts >= 1, "ok {ok}, conflicts {conflicts}");
    assert_eq!((ok, conflicts), (1, 11));
    assert_eq!(
        numbers(&t, "once").await,
        (1..=ok as i64).collect::<Vec<_>>()
    );
}

/// Pessimistic: contended commands queue on the scope lock; none conflicts, even
/// without retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pessimistic_mode_queues_instead_of_conflicting() {
    let t = TestStore::new().await;
    let exec = CommandExecutor::new(t.store.clone())
        .retry(CommandRetry::none())
        .concurrency(Concurrency::Pessimistic);
    for r in race_take(&exec, 16, "queue", None).await {
        assert_eq!(r.unwrap().attempts, 1);
    }
    assert_eq!(numbers(&t, "queue").await, (1..=16).collect::<Vec<_>>());
}

#[test]
fn given_when_then_runs_decisions_without_a_database() {
    use dcbflow::testing::given;
    let taken = |n: i64| Event::new("Taken", ["counter:x"], json!({"n": n}));
    given([]).when(&take("x", 2)).then([taken(1)]);
    given([taken(1)]).when(&take("x", 2)).then([taken(2)]);
    // Events of other counters are not part of the decision model.
    given([
        taken(1),
        Event::new("Taken", ["counter:y"], json!({"n": 9})),
    ])
    .when(&take("x", 2))
    .then([taken(2)]);
    given([taken(1), taken(2)])
        .when(&take("x", 2))
        .then_error(|e| *e == Exhausted("x".into()));
}
