//! The performance goals (issue 14, docs/performance.md): each bench checks its
//! rows against their goals, prints them with met / MISSED, and records them
//! under `<target>/criterion/dcbflow-goals/`, where the last bench of the suite
//! (`zz_goals`) prints the whole table at the end of `cargo bench`.
//!
//! Also here: what a window of work cost the server and how busy the machine
//! was meanwhile, read from `/proc` (the server runs on this machine), so that
//! "CPU-bound" and "waiting" can be told apart.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A goal: the measured value against its bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub bench: String,
    pub label: String,
    pub value: f64,
    pub bound: f64,
    /// `true`: the value must be at least `bound`; `false`: at most.
    pub at_least: bool,
    /// How the value reads: "x" (a ratio), "ms", "%", "statements".
    pub unit: String,
    /// Seconds since the epoch when it was measured.
    pub measured_at: u64,
}

impl Row {
    /// A ratio that must be at least `bound`.
    pub fn ratio(label: impl Into<String>, value: f64, bound: f64) -> Row {
        Row::new(label, value, bound, true, "x")
    }

    /// A value that must not exceed `bound`.
    pub fn at_most(label: impl Into<String>, value: f64, bound: f64, unit: &str) -> Row {
        Row::new(label, value, bound, false, unit)
    }

    fn new(label: impl Into<String>, value: f64, bound: f64, at_least: bool, unit: &str) -> Row {
        Row {
            bench: String::new(),
            label: label.into(),
            value,
            bound,
            at_least,
            unit: unit.to_owned(),
            measured_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    pub fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.bound
        } else {
            self.value <= self.bound
        }
    }
}

fn dir() -> String {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    format!("{target}/criterion/dcbflow-goals")
}

/// Criterion's mean time per iteration of `group/id/name`, in ns.
pub fn mean_ns(group: &str, id: &str, name: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!(
        "{target}/criterion/{group}/{id}/{}/new/estimates.json",
        name.replace('/', "_")
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

/// Throughput of `ours` over `baseline` (criterion paths), if both ran.
pub fn throughput_ratio(ours: (&str, &str, &str), baseline: (&str, &str, &str)) -> Option<f64> {
    let (o, b) = (
        mean_ns(ours.0, ours.1, ours.2)?,
        mean_ns(baseline.0, baseline.1, baseline.2)?,
    );
    Some(b / o)
}

/// Prints `rows` as `bench`'s goals and records them for the suite's summary.
pub fn report(bench: &str, rows: Vec<Row>) {
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|mut r| {
            r.bench = bench.to_owned();
            r
        })
        .collect();
    println!("\ngoals ({bench}):");
    print(&rows);
    let _ = std::fs::create_dir_all(dir());
    let _ = std::fs::write(
        format!("{}/{bench}.json", dir()),
        serde_json::to_vec_pretty(&rows).unwrap_or_default(),
    );
}

/// Every recorded goal, by bench.
pub fn recorded() -> Vec<Row> {
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return rows;
    };
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if let Ok(text) = std::fs::read_to_string(&p)
            && let Ok(mut r) = serde_json::from_str::<Vec<Row>>(&text)
        {
            rows.append(&mut r);
        }
    }
    rows
}

/// Prints goal rows: label, value, goal, met / MISSED.
pub fn print(rows: &[Row]) {
    println!(
        "{:<14} {:<58} {:>10} {:>10}  result",
        "bench", "goal", "measured", "bound"
    );
    for r in rows {
        let fmt = |v: f64| match r.unit.as_str() {
            "x" => format!("{v:.2}x"),
            u => format!("{v:.2} {u}"),
        };
        println!(
            "{:<14} {:<58} {:>10} {:>9}{} {}",
            r.bench,
            r.label,
            fmt(r.value),
            if r.at_least { "≥" } else { "≤" },
            fmt(r.bound),
            if r.met() { "met" } else { "MISSED" }
        );
    }
}

/// CPU time of the local PostgreSQL server's processes and of the whole
/// machine, read from `/proc`, to take the cost of a window of work.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    /// Clock ticks spent by processes named `postgres`.
    server: u64,
    /// Clock ticks spent by this (the client) process.
    client: u64,
    /// Busy and total ticks of all CPUs (`/proc/stat`).
    busy: u64,
    total: u64,
    at: Instant,
}

/// What a window cost: server CPU per operation, and the machine's busy share.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    pub ops: u64,
    pub elapsed: Duration,
    /// Server CPU time per operation, in ms.
    pub server_ms_per_op: f64,
    /// The bench process's (the client's) CPU time per operation, in ms.
    pub client_ms_per_op: f64,
    /// Busy share of all CPUs during the window, 0 to 1.
    pub busy: f64,
}

impl Cost {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

fn ticks_per_second() -> f64 {
    // USER_HZ: 100 on every Linux this runs on.
    100.0
}

impl Cpu {
    /// Reads the counters now (zeros where `/proc` cannot be read).
    pub fn now() -> Cpu {
        let mut server = 0;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                // pid (comm) state ppid ... utime(14) stime(15)
                let Some((comm, rest)) = stat.split_once(") ") else {
                    continue;
                };
                if !comm.ends_with("(postgres") {
                    continue;
                }
                let f: Vec<&str> = rest.split_whitespace().collect();
                let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                // Fields after ") " start at field 3 (state): utime is 14, stime 15.
                server += t(11) + t(12);
            }
        }
        let client = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.split_once(") ")?;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        let (mut busy, mut total) = (0, 0);
        if let Ok(stat) = std::fs::read_to_string("/proc/stat")
            && let Some(line) = stat.lines().next()
        {
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            total = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            busy = total - idle;
        }
        Cpu {
            server,
            client,
            busy,
            total,
            at: Instant::now(),
        }
    }

    /// The cost of the `ops` operations done since `self`. Processes that
    /// ended meanwhile (connections closed in the window) are not counted, so
    /// keep connections open across the window.
    pub fn cost(&self, ops: u64) -> Cost {
        let now = Cpu::now();
        let server_s = now.server.saturating_sub(self.server) as f64 / ticks_per_second();
        let client_s = now.client.saturating_sub(self.client) as f64 / ticks_per_second();
        let total = now.total.saturating_sub(self.total).max(1) as f64;
        Cost {
            ops,
            elapsed: now.at - self.at,
            server_ms_per_op: server_s * 1e3 / ops.max(1) as f64,
            client_ms_per_op: client_s * 1e3 / ops.max(1) as f64,
            busy: now.busy.saturating_sub(self.busy) as f64 / total,
        }
    }
}

/// Runs `op(client)` on `clients` concurrent tasks for `window`, and returns
/// what it cost (operations counted when they complete).
pub async fn window<F, Fut>(clients: usize, window: Duration, op: F) -> Cost
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Cpu::now();
    let until = Instant::now() + window;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (op, done) = (op.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    op(i).await;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("window task");
    }
    start.cost(done.load(std::sync::atomic::Ordering::Relaxed))
}

/// Whether this is a quick run (`DCBFLOW_BENCH_QUICK`).
pub fn quick() -> bool {
    std::env::var_os("DCBFLOW_BENCH_QUICK").is_some()
}
