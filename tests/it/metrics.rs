//! Metrics (feature `metrics`): appends by result, flow step attempts, with
//! their names, labels and descriptions, recorded into `metrics-util`'s
//! debugging recorder.
//!
//! The recorder is installed for the test's thread only
//! (`set_default_local_recorder`), and the test runs on a current-thread
//! runtime, so every task it spawns (the store's, the worker's) records into it
//! and no other test's appends do.

use ::metrics::{SharedString, Unit};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};

use dcbflow::{Event, Query};
use serde_json::json;

use crate::support::{TestStore, ev};

/// What the recorder holds: taking it resets the counters and histograms, so
/// each snapshot holds what was recorded since the previous one.
type Recorded = Vec<(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)>;

/// The metrics in `recorded` matching `kind`, `name` and every one of `labels`.
fn values<'a>(
    recorded: &'a Recorded,
    kind: MetricKind,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a DebugValue> {
    recorded
        .iter()
        .filter(move |(key, ..)| matches(key, kind, name, labels))
        .map(|(.., value)| value)
}

fn matches(key: &CompositeKey, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> bool {
    key.kind() == kind
        && key.key().name() == name
        && labels
            .iter()
            .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
}

/// The sum of the counters `name` with `labels`.
fn counted(recorded: &Recorded, name: &str, labels: &[(&str, &str)]) -> u64 {
    values(recorded, MetricKind::Counter, name, labels)
        .map(|v| match v {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

/// The number of samples of the histograms `name` with `labels`.
fn samples(recorded: &Recorded, name: &str, labels: &[(&str, &str)]) -> usize {
    values(recorded, MetricKind::Histogram, name, labels)
        .map(|v| match v {
            DebugValue::Histogram(s) => s.len(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .sum()
}

#[tokio::test]
async fn appends_and_step_attempts_are_counted_with_their_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = ::metrics::set_default_local_recorder(&recorder);
    dcbflow::metrics::describe();

    let t = TestStore::new().await;
    let q = Query::items_of(["Booked"], ["seat:1"]);
    let cursor = t.cursor(&q).await;
    t.append_if(vec![ev("Booked", &["seat:1"])], &q, cursor.clone())
        .await
        .unwrap();
    let conflict = t
        .append_if(vec![ev("Booked", &["seat:1"])], &q, cursor)
        .await;
    assert!(conflict.unwrap_err().is_conflict());
    let invalid = t
        .store
        .append(vec![Event::new("", ["x:1"], json!({}))], None)
        .await;
    assert!(matches!(invalid, Err(dcbflow::Error::InvalidInput(_))));

    // Group commit and an append in the caller's transaction: counted the same.
    let grouped = dcbflow::Store::builder_for_url(&t.url, Some(4))
        .unwrap()
        .schema(&t.schema)
        .group_commit(8)
        .build()
        .await
        .unwrap();
    grouped
        .append(vec![ev("Other", &["x:1"])], None)
        .await
        .unwrap();
    let mut client = t.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    t.store
        .append_in_tx(&tx, vec![ev("Other", &["x:2"])], None)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let recorded = snapshotter.snapshot().into_vec();
    let appends = dcbflow::metrics::APPENDS_TOTAL;
    assert_eq!(appends, "dcbflow_appends_total");
    assert_eq!(counted(&recorded, appends, &[("result", "ok")]), 3);
    assert_eq!(counted(&recorded, appends, &[("result", "conflict")]), 1);
    assert_eq!(counted(&recorded, appends, &[("result", "invalid")]), 1);
    assert_eq!(counted(&recorded, appends, &[("result", "error")]), 0);
    assert_eq!(
        samples(&recorded, "dcbflow_append_duration_seconds", &[]),
        5
    );
    let (_, unit, help, _) = recorded
        .iter()
        .find(|(key, ..)| matches(key, MetricKind::Counter, appends, &[]))
        .unwrap();
    assert_eq!(*unit, Some(Unit::Count));
    assert!(help.as_ref().is_some_and(|h| h.contains("conflict")));

    #[cfg(feature = "flow")]
    steps(&t, &snapshotter).await;
}

/// A step that fails its first attempt and succeeds its second.
#[cfg(feature = "flow")]
async fn steps(t: &TestStore, snapshotter: &metrics_util::debugging::Snapshotter) {
    use dcbflow::flow::{
        Action, FlowDefinition, Flows, InstanceStatus, TaskContext, TaskDefinition, TaskError,
        TaskRetry,
    };

    let flows = Flows::new(t.store.clone());
    flows.function("flaky", |ctx: TaskContext| async move {
        if ctx.attempt == 1 {
            Err(TaskError::retryable("not yet"))
        } else {
            Ok(json!("done"))
        }
    });
    let def = FlowDefinition::builder("metered")
        .task(TaskDefinition::new("charge", Action::rust("flaky")).retry(
            TaskRetry::attempts(3).backoff(
                std::time::Duration::from_millis(10),
                std::time::Duration::from_millis(10),
            ),
        ))
        .build();
    flows.register(&def).await.unwrap();
    let workers = crate::flow::Workers::start(&[&flows]);
    let id = flows
        .start("metered", None, json!({}))
        .await
        .unwrap()
        .instance;
    crate::flow::wait_for(&flows, id, InstanceStatus::Completed, 30).await;
    workers.stop().await;

    let recorded = &snapshotter.snapshot().into_vec();
    let attempts = "dcbflow_step_attempts_total";
    let labels = |outcome| {
        [
            ("flow", "metered"),
            ("task", "charge"),
            ("outcome", outcome),
        ]
    };
    assert_eq!(counted(recorded, attempts, &labels("failed")), 1);
    assert_eq!(counted(recorded, attempts, &labels("succeeded")), 1);
    assert_eq!(counted(recorded, attempts, &labels("timed_out")), 0);
    let step = [("flow", "metered"), ("task", "charge")];
    assert_eq!(samples(recorded, "dcbflow_step_duration_seconds", &step), 2);
    assert_eq!(
        samples(
            recorded,
            "dcbflow_step_queue_wait_seconds",
            &[("flow", "metered")]
        ),
        2
    );
    // Flow transitions are appends too: counted, never with an instance id.
    assert!(counted(recorded, "dcbflow_appends_total", &[("result", "ok")]) > 1);
    for (key, ..) in recorded {
        for label in key.key().labels() {
            assert!(
                !label.value().contains(&id.to_string()),
                "an instance id as a label: {key:?}"
            );
        }
    }
}
