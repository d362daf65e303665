//! The admin queries: instance listings (filters, keyset pagination, counts),
//! incident groups (stable ids, pagination), single incidents, and
//! acknowledgements (an event on the instance, kept in the read model, cleared
//! by a different failure).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dcbflow::flow::{
    Action, FlowDefinition, FlowError, Flows, IncidentFilter, InstanceCursor, InstanceFilter,
    InstanceStatus, OnExhausted, Operator, Phase, StatusCount, StepId, StepStatus, TaskContext,
    TaskDefinition, TaskError, TaskRetry, events::types, parse_incident_id,
};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Workers, engine, wait_for};
use crate::support::{DEADLINE, eventually};

/// A one-task flow `name` whose task nobody runs (no workers in these tests):
/// its instances stay `running`.
async fn idle_flow(flows: &Flows, name: &str) {
    let def = FlowDefinition::builder(name)
        .task(TaskDefinition::new("noop", Action::rust("noop")))
        .build();
    flows.function("noop", |_ctx: TaskContext| async move {
        Ok::<_, TaskError>(Value::Null)
    });
    flows.register(&def).await.unwrap();
}

async fn start(flows: &Flows, flow: &str, key: Option<&str>) -> Uuid {
    flows.start(flow, key, json!({})).await.unwrap().instance
}

fn ids(rows: &[dcbflow::flow::InstanceSummary]) -> Vec<Uuid> {
    rows.iter().map(|r| r.id).collect()
}

