//! [`Flows`]: registering definitions, starting instances, the read models.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::executor::{Erased, HttpPolicy, SharedPolicy, TaskExecutor};
use super::transition::instance_query;
use crate::flow::FlowError;
use crate::flow::model::decide::{incidents, next_due};
use crate::flow::model::definition::FlowDefinition;
use crate::flow::model::events::{self, FlowEvent, Started, types};
use crate::flow::model::plan::plan;
use crate::flow::model::state::InstanceState;
use crate::flow::model::validate::validate_for;
use serde::Deserialize;

use crate::store::{
    AppendCondition, AppendResult, Event, Query, ReadOptions, SequencedEvent, Store,
};

/// The flow engine's entry point: register definitions and functions, start
/// instances, operate on them, query them, and run [`Worker`](super::Worker)s.
///
/// ```no_run
/// # async fn demo(store: dcbflow::Store) -> Result<(), dcbflow::flow::FlowError> {
/// use dcbflow::flow::{Action, FlowDefinition, Flows, TaskContext, TaskDefinition, TaskError};
/// use serde_json::json;
///
/// let flows = Flows::new(store);
/// flows.function("reserve", |ctx: TaskContext| async move {
///     Ok::<_, TaskError>(json!({"reserved": ctx.input["sku"]}))
/// });
/// let order = FlowDefinition::builder("order")
///     .task(TaskDefinition::new("reserve", Action::rust("reserve")).input("sku", json!("{{flow.input.sku}}")))
///     .build();
/// flows.register(&order).await?;
/// let started = flows.start("order", Some("order-1"), json!({"sku": "A-1"})).await?;
/// println!("instance {}", started.instance);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Flows {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) store: Store,
    functions: RwLock<HashMap<String, Arc<dyn Erased>>>,
    definitions: RwLock<HashMap<(String, String), Arc<FlowDefinition>>>,
    #[cfg(feature = "http")]
    pub(super) http: super::executor::HttpTasks,
    /// Which targets HTTP (and gRPC) tasks may call (shared with `http`).
    pub(super) http_policy: SharedPolicy,
    /// Descriptor sets and channels of gRPC tasks.
    #[cfg(feature = "grpc")]
    pub(super) grpc: super::grpc::GrpcTasks,
    pub(super) stats: Counters,
    /// Instances' states as last read, with the reads' cursors (ADR 0013).
    pub(super) known: super::transition::KnownStates,
    /// The wake-up subscription shared by this engine's workers.
    pub(super) wakeups: Arc<super::wakeups::WakeHub>,
}

/// Counters behind [`Flows::stats`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) transitions: AtomicU64,
    pub(super) events: AtomicU64,
    pub(super) statements: AtomicU64,
}

impl Counters {
    pub(super) fn statements(&self, n: u64) {
        self.statements.fetch_add(n, Ordering::Relaxed);
    }
}

/// What this engine (all its workers, in this process) has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowStats {
    /// Transitions committed (each one transaction appending one or more events).
    pub transitions: u64,
    /// Events those transitions appended.
    pub events: u64,
    /// SQL statements sent for flows: transactions' BEGIN/COMMIT/ROLLBACK, locks,
    /// reads, appends, read-model writes, SQL steps, and the workers' claims,
    /// heartbeats and releases.
    pub statements: u64,
}

impl std::fmt::Debug for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flows")
            .field("schema", &self.inner.store.schema())
            .finish_non_exhaustive()
    }
}

/// An instance that [`Flows::start`] started or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedInstance {
    /// The instance id.
    pub instance: Uuid,
    /// The definition version (content hash) it runs on.
    pub definition_version: String,
    /// `false` if an instance with the business key already existed (and is returned).
    pub created: bool,
}

/// Starts read per page by [`Flows::rebuild_read_models`].
const REBUILD_PAGE: u64 = 500;

impl Flows {
    /// The flow engine on `store`. Its tables are installed in the store's schema
    /// the first time it needs them.
    ///
    /// HTTP tasks may call public addresses only until
    /// [`http_policy`](Self::http_policy) says otherwise.
    pub fn new(store: Store) -> Self {
        let policy = SharedPolicy::default();
        #[cfg(feature = "http")]
        let http = super::executor::guarded(
            crate::http::client_builder().connect_timeout(std::time::Duration::from_secs(5)),
            &policy,
        )
        .build()
        .expect("HTTP client");
        Self::with_parts(
            store,
            policy,
            #[cfg(feature = "http")]
            http,
        )
    }

