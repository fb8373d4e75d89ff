//! `locksfile status`: every lock held on a file and every waiter, with
//! the processes behind them, as a table and a picture of the ranges: the
//! kernel's locks from `/proc/locks`, and those of the file's shm lock
//! table (`FILE-shm`, `--mode shm`) read from the table itself.
//!
//! FILE is only `stat`ed, never opened: looking cannot create, modify or
//! lock anything. A shm table in use is read under its mutex (which writes
//! to the mutex word only); a missing one is not created.

use std::fmt::Write as _;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use clap::Args;
use locksfile::{Span, INDEX_END};
use serde_json::{json, Value};

use crate::exit;
use crate::procfs::{self, FileId, Found};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON for scripts instead of the table.
    #[arg(long)]
    json: bool,

    /// The lock file (it is not opened, only looked up; its shm lock table
    /// FILE-shm, if in use, is read), or a lock namespace on a PostgreSQL
    /// server (a URL or key=value string with name=NAME, as `locksfile run`
    /// takes it): its locks and waiters, from pg_locks and pg_stat_activity.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// `status` of a namespace on a server: a session of our own (taking no
/// lock) lists every other session's locks and waits.
fn server_status(target: &str, json: bool) -> i32 {
    let lf = match locksfile::LockFile::options().write(false).connect(target) {
        Ok(lf) => lf,
        Err(e) => {
            eprintln!("locksfile: {e}");
            return exit::for_lock_error(&e);
        }
    };
    let locks = match lf.server_locks() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("locksfile: {e}");
            return exit::for_lock_error(&e);
        }
    };
    // The handle's own form of the target: never the password.
    let shown = lf.path().display().to_string();
    let row = |l: &locksfile::ServerLock| {
        let s = l.holder.server.expect("server locks name their session");
        (
            if l.granted { "held" } else { "waiting" },
            l.holder.kind.to_string(),
            l.holder.span.start(),
            s,
        )
    };
    if json {
        let locks: Vec<Value> = locks
            .iter()
            .map(|l| {
                let (state, kind, index, s) = row(l);
                json!({
                    "state": state,
                    "kind": kind,
                    "index": index,
                    "backend_pid": s.backend_pid,
                    "client_addr": s.client_addr.map(|a| a.to_string()),
                    "client_port": s.client_port,
                    "application_name": s.application_name(),
                })
            })
            .collect();
        println!("{}", json!({"target": shown, "locks": locks}));
        return 0;
    }
    println!("{shown}");
    if locks.is_empty() {
        println!("no locks held or waited for");
        return 0;
    }
    println!(
        "{:<8} {:<10} {:>10} {:>8}  client",
        "state", "kind", "index", "backend"
    );
    for l in &locks {
        let (state, kind, index, s) = row(l);
        let client = match (s.client_addr, s.client_port) {
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.to_string(),
            _ => "local".to_string(),
        };
        println!(
            "{state:<8} {kind:<10} {index:>10} {:>8}  {client} {}",
            s.backend_pid,
            s.application_name()
        );
    }
    0
}

/// The widest picture, in cells.
const PICTURE_WIDTH: u64 = 64;

pub fn main(args: StatusArgs) -> i32 {
    if let Some(target) = args
        .file
        .to_str()
        .filter(|f| locksfile::LockFile::is_server_target(f))
    {
        return server_status(target, args.json);
    }
    let shown = args.file.display();
    let meta = match std::fs::metadata(&args.file) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("locksfile: cannot look at {shown}: {e}");
            return exit::NOINPUT;
        }
    };
    if !meta.file_type().is_file() {
        let t = meta.file_type();
        let what = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "something else"
        };
        eprintln!("locksfile: {shown} is {what}, not a regular lock file");
        return exit::NOINPUT;
    }
    let id = FileId::of(&meta);
    let mut locks = match procfs::locks_on(id) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("locksfile: cannot read /proc/locks: {e}");
            return exit::OSERR;
        }
    };
    locks.sort_by_key(|f| (f.line.waiting, f.line.start, f.line.id));
    let table = match procfs::shm_locks_on(&args.file, id) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("locksfile: cannot read the shm lock table of {shown}: {e}");
            return exit::for_lock_error(&e);
        }
    };
    // Holders by start, kernel and table together; then waiters, the
    // table's in queue order.
    let (table_waiting, table_held): (Vec<Found>, Vec<Found>) =
        table.into_iter().partition(|f| f.line.waiting);
    let waiting_at = locks.partition_point(|f| !f.line.waiting);
    let kernel_waiting = locks.split_off(waiting_at);
    locks.extend(table_held);
    locks.sort_by_key(|f| f.line.start);
    locks.extend(kernel_waiting);
    locks.extend(table_waiting);
    let path = std::path::absolute(&args.file).unwrap_or(args.file.clone());
    if args.json {
        println!("{}", to_json(&path, id, &locks));
    } else {
        print!("{}", render(&path, id, &locks));
    }
    0
}

