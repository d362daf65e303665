//! Scenario 3: a TCP proxy between the store and the server (`support::proxy`)
//! that adds latency, resets every connection, and blackholes them (accepts and
//! keeps connections, drops every byte: a frozen server or a middlebox that
//! died while its kernel still answers, so TCP alone notices nothing).
//!
//! Verdicts: with latency every call succeeds; after a reset the store recovers
//! at once with retryable errors; during a blackhole no store call lasts longer
//! than its configured timeout; after the heal the SAME `Store` acknowledges
//! appends again within a deadline.
//!
//! EXPECTATION (issue 11 §7, "a stuck call must end with a typed timeout"): the
//! store is built the documented way, `Store::builder(dcbflow::pool_from_url(url,
//! Some(4)))`, with `connect_timeout=2` in the URL. `pool_from_url` documents its
//! bounds: connect 10 s (here 2 s), creating a connection 10 s, checking one 5 s,
//! waiting for one 30 s. With no more callers than connections nobody waits for
//! the pool, so a call should end within [`CALL_BUDGET`] = the 10 s bound on
//! creating a connection plus the 5 s on checking one plus 2 s of slack. The crate has no client-side bound on
//! a statement sent on an established connection (the server-side
//! `statement_timeout` never sees a blackholed statement); if a call exceeds the
//! budget, that is the defect this scenario exists to catch.

use std::time::{Duration, Instant};

use dcbflow::{Event, Query, ReadOptions, Store};
use serde_json::json;

use crate::figure;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{Cluster, Verdicts, kind, long, percentile_ms};

const S: &str = "net";

/// Connections in the store's pool, and callers during the blackhole.
const POOL: usize = 4;

/// The longest a store call may last during a blackhole (see the module docs).
const CALL_BUDGET: Duration = Duration::from_secs(17);

/// Calls still running after this are dropped (and counted as over budget).
const HARD_CAP: Duration = Duration::from_secs(20);

#[test]
fn proxy_latency_reset_blackhole() {
    crate::support::run(scenario());
}

fn event(phase: &str) -> Vec<Event> {
    vec![Event::new(
        "Net",
        [format!("phase:{phase}")],
        json!({"phase": phase}),
    )]
}

/// One timed append: its duration and result (`Err` holds the error kind).
async fn timed_append(store: &Store, phase: &str) -> (Duration, Result<(), String>) {
    capped_append(store, phase, HARD_CAP).await
}

/// [`timed_append`], dropped after `cap`.
async fn capped_append(
    store: &Store,
    phase: &str,
    cap: Duration,
) -> (Duration, Result<(), String>) {
    let t0 = Instant::now();
    let r = tokio::time::timeout(cap, store.append(event(phase), None)).await;
    let outcome = match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "{}{}",
            kind(&e),
            if e.is_retryable() {
                ""
            } else {
                " (not retryable)"
            }
        )),
        Err(_) => Err("hung".to_string()),
    };
    (t0.elapsed(), outcome)
}