    /// The flow engine on `store`, calling HTTP tasks with `http` (for example a
    /// client that trusts a private certificate authority). The
    /// [`HttpPolicy`] is checked before each call and on its final URL; build
    /// `http` with `.redirect(reqwest::redirect::Policy::none())` so that no
    /// redirect it follows reaches a refused target in between.
    #[cfg(feature = "http")]
    pub fn with_http_client(store: Store, http: reqwest::Client) -> Self {
        Self::with_parts(store, SharedPolicy::default(), http)
    }

    fn with_parts(
        store: Store,
        http_policy: SharedPolicy,
        #[cfg(feature = "http")] http: reqwest::Client,
    ) -> Self {
        Flows {
            inner: Arc::new(Inner {
                store,
                functions: RwLock::default(),
                definitions: RwLock::default(),
                #[cfg(feature = "http")]
                http: super::executor::HttpTasks::new(http, http_policy.clone()),
                http_policy,
                #[cfg(feature = "grpc")]
                grpc: super::grpc::GrpcTasks::default(),
                stats: Counters::default(),
                known: super::transition::KnownStates::default(),
                wakeups: Arc::default(),
            }),
        }
    }

    /// Sets which targets HTTP tasks may call (default: public addresses only,
    /// see [`HttpPolicy`]); for example `HttpPolicy::default().allow_loopback(true)`
    /// for tests against a local server. It applies to this engine and its
    /// clones from their next call on; set it before starting workers. Without the
    /// `http` feature there are no HTTP tasks and it changes nothing.
    #[must_use]
    pub fn http_policy(self, policy: HttpPolicy) -> Self {
        *self.inner.http_policy.write().expect("HTTP policy lock") = Arc::new(policy);
        self
    }

    /// Installs or upgrades the flow layer's tables (the read models) now;
    /// otherwise the first operation that needs them does it.
    ///
    /// # Errors
    /// Store errors, or a failed migration.
    pub async fn migrate(&self) -> Result<(), FlowError> {
        self.ready().await
    }

