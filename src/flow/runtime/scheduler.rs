//! Cron schedules at run time: set, pause and resume them (events tagged
//! `flow_schedule:<name>`), and start their instances from the workers.
//!
//! Every worker looks at the schedules (cached for two seconds) on each round
//! and starts the instance of a due tick with the business key
//! `schedule:<name>:<tick>`. The start is idempotent by that key (a
//! conditional append on it), so however many workers and processes try, one
//! instance starts per tick.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::engine::Flows;
use crate::flow::FlowError;
use crate::flow::admin::Operator;
use crate::flow::model::events::{InstanceChange, schedule_tag, types};
use crate::flow::model::schedule::Schedule;
use crate::store::{Event, Position, Query, ReadOptions};

/// A schedule as its events tell it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// The schedule.
    pub schedule: Schedule,
    /// Paused: no tick starts an instance.
    pub paused: bool,
    /// When it was last set (ticks before are not started).
    pub set_at: DateTime<Utc>,
    /// Who set, paused or resumed it last, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_by: Option<String>,
    /// The position of its last event.
    pub position: Position,
    /// The last tick an instance was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tick: Option<DateTime<Utc>>,
    /// The next tick (none while paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_tick: Option<DateTime<Utc>>,
}

/// `FlowScheduleSet`'s payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScheduleSet {
    schedule: Schedule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actor: Option<String>,
}

impl Flows {
    /// Creates or changes a schedule (ticks from now on start instances).
    ///
    /// # Errors
    /// [`FlowError::InvalidSchedule`] (a bad name, cron expression, time zone
    /// or input), [`FlowError::UnknownFlow`], [`FlowError::InputMismatch`]
    /// (the input does not fit the flow); nothing is written then. Store errors.
    pub async fn set_schedule(
        &self,
        schedule: &Schedule,
        actor: Option<&str>,
    ) -> Result<ScheduleState, FlowError> {
        let problems = schedule.problems();
        if !problems.is_empty() {
            return Err(FlowError::InvalidSchedule(problems));
        }
        self.ready().await?;
        let def = self.definition(&schedule.flow, None).await?;
        def.prepare_input(&schedule.input)
            .map_err(FlowError::InputMismatch)?;
        let data = serde_json::to_value(ScheduleSet {
            schedule: schedule.clone(),
            actor: actor.map(str::to_owned),
        })
        .expect("a schedule serializes");
        let event = Event::new(types::SCHEDULE_SET, [schedule_tag(&schedule.name)], data);
        self.store().append(vec![event], None).await?;
        self.schedule(&schedule.name)
            .await?
            .ok_or_else(|| FlowError::UnknownSchedule(schedule.name.clone()))
    }

    /// Pauses schedule `name`: no tick starts an instance until it is resumed
    /// (ticks in between are missed ticks).
    ///
    /// # Errors
    /// [`FlowError::UnknownSchedule`], store errors.
    pub async fn pause_schedule(
        &self,
        name: &str,
        by: &Operator,
    ) -> Result<ScheduleState, FlowError> {
        self.change_schedule(name, types::SCHEDULE_PAUSED, by).await
    }

    /// Resumes schedule `name`.
    ///
    /// # Errors
    /// [`FlowError::UnknownSchedule`], store errors.
    pub async fn resume_schedule(
        &self,
        name: &str,
        by: &Operator,
    ) -> Result<ScheduleState, FlowError> {
        self.change_schedule(name, types::SCHEDULE_RESUMED, by)
            .await
    }

    async fn change_schedule(
        &self,
        name: &str,
        event_type: &str,
        by: &Operator,
    ) -> Result<ScheduleState, FlowError> {
        self.ready().await?;
        if self.schedule(name).await?.is_none() {
            return Err(FlowError::UnknownSchedule(name.to_owned()));
        }
        let change = InstanceChange {
            actor: Some(by.actor.clone()),
            reason: Some(by.reason.clone()),
        };
        let data = serde_json::to_value(change).expect("a change serializes");
        let event = Event::new(event_type, [schedule_tag(name)], data);
        self.store().append(vec![event], None).await?;
        self.schedule(name)
            .await?
            .ok_or_else(|| FlowError::UnknownSchedule(name.to_owned()))
    }

    /// Schedule `name`, if there is one.
    ///
    /// # Errors
    /// Store errors.
    pub async fn schedule(&self, name: &str) -> Result<Option<ScheduleState>, FlowError> {
        let query = Query::items_of(
            [
                types::SCHEDULE_SET,
                types::SCHEDULE_PAUSED,
                types::SCHEDULE_RESUMED,
            ],
            [schedule_tag(name)],
        );
        let mut all = self.fold_schedules(&query).await?;
        let Some(mut s) = all.remove(name) else {
            return Ok(None);
        };
        self.complete(&mut s).await?;
        Ok(Some(s))
    }

    /// Every schedule, by name, with its last and next tick.
    ///
    /// # Errors
    /// Store errors.
    pub async fn schedules(&self) -> Result<Vec<ScheduleState>, FlowError> {
        let mut all: Vec<ScheduleState> = self.schedule_states().await?.into_values().collect();
        for s in &mut all {
            self.complete(s).await?;
        }
        Ok(all)
    }

