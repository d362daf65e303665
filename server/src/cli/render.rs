//! Readable output: tables (comfy-table) and short summaries of the views.
//! `--json` prints the views themselves instead.

use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, LineStyle, Table, TableStyle, presets};
use serde_json::Value;

use crate::api::flows::{FlowDetail, FlowPage, Registered};
use crate::api::incidents::{GroupDetail, GroupPage, IncidentView};
use crate::api::instances::{BulkResult, EventView, InstancePage, InstanceView, Started, Timeline};
use crate::api::relays::{ConsumerList, DeadLetterAction, DeadLetterPage};

/// A view as text for a person.
pub trait Human {
    /// The text, ending with a newline.
    fn human(&self) -> String;
}

/// The CLI's table style: no borders, the header underlined.
const STYLE: TableStyle =
    TableStyle::new().header_separator(LineStyle::none().fill('─').junction(' '));

/// A table with the CLI's style and these column headers.
pub fn table<I: IntoIterator<Item = &'static str>>(header: I) -> Table {
    let mut t = Table::new();
    t.load_style(STYLE)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

/// A timestamp, to the second, UTC.
pub fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// An optional timestamp (`-` for none).
pub fn opt_time(t: Option<&DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".into(), time)
}

/// An optional text (`-` for none).
pub fn opt(s: Option<&str>) -> String {
    s.map_or_else(|| "-".into(), str::to_owned)
}