fn span_of(f: &Found) -> Span {
    let end = match f.line.last {
        Some(last) => last.saturating_add(1).min(INDEX_END),
        None => INDEX_END,
    };
    let start = f.line.start.min(INDEX_END - 1);
    Span::new(start, end.max(start + 1)).expect("bounds clipped to the index space")
}

fn kind_of(f: &Found) -> &'static str {
    if f.line.exclusive {
        "exclusive"
    } else {
        "shared"
    }
}

fn state_of(f: &Found) -> &'static str {
    if f.line.waiting {
        "waiting"
    } else {
        "held"
    }
}

fn to_json(path: &std::path::Path, id: FileId, locks: &[Found]) -> Value {
    let locks: Vec<Value> = locks
        .iter()
        .map(|f| {
            let span = span_of(f);
            let procs: Vec<Value> = f
                .procs
                .iter()
                .map(|p| json!({"pid": p.pid, "command": p.command, "wraps": p.wraps}))
                .collect();
            let first = f.procs.first();
            json!({
                // The kernel's lock id (/proc/locks), or the table's owner.
                "id": if f.table_owner.is_some() { None } else { Some(f.line.id) },
                "owner": f.table_owner,
                "state": state_of(f),
                "mode": f.line.class.name().to_ascii_lowercase(),
                "kind": kind_of(f),
                "span": span.to_string(),
                "start": span.start(),
                "end": if span.is_to_end() { None } else { Some(span.end()) },
                "pid": first.map(|p| p.pid),
                "command": first.and_then(|p| p.command.clone()),
                "wraps": first.and_then(|p| p.wraps.clone()),
                "processes": procs,
            })
        })
        .collect();
    json!({
        "file": path.to_string_lossy(),
        "device": format!("{:02x}:{:02x}", id.major, id.minor),
        "inode": id.ino,
        "locks": locks,
    })
}

fn who(f: &Found) -> (String, String) {
    if f.procs.is_empty() {
        return ("?".into(), "unknown".into());
    }
    let pids: Vec<String> = f.procs.iter().map(|p| p.pid.to_string()).collect();
    let cmds: Vec<String> = f
        .procs
        .iter()
        .map(|p| {
            let command = p.command.as_deref().unwrap_or("unknown");
            match &p.wraps {
                Some(w) => format!("{command} ({})", shortened(w)),
                None => command.to_string(),
            }
        })
        .collect();
    (pids.join(","), cmds.join(","))
}

/// A wrapped command line cut to fit a table cell.
fn shortened(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut cut: String = s.chars().take(MAX - 3).collect();
        cut.push_str("...");
        cut
    }
}

fn render(path: &std::path::Path, id: FileId, locks: &[Found]) -> String {
    let mut out = String::new();
    let head = format!(
        "{} (device {:02x}:{:02x}, inode {})",
        path.display(),
        id.major,
        id.minor,
        id.ino
    );
    if locks.is_empty() {
        let _ = writeln!(out, "no locks on {head}");
        return out;
    }
    let _ = writeln!(out, "locks on {head}");
    let rows: Vec<[String; 6]> = locks
        .iter()
        .map(|f| {
            let (pid, cmd) = who(f);
            let state = match (f.table_owner, f.line.waiting) {
                (Some(o), true) => format!("waiting (owner {o})"),
                (Some(o), false) => format!("held (owner {o})"),
                (None, true) => format!("waiting (behind #{})", f.line.id),
                (None, false) => format!("held (#{})", f.line.id),
            };
            [
                span_of(f).to_string(),
                kind_of(f).into(),
                f.line.class.name().into(),
                pid,
                cmd,
                state,
            ]
        })
        .collect();
    let header = ["SPAN", "KIND", "MODE", "PID", "COMMAND", "STATE"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        s
    };
    let _ = writeln!(out, "{}", line(&header));
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    out.push('\n');
    out.push_str(&picture(locks));
    out
}

