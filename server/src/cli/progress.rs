//! Progress of long operations on stderr: a bar redrawn in place on a
//! terminal, a plain line every few seconds otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress of `done` out of `total`.
#[derive(Debug)]
pub struct Progress {
    label: String,
    tty: bool,
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

/// How often a plain line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    /// Progress of `label` (`bulk pause`).
    pub fn new(label: impl Into<String>) -> Self {
        Progress {
            label: label.into(),
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: None,
            drawn: false,
        }
    }

    /// `done` of `total` are done.
    pub fn update(&mut self, done: usize, total: i64) {
        let now = Instant::now();
        let finished = total >= 0 && done as i64 >= total;
        let due = self.last.is_none_or(|l| {
            now - l
                >= if self.tty {
                    Duration::from_millis(100)
                } else {
                    PLAIN_EVERY
                }
        });
        if !due && !finished {
            return;
        }
        self.last = Some(now);
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let total_u = total.max(0) as usize;
        let eta = if rate > 0.0 && total_u > done {
            format!(", about {:.0}s left", (total_u - done) as f64 / rate)
        } else {
            String::new()
        };
        let pct = (done * 100).checked_div(total_u).unwrap_or(100);
        let mut err = std::io::stderr().lock();
        if self.tty {
            const WIDTH: usize = 30;
            let filled = (done * WIDTH).checked_div(total_u).unwrap_or(WIDTH);
            let bar: String =
                "#".repeat(filled.min(WIDTH)) + &"-".repeat(WIDTH - filled.min(WIDTH));
            let _ = write!(
                err,
                "\r\x1b[K{} [{bar}] {done}/{total_u} {pct}% {rate:.1}/s{eta}",
                self.label
            );
            self.drawn = true;
        } else {
            let _ = writeln!(
                err,
                "{}: {done}/{total_u} ({pct}%), {rate:.1}/s{eta}",
                self.label
            );
        }
        let _ = err.flush();
    }

    /// A line saying the operation still runs elsewhere (a server), with the
    /// time elapsed; printed each call on a terminal, every few seconds otherwise.
    pub fn waiting(&mut self, what: &str) {
        let now = Instant::now();
        let due = self.last.is_none_or(|l| {
            now - l
                >= if self.tty {
                    Duration::from_millis(250)
                } else {
                    PLAIN_EVERY * 2
                }
        });
        if !due {
            return;
        }
        self.last = Some(now);
        const SPIN: [char; 4] = ['|', '/', '-', '\\'];
        let secs = self.start.elapsed().as_secs();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let c = SPIN[(self.start.elapsed().as_millis() / 250) as usize % SPIN.len()];
            let _ = write!(err, "\r\x1b[K{} {c} {what} ({secs}s)", self.label);
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{}: {what} ({secs}s)", self.label);
        }
        let _ = err.flush();
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.tty && self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
