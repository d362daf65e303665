//! The wake-ups of an engine's workers in this process: one subscription to the
//! flow events that create work (starts, operator actions), shared by every
//! worker of the [`Flows`](super::Flows) handle, instead of one per worker.
//!
//! A worker claims its work from `flow_wakeups`, so these events are only a hint
//! to claim now rather than at the next poll. Each look that finds some wakes
//! **one** worker, the one with the most free slots. If that worker's claim takes
//! as many instances as it had slots, there may be more due, and it hands the
//! wake-up on ([`WakeHub::wake_one`] again), to the worker with the most free
//! slots then. With every worker woken by every look, four workers made four
//! claims for each start, three of them finding nothing (docs/performance.md,
//! issue 14, fourth pass).
//!
//! The subscription starts with the first worker to join and ends with the
//! last to leave; if it fails, the next worker to join starts a new one
//! (meanwhile the workers poll `flow_wakeups` at their `poll_interval`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::flow::FlowError;
use crate::flow::model::events::types;
use crate::projection::{Subscription, SubscriptionOptions};
use crate::store::{Query, Store};

/// The shortest time between two looks of the shared subscription: every commit
/// in the store notifies, and a busy store would have it re-read the log after
/// each one. Looking at most this often lets a burst of commits count as one.
const WAKE_GAP: Duration = Duration::from_millis(5);

/// The workers of one engine in this process and their shared subscription.
#[derive(Default)]
pub(crate) struct WakeHub {
    state: Mutex<HubState>,
    /// Serializes the start of the subscription (joins race for it).
    starting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct HubState {
    members: Vec<Member>,
    next_id: u64,
    /// Where the search for the worker to wake starts (ties go round).
    turn: usize,
    /// The running subscription's task and its stop signal.
    task: Option<(tokio::task::JoinHandle<()>, CancellationToken)>,
}

struct Member {
    id: u64,
    wake: Arc<Notify>,
    slots: Arc<Semaphore>,
}

/// A worker's place in the hub; leaving it (on drop) stops the subscription
/// when no worker is left.
pub(crate) struct Membership {
    hub: Arc<WakeHub>,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut state = self.hub.state.lock().expect("wake hub lock");
        state.members.retain(|m| m.id != self.id);
        if state.members.is_empty()
            && let Some((_, stop)) = state.task.take()
        {
            stop.cancel();
        }
    }
}

impl WakeHub {
    /// Adds a worker (woken through `wake`; `slots` tells how many instances it
    /// can take now), starting the subscription if none runs. The subscription
    /// polls at `poll_interval` when no notification comes.
    ///
    /// # Errors
    /// Store errors while subscribing.
    pub(crate) async fn join(
        self: &Arc<Self>,
        store: &Store,
        poll_interval: Duration,
        wake: Arc<Notify>,
        slots: Arc<Semaphore>,
    ) -> Result<Membership, FlowError> {
        let _starting = self.starting.lock().await;
        let running = {
            let state = self.state.lock().expect("wake hub lock");
            state.task.as_ref().is_some_and(|(t, _)| !t.is_finished())
        };
        let task = if running {
            None
        } else {
            Some(self.subscribe(store, poll_interval).await?)
        };
        if let Some(task) = task
            && let Some((_, old)) = self.state.lock().expect("wake hub lock").task.replace(task)
        {
            old.cancel();
        }
        Ok(self.add(wake, slots))
    }

    /// Adds a worker to those [`wake_one`](Self::wake_one) chooses from.
    fn add(self: &Arc<Self>, wake: Arc<Notify>, slots: Arc<Semaphore>) -> Membership {
        let mut state = self.state.lock().expect("wake hub lock");
        state.next_id += 1;
        let id = state.next_id;
        state.members.push(Member { id, wake, slots });
        Membership {
            hub: self.clone(),
            id,
        }
    }