    /// The schedules as their events tell them (without their last ticks).
    async fn schedule_states(&self) -> Result<BTreeMap<String, ScheduleState>, FlowError> {
        let query = Query::items_of(
            [
                types::SCHEDULE_SET,
                types::SCHEDULE_PAUSED,
                types::SCHEDULE_RESUMED,
            ],
            Vec::<String>::new(),
        );
        self.fold_schedules(&query).await
    }

    async fn fold_schedules(
        &self,
        query: &Query,
    ) -> Result<BTreeMap<String, ScheduleState>, FlowError> {
        let events = self
            .store()
            .read_all(query, ReadOptions::default())
            .await?
            .events;
        let mut out: BTreeMap<String, ScheduleState> = BTreeMap::new();
        for e in &events {
            let Some(name) = e
                .tags()
                .iter()
                .find_map(|t| t.strip_prefix("flow_schedule:"))
            else {
                continue;
            };
            match e.event_type() {
                types::SCHEDULE_SET => {
                    let Ok(set) = ScheduleSet::deserialize(e.data()) else {
                        continue;
                    };
                    let paused = out.get(name).is_some_and(|s| s.paused);
                    out.insert(
                        name.to_owned(),
                        ScheduleState {
                            schedule: set.schedule,
                            paused,
                            set_at: e.recorded_at,
                            changed_by: set.actor,
                            position: e.position,
                            last_tick: None,
                            next_tick: None,
                        },
                    );
                }
                other => {
                    if let Some(s) = out.get_mut(name) {
                        let change = InstanceChange::deserialize(e.data()).unwrap_or_default();
                        s.paused = other == types::SCHEDULE_PAUSED;
                        s.changed_by = change.actor;
                        s.position = e.position;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Fills in the last tick started (from the log) and the next.
    async fn complete(&self, s: &mut ScheduleState) -> Result<(), FlowError> {
        s.last_tick = self.last_tick(&s.schedule).await?;
        let from = s.last_tick.map_or(Utc::now(), |t| t.max(Utc::now()));
        s.next_tick = (!s.paused).then(|| s.schedule.next_after(from)).flatten();
        Ok(())
    }

    /// The tick of the last instance schedule `s` started.
    async fn last_tick(&self, s: &Schedule) -> Result<Option<DateTime<Utc>>, FlowError> {
        let query = Query::items_of([types::STARTED], [schedule_tag(&s.name)]);
        let Some(e) = self.store().read_last(&query).await? else {
            return Ok(None);
        };
        let prefix = format!("schedule:{}:", s.name);
        Ok(e.data()["business_key"]
            .as_str()
            .and_then(|k| k.strip_prefix(&prefix))
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)))
    }
}

/// One worker's view of the schedules: cached, with the ticks it started.
#[derive(Default)]
pub(crate) struct Scheduler {
    cached: Option<(Instant, Vec<ScheduleState>)>,
    /// The last tick started (by anyone) per schedule, as this worker knows it.
    started: HashMap<String, DateTime<Utc>>,
}

/// How long a worker keeps the schedules before reading them again.
const REFRESH: Duration = Duration::from_secs(2);

impl Scheduler {
    /// Starts the instances of the ticks due now; how long until the next
    /// tick of any schedule.
    pub(crate) async fn run_due(&mut self, flows: &Flows) -> Result<Option<Duration>, FlowError> {
        let stale = self
            .cached
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() > REFRESH);
        if stale {
            let states: Vec<ScheduleState> = flows.schedule_states().await?.into_values().collect();
            for s in &states {
                if !self.started.contains_key(&s.schedule.name)
                    && let Some(t) = flows.last_tick(&s.schedule).await?
                {
                    self.started.insert(s.schedule.name.clone(), t);
                }
            }
            self.cached = Some((Instant::now(), states));
        }
        let now = Utc::now();
        let mut next: Option<DateTime<Utc>> = None;
        let states = self
            .cached
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        for s in states.iter().filter(|s| !s.paused) {
            let sched = &s.schedule;
            let since = self
                .started
                .get(&sched.name)
                .map_or(s.set_at, |t| (*t).max(s.set_at));
            if let Some(tick) = sched.due(since, now) {
                let started = flows
                    .start_with_parent(
                        &sched.flow,
                        Some(&sched.key(tick)),
                        sched.input.clone(),
                        None,
                        vec![schedule_tag(&sched.name)],
                    )
                    .await;
                match started {
                    Ok(_) => {
                        self.started.insert(sched.name.clone(), tick);
                    }
                    Err(e) => {
                        tracing::warn!(schedule = %sched.name, %tick, error = %e, "a scheduled start failed");
                        continue;
                    }
                }
            }
            let after = self.started.get(&sched.name).map_or(now, |t| (*t).max(now));
            if let Some(t) = sched.next_after(after) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        Ok(next.map(|t| (t - Utc::now()).to_std().unwrap_or_default()))
    }
}
