//! `locksfile stats`: the lock statistics of a file's shm lock table
//! (`FILE-shm`, `--mode shm`), table-wide, as a table, JSON or the
//! Prometheus text exposition format.
//!
//! Only owners that record count (`LOCKSFILE_STATS=1` in their
//! environment, `OpenOptions::stats`). Kernel-mode locks (ofd, process,
//! flock) and PostgreSQL namespaces keep their statistics per handle, in
//! the process that took them: no other process can read them, and this
//! says so (exit 69) rather than show nothing.
//!
//! FILE is only `stat`ed, never opened; the table is read without its
//! mutex and without joining it (its figures are atomic counters).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use locksfile::{Histogram, LockStats, Stats, HIST_BUCKETS};
use serde_json::{json, Value};

use crate::exit;

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Print JSON for scripts instead of the table.
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,

    /// Print the Prometheus text exposition format (counters and
    /// histograms per lock index).
    #[arg(long)]
    prometheus: bool,

    /// The lock file whose shm lock table (FILE-shm) is read.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

const PER_HANDLE: &str = "statistics of kernel-mode locks (ofd, process, flock) and of \
PostgreSQL namespaces are per handle, kept in the process that took them: read them there \
(LockFile::stats(), Python LocksFile.stats()), or lock with --mode shm and LOCKSFILE_STATS=1 \
for table-wide statistics";

pub fn main(args: StatsArgs) -> i32 {
    let shown = args.file.display();
    if args
        .file
        .to_str()
        .is_some_and(locksfile::LockFile::is_server_target)
    {
        eprintln!("locksfile: no statistics from outside for {shown}: {PER_HANDLE}");
        return exit::UNAVAILABLE;
    }
    match std::fs::metadata(&args.file) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            eprintln!("locksfile: {shown} is not a regular lock file");
            return exit::NOINPUT;
        }
        Err(e) => {
            eprintln!("locksfile: cannot look at {shown}: {e}");
            return exit::NOINPUT;
        }
    }
    let stats = match locksfile::shm::read_stats(&args.file) {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!("locksfile: {shown} has no shm lock table in use: {PER_HANDLE}");
            return exit::UNAVAILABLE;
        }
        Err(e) => {
            eprintln!("locksfile: cannot read the shm lock table of {shown}: {e}");
            return exit::for_lock_error(&e);
        }
    };
    let path = std::path::absolute(&args.file).unwrap_or(args.file.clone());
    if args.json {
        println!("{}", to_json(&path, &stats));
    } else if args.prometheus {
        print!("{}", prometheus(&stats));
    } else {
        print!("{}", render(&path, &stats));
    }
    0
}

/// Milliseconds to the microsecond (the histograms' resolution).
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

fn hist_json(h: &Histogram) -> Value {
    json!({
        "p50": ms(h.p50()),
        "p99": ms(h.p99()),
        "max": ms(h.max()),
        "count": h.count(),
        "sum": ms(h.sum()),
    })
}

fn counts_json(
    acquired: u64,
    contended: u64,
    timeouts: u64,
    deadlocks: u64,
    wait: &Histogram,
    hold: &Histogram,
) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("acquired".into(), acquired.into());
    m.insert("contended".into(), contended.into());
    m.insert("timeouts".into(), timeouts.into());
    m.insert("deadlocks".into(), deadlocks.into());
    m.insert("wait_ms".into(), hist_json(wait));
    m.insert("hold_ms".into(), hist_json(hold));
    m
}

/// The JSON form; `Python LocksFile.stats()` has the same keys.
pub fn to_json(path: &std::path::Path, s: &Stats) -> Value {
    let locks: Vec<Value> = s
        .locks
        .iter()
        .map(|l| {
            let mut m = counts_json(
                l.acquired,
                l.contended,
                l.timeouts,
                l.deadlocks,
                &l.wait,
                &l.hold,
            );
            // null: the "other indices" entry.
            m.insert("index".into(), json!(l.index));
            Value::Object(m)
        })
        .collect();
    let owners: Vec<Value> = s
        .owners
        .iter()
        .map(|o| {
            let mut m = counts_json(
                o.acquired,
                o.contended,
                o.timeouts,
                o.deadlocks,
                &o.wait,
                &o.hold,
            );
            m.insert("pid".into(), o.pid.into());
            m.insert("command".into(), json!(o.command));
            Value::Object(m)
        })
        .collect();
    json!({
        "file": path.to_string_lossy(),
        "scope": s.scope.as_str(),
        "locks": locks,
        "owners": owners,
    })
}

fn label(l: &LockStats) -> String {
    match l.index {
        Some(i) => i.to_string(),
        None => "other".into(),
    }
}

/// Seconds as Prometheus writes them.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    format!("{s}")
}

