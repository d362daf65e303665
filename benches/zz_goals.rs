//! The goal table of the whole suite, printed at the end of `cargo bench`
//! (cargo runs the benches in name order, hence the name).
//!
//! Every other bench records its goal rows (see `common/goals.rs`); this one
//! prints them all, with the time each was measured, so that a row left from
//! an earlier run of a single bench is visible as such.

mod common;

fn main() {
    let rows = common::goals::recorded();
    if rows.is_empty() {
        println!("no goals recorded yet: run `cargo bench`");
        return;
    }
    let newest = rows.iter().map(|r| r.measured_at).max().unwrap_or(0);
    println!("\n== goals of issue 14 (docs/performance.md) ==");
    common::goals::print(&rows);
    let stale: Vec<_> = rows
        .iter()
        .filter(|r| newest.saturating_sub(r.measured_at) > 3 * 3600)
        .map(|r| r.bench.as_str())
        .collect();
    if !stale.is_empty() {
        println!("(rows of {stale:?} are more than 3 hours older than the newest)");
    }
    let met = rows.iter().filter(|r| r.met()).count();
    println!("{met} of {} goals met", rows.len());
}
