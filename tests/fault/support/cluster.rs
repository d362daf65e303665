//! A throwaway PostgreSQL cluster that the test owns and may kill: `initdb` into a
//! temporary directory, `pg_ctl start` on a free port, `pg_ctl restart -m immediate`,
//! `pg_ctl stop -m immediate`. Never the shared server on 127.0.0.1:5432.
//!
//! PostgreSQL refuses to run as root; as root the server binaries run as the
//! `postgres` user (through `runuser`), and the directory is handed to that user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One throwaway cluster; stopped and removed on drop (and, should the test
/// process die, by a watchdog shell once it has exited).
pub struct Cluster {
    ctl: Ctl,
    /// The TCP port it listens on (127.0.0.1 only).
    pub port: u16,
}

impl Cluster {
    /// initdb + pg_ctl start on a free port. Blocking: call from `spawn_blocking`
    /// or use [`Cluster::start_async`].
    pub fn start() -> Cluster {
        let bin = server_bin_dir().expect(
            "the fault suite needs the PostgreSQL server binaries (initdb, pg_ctl, postgres), \
             e.g. /usr/lib/postgresql/15/bin (Debian/Ubuntu: apt-get install postgresql)",
        );
        let owner = if is_root() {
            Some(postgres_ids().expect("running as root needs a `postgres` user to run the server"))
        } else {
            None
        };
        let dir =
            std::env::temp_dir().join(format!("dcbflow-fault-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown temp dir");
        }
        let data = dir.join("data");
        let mut cluster = Cluster {
            ctl: Ctl {
                dir,
                data,
                bin,
                owner,
            },
            port: 0,
        };
        cluster.ctl.run_checked(
            "initdb",
            &[
                "-D",
                path(&cluster.ctl.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.ctl.watchdog();
        // A free port can be taken by someone else between the probe and the start:
        // try a few.
        let mut last = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            let conf = format!(
                "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
                 max_connections = 200\nlog_min_messages = warning\nlog_line_prefix = '%m [%p] %a '\n",
                cluster.port,
                cluster.ctl.dir.display()
            );
            let file = cluster.ctl.data.join("postgresql.auto.conf");
            std::fs::write(&file, conf).expect("write postgresql.auto.conf");
            match cluster.ctl.pg_ctl(&["start"]) {
                Ok(()) => return cluster,
                Err(e) => last = e,
            }
        }
        panic!("could not start the throwaway cluster: {last}");
    }

    /// [`Cluster::start`] off the async runtime's threads.
    pub async fn start_async() -> Cluster {
        tokio::task::spawn_blocking(Cluster::start)
            .await
            .expect("cluster start")
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres?application_name=<app>`.
    pub fn url(&self, app: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?application_name={app}",
            self.port
        )
    }

    /// `pg_ctl restart -m immediate`: every backend dies at once (no checkpoint, no
    /// goodbye to the clients), the server comes back through crash recovery.
    /// Returns how long until it accepted connections again.
    pub async fn restart_immediate(&self) -> Duration {
        self.blocking(&["-m", "immediate", "restart"]).await
    }

    /// `pg_ctl stop -m immediate`.
    pub async fn stop_immediate(&self) -> Duration {
        self.blocking(&["-m", "immediate", "stop"]).await
    }

    /// `pg_ctl start` (after a stop).
    pub async fn start_again(&self) -> Duration {
        self.blocking(&["start"]).await
    }

    async fn blocking(&self, args: &'static [&'static str]) -> Duration {
        let ctl = self.ctl.clone();
        let t0 = Instant::now();
        tokio::task::spawn_blocking(move || ctl.pg_ctl(args))
            .await
            .expect("pg_ctl thread")
            .unwrap_or_else(|e| panic!("{e}"));
        t0.elapsed()
    }

    /// The last `lines` lines of the server log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.ctl.dir.join("server.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.ctl.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.ctl.dir);
    }
}

/// Where the cluster lives and how to run its tools; movable to a blocking thread.
#[derive(Clone)]
struct Ctl {
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    /// `Some((uid, gid))` of `postgres` when running as root.
    owner: Option<(u32, u32)>,
}

impl Ctl {
    fn run_checked(&self, tool: &str, args: &[&str]) {
        let out = command(&self.bin, self.owner, tool, args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server and removes the directory once this process has exited,
    /// in case it dies without running `Drop`.
    fn watchdog(&self) {
        let runas = if self.owner.is_some() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {runas}'{bin}/pg_ctl' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            bin = self.bin.display(),
            data = self.data.display(),
            dir = self.dir.display(),
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(std::env::temp_dir())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let log = self.dir.join("server.log");
        let mut all = vec!["-D", path(&self.data), "-l", path(&log), "-w", "-t", "120"];
        all.extend_from_slice(args);
        let out = command(&self.bin, self.owner, "pg_ctl", &all)
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl {args:?} failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }
}

fn command(bin: &Path, owner: Option<(u32, u32)>, tool: &str, args: &[&str]) -> Command {
    let exe = bin.join(tool);
    let mut cmd = if owner.is_some() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    cmd.args(args).current_dir(std::env::temp_dir());
    cmd
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"postgres") && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn has_server(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|t| dir.join(t).is_file())
}

/// `PG_BIN`, the binaries on `PATH`, `pg_config --bindir`, or the newest
/// `/usr/lib/postgresql/*/bin`.
fn server_bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PG_BIN").map(PathBuf::from)
        && has_server(&d)
    {
        return Some(d);
    }
    if let Some(p) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&p) {
            if has_server(&d) {
                return Some(d);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&d) {
            return Some(d);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| has_server(d))
        .collect();
    dirs.sort();
    dirs.pop()
}