    /// Wakes the worker with the most free slots, the first in turn among
    /// equals (none if every worker is full: each claims again when one of its
    /// instances is done).
    pub(crate) fn wake_one(&self) {
        let mut state = self.state.lock().expect("wake hub lock");
        let n = state.members.len();
        let mut best: Option<(usize, usize)> = None;
        for i in (0..n).map(|k| (state.turn + k) % n) {
            let free = state.members[i].slots.available_permits();
            if free > best.map_or(0, |(_, most)| most) {
                best = Some((i, free));
            }
        }
        if let Some((i, _)) = best {
            state.members[i].wake.notify_one();
            state.turn = (i + 1) % n;
        }
    }

    /// Subscribes to the events that create work, from the head on, and runs
    /// the look loop in a task.
    async fn subscribe(
        self: &Arc<Self>,
        store: &Store,
        poll_interval: Duration,
    ) -> Result<(tokio::task::JoinHandle<()>, CancellationToken), FlowError> {
        let query = Query::items_of(
            [
                types::STARTED,
                types::RETRY_REQUESTED,
                types::RESUMED,
                types::ABORTED,
                types::STEP_SKIPPED,
                types::SIGNAL_RECEIVED,
            ],
            Vec::<String>::new(),
        );
        let after = store.head().await?;
        let options = SubscriptionOptions {
            poll_interval,
            ..SubscriptionOptions::default()
        };
        // Only a hint: the work itself is claimed from `flow_wakeups`, which the
        // workers' polls find even if a late-committing start is skipped here.
        let mut sub = Subscription::connect(store, query, after, options)
            .await?
            .wake_signal();
        let stop = CancellationToken::new();
        let (hub, cancel) = (Arc::downgrade(self), stop.clone());
        let task = tokio::spawn(
            async move {
                loop {
                    match sub.next_batch_or_cancel(&cancel).await {
                        Ok(Some(batch)) => {
                            if !batch.is_empty() {
                                let Some(hub) = hub.upgrade() else { break };
                                hub.wake_one();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            // The workers still poll; the next to join subscribes again.
                            tracing::warn!(error = %e, "the flow workers' wake-up subscription failed");
                            break;
                        }
                    }
                    tokio::time::sleep(WAKE_GAP).await;
                }
            }
            .instrument(tracing::debug_span!("dcbflow.worker.wakeups")),
        );
        Ok((task, stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(hub: &Arc<WakeHub>, free: usize) -> (Arc<Notify>, Arc<Semaphore>, Membership) {
        let (wake, slots) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(free)));
        let membership = hub.add(wake.clone(), slots.clone());
        (wake, slots, membership)
    }

    /// Whether `wake` holds a wake-up (taking it).
    fn woken(wake: &Notify) -> bool {
        let notified = wake.notified();
        futures::pin_mut!(notified);
        futures::FutureExt::now_or_never(notified).is_some()
    }

    #[test]
    fn the_worker_with_the_most_free_slots_is_woken_and_nobody_when_all_are_full() {
        let hub = Arc::new(WakeHub::default());
        let (a, a_slots, _ma) = member(&hub, 1);
        let (b, b_slots, _mb) = member(&hub, 3);
        hub.wake_one();
        assert!(!woken(&a) && woken(&b), "b has the most free slots");
        let _b_busy = b_slots.try_acquire_many(3).unwrap();
        hub.wake_one();
        assert!(woken(&a) && !woken(&b), "only a has a free slot");
        let _a_busy = a_slots.try_acquire().unwrap();
        hub.wake_one();
        assert!(!woken(&a) && !woken(&b), "every worker is full");
    }

    #[test]
    fn ties_go_round_and_a_leaving_worker_is_not_woken() {
        let hub = Arc::new(WakeHub::default());
        let (a, _, ma) = member(&hub, 2);
        let (b, _, _mb) = member(&hub, 2);
        hub.wake_one();
        hub.wake_one();
        assert!(woken(&a) && woken(&b), "one each");
        drop(ma);
        hub.wake_one();
        hub.wake_one();
        assert!(!woken(&a) && woken(&b));
        assert_eq!(hub.state.lock().unwrap().members.len(), 1);
    }
}