/// `s` cut to `max` characters, with an ellipsis when cut.
pub fn cut(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut t: String = one_line.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Compact JSON.
pub fn json_compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A duration in milliseconds as `1.2s`, `340ms`, `3m05s`.
pub fn millis(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        let s = ms / 1000;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A version hash shortened for tables.
fn short(v: &str) -> String {
    v.chars().take(12).collect()
}

fn next_page(out: &mut String, cursor: Option<&String>) {
    if let Some(c) = cursor {
        out.push_str(&format!("more: pass --cursor {c}\n"));
    }
}

impl Human for Registered {
    fn human(&self) -> String {
        if self.created {
            format!("registered flow {} version {}\n", self.name, self.version)
        } else {
            format!(
                "flow {} version {} was registered before: nothing changed\n",
                self.name, self.version
            )
        }
    }
}

impl Human for FlowPage {
    fn human(&self) -> String {
        if self.items.is_empty() {
            return "no flows registered\n".into();
        }
        let mut t = table(["FLOW", "LATEST VERSION", "VERSIONS", "TASKS", "REGISTERED"]);
        for f in &self.items {
            t.add_row([
                f.name.clone(),
                short(&f.latest_version),
                f.versions.to_string(),
                f.tasks.to_string(),
                time(&f.registered_at),
            ]);
        }
        let mut out = format!("{t}\n");
        next_page(&mut out, self.next_cursor.as_ref());
        out
    }
}

impl Human for FlowDetail {
    fn human(&self) -> String {
        let mut out = format!("flow {}  version {}\n\n", self.name, self.version);
        let mut v = table(["VERSION", "REGISTERED", "POSITION", "INSTANCES"]);
        for ver in &self.versions {
            let mark = if ver.version == self.version {
                " *"
            } else {
                ""
            };
            v.add_row([
                format!("{}{mark}", ver.version),
                time(&ver.registered_at),
                ver.position.to_string(),
                ver.instances.to_string(),
            ]);
        }
        out.push_str(&format!("{v}\n\n"));
        let mut t = table(["TASK", "EXECUTOR", "COMPENSABLE", "DEPENDS ON"]);
        for n in &self.graph.nodes {
            let deps: Vec<&str> = self
                .graph
                .edges
                .iter()
                .filter(|e| e.to == n.id)
                .map(|e| e.from.as_str())
                .collect();
            let executor = if n.participants.is_empty() {
                n.executor.clone()
            } else {
                format!("{} ({})", n.executor, n.participants.join(", "))
            };
            t.add_row([
                n.id.clone(),
                executor,
                if n.compensable { "yes" } else { "no" }.to_owned(),
                if deps.is_empty() {
                    "-".into()
                } else {
                    deps.join(", ")
                },
            ]);
        }
        out.push_str(&format!(
            "{t}\n\nsource ({}):\n{}",
            self.format, self.source
        ));
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

impl Human for Started {
    fn human(&self) -> String {
        if self.created {
            format!(
                "started instance {} (definition version {})\n",
                self.id, self.definition_version
            )
        } else {
            format!(
                "an instance with this business key exists already: {} (definition version {}); nothing was started\n",
                self.id, self.definition_version
            )
        }
    }
}

impl Human for InstancePage {
    fn human(&self) -> String {
        if self.items.is_empty() {
            return "no instances match\n".into();
        }
        let mut t = table(["ID", "FLOW", "KEY", "STATUS", "STARTED", "UPDATED", "SEEN"]);
        for i in &self.items {
            t.add_row([
                i.id.to_string(),
                i.flow.clone(),
                opt(i.business_key.as_deref()),
                i.status.clone(),
                time(&i.started_at),
                time(&i.updated_at),
                i.seen.to_string(),
            ]);
        }
        let mut out = format!("{t}\n");
        next_page(&mut out, self.next_cursor.as_ref());
        out
    }
}

impl Human for InstanceView {
    fn human(&self) -> String {
        let mut kv = Table::new();
        kv.load_style(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Dynamic);
        let rows: Vec<(&str, String)> = vec![
            ("instance", self.id.to_string()),
            (
                "flow",
                format!("{} (version {})", self.flow, self.definition_version),
            ),
            ("business key", opt(self.business_key.as_deref())),
            ("status", self.status.clone()),
            ("reason", opt(self.reason.as_deref())),
            ("seen", self.seen.to_string()),
            ("started", time(&self.started_at)),
            ("updated", time(&self.updated_at)),
            ("deadline", opt_time(self.deadline_at.as_ref())),
            ("events", self.events.to_string()),
            ("input", cut(&json_compact(&self.input), 200)),
        ];
        for (k, v) in rows {
            kv.add_row([format!("{k}:"), v]);
        }
        let mut out = format!("{kv}\n");
        if self.steps.is_empty() {
            out.push_str("\nno steps have started\n");
        } else {
            let mut t = table([
                "STEP", "STATUS", "ATTEMPTS", "WORKER", "STARTED", "DURATION", "DUE", "ERROR",
            ]);
            for s in &self.steps {
                t.add_row([
                    s.key.clone(),
                    s.status.clone(),
                    s.attempts.to_string(),
                    opt(s.worker.as_deref()),
                    opt_time(s.started_at.as_ref()),
                    s.duration_ms.map_or_else(|| "-".into(), millis),
                    opt_time(s.due_at.as_ref()),
                    s.error
                        .as_deref()
                        .map_or_else(|| "-".into(), |e| cut(e, 80)),
                ]);
            }
            out.push_str(&format!("\n{t}\n"));
        }
        if let Some(outputs) = self.outputs.as_object()
            && !outputs.is_empty()
        {
            let mut t = table(["TASK", "OUTPUT"]);
            for (task, o) in outputs {
                t.add_row([task.clone(), cut(&json_compact(o), 120)]);
            }
            out.push_str(&format!("\n{t}\n"));
        }
        out
    }
}

/// Events as a table.
pub fn events_table(events: &[EventView]) -> String {
    let mut t = table(["POSITION", "RECORDED", "TYPE", "TAGS", "DATA"]);
    for e in events {
        t.add_row([
            e.position.to_string(),
            time(&e.recorded_at),
            e.event_type.clone(),
            cut(&e.tags.join(" "), 60),
            cut(&json_compact(&e.data), 100),
        ]);
    }
    format!("{t}\n")
}

/// One event on one line (the live tail).
pub fn event_line(e: &EventView) -> String {
    format!(
        "{:>8}  {}  {}  [{}]  {}",
        e.position,
        time(&e.recorded_at),
        e.event_type,
        e.tags.join(" "),
        cut(&json_compact(&e.data), 200)
    )
}

impl Human for Timeline {
    fn human(&self) -> String {
        format!(
            "instance {}: {} events\n{}",
            self.id,
            self.events.len(),
            events_table(&self.events)
        )
    }
}

impl Human for BulkResult {
    fn human(&self) -> String {
        let mut out = if self.dry_run {
            format!(
                "dry run: {} instances match; nothing was done\n",
                self.matched
            )
        } else {
            format!(
                "{} instances matched, {} acted on, {} refused\n",
                self.matched,
                self.acted,
                self.refused.len()
            )
        };
        if !self.refused.is_empty() {
            let mut t = table(["INSTANCE", "CODE", "WHY"]);
            for r in &self.refused {
                t.add_row([r.id.to_string(), r.code.clone(), cut(&r.detail, 100)]);
            }
            out.push_str(&format!("{t}\n"));
        }
        out
    }
}

impl Human for GroupPage {
    fn human(&self) -> String {
        if self.items.is_empty() {
            return "no open incidents\n".into();
        }
        let mut t = table([
            "GROUP",
            "FLOW",
            "TASK",
            "KIND",
            "INSTANCES",
            "ACKED",
            "OCCURRENCES",
            "LAST SEEN",
            "ERROR",
        ]);
        for g in &self.items {
            t.add_row([
                g.id.clone(),
                g.flow.clone(),
                g.task.clone(),
                g.kind.clone(),
                g.instance_count.to_string(),
                g.acknowledged.to_string(),
                g.occurrences.to_string(),
                time(&g.last_seen),
                cut(&g.error, 60),
            ]);
        }
        let mut out = format!("{t}\n");
        next_page(&mut out, self.next_cursor.as_ref());
        out
    }
}

impl Human for GroupDetail {
    fn human(&self) -> String {
        let g = &self.group;
        let mut out = format!(
            "group {}: {} / {} / {}\nerror: {}\n{} instances ({} acknowledged), {} occurrences, first {} last {}\n\n",
            g.id,
            g.flow,
            g.task,
            g.kind,
            g.error,
            g.instance_count,
            g.acknowledged,
            g.occurrences,
            time(&g.first_seen),
            time(&g.last_seen)
        );
        let mut t = table([
            "INCIDENT",
            "OCCURRENCES",
            "LAST SEEN",
            "ACKNOWLEDGED BY",
            "NOTE",
        ]);
        for i in &self.incidents {
            t.add_row([
                i.id.clone(),
                i.occurrences.to_string(),
                time(&i.last_seen),
                opt(i.acknowledged_by.as_deref()),
                i.note.as_deref().map_or_else(|| "-".into(), |n| cut(n, 60)),
            ]);
        }
        out.push_str(&format!("{t}\n"));
        out
    }
}

impl Human for IncidentView {
    fn human(&self) -> String {
        let mut out = format!(
            "incident {}\n  flow {}, task {}, step {}, kind {}\n  error: {}\n  {} occurrences, first {} last {}\n",
            self.id,
            self.flow,
            self.task,
            self.step,
            self.kind,
            self.error,
            self.occurrences,
            time(&self.first_seen),
            time(&self.last_seen)
        );
        if let Some(by) = &self.acknowledged_by {
            out.push_str(&format!(
                "  acknowledged by {by} at {}: {}\n",
                opt_time(self.acknowledged_at.as_ref()),
                opt(self.note.as_deref())
            ));
        }
        out
    }
}

impl Human for ConsumerList {
    fn human(&self) -> String {
        let mut out = format!("log head: {}\n", self.head);
        if self.items.is_empty() {
            out.push_str("no relays, projections or checkpoints\n");
            return out;
        }
        let mut t = table([
            "NAME",
            "KIND",
            "CHECKPOINT",
            "LAG (EVENTS)",
            "LAG (AGE)",
            "DEAD LETTERS",
            "UPDATED",
            "TARGET",
        ]);
        for c in &self.items {
            t.add_row([
                c.name.clone(),
                c.kind.clone(),
                c.checkpoint.to_string(),
                c.lag_events.map_or_else(|| "-".into(), |l| l.to_string()),
                c.lag_seconds
                    .map_or_else(|| "-".into(), |s| millis((s * 1000.0) as i64)),
                c.dead_letters.to_string(),
                opt_time(c.updated_at.as_ref()),
                opt(c.target.as_deref()),
            ]);
        }
        out.push_str(&format!("{t}\n"));
        out
    }
}

impl Human for crate::api::schedules::ScheduleList {
    fn human(&self) -> String {
        if self.items.is_empty() {
            return "no schedules\n".into();
        }
        let mut t = table([
            "NAME",
            "FLOW",
            "CRON",
            "TIMEZONE",
            "MISSED",
            "PAUSED",
            "LAST TICK",
            "NEXT TICK",
        ]);
        for s in &self.items {
            t.add_row([
                s.name.clone(),
                s.flow.clone(),
                s.cron.clone(),
                s.timezone.clone(),
                s.missed.clone(),
                if s.paused { "yes".into() } else { "no".into() },
                opt_time(s.last_tick.as_ref()),
                opt_time(s.next_tick.as_ref()),
            ]);
        }
        format!("{t}\n")
    }
}

impl Human for crate::api::schedules::ScheduleView {
    fn human(&self) -> String {
        crate::api::schedules::ScheduleList {
            items: vec![self.clone()],
        }
        .human()
    }
}

impl Human for DeadLetterPage {
    fn human(&self) -> String {
        if self.items.is_empty() {
            return format!("no dead letters here ({} in all)\n", self.total);
        }
        let mut t = table([
            "ID",
            "RELAY",
            "POSITION",
            "ATTEMPTS",
            "GIVEN UP",
            "MESSAGE ID",
            "ERROR",
        ]);
        for d in &self.items {
            t.add_row([
                d.id.to_string(),
                d.relay.clone(),
                d.position.to_string(),
                d.attempts.to_string(),
                time(&d.created_at),
                d.message_id.clone(),
                cut(&d.error, 80),
            ]);
        }
        let mut out = format!("{t}\n{} dead letters in all\n", self.total);
        next_page(&mut out, self.next_cursor.as_ref());
        out
    }
}

impl Human for DeadLetterAction {
    fn human(&self) -> String {
        format!("dead letter {} {}\n", self.id, self.outcome)
    }
}

impl Human for dcbflow::MigrationStatus {
    fn human(&self) -> String {
        let mut t = table(["LAYER", "APPLIED", "KNOWN", "CHANGED", "CURRENT"]);
        for l in &self.layers {
            t.add_row([
                l.layer.clone(),
                l.applied.to_string(),
                l.known.to_string(),
                if l.changed.is_empty() {
                    "-".into()
                } else {
                    l.changed
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                if l.current { "yes" } else { "no" }.to_owned(),
            ]);
        }
        format!(
            "{t}\nmigrations {}\n",
            if self.current {
                "current"
            } else {
                "NOT current"
            }
        )
    }
}

impl<T: Human> Human for Vec<T> {
    fn human(&self) -> String {
        self.iter().map(Human::human).collect()
    }
}