async fn scenario() {
    // Longer than the budget, so that a store that bounds its calls shows it.
    let blackhole = Duration::from_secs(if long() { 60 } else { 20 });
    let heal_deadline = Duration::from_secs(if long() { 90 } else { 20 });
    let cluster = Cluster::start_async().await;
    let upstream = format!("127.0.0.1:{}", cluster.port).parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    let url = format!(
        "postgres://postgres@{}/postgres?application_name=fault_net&connect_timeout=2",
        proxy.addr
    );
    let schema = "fault_net";
    let store = Store::builder(dcbflow::pool_from_url(&url, Some(POOL)).unwrap())
        .schema(schema)
        .build()
        .await
        .expect("store through the proxy");
    let mut v = Verdicts::new(S);

    // Pass.
    let mut pass = Vec::new();
    let mut pass_failed = 0;
    for _ in 0..100 {
        let (d, r) = timed_append(&store, "pass").await;
        pass.push(d);
        pass_failed += usize::from(r.is_err());
    }
    let pass_p50 = percentile_ms(&mut pass, 50.0);
    v.check(
        "through the proxy, every append succeeds",
        pass_failed == 0,
        format!("100 appends, {pass_failed} failed, p50 {pass_p50:.1} ms"),
    );

    // Latency.
    let delay = Duration::from_millis(20);
    proxy.set(Mode::Latency(delay));
    let mut slow = Vec::new();
    let mut slow_failed = Vec::new();
    for _ in 0..30 {
        let (d, r) = timed_append(&store, "latency").await;
        slow.push(d);
        if let Err(e) = r {
            slow_failed.push(e);
        }
    }
    let slow_p50 = percentile_ms(&mut slow, 50.0);
    v.check(
        "with 20 ms added each way, every append succeeds",
        slow_failed.is_empty() && slow_p50 >= 40.0,
        format!(
            "30 appends, failed {slow_failed:?}, p50 {slow_p50:.1} ms (without: {pass_p50:.1} ms)"
        ),
    );
    proxy.set(Mode::Pass);

    // Reset every connection.
    let reset = proxy.reset_all();
    let t0 = Instant::now();
    let mut reset_errors = Vec::new();
    let mut recovered = None;
    let mut acked = 0;
    while t0.elapsed() < Duration::from_secs(10) && acked < 20 {
        match timed_append(&store, "reset").await.1 {
            Ok(()) => {
                recovered.get_or_insert(t0.elapsed());
                acked += 1;
            }
            Err(e) => reset_errors.push(e),
        }
    }
    v.check(
        "after every connection was reset, the store acknowledges again at once, with retryable errors only",
        recovered.is_some() && acked == 20 && reset_errors.iter().all(|e| !e.contains("not retryable") && e != "hung"),
        format!(
            "{reset} connections reset; first ack after {:?}; errors before it {:?}",
            recovered, reset_errors
        ),
    );

    // Blackhole: POOL callers, each calling again as soon as a call ends.
    proxy.set(Mode::Blackhole);
    let hole = Instant::now();
    let mut callers = Vec::new();
    for c in 0..POOL {
        let store = store.clone();
        callers.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            let mut i = 0;
            while hole.elapsed() < blackhole {
                let t0 = Instant::now();
                let op = ["append", "read", "head"][(c + i) % 3];
                let r = match op {
                    "append" => {
                        tokio::time::timeout(HARD_CAP, async {
                            store.append(event("blackhole"), None).await.map(|_| ())
                        })
                        .await
                    }
                    "read" => {
                        tokio::time::timeout(HARD_CAP, async {
                            store
                                .read_all(&Query::all(), ReadOptions::default().limit(10))
                                .await
                                .map(|_| ())
                        })
                        .await
                    }
                    _ => {
                        tokio::time::timeout(HARD_CAP, async { store.head().await.map(|_| ()) })
                            .await
                    }
                };
                let outcome = match r {
                    Ok(Ok(())) => "ok".to_string(),
                    Ok(Err(e)) if kind(&e) == "Timeout" => format!("Timeout ({e})"),
                    Ok(Err(e)) => kind(&e),
                    Err(_) => "hung".to_string(),
                };
                calls.push((op, t0, t0.elapsed(), outcome));
                i += 1;
            }
            calls
        }));
    }
    // The blackhole lasts `blackhole`; the callers' calls may outlast it.
    tokio::time::sleep(blackhole.saturating_sub(hole.elapsed())).await;
    proxy.set(Mode::Pass);
    let healed = Instant::now();
    let mut calls = Vec::new();
    for c in callers {
        calls.extend(c.await.expect("caller"));
    }
    let longest = calls.iter().map(|c| c.2).max().unwrap_or_default();
    let over: Vec<_> = calls
        .iter()
        .filter(|c| c.2 > CALL_BUDGET)
        .map(|c| (c.0, c.2, &c.3))
        .collect();
    let mut outcomes: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    for c in &calls {
        let o = outcomes.entry(format!("{} -> {}", c.0, c.3)).or_default();
        o.0 += 1;
        o.1 = o.1.max((c.2.as_secs_f64() * 10.0).round() / 10.0);
    }
    figure!(
        S,
        "blackhole of {:.0} s: {} calls by {} callers, longest {:.1} s (budget {:?}, dropped at {:?}); outcomes (count, longest s) {:?}; {} bytes swallowed",
        blackhole.as_secs_f64(),
        calls.len(),
        POOL,
        longest.as_secs_f64(),
        CALL_BUDGET,
        HARD_CAP,
        outcomes,
        proxy.dropped_bytes()
    );
    v.check(
        "during the blackhole no store call lasts longer than its configured timeout (EXPECTATION, see the module docs)",
        over.is_empty(),
        format!("{} of {} calls over {:?}: {:?}", over.len(), calls.len(), CALL_BUDGET, &over[..over.len().min(6)]),
    );
    // Calls that ended while the blackhole lasted.
    let ended: Vec<&str> = calls
        .iter()
        .filter(|c| c.3 != "hung" && c.1 + c.2 <= healed)
        .map(|c| c.3.as_str())
        .collect();
    v.check(
        "every call that ended while the blackhole lasted ended with an error (a typed timeout or a connection error), none succeeded",
        ended
            .iter()
            .all(|c| c.starts_with("Timeout") || *c == "Database(closed)"),
        format!("{} calls ended: {ended:?}", ended.len()),
    );

    // Heal: the SAME store must acknowledge again.
    let mut heal_errors: std::collections::BTreeMap<String, usize> = Default::default();
    let mut same_recovered = None;
    while healed.elapsed() < heal_deadline {
        let left = heal_deadline.saturating_sub(healed.elapsed()).min(HARD_CAP);
        match capped_append(&store, "healed", left).await.1 {
            Ok(()) => {
                same_recovered = Some(healed.elapsed());
                break;
            }
            Err(e) => *heal_errors.entry(e).or_default() += 1,
        }
    }
    // For comparison: a fresh store through the same proxy.
    let fresh_t0 = Instant::now();
    let fresh = match Store::builder(dcbflow::pool_from_url(&url, Some(1)).unwrap())
        .schema(schema)
        .build()
        .await
    {
        Ok(fresh) => tokio::time::timeout(HARD_CAP, fresh.append(event("fresh"), None))
            .await
            .map(|r| r.map(|_| fresh_t0.elapsed()).map_err(|e| kind(&e)))
            .unwrap_or_else(|_| Err("hung".into())),
        Err(e) => Err(kind(&e)),
    };
    figure!(S, "a fresh store through the healed proxy: {fresh:?}");
    v.check(
        "after the heal the same Store acknowledges appends again within the deadline",
        same_recovered.is_some(),
        format!(
            "{} (deadline {:?}); errors meanwhile {:?}",
            same_recovered.map_or("never".to_string(), |d| format!(
                "first ack {:.1} s after the heal",
                d.as_secs_f64()
            )),
            heal_deadline,
            heal_errors
        ),
    );
    figure!(
        S,
        "append p50: {pass_p50:.1} ms direct through the proxy, {slow_p50:.1} ms with 20 ms each way; proxy accepted {} connections",
        proxy.accepted()
    );
    v.finish();
}