    /// Installs the flow layer's schema in the store (once per store handle).
    pub(crate) async fn ready(&self) -> Result<(), FlowError> {
        self.inner.store.ensure_layer(&crate::flow::SCHEMA).await?;
        Ok(())
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Counters of what this engine did (for benchmarks and metrics).
    pub fn stats(&self) -> FlowStats {
        let c = &self.inner.stats;
        FlowStats {
            transitions: c.transitions.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            statements: c.statements.load(Ordering::Relaxed),
        }
    }

    /// Registers the protobuf descriptor set `bytes` (an encoded
    /// `FileDescriptorSet`, as `protoc --include_imports
    /// --descriptor_set_out=FILE` writes it) under `name`, for `executor: grpc`
    /// actions whose `descriptor_set` is `name` (feature `grpc`). Register it
    /// before the definitions that use it, in every worker process: `register`
    /// checks their methods and message fields against it.
    ///
    /// # Errors
    /// [`DescriptorSetError`](crate::flow::DescriptorSetError) if the bytes are
    /// not a descriptor set whose files resolve; nothing is registered then.
    #[cfg(feature = "grpc")]
    pub fn grpc_descriptor_set(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<&Self, crate::flow::DescriptorSetError> {
        self.inner.grpc.register(name, bytes)?;
        Ok(self)
    }

    /// Registers a Rust function for `executor: rust` actions named `name`. Register
    /// functions before the definitions that use them, in every worker process.
    pub fn function(&self, name: impl Into<String>, executor: impl TaskExecutor) -> &Self {
        self.inner
            .functions
            .write()
            .expect("functions lock")
            .insert(name.into(), Arc::new(executor));
        self
    }

    /// The Rust function registered as `name`.
    pub(super) fn registered_function(&self, name: &str) -> Option<Arc<dyn Erased>> {
        self.inner
            .functions
            .read()
            .expect("functions lock")
            .get(name)
            .cloned()
    }

    /// The definition of `flow` at `version`, if this process has it cached.
    pub(super) fn cached_definition(
        &self,
        flow: &str,
        version: &str,
    ) -> Option<Arc<FlowDefinition>> {
        self.inner
            .definitions
            .read()
            .expect("definitions lock")
            .get(&(flow.to_owned(), version.to_owned()))
            .cloned()
    }

    fn function_names(&self) -> Vec<String> {
        self.inner
            .functions
            .read()
            .expect("functions lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Validates and registers a definition; returns its version (content hash).
    /// Registering the same content again is a no-op returning the same version;
    /// new content under the same name is a new version, used by new instances,
    /// while running ones keep theirs.
    ///
    /// # Errors
    /// [`FlowError::Definition`] listing every problem; store errors.
    #[tracing::instrument(name = "dcbflow.flow.register", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.store.schema(), flow = %definition.name))]
    pub async fn register(&self, definition: &FlowDefinition) -> Result<String, FlowError> {
        self.ready().await?;
        // Size first: an oversized definition is refused before the work of
        // validating it.
        let size = serde_json::to_vec(definition).map_or(usize::MAX, |v| v.len());
        let max = self.inner.store.limits().max_payload_bytes;
        if size > max {
            return Err(FlowError::Definition(crate::flow::DefinitionError {
                flow: definition.name.clone(),
                problems: vec![format!(
                    "the definition is {size} bytes as JSON, the store's payload limit is {max}"
                )],
            }));
        }
        let names = self.function_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        validate_for(definition, &names, super::executor::AVAILABLE)?;
        #[cfg(feature = "grpc")]
        {
            let problems = self.inner.grpc.problems(definition);
            if !problems.is_empty() {
                return Err(FlowError::Definition(crate::flow::DefinitionError {
                    flow: definition.name.clone(),
                    problems,
                }));
            }
        }
        let version = definition.version();
        // A stable event id per (name, version): registering again is a replay.
        let digest = <sha2::Sha256 as sha2::Digest>::digest(
            format!("dcbflow-definition:{}:{version}", definition.name).as_bytes(),
        );
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        let id = Uuid::from_bytes(bytes);
        let event = Event::new(
            types::DEFINITION_REGISTERED,
            [
                events::definition_tag(&definition.name),
                format!("flow_version:{}:{version}", definition.name),
            ],
            json!({"name": definition.name, "version": version, "definition": definition}),
        )
        .with_id(id);
        self.inner.store.append(vec![event], None).await?;
        self.inner
            .definitions
            .write()
            .expect("definitions lock")
            .insert(
                (definition.name.clone(), version.clone()),
                Arc::new(definition.clone()),
            );
        Ok(version)
    }

    /// The definition of `flow` at `version` (`None`: the latest registered).
    ///
    /// # Errors
    /// [`FlowError::UnknownFlow`]; store errors.
    #[tracing::instrument(name = "dcbflow.flow.definition", level = "debug", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.store.schema(), flow))]
    pub async fn definition(
        &self,
        flow: &str,
        version: Option<&str>,
    ) -> Result<Arc<FlowDefinition>, FlowError> {
        if let Some(v) = version
            && let Some(d) = self.cached_definition(flow, v)
        {
            return Ok(d);
        }
        let tag = match version {
            Some(v) => format!("flow_version:{flow}:{v}"),
            None => events::definition_tag(flow),
        };
        let q = Query::items_of([types::DEFINITION_REGISTERED], [tag]);
        let Some(e) = self.inner.store.read_last(&q).await? else {
            return Err(FlowError::UnknownFlow(match version {
                Some(v) => format!("{flow}@{v}"),
                None => flow.to_owned(),
            }));
        };
        let def = FlowDefinition::deserialize(&e.data()["definition"])
            .map_err(|err| FlowError::Unreadable(format!("stored definition of {flow}: {err}")))?;
        let version = def.version();
        let def = Arc::new(def);
        self.inner
            .definitions
            .write()
            .expect("definitions lock")
            .insert((flow.to_owned(), version), def.clone());
        Ok(def)
    }

    /// Wakes one of this engine's workers in this process (the one with the
    /// most free slots) to claim what a transition made due now.
    pub(crate) fn wake_workers(&self) {
        self.inner.wakeups.wake_one();
    }

    /// Starts an instance of the latest version of `flow`. With a business key, a
    /// second start with the same key returns the existing instance
    /// (`created: false`) instead of starting another.
    ///
    /// # Errors
    /// [`FlowError::UnknownFlow`]; [`FlowError::InputMismatch`] when `input` does
    /// not match the definition's input fields (nothing is written); store errors.
    #[tracing::instrument(name = "dcbflow.flow.start", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.store.schema(), flow))]
    pub async fn start(
        &self,
        flow: &str,
        business_key: Option<&str>,
        input: Value,
    ) -> Result<StartedInstance, FlowError> {
        self.start_with_parent(flow, business_key, input, None, Vec::new())
            .await
    }

    /// [`start`](Self::start) of a child instance of `parent`, with further
    /// `tags` on its `FlowStarted`.
    pub(crate) async fn start_with_parent(
        &self,
        flow: &str,
        business_key: Option<&str>,
        input: Value,
        parent: Option<events::ParentRef>,
        tags: Vec<String>,
    ) -> Result<StartedInstance, FlowError> {
        self.ready().await?;
        let def = self.definition(flow, None).await?;
        let input = def
            .prepare_input(&input)
            .map_err(FlowError::InputMismatch)?;
        let version = def.version();
        let store = &self.inner.store;
        let key_query = business_key
            .map(|k| Query::items_of([types::STARTED], [events::business_key_tag(flow, k)]));
        for _ in 0..3 {
            let mut client = store.pool().get().await?;
            let tx = client.transaction().await?;
            let mut condition = None;
            if let Some(q) = &key_query {
                let found = store
                    .read_in_tx(&tx, q, ReadOptions::default())
                    .await?
                    .collect_all()
                    .await?;
                if let Some(e) = found.events.first() {
                    let s = Started::deserialize(e.data()).map_err(|err| {
                        FlowError::Unreadable(format!("start of instance at {}: {err}", e.position))
                    })?;
                    return Ok(StartedInstance {
                        instance: s.instance,
                        definition_version: s.version,
                        created: false,
                    });
                }
                condition = Some(AppendCondition::new(q.clone()).after(found.cursor));
            }
            let id = Uuid::new_v4();
            let now = Utc::now();
            let started = Started {
                instance: id,
                flow: flow.to_owned(),
                version: version.clone(),
                business_key: business_key.map(str::to_owned),
                input: input.clone(),
                deadline_at: def
                    .deadline_ms
                    .map(|ms| now + chrono::Duration::milliseconds(ms as i64)),
                parent: parent.clone(),
            };
            let mut event = FlowEvent::Started(started).to_event(id);
            event.tags.push(events::flow_tag(flow));
            if let Some(k) = business_key {
                event.tags.push(events::business_key_tag(flow, k));
            }
            event.tags.extend(tags.iter().cloned());
            match store
                .append_in_tx(&tx, vec![event.clone()], condition)
                .await
            {
                Ok(r) => {
                    let appended = sequenced(vec![event], &r, now);
                    let state = InstanceState::fold(&appended).expect("a start folds");
                    sync(&tx, store, &def, &state, now).await?;
                    tx.commit().await?;
                    // This engine's workers claim it now (the shared wake-up
                    // subscription is for other processes' starts).
                    self.wake_workers();
                    let stats = &self.inner.stats;
                    stats.statements(4 + u64::from(key_query.is_some()));
                    stats.transitions.fetch_add(1, Ordering::Relaxed);
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    return Ok(StartedInstance {
                        instance: id,
                        definition_version: version,
                        created: true,
                    });
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FlowError::Contended(format!(
            "starting {flow} with business key {business_key:?} kept conflicting"
        )))
    }

    /// Rebuilds the read models (instances, wake-ups, incidents) from the log.
    ///
    /// # Errors
    /// Store errors.
    #[tracing::instrument(name = "dcbflow.flow.rebuild_read_models", skip_all, fields(db.system.name = "postgresql", db.namespace = %self.inner.store.schema()))]
    pub async fn rebuild_read_models(&self) -> Result<u64, FlowError> {
        self.ready().await?;
        let store = &self.inner.store;
        // In pages: never every start in memory at once.
        let starts_query = Query::items_of([types::STARTED], Vec::<String>::new());
        let mut after = None;
        let mut n = 0;
        loop {
            let mut options = ReadOptions::default().limit(REBUILD_PAGE);
            if let Some(p) = after {
                options = options.after(p);
            }
            let page = store.read_all(&starts_query, options).await?.events;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.position);
            let full = page.len() as u64 == REBUILD_PAGE;
            n += self.rebuild_page(page).await?;
            if !full {
                break;
            }
        }
        Ok(n)
    }

    /// Rebuilds the read models of the instances whose starts are `starts`.
    async fn rebuild_page(&self, starts: Vec<SequencedEvent>) -> Result<u64, FlowError> {
        let store = &self.inner.store;
        let mut n = 0;
        for e in starts {
            let Ok(s) = Started::deserialize(e.data()) else {
                tracing::warn!(position = %e.position, "unreadable flow start skipped");
                continue;
            };
            // The definition first: no connection is held while it loads.
            let def = self.definition(&s.flow, Some(&s.version)).await?;
            let q = instance_query(s.instance);
            let mut client = store.pool().get().await?;
            let tx = client.transaction().await?;
            store.lock_scope_in_tx(&tx, &q).await?;
            let events = store
                .read_in_tx(&tx, &q, ReadOptions::default())
                .await?
                .collect_all()
                .await?;
            if let Some(state) = InstanceState::fold(&events.events) {
                sync(&tx, store, &def, &state, Utc::now()).await?;
                n += 1;
            }
            tx.commit().await?;
        }
        Ok(n)
    }
}

/// Appended events as the log will return them (with `now` for the record time).
pub(super) fn sequenced(
    events: Vec<Event>,
    appended: &AppendResult,
    now: DateTime<Utc>,
) -> Vec<SequencedEvent> {
    events
        .into_iter()
        .zip(&appended.positions)
        .map(|(event, position)| SequencedEvent {
            position: *position,
            transaction_id: appended.transaction_id,
            recorded_at: now,
            event,
        })
        .collect()
}

/// Writes the instance's read models in the transition's transaction.
pub(super) async fn sync(
    tx: &deadpool_postgres::Transaction<'_>,
    store: &Store,
    def: &FlowDefinition,
    state: &InstanceState,
    now: DateTime<Utc>,
) -> Result<(), FlowError> {
    let (row, due, incidents) = sync_params(def, state, now);
    let stmt = tx
        .prepare_cached(&format!("SELECT {}($1, $2, $3)", store.table("flow_sync")))
        .await?;
    tx.execute(&stmt, &[&row, &due, &incidents]).await?;
    Ok(())
}

/// The parameters of `flow_sync` for `state`: the instance's row, its next
/// wake-up (`None`: none), its incidents.
pub(super) fn sync_params(
    def: &FlowDefinition,
    state: &InstanceState,
    now: DateTime<Utc>,
) -> (Value, Option<DateTime<Utc>>, Value) {
    let due = next_due(&plan(def, state, now), now);
    let incidents = incidents(state);
    let row = serde_json::to_value(ReadModelRow::of(state, &incidents)).expect("row serializes");
    let incidents = serde_json::to_value(incidents).expect("incidents serialize");
    (row, due, incidents)
}

/// What `flow_sync` keeps of an instance in `flow_instances.state`: its
/// summary, its await_event queries, and the steps of its open incidents.
/// Not the whole state, which the instance's events give (ADR 0013): an
/// instance with many steps (a `for_each` of a thousand items) would rewrite
/// all of them on every transition.
#[derive(serde::Serialize)]
struct ReadModelRow<'a> {
    id: Uuid,
    flow: &'a str,
    definition_version: &'a str,
    business_key: Option<&'a str>,
    status: crate::flow::model::state::InstanceStatus,
    started_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_position: crate::store::Position,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'a events::ParentRef>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    awaiting: &'a std::collections::BTreeMap<String, events::AwaitedEvent>,
    /// By step key: `{"step": <StepId>}` (the incident queries read it).
    steps: std::collections::BTreeMap<&'a str, serde_json::Value>,
}

impl<'a> ReadModelRow<'a> {
    fn of(state: &'a InstanceState, incidents: &'a [crate::flow::model::decide::Incident]) -> Self {
        ReadModelRow {
            id: state.id,
            flow: &state.flow,
            definition_version: &state.definition_version,
            business_key: state.business_key.as_deref(),
            status: state.status,
            started_at: state.started_at,
            updated_at: state.updated_at,
            last_position: state.last_position,
            parent: state.parent.as_ref(),
            awaiting: &state.awaiting,
            steps: incidents
                .iter()
                .filter_map(|i| {
                    let step = state.steps.get(&i.step)?;
                    Some((i.step.as_str(), json!({ "step": step.step })))
                })
                .collect(),
        }
    }
}