/// Every page of `filter` (page size `limit`), following the cursors.
async fn all_pages(flows: &Flows, filter: InstanceFilter, limit: i64) -> Vec<Uuid> {
    let mut out = Vec::new();
    let mut filter = filter.limit(limit);
    loop {
        let page = flows.instances(&filter).await.unwrap();
        out.extend(ids(&page));
        match page.last() {
            Some(last) if page.len() as i64 == limit => filter.page_after = Some(last.cursor()),
            _ => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instance_filters_and_counts() {
    let (_t, flows) = engine().await;
    idle_flow(&flows, "orders").await;
    idle_flow(&flows, "refunds").await;
    let keys = [
        "order-1",
        "order-2",
        "ORDER-3",
        "50%off",
        "50Xoff",
        "a_b",
        "aXb",
        r"back\slash",
        "backXslash",
    ];
    let mut by_key = std::collections::HashMap::new();
    for k in keys {
        by_key.insert(k, start(&flows, "orders", Some(k)).await);
    }
    let keyless = start(&flows, "orders", None).await;
    let refunds = [
        start(&flows, "refunds", Some("order-1")).await,
        start(&flows, "refunds", None).await,
    ];
    // One paused instance, for the status filter.
    let paused = by_key["order-2"];
    let seen = flows.instance(paused).await.unwrap().unwrap().last_position;
    flows
        .pause(paused, seen, &Operator::new("ada", "test"))
        .await
        .unwrap();

    // Everything, newest first, with its last position.
    let all = flows.instances(&InstanceFilter::new()).await.unwrap();
    assert_eq!(all.len(), keys.len() + 1 + refunds.len());
    assert_eq!(all[0].id, refunds[1]);
    for w in all.windows(2) {
        assert!((w[0].started_at, w[0].id) > (w[1].started_at, w[1].id));
    }
    for row in &all {
        let state = flows.instance(row.id).await.unwrap().unwrap();
        assert_eq!(row.last_position, state.last_position);
        assert_eq!(
            row.cursor(),
            InstanceCursor {
                started_at: row.started_at,
                id: row.id
            }
        );
    }

    // Each filter, and its count.
    let check = |filter: InstanceFilter, expected: BTreeSet<Uuid>| {
        let flows = &flows;
        async move {
            let got: BTreeSet<Uuid> = ids(&flows.instances(&filter).await.unwrap())
                .into_iter()
                .collect();
            assert_eq!(got, expected, "{filter:?}");
            let count = flows.count_instances(&filter).await.unwrap();
            assert_eq!(count, expected.len() as i64, "count of {filter:?}");
        }
    };
    let set = |ids: &[Uuid]| ids.iter().copied().collect::<BTreeSet<_>>();
    let orders: BTreeSet<Uuid> = by_key.values().copied().chain([keyless]).collect();
    check(InstanceFilter::flow("orders"), orders.clone()).await;
    check(InstanceFilter::flow("refunds"), set(&refunds)).await;
    check(InstanceFilter::flow("nothing"), set(&[])).await;
    check(
        InstanceFilter::new().status(InstanceStatus::Paused),
        set(&[paused]),
    )
    .await;
    check(
        InstanceFilter::flow("orders").status(InstanceStatus::Running),
        orders.iter().copied().filter(|i| *i != paused).collect(),
    )
    .await;
    check(
        InstanceFilter::new().business_key("order-1"),
        set(&[by_key["order-1"], refunds[0]]),
    )
    .await;
    check(
        InstanceFilter::flow("orders").business_key("order-1"),
        set(&[by_key["order-1"]]),
    )
    .await;

    // Started windows: [after, before), so adjacent windows tile.
    let oldest_first: Vec<_> = all.iter().rev().collect();
    let middle = oldest_first[4].started_at;
    let before: BTreeSet<Uuid> = all
        .iter()
        .filter(|r| r.started_at < middle)
        .map(|r| r.id)
        .collect();
    let after: BTreeSet<Uuid> = all
        .iter()
        .filter(|r| r.started_at >= middle)
        .map(|r| r.id)
        .collect();
    assert!(!before.is_empty() && !after.is_empty());
    check(InstanceFilter::new().started_before(middle), before.clone()).await;
    check(InstanceFilter::new().started_after(middle), after.clone()).await;
    check(
        InstanceFilter::new()
            .started_after(middle)
            .started_before(middle),
        set(&[]),
    )
    .await;
    let last = all[0].started_at;
    check(
        InstanceFilter::new()
            .started_after(middle)
            .started_before(last),
        after.iter().copied().filter(|i| *i != refunds[1]).collect(),
    )
    .await;

    // Key search: case-insensitive, metacharacters literal.
    check(
        InstanceFilter::flow("orders").key_contains("order-"),
        set(&[by_key["order-1"], by_key["order-2"], by_key["ORDER-3"]]),
    )
    .await;
    check(
        InstanceFilter::new().key_contains("ORDER-1"),
        set(&[by_key["order-1"], refunds[0]]),
    )
    .await;
    check(
        InstanceFilter::new().key_contains("%"),
        set(&[by_key["50%off"]]),
    )
    .await;
    check(
        InstanceFilter::new().key_contains("50%OFF"),
        set(&[by_key["50%off"]]),
    )
    .await;
    check(
        InstanceFilter::new().key_contains("_"),
        set(&[by_key["a_b"]]),
    )
    .await;
    check(
        InstanceFilter::new().key_contains("a_b"),
        set(&[by_key["a_b"]]),
    )
    .await;
    check(
        InstanceFilter::new().key_contains(r"\"),
        set(&[by_key[r"back\slash"]]),
    )
    .await;
    check(
        InstanceFilter::new().key_contains(r"k\s"),
        set(&[by_key[r"back\slash"]]),
    )
    .await;
    check(InstanceFilter::new().key_contains("%%"), set(&[])).await;
    check(InstanceFilter::new().key_contains("zzz"), set(&[])).await;
    let with_key: BTreeSet<Uuid> = all
        .iter()
        .filter(|r| r.business_key.is_some())
        .map(|r| r.id)
        .collect();
    check(InstanceFilter::new().key_contains(""), with_key).await;
    // SQL in the search text is only text.
    check(InstanceFilter::new().key_contains("' OR '1'='1"), set(&[])).await;

    // Limits are clamped; the count ignores the limit and the page.
    let one = InstanceFilter::new().limit(0);
    assert_eq!(flows.instances(&one).await.unwrap().len(), 1);
    assert_eq!(
        flows
            .count_instances(&one.page_after(all[0].cursor()))
            .await
            .unwrap(),
        all.len() as i64
    );
    let huge = flows
        .instances(&InstanceFilter::new().limit(i64::MAX))
        .await
        .unwrap();
    assert_eq!(huge.len(), all.len());

    // Counts by flow and status.
    let counts = flows.instance_counts().await.unwrap();
    let count = |flow: &str, status: &str, count: i64| StatusCount {
        flow: flow.into(),
        status: status.into(),
        count,
    };
    assert_eq!(
        counts,
        vec![
            count("orders", "paused", 1),
            count("orders", "running", keys.len() as i64),
            count("refunds", "running", 2),
        ]
    );
}

/// Paging through a listing while new instances start: every instance that
/// existed before the first page is seen exactly once, in order, and nothing is
/// seen twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_neither_repeat_nor_skip_while_instances_start() {
    let (_t, flows) = engine().await;
    idle_flow(&flows, "paged").await;
    let mut before = Vec::new();
    for i in 0..47 {
        before.push(start(&flows, "paged", Some(&format!("k-{i}"))).await);
    }
    // Starts in the background, all through the paging.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let background = {
        let (flows, stop, started) = (flows.clone(), stop.clone(), started.clone());
        tokio::spawn(async move {
            let mut new = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                new.push(start(&flows, "paged", None).await);
                started.fetch_add(1, Ordering::SeqCst);
            }
            new
        })
    };

    let filter = InstanceFilter::flow("paged").limit(5);
    let mut seen = Vec::new();
    let mut rows = Vec::new();
    let mut page = flows.instances(&filter).await.unwrap();
    loop {
        rows.extend(page.iter().map(|r| (r.started_at, r.id)));
        seen.extend(ids(&page));
        let Some(last) = page.last() else { break };
        if page.len() < 5 {
            break;
        }
        // The cursor as a client holds it: its text, parsed back.
        let cursor: InstanceCursor = last.cursor().to_string().parse().unwrap();
        assert_eq!(cursor, last.cursor());
        // Something starts between every two pages.
        let n = started.load(Ordering::SeqCst);
        eventually("a start between pages", DEADLINE, || {
            let started = started.clone();
            async move { (started.load(Ordering::SeqCst) > n).then_some(()) }
        })
        .await;
        page = flows
            .instances(&filter.clone().page_after(cursor))
            .await
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let new = background.await.unwrap();
    assert!(!new.is_empty());

    let unique: HashSet<Uuid> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "an instance was listed twice");
    for id in &before {
        assert!(unique.contains(id), "instance {id} was skipped");
    }
    for w in rows.windows(2) {
        assert!(w[0] > w[1], "not in (started_at, id) DESC order: {w:?}");
    }
    // Those started while paging are newer than the first page: never listed
    // on a later one.
    let new: HashSet<Uuid> = new.into_iter().collect();
    assert!(seen[5..].iter().all(|id| !new.contains(id)));
    // Everything is there in the end.
    let everything = all_pages(&flows, InstanceFilter::flow("paged"), 9).await;
    assert_eq!(everything.len(), before.len() + new.len());
    assert_eq!(
        everything.iter().copied().collect::<HashSet<_>>().len(),
        everything.len()
    );
}

/// `charge` fails for good with the flow input's `error` and pauses the
/// instance: one incident per instance, grouped by flow and error.
async fn failing_flow(flows: &Flows, name: &str) {
    flows.function("charge", |ctx: TaskContext| async move {
        let error = ctx.flow_input["error"].as_str().unwrap_or("no error given");
        Err::<Value, _>(TaskError::fatal(error.to_owned()))
    });
    let def = FlowDefinition::builder(name)
        .task(
            TaskDefinition::new("charge", Action::rust("charge"))
                .retry(TaskRetry::attempts(1))
                .on_exhausted(OnExhausted::Pause),
        )
        .build();
    flows.register(&def).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incident_groups_have_stable_ids_and_pages() {
    let (_t, flows) = engine().await;
    failing_flow(&flows, "billing").await;
    failing_flow(&flows, "payroll").await;
    let workers = Workers::start(&[&flows]);
    // 7 groups: 5 errors in billing (error i on i + 1 instances), 2 in payroll.
    let mut instances = Vec::new();
    for i in 0..5 {
        for _ in 0..=i {
            let id = flows
                .start(
                    "billing",
                    None,
                    json!({"error": format!("card declined #{i}")}),
                )
                .await
                .unwrap()
                .instance;
            instances.push(id);
        }
    }
    for e in ["bank down", "card declined #0"] {
        let id = flows
            .start("payroll", None, json!({"error": e}))
            .await
            .unwrap()
            .instance;
        instances.push(id);
    }
    for id in &instances {
        wait_for(&flows, *id, InstanceStatus::Paused, 30).await;
    }
    workers.stop().await;

    let first = flows.incidents().await.unwrap();
    assert_eq!(first.len(), 7, "{first:?}");
    let ids: Vec<String> = first.iter().map(|g| g.id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "ordered by id, no two alike");
    for g in &first {
        assert_eq!(g.id.len(), 16);
        assert!(g.id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(g.instance_count, g.instances.len() as i64);
        assert_eq!(g.acknowledged, 0);
        assert_eq!(g.kind, "exhausted");
        assert_eq!(g.task, "charge");
    }
    let declined = |flow: &str, i: usize| {
        first
            .iter()
            .find(|g| g.flow == flow && g.error == format!("card declined #{i}"))
            .unwrap()
    };
    assert_eq!(declined("billing", 4).instance_count, 5);
    // The same error in another flow is another group.
    assert_ne!(declined("billing", 0).id, declined("payroll", 0).id);

    // Pages of 2 by the id cursor: the same groups, in the same order.
    let mut paged = Vec::new();
    let mut filter = IncidentFilter::new().limit(2);
    loop {
        let page = flows.incident_groups(&filter).await.unwrap();
        assert!(page.len() <= 2);
        paged.extend(page.iter().map(|g| g.id.clone()));
        match page.last() {
            Some(last) if page.len() == 2 => filter = filter.after(last.id.clone()),
            _ => break,
        }
    }
    assert_eq!(paged, ids);
    // A flow's groups; the default page size; ids stable across calls.
    let payroll = flows
        .incident_groups(&IncidentFilter::flow("payroll"))
        .await
        .unwrap();
    assert_eq!(payroll.len(), 2);
    assert!(payroll.iter().all(|g| g.flow == "payroll"));
    let again = flows
        .incident_groups(&IncidentFilter::default())
        .await
        .unwrap();
    assert_eq!(again, first);

    // One group's incidents, and one incident by its id.
    let group = declined("billing", 2);
    let incidents = flows.group_incidents(&group.id, 100).await.unwrap();
    assert_eq!(incidents.len(), 3);
    assert_eq!(
        incidents.iter().map(|i| i.instance).collect::<Vec<_>>(),
        group.instances
    );
    assert_eq!(flows.group_incidents(&group.id, 2).await.unwrap().len(), 2);
    assert!(
        flows
            .group_incidents("0000000000000000", 10)
            .await
            .unwrap()
            .is_empty()
    );
    let charge = StepId::new("charge", Phase::Action);
    for i in &incidents {
        assert_eq!(i.id, format!("{}/charge/action", i.instance));
        assert_eq!(i.step, "charge/action");
        assert_eq!(i.step_id.as_ref(), Some(&charge));
        assert_eq!(i.group_id, group.id);
        assert_eq!((i.flow.as_str(), i.kind.as_str()), ("billing", "exhausted"));
        assert_eq!(i.error, "card declined #2");
        assert_eq!(i.occurrences, 1);
        assert!(i.first_seen <= i.last_seen);
        assert_eq!(i.acknowledged, None);
        assert_eq!(parse_incident_id(&i.id), Some((i.instance, charge.clone())));
        assert_eq!(flows.incident(&i.id).await.unwrap().as_ref(), Some(i));
    }
    let some = incidents[0].instance;
    for missing in [
        format!("{some}/charge/compensate"),
        format!("{}/charge/action", Uuid::new_v4()),
        format!("{some}/"),
        "not an id".to_owned(),
        String::new(),
    ] {
        assert_eq!(flows.incident(&missing).await.unwrap(), None, "{missing:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledging_an_incident() {
    let (_t, flows) = engine().await;
    let error = Arc::new(Mutex::new("carrier refused".to_owned()));
    let e = error.clone();
    flows.function("ship", move |_ctx: TaskContext| {
        let message = e.lock().unwrap().clone();
        async move { Err::<Value, _>(TaskError::fatal(message)) }
    });
    let def = FlowDefinition::builder("shipping")
        .task(
            TaskDefinition::new("ship", Action::rust("ship"))
                .retry(TaskRetry::attempts(1))
                .on_exhausted(OnExhausted::Pause),
        )
        .build();
    flows.register(&def).await.unwrap();
    let workers = Workers::start(&[&flows]);
    let id = flows
        .start("shipping", None, json!({}))
        .await
        .unwrap()
        .instance;
    let other = flows
        .start("shipping", None, json!({}))
        .await
        .unwrap()
        .instance;
    let paused = wait_for(&flows, id, InstanceStatus::Paused, 30).await;
    wait_for(&flows, other, InstanceStatus::Paused, 30).await;
    let ship = StepId::new("ship", Phase::Action);
    let incident_id = format!("{id}/ship/action");
    let ops = Operator::new("ada@ops", "calling the carrier");

    // Refused: a stale `seen`, a step without an incident, an unknown instance.
    let stale = dcbflow::Position(paused.last_position.0 - 1);
    assert!(matches!(
        flows.acknowledge(id, &ship, Some(stale), &ops).await,
        Err(FlowError::Moved { expected, actual }) if expected == stale && actual == paused.last_position
    ));
    assert!(matches!(
        flows
            .acknowledge(id, &StepId::new("ship", Phase::Compensate), None, &ops)
            .await,
        Err(FlowError::NotAllowed(_))
    ));
    assert!(matches!(
        flows.acknowledge(Uuid::new_v4(), &ship, None, &ops).await,
        Err(FlowError::UnknownInstance(_))
    ));
    assert_eq!(
        flows.instance(id).await.unwrap().unwrap().last_position,
        paused.last_position,
        "refusals write nothing"
    );

    // Acknowledged: an event on the instance, in the fold and the read model.
    let state = flows
        .acknowledge(id, &ship, Some(paused.last_position), &ops)
        .await
        .unwrap();
    assert!(state.last_position > paused.last_position);
    assert_eq!(state.status, InstanceStatus::Paused);
    let ack = state.step(&ship).acknowledged.expect("acknowledged");
    assert_eq!(
        (
            ack.actor.as_str(),
            ack.note.as_str(),
            ack.kind.as_str(),
            ack.error.as_str()
        ),
        (
            "ada@ops",
            "calling the carrier",
            "exhausted",
            "carrier refused"
        )
    );
    let last = flows.timeline(id).await.unwrap().pop().unwrap();
    assert_eq!(last.event_type(), types::INCIDENT_ACKNOWLEDGED);
    assert_eq!(last.data()["actor"], json!("ada@ops"));
    assert_eq!(last.data()["note"], json!("calling the carrier"));
    assert_eq!(
        last.data()["step"],
        json!({"task": "ship", "phase": "action"})
    );
    let folded = flows.instance(id).await.unwrap().unwrap();
    assert_eq!(
        folded.step(&ship).acknowledged.map(|a| (a.actor, a.note)),
        Some(("ada@ops".to_owned(), "calling the carrier".to_owned()))
    );
    let incident = flows.incident(&incident_id).await.unwrap().unwrap();
    let read = incident.acknowledged.clone().expect("in the read model");
    assert_eq!(
        (read.actor.as_str(), read.note.as_str()),
        ("ada@ops", "calling the carrier")
    );
    let groups = flows.incidents().await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].instance_count, groups[0].acknowledged), (2, 1));
    // Without the acknowledged ones: only `other` is left to take on.
    let open = flows
        .incident_groups(&IncidentFilter::new().include_acknowledged(false))
        .await
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].instances.clone(), open[0].acknowledged),
        (vec![other], 0)
    );
    assert_eq!(open[0].id, groups[0].id);
    // The read models rebuilt from the log keep it.
    flows.rebuild_read_models().await.unwrap();
    let rebuilt = flows.incident(&incident_id).await.unwrap().unwrap();
    assert_eq!(
        rebuilt.acknowledged.map(|a| a.actor),
        Some("ada@ops".to_owned())
    );
    // Acknowledging the other one too empties the unacknowledged view.
    flows.acknowledge(other, &ship, None, &ops).await.unwrap();
    assert!(
        flows
            .incident_groups(&IncidentFilter::new().include_acknowledged(false))
            .await
            .unwrap()
            .is_empty()
    );

    // Retried, failing the same way: still acknowledged.
    let seen = flows.instance(id).await.unwrap().unwrap().last_position;
    flows.retry_now(id, &ship, seen, &ops).await.unwrap();
    let again = failed_attempt(&flows, id, &ship, 2).await;
    assert!(again.step(&ship).acknowledged.is_some());
    let incident = eventually("the incident is back", DEADLINE, || async {
        flows.incident(&incident_id).await.unwrap()
    })
    .await;
    assert_eq!(
        incident.acknowledged.map(|a| a.actor),
        Some("ada@ops".to_owned())
    );

    // Retried, failing with another error: the acknowledgement is gone.
    *error.lock().unwrap() = "address unknown".to_owned();
    let seen = flows.instance(id).await.unwrap().unwrap().last_position;
    flows.retry_now(id, &ship, seen, &ops).await.unwrap();
    let third = failed_attempt(&flows, id, &ship, 3).await;
    assert_eq!(third.step(&ship).acknowledged, None);
    let incident = eventually("the new incident", DEADLINE, || async {
        flows.incident(&incident_id).await.unwrap()
    })
    .await;
    assert_eq!(incident.error, "address unknown");
    assert_eq!(incident.acknowledged, None);
    let groups = flows.incidents().await.unwrap();
    let new = groups
        .iter()
        .find(|g| g.error == "address unknown")
        .unwrap();
    assert_eq!((new.instances.clone(), new.acknowledged), (vec![id], 0));
    assert_ne!(
        new.id,
        groups
            .iter()
            .find(|g| g.error == "carrier refused")
            .unwrap()
            .id
    );
    workers.stop().await;
}

/// The instance once attempt `attempt` of `step` has failed for good and it is
/// paused again.
async fn failed_attempt(
    flows: &Flows,
    id: Uuid,
    step: &StepId,
    attempt: u32,
) -> dcbflow::flow::InstanceState {
    let what = format!("attempt {attempt} of {step} failed");
    eventually(&what, DEADLINE, || async {
        let s = flows.instance(id).await.unwrap().unwrap();
        let st = s.step(step);
        (st.attempts == attempt
            && st.status == StepStatus::Failed
            && s.status == InstanceStatus::Paused)
            .then_some(s)
    })
    .await
}
