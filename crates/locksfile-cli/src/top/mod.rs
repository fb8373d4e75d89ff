//! `locksfile top`: a live view of a lock file's (or a server namespace's)
//! holders and waiters, refreshed every `--interval`, with the hottest
//! locks and a histogram of wait times as seen across refreshes.
//!
//! Nobody tells how long a waiter has waited: neither `/proc/locks` nor the
//! shm table nor `pg_locks` keeps the time a wait began. Each waiter (its
//! processes, its span, its kind) is remembered from the refresh that first
//! showed it, so a wait is known to have lasted *at least* as long as it
//! has been seen; shorter waits than one interval may be missed.

mod recorded;
mod term;
mod view;

use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use locksfile::{LockFile, INDEX_END};

use crate::exit;
use crate::procfs::{self, FileId, Found};

use recorded::Recorded;
use view::{Observed, Row, StatsSource};

#[derive(Args, Debug)]
#[command(after_long_help = TOP_NOTES)]
pub struct TopArgs {
    /// Seconds between refreshes; fractions allowed (0.2).
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_interval)]
    interval: Duration,

    /// Print one frame and exit, without taking over the terminal.
    #[arg(long)]
    once: bool,

    /// How many of the hottest locks to list.
    #[arg(long, value_name = "N", default_value_t = 8)]
    hot: usize,

    /// The lock file (only looked up and read, never opened for locking),
    /// or a lock namespace on a PostgreSQL server (a URL or key=value
    /// string with name=NAME, as `locksfile status` takes it).
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

const TOP_NOTES: &str = "\
Keys: q or Ctrl-C quits. The screen is redrawn every --interval and whenever
the window changes size; it works over ssh (any terminal that speaks ANSI).

WAITED: the system does not record when a wait began; a waiter is timed from
the first refresh that showed it, so the figure is a lower bound (>=), and
waits shorter than one interval may never be seen. The hottest locks and the
wait histogram count what these refreshes observed since top started: how
many refreshes saw each index held, and saw a waiter on it.

When stdout or stdin is not a terminal (a pipe, a file), top prints one
frame and exits, as with --once.";

fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.05..=3600.0).contains(&secs) {
        return Err("the interval must be between 0.05 and 3600 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Where the locks are read from.
enum Source {
    File { path: PathBuf, id: FileId },
    Server(Box<LockFile>),
}

impl Source {
    fn open(file: &Path) -> Result<Source, (String, i32)> {
        if let Some(target) = file.to_str().filter(|f| LockFile::is_server_target(f)) {
            return match LockFile::options().write(false).connect(target) {
                Ok(lf) => Ok(Source::Server(Box::new(lf))),
                Err(e) => Err((e.to_string(), exit::for_lock_error(&e))),
            };
        }
        let meta = std::fs::metadata(file).map_err(|e| {
            (
                format!("cannot look at {}: {e}", file.display()),
                exit::NOINPUT,
            )
        })?;
        let t = meta.file_type();
        if !t.is_file() || t.is_fifo() {
            return Err((
                format!("{} is not a regular lock file", file.display()),
                exit::NOINPUT,
            ));
        }
        let path = std::path::absolute(file).unwrap_or(file.to_path_buf());
        Ok(Source::File {
            path,
            id: FileId::of(&meta),
        })
    }

    fn title(&self) -> String {
        match self {
            Source::File { path, id } => format!(
                "{} (device {:02x}:{:02x}, inode {})",
                path.display(),
                id.major,
                id.minor,
                id.ino
            ),
            // The handle's own form of the target: never the password.
            Source::Server(lf) => lf.path().display().to_string(),
        }
    }

    /// A lock file's shm table statistics, where it has a table in use
    /// with statistics recorded.
    fn recorded(&self) -> Option<Recorded> {
        match self {
            Source::File { path, .. } => Recorded::read(path),
            Source::Server(_) => None,
        }
    }

    /// Every holder and waiter now.
    fn read(&self) -> Result<Vec<Row>, String> {
        match self {
            Source::File { path, id } => {
                let mut found =
                    procfs::locks_on(*id).map_err(|e| format!("cannot read /proc/locks: {e}"))?;
                found.extend(
                    procfs::shm_locks_on(path, *id)
                        .map_err(|e| format!("cannot read the shm lock table: {e}"))?,
                );
                Ok(found.iter().map(row_of).collect())
            }
            Source::Server(lf) => {
                let locks = lf.server_locks().map_err(|e| e.to_string())?;
                Ok(locks
                    .iter()
                    .map(|l| {
                        let s = l.holder.server;
                        Row {
                            waiting: !l.granted,
                            exclusive: l.holder.kind == locksfile::Kind::Exclusive,
                            mode: "PG".into(),
                            start: l.holder.span.start(),
                            end: (!l.holder.span.is_to_end()).then(|| l.holder.span.end()),
                            pids: s.map(|s| s.backend_pid.to_string()).unwrap_or("?".into()),
                            command: s
                                .map(|s| s.application_name().to_string())
                                .unwrap_or_default(),
                            owner: None,
                            behind: None,
                        }
                    })
                    .collect())
            }
        }
    }
}

fn row_of(f: &Found) -> Row {
    let pids = if f.procs.is_empty() {
        "?".to_string()
    } else {
        let p: Vec<String> = f.procs.iter().map(|p| p.pid.to_string()).collect();
        p.join(",")
    };
    let command = f
        .procs
        .iter()
        .map(|p| {
            let c = p.command.as_deref().unwrap_or("unknown");
            match &p.wraps {
                Some(w) => format!("{c} ({w})"),
                None => c.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    Row {
        waiting: f.line.waiting,
        exclusive: f.line.exclusive,
        mode: f.line.class.name().into(),
        start: f.line.start.min(INDEX_END - 1),
        end: f.line.last.map(|l| l.saturating_add(1).min(INDEX_END)),
        pids,
        command,
        owner: f.table_owner,
        behind: (f.line.waiting && f.table_owner.is_none()).then_some(f.line.id),
    }
}

pub fn main(args: TopArgs) -> i32 {
    let source = match Source::open(&args.file) {
        Ok(s) => s,
        Err((msg, code)) => {
            eprintln!("locksfile: {msg}");
            return code;
        }
    };
    let title = source.title();
    let mut observed = Observed::default();
    let interactive =
        !args.once && std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    if !interactive {
        let rows = match source.read() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("locksfile: {e}");
                return exit::OSERR;
            }
        };
        observed.see(&rows, Instant::now());
        let recorded = source.recorded();
        // A frame for a pipe or a file: as wide as it needs, all of it.
        let lines = view::frame(
            &title,
            &rows,
            &observed,
            stats_of(&observed, &recorded),
            args.hot,
            None,
            None,
        );
        let mut out = std::io::stdout().lock();
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
        return 0;
    }
    let screen = match term::Screen::open() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("locksfile: cannot take over the terminal: {e}");
            return exit::OSERR;
        }
    };
    let mut next = Instant::now();
    let mut rows = Vec::new();
    let mut recorded = None;
    let mut error = None;
    loop {
        let now = Instant::now();
        if now >= next {
            match source.read() {
                Ok(r) => {
                    observed.see(&r, now);
                    rows = r;
                    recorded = source.recorded();
                    error = None;
                }
                // Shown on the screen, not fatal: a server may come back.
                Err(e) => error = Some(e),
            }
            next = now + args.interval;
        }
        let size = screen.size();
        let stats = stats_of(&observed, &recorded);
        let lines = view::frame(
            &title,
            &rows,
            &observed,
            stats,
            args.hot,
            Some(size),
            Some((args.interval, error.as_deref())),
        );
        if screen.draw(&lines).is_err() {
            // The terminal is gone.
            return 128 + libc::SIGHUP;
        }
        match screen.wait(next.saturating_duration_since(Instant::now())) {
            term::Event::Tick => {}
            term::Event::Quit => return 0,
            term::Event::Signal(sig) => {
                drop(screen);
                return if sig == libc::SIGINT { 0 } else { 128 + sig };
            }
        }
    }
}

/// The statistics panel's source: the counters a shm table keeps itself
/// where it has any; else what the refreshes saw.
fn stats_of<'a>(observed: &'a Observed, recorded: &'a Option<Recorded>) -> &'a dyn StatsSource {
    match recorded {
        Some(r) => r,
        None => observed,
    }
}
