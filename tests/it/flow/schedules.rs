//! Cron schedules against a real PostgreSQL, with workers of several "processes"
//! (engines on store handles of their own) competing for every tick.

use std::collections::BTreeMap;

use dcbflow::flow::{
    Action, FlowDefinition, FlowError, Flows, MissedTicks, Operator, Schedule, TaskContext,
    TaskDefinition, TaskError, events::types,
};
use dcbflow::{Query, ReadOptions, Store};
use serde_json::{Value, json};

use super::{Workers, engine};
use crate::support::{DEADLINE, eventually};

fn every_second(name: &str) -> Schedule {
    Schedule {
        name: name.into(),
        flow: "report".into(),
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        input: json!({"kind": "daily"}),
        missed: MissedTicks::Skip,
    }
}

async fn report_flow(flows: &Flows) {
    flows.function("report", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    let def = FlowDefinition::builder("report")
        .task(TaskDefinition::new("report", Action::rust("report")))
        .build();
    flows.register(&def).await.unwrap();
}

/// The business keys of the instances schedule `name` started, with their count.
async fn started(store: &Store, name: &str) -> BTreeMap<String, usize> {
    let events = store
        .read_all(
            &Query::items_of([types::STARTED], [format!("flow_schedule:{name}")]),
            ReadOptions::default(),
        )
        .await
        .unwrap()
        .events;
    let mut keys = BTreeMap::new();
    for e in events {
        *keys
            .entry(e.data()["business_key"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_run_by_three_processes_starts_one_instance_per_tick() {
    let (t, flows) = engine().await;
    report_flow(&flows).await;
    flows
        .set_schedule(&every_second("nightly"), Some("ada"))
        .await
        .unwrap();
    // Three engines on store handles of their own, as three processes would be.
    let mut engines = Vec::new();
    for _ in 0..3 {
        let store = Store::builder_for_url(&t.url, Some(8))
            .unwrap()
            .schema(&t.schema)
            .build()
            .await
            .unwrap();
        let f = Flows::new(store);
        report_flow(&f).await;
        engines.push(f);
    }
    let workers = Workers::start(&engines.iter().collect::<Vec<_>>());
    let keys = eventually("four ticks to start instances", DEADLINE, || async {
        let keys = started(&t.store, "nightly").await;
        (keys.len() >= 4).then_some(keys)
    })
    .await;
    workers.stop().await;
    let keys = started(&t.store, "nightly")
        .await
        .into_iter()
        .chain(keys)
        .collect::<BTreeMap<_, _>>();
    assert!(
        keys.values().all(|n| *n == 1),
        "a tick started twice: {keys:?}"
    );
    // Consecutive seconds: no tick skipped while on time.
    let ticks: Vec<chrono::DateTime<chrono::Utc>> = keys
        .keys()
        .map(|k| k.trim_start_matches("schedule:nightly:").parse().unwrap())
        .collect();
    for w in ticks.windows(2) {
        assert_eq!((w[1] - w[0]).num_seconds(), 1, "{ticks:?}");
    }
    let s = flows.schedule("nightly").await.unwrap().unwrap();
    assert_eq!(s.last_tick, ticks.last().copied());
    assert_eq!(s.changed_by.as_deref(), Some("ada"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_schedule_starts_nothing_and_bad_schedules_are_refused() {
    let (t, flows) = engine().await;
    report_flow(&flows).await;
    flows
        .set_schedule(&every_second("paused"), None)
        .await
        .unwrap();
    let paused = flows
        .pause_schedule("paused", &Operator::new("ada", "maintenance"))
        .await
        .unwrap();
    assert!(paused.paused && paused.next_tick.is_none());
    let workers = Workers::start(&[&flows]);
    // Another schedule runs meanwhile: its ticks show the workers look.
    flows
        .set_schedule(&every_second("running"), None)
        .await
        .unwrap();
    eventually("the running schedule to start two", DEADLINE, || async {
        (started(&t.store, "running").await.len() >= 2).then_some(())
    })
    .await;
    assert!(started(&t.store, "paused").await.is_empty());
    flows
        .resume_schedule("paused", &Operator::new("ada", "done"))
        .await
        .unwrap();
    eventually("the resumed schedule to start one", DEADLINE, || async {
        (!started(&t.store, "paused").await.is_empty()).then_some(())
    })
    .await;
    workers.stop().await;

    let before = t.count().await;
    let mut bad = every_second("bad one");
    bad.cron = "every second".into();
    bad.timezone = "Mars/Olympus".into();
    match flows.set_schedule(&bad, None).await {
        Err(FlowError::InvalidSchedule(p)) => assert_eq!(p.len(), 3, "{p:?}"),
        other => panic!("{other:?}"),
    }
    let mut unknown = every_second("x");
    unknown.flow = "nope".into();
    assert!(matches!(
        flows.set_schedule(&unknown, None).await,
        Err(FlowError::UnknownFlow(_))
    ));
    assert!(matches!(
        flows.pause_schedule("nope", &Operator::new("a", "b")).await,
        Err(FlowError::UnknownSchedule(_))
    ));
    assert_eq!(t.count().await, before, "nothing written");
}