/// One lane per holder (and per waiter): `#` exclusive, `=` shared, `.`
/// not held, a trailing `>` for a lock that runs to the end.
fn picture(locks: &[Found]) -> String {
    // Lanes: one per (process set, held/waiting), in first-seen order.
    let mut lanes: Vec<(String, Vec<&Found>)> = Vec::new();
    for f in locks {
        let (pid, cmd) = who(f);
        let mut label = match (f.procs.is_empty(), f.table_owner) {
            (true, _) => format!("unknown #{}", f.line.id),
            // Shm owners are handles: two in one process are two lanes,
            // told apart before the label is cut to width.
            (false, Some(o)) => format!("{pid} (owner {o}) {cmd}"),
            (false, None) => format!("{pid} {cmd}"),
        };
        if f.line.waiting {
            label.push_str(" (waiting)");
        }
        match lanes.iter_mut().find(|(l, _)| *l == label) {
            Some((_, v)) => v.push(f),
            None => lanes.push((label, vec![f])),
        }
    }
    let hi = locks
        .iter()
        .map(|f| {
            let s = span_of(f);
            if s.is_to_end() {
                s.start() + 1
            } else {
                s.end()
            }
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let cells = hi.min(PICTURE_WIDTH);
    // Cell c covers indices [c*hi/cells, (c+1)*hi/cells).
    let cell_range = |c: u64| {
        let a = (c as u128 * hi as u128 / cells as u128) as u64;
        let b = ((c + 1) as u128 * hi as u128 / cells as u128) as u64;
        (a, b.max(a + 1))
    };
    let label_w = lanes
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0)
        .min(40);
    let mut out = String::new();
    let ruler_end = hi.to_string();
    let gap = (cells as usize).saturating_sub(1 + ruler_end.len());
    let _ = writeln!(
        out,
        "{:label_w$}  0{}{}",
        "",
        " ".repeat(gap),
        if cells > 1 + ruler_end.len() as u64 {
            ruler_end.as_str()
        } else {
            ""
        }
    );
    for (label, fs) in &lanes {
        let mut row = String::new();
        for c in 0..cells {
            let (a, b) = cell_range(c);
            let mut ch = '.';
            for f in fs {
                let s = span_of(f);
                if s.start() < b && a < s.end() {
                    if f.line.exclusive {
                        ch = '#';
                    } else if ch == '.' {
                        ch = '=';
                    }
                }
            }
            row.push(ch);
        }
        if fs.iter().any(|f| span_of(f).is_to_end()) {
            row.push('>');
        }
        let label: String = label.chars().take(label_w).collect();
        let _ = writeln!(out, "{label:label_w$}  {row}");
    }
    let scale = if hi > cells {
        format!(", one cell = {} indices", hi.div_ceil(cells))
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "{:label_w$}  # exclusive  = shared  > to the end{scale}",
        ""
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::{LockLine, Proc};

    fn found(line: &str, pid: u32) -> Found {
        Found {
            line: LockLine::parse(line).unwrap(),
            procs: vec![Proc {
                pid,
                command: Some("cmd".into()),
                wraps: None,
            }],
            table_owner: None,
        }
    }

    #[test]
    fn picture_has_a_lane_per_holder() {
        let locks = [
            found("1: OFDLCK ADVISORY WRITE -1 fe:00:9 0 1", 10),
            found("2: POSIX ADVISORY READ 20 fe:00:9 4 EOF", 20),
            found("1: -> OFDLCK ADVISORY WRITE -1 fe:00:9 0 0", 30),
        ];
        let p = picture(&locks);
        let lanes: Vec<&str> = p.lines().collect();
        assert!(
            lanes[1].starts_with("10 cmd") && lanes[1].ends_with("##..."),
            "{p}"
        );
        assert!(lanes[2].ends_with("....=>"), "{p}");
        assert!(
            lanes[3].contains("(waiting)") && lanes[3].ends_with("#...."),
            "{p}"
        );
    }
}
