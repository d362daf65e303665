//! Scenario 2: a backend-kill storm. While eight writers append (with and without
//! group commit, ids and conditions, see `support::load`), every 100-300 ms
//! `pg_terminate_backend` ends every backend of the store (found by
//! `application_name`). Verdict: no partial write (each append's events all
//! present or all absent), every acknowledged append present exactly once at the
//! positions it was told, no session left inside a transaction.

use std::time::{Duration, Instant};

use dcbflow::Store;
use rand::Rng;

use crate::figure;
use crate::support::load::{self, Load, WriterSpec};
use crate::support::{Cluster, Verdicts, long, raw, within};

const S: &str = "storm";

#[test]
fn backend_kill_storm() {
    crate::support::run(scenario());
}

async fn scenario() {
    let storm = Duration::from_secs(if long() { 60 } else { 10 });
    let cluster = Cluster::start_async().await;
    let schema = "fault_storm";
    let apps = ["fault_storm_plain", "fault_storm_group"];
    let plain = Store::builder_for_url(&cluster.url(apps[0]), Some(8))
        .unwrap()
        .schema(schema)
        .group_commit(0)
        .build()
        .await
        .expect("plain store");
    let group = Store::builder_for_url(&cluster.url(apps[1]), Some(8))
        .unwrap()
        .schema(schema)
        .group_commit(16)
        .build()
        .await
        .expect("group-commit store");
    let killer = raw(&cluster.url("fault_storm_killer")).await;

    let mut specs = Vec::new();
    for (store, label) in [(&plain, "plain"), (&group, "group")] {
        for (ids, conditional) in [(true, true), (false, true), (true, false), (false, false)] {
            specs.push(WriterSpec {
                store: store.clone(),
                label,
                ids,
                conditional,
            });
        }
    }
    let load = Load::start(specs);
    let apps: Vec<String> = apps.iter().map(|s| s.to_string()).collect();
    let started = Instant::now();
    let (mut rounds, mut terminated) = (0u64, 0i64);
    while started.elapsed() < storm {
        // The storm's rhythm, not a wait for a condition.
        let pause = rand::rng().random_range(100..=300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let row = killer
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
                &[&apps],
            )
            .await
            .expect("terminate");
        rounds += 1;
        terminated += row.get::<_, i64>(0);
    }
    let acked_in_storm = load.acked();
    // After the storm, each store acknowledges again.
    let calm = Instant::now();
    let recovered = within(Duration::from_secs(30), || async {
        (load.acked_since("plain", calm) > 0 && load.acked_since("group", calm) > 0).then_some(())
    })
    .await;
    let ledger = load.stop().await;

    let mut v = Verdicts::new(S);
    let log = load::stored(&killer, schema).await;
    let checked = load::check(&ledger, &log, &mut v);
    let open: i64 = within(Duration::from_secs(30), || async {
        let n: i64 = killer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1) \
                 AND xact_start IS NOT NULL",
                &[&apps],
            )
            .await
            .ok()?
            .get(0);
        (n == 0).then_some(0)
    })
    .await
    .unwrap_or(-1);
    v.check(
        "no session of the stores is left inside a transaction",
        open == 0,
        if open == 0 {
            "none".to_string()
        } else {
            "some still open after 30 s".to_string()
        },
    );
    v.check(
        "both stores acknowledge appends once the storm is over",
        recovered.is_some(),
        format!("{:?}", recovered.map(|()| calm.elapsed())),
    );
    figure!(
        S,
        "{:.1} s storm: {} kill rounds, {} backends terminated; {} appends ({} events stored), {} acknowledged during the storm ({:.0}/s), {} acknowledged in all ({} replays), {} unacknowledged and absent, {} unacknowledged but committed whole, {} conflicts",
        storm.as_secs_f64(),
        rounds,
        terminated,
        checked.appends,
        checked.events,
        acked_in_storm,
        acked_in_storm as f64 / storm.as_secs_f64(),
        checked.acked,
        checked.replayed,
        checked.unacked_absent,
        checked.unacked_committed,
        ledger.conflicts.len()
    );
    figure!(S, "errors seen by the writers: {}", ledger.errors.summary());
    v.check(
        "every error the writers saw says is_retryable() (issue 11 §8) and none hung",
        ledger.errors.not_retryable() == 0 && ledger.errors.hung == 0,
        format!(
            "{} errors, {} not retryable, {} hung",
            ledger.errors.total(),
            ledger.errors.not_retryable(),
            ledger.errors.hung
        ),
    );
    if !v.all_hold() {
        println!("[{S}] server log tail:\n{}", cluster.log_tail(30));
    }
    v.finish();
}
