//! The flow engine against a real PostgreSQL (and a real local HTTP server).

mod admin;
#[cfg(feature = "amqp")]
mod amqp;
mod basic;
mod control;
mod fan_out;
#[cfg(feature = "grpc")]
mod grpc;
mod nats;
mod ops;
mod saga;
mod schedules;
mod tcc;
mod workers;

use std::time::Duration;

use dcbflow::CancellationToken;
use dcbflow::flow::{
    Flows, HttpPolicy, InstanceState, InstanceStatus, WorkerOptions, events::types,
};
use uuid::Uuid;

use crate::support::TestStore;

/// Worker settings for tests: short polls, claims and lease grace.
pub fn fast(id: &str) -> WorkerOptions {
    let mut o = WorkerOptions::default().id(id);
    o.poll_interval = Duration::from_millis(50);
    o.claim_ttl = Duration::from_secs(2);
    o.lease_grace = Duration::from_millis(200);
    o
}

/// Workers running until dropped.
pub struct Workers {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    pub fn start(flows: &[&Flows]) -> Self {
        let cancel = CancellationToken::new();
        let tasks = flows
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let (worker, cancel) = (f.worker(fast(&format!("w{i}"))), cancel.clone());
                tokio::spawn(async move { worker.run(cancel).await.expect("worker") })
            })
            .collect();
        Workers { cancel, tasks }
    }

    pub async fn stop(mut self) {
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Waits until the instance reaches `status` (panics after `secs`).
pub async fn wait_for(flows: &Flows, id: Uuid, status: InstanceStatus, secs: u64) -> InstanceState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let state = flows.instance(id).await.unwrap().expect("instance");
        if state.status == status {
            return state;
        }
        if tokio::time::Instant::now() > deadline {
            let timeline: Vec<String> = flows
                .timeline(id)
                .await
                .unwrap()
                .iter()
                .map(|e| format!("{} {}", e.event_type(), e.data()))
                .collect();
            panic!(
                "instance {id} is {:?}, not {status:?} after {secs} s; timeline:\n{}",
                state.status,
                timeline.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The timeline as `(type, step key)` pairs.
pub async fn steps(flows: &Flows, id: Uuid) -> Vec<(String, String)> {
    flows
        .timeline(id)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            let step = e.data()["step"].as_object().map(|s| {
                let task = s["task"].as_str().unwrap_or_default();
                let phase = s["phase"].as_str().unwrap_or_default();
                match s.get("participant").and_then(|p| p.as_str()) {
                    Some(p) => format!("{task}.{p}/{phase}"),
                    None => format!("{task}/{phase}"),
                }
            });
            (e.event_type().to_owned(), step.unwrap_or_default())
        })
        .collect()
}

/// A test store and its flow engine.
pub async fn engine() -> (TestStore, Flows) {
    let t = TestStore::new().await;
    let flows = Flows::new(t.store.clone()).http_policy(HttpPolicy::default().allow_loopback(true));
    (t, flows)
}

#[allow(dead_code)]
pub const STARTED: &str = types::STARTED;