/// One counter of a lock's figures.
type Counter = fn(&LockStats) -> u64;
/// One histogram of a lock's figures.
type Hist = fn(&LockStats) -> &Histogram;

/// The Prometheus text exposition format: counters and, per index, the
/// wait and hold histograms with cumulative `le` buckets (their bounds
/// the power-of-two microsecond bucket bounds).
pub fn prometheus(s: &Stats) -> String {
    let mut out = String::new();
    let counters: [(&str, &str, Counter); 4] = [
        ("acquired", "Takes granted", |l| l.acquired),
        (
            "contended",
            "Takes another owner was in the way of (waited or refused)",
            |l| l.contended,
        ),
        ("timeouts", "Waits that ended at their deadline", |l| {
            l.timeouts
        }),
        ("deadlocks", "Waits refused as deadlocks", |l| l.deadlocks),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP locksfile_{name}_total {help}, per lock index.");
        let _ = writeln!(out, "# TYPE locksfile_{name}_total counter");
        for l in &s.locks {
            let _ = writeln!(
                out,
                "locksfile_{name}_total{{index=\"{}\"}} {}",
                label(l),
                get(l)
            );
        }
    }
    let hists: [(&str, &str, Hist); 2] = [
        ("wait", "How long contended takes waited", |l| &l.wait),
        ("hold", "How long locks were held, grant to release", |l| {
            &l.hold
        }),
    ];
    for (name, help, get) in hists {
        let metric = format!("locksfile_{name}_seconds");
        let _ = writeln!(out, "# HELP {metric} {help}, per lock index.");
        let _ = writeln!(out, "# TYPE {metric} histogram");
        for l in &s.locks {
            let h = get(l);
            let index = label(l);
            let mut cumulative = 0u64;
            for (i, n) in h.buckets().iter().enumerate().take(HIST_BUCKETS - 1) {
                cumulative = cumulative.saturating_add(*n);
                let le = secs(Histogram::bucket_bound(i));
                let _ = writeln!(
                    out,
                    "{metric}_bucket{{index=\"{index}\",le=\"{le}\"}} {cumulative}"
                );
            }
            cumulative = cumulative.saturating_add(h.buckets()[HIST_BUCKETS - 1]);
            let _ = writeln!(
                out,
                "{metric}_bucket{{index=\"{index}\",le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(out, "{metric}_sum{{index=\"{index}\"}} {}", secs(h.sum()));
            let _ = writeln!(out, "{metric}_count{{index=\"{index}\"}} {cumulative}");
        }
    }
    out
}

/// A duration for a table cell: µs, ms or s.
fn short(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1000 {
        format!("{us}µs")
    } else if us < 10_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn dist(h: &Histogram) -> String {
    if h.count() == 0 {
        return "-".into();
    }
    format!("{}/{}/{}", short(h.p50()), short(h.p99()), short(h.max()))
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                let _ = write!(s, "{c}{}  ", " ".repeat(pad));
            }
        }
        s
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

fn render(path: &std::path::Path, s: &Stats) -> String {
    let mut out = String::new();
    if s.locks.is_empty() {
        let _ = writeln!(
            out,
            "no statistics recorded on the shm lock table of {} (owners record with LOCKSFILE_STATS=1)",
            path.display()
        );
        return out;
    }
    let _ = writeln!(
        out,
        "lock statistics of {} ({} wide)",
        path.display(),
        s.scope.as_str()
    );
    let head = [
        "INDEX",
        "ACQUIRED",
        "CONTENDED",
        "TIMEOUTS",
        "DEADLOCKS",
        "WAIT p50/p99/max",
        "HOLD p50/p99/max",
    ];
    let rows: Vec<Vec<String>> = s
        .locks
        .iter()
        .map(|l| {
            vec![
                label(l),
                l.acquired.to_string(),
                l.contended.to_string(),
                l.timeouts.to_string(),
                l.deadlocks.to_string(),
                dist(&l.wait),
                dist(&l.hold),
            ]
        })
        .collect();
    table(&mut out, &head, &rows);
    out.push('\n');
    let head = [
        "PID",
        "COMMAND",
        "ACQUIRED",
        "CONTENDED",
        "TIMEOUTS",
        "DEADLOCKS",
        "WAIT p50/p99/max",
        "HOLD p50/p99/max",
    ];
    let rows: Vec<Vec<String>> = s
        .owners
        .iter()
        .map(|o| {
            vec![
                if o.pid == 0 {
                    "other".into()
                } else {
                    o.pid.to_string()
                },
                o.command.clone().unwrap_or_else(|| "(gone)".into()),
                o.acquired.to_string(),
                o.contended.to_string(),
                o.timeouts.to_string(),
                o.deadlocks.to_string(),
                dist(&o.wait),
                dist(&o.hold),
            ]
        })
        .collect();
    table(&mut out, &head, &rows);
    out
}
