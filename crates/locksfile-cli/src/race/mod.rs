//! `locksfile race`: K processes walk hand-over-hand around a ring of N
//! locks for R rounds, in each lock mode, and check what they saw.
//!
//! Racer `i` starts on track `i*N/K` (staggered round the ring, as in the
//! original's test), holding its lock. A step takes the next track's lock,
//! enters it, leaves the current track and releases its lock. After `R*N`
//! steps every racer is back where it started, having entered each track
//! `R` times.
//!
//! The racers keep a board in memory shared by all of them (an anonymous
//! `MAP_SHARED` mapping made before the fork), written only while holding
//! the track's lock:
//! - each track's *occupant*: set on entering (it must be empty) and
//!   cleared on leaving (it must still be ours): two racers on one track
//!   at once is a **collision**;
//! - each track's *counter*, incremented with a plain load and store (not
//!   an atomic add), so an increment lost to an unlocked overlap shows up
//!   at the end as a count other than `K*R`;
//! - each racer's *position*, counted in steps from track 0 of lap 0
//!   (`lap*N + track`). The **order invariant** (no racer both ahead of
//!   and behind another): racers keep their starting order round the ring.
//!   Each time racer `i` enters position `p`, it checks that the racer
//!   after it in that order is strictly ahead and less than a lap ahead
//!   (`p < ahead < p + N`), and the racer before it strictly behind and
//!   less than a lap behind (`p - N < behind < p`), the last racer's
//!   successor being the first one a lap on. A racer that overtook
//!   another, or was lapped by it, fails one of these.
//!
//! The lock file lives in a fresh temporary directory, removed as soon as
//! every racer has it open.

use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use locksfile::{Error, Kind, LockFile, Mode, Wait};
use serde_json::{json, Value};

mod board;
mod waits;

use board::{Board, COLLISIONS, DEADLOCK_RETRIES, ORDER_BREAKS};
use waits::WaitHistogram;
pub use waits::{wait_bucket, WAIT_BUCKETS};

use crate::exit;
use crate::sys::{self, Forked, SharedWords};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RaceMode {
    /// Open-file-description locks only.
    Ofd,
    /// Process-associated locks only.
    Process,
    /// The shared-memory lock table only.
    Shm,
    /// The two kernel modes (ofd, process), one after the other.
    Both,
    /// All three (ofd, process, shm), one after the other.
    All,
}

#[derive(Args, Debug)]
#[command(after_long_help = RACE_NOTES)]
pub struct RaceArgs {
    /// Number of racing processes (K); fewer than the tracks.
    #[arg(short = 'k', long = "procs", value_name = "K", default_value_t = 4)]
    procs: usize,

    /// Number of tracks (locks) in the ring (N).
    #[arg(short = 'n', long = "tracks", value_name = "N", default_value_t = 50)]
    tracks: usize,

    /// Number of rounds each racer runs (R).
    #[arg(short = 'r', long = "rounds", value_name = "R", default_value_t = 100)]
    rounds: u64,

    /// Lock mode(s) to race in.
    #[arg(long, value_enum, default_value_t = RaceMode::All)]
    mode: RaceMode,

    /// Print the results as JSON.
    #[arg(long)]
    json: bool,

    /// Never show a progress bar, even on a terminal.
    #[arg(long)]
    no_progress: bool,

    /// Racers take no locks at all: the verifier must catch them.
    #[arg(long, hide = true)]
    unsafe_skip_locking: bool,

    /// Race over a lock namespace on a PostgreSQL server instead of a
    /// temporary lock file: postgresql://[user@]host[:port]/dbname?name=NAME
    /// (or a key=value string with name=NAME). Each racer is a session of
    /// its own; the namespace should be one nobody else uses.
    #[arg(value_name = "TARGET")]
    target: Option<String>,
}

const RACE_NOTES: &str = "\
Racer i starts on track i*N/K holding its lock. A step takes the next track's
lock, enters that track, leaves the current one and releases its lock; after
R*N steps every racer is back at its start. The racers write what they see in
shared memory while holding the locks, and the race fails (exit 1) when two
racers were ever on one track, a track was not entered exactly K*R times, or a
racer overtook or lapped another (racers must keep their order round the ring).
Prints steps per second and microseconds per step (elapsed time / all steps)
for each mode, and how long the steps' lock takes waited: each racer reads
the clock around every take and counts the wait in log2 buckets of
microseconds (--json: wait_us_histogram, bucket k holding [2^k, 2^(k+1)) us;
p50_us and p99_us are the upper edge of the bucket holding them, max_us exact).";

const MAX_PROCS: usize = 1024;
const MAX_TRACKS: usize = 1 << 20;
const MAX_STEPS: u64 = 1 << 50;

#[derive(Clone, Copy)]
struct Plan {
    procs: usize,
    tracks: usize,
    rounds: u64,
    locking: bool,
}

impl Plan {
    fn steps_per_racer(&self) -> u64 {
        self.rounds * self.tracks as u64
    }
    fn steps(&self) -> u64 {
        self.steps_per_racer() * self.procs as u64
    }
}

/// What one mode's race measured and found.
struct Outcome {
    mode: Mode,
    seconds: f64,
    collisions: u64,
    order_breaks: u64,
    count_errors: u64,
    deadlock_retries: u64,
    racer_failures: u64,
    first_problem: Option<String>,
    /// How long each step's lock take waited, every racer's together.
    waits: WaitHistogram,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.collisions == 0
            && self.order_breaks == 0
            && self.count_errors == 0
            && self.racer_failures == 0
    }
}

pub fn main(args: RaceArgs) -> i32 {
    let plan = Plan {
        procs: args.procs,
        tracks: args.tracks,
        rounds: args.rounds,
        locking: !args.unsafe_skip_locking,
    };
    if let Err(msg) = check_plan(&plan) {
        eprintln!("locksfile race: {msg}");
        return exit::USAGE;
    }
    if let Some(t) = &args.target {
        if !LockFile::is_server_target(t) {
            eprintln!("locksfile race: {t:?} is not a server target (postgresql://...?name=NAME)");
            return exit::USAGE;
        }
    }
    let modes: &[Mode] = match args.mode {
        _ if args.target.is_some() => &[Mode::Postgres],
        RaceMode::Ofd => &[Mode::Ofd],
        RaceMode::Process => &[Mode::Process],
        RaceMode::Shm => &[Mode::Shm],
        RaceMode::Both => &[Mode::Ofd, Mode::Process],
        RaceMode::All => &[Mode::Ofd, Mode::Process, Mode::Shm],
    };
    let progress = !args.no_progress && !args.json && std::io::stderr().is_terminal();
    if !args.json {
        println!(
            "race: {} racers, {} tracks, {} rounds: {} steps per mode{}",
            plan.procs,
            plan.tracks,
            plan.rounds,
            plan.steps(),
            if plan.locking {
                ""
            } else {
                " (WITHOUT LOCKING)"
            }
        );
        println!(
            "{:<8} {:>12} {:>9} {:>12} {:>9}  result",
            "mode", "steps", "seconds", "steps/s", "us/step"
        );
    }
    let mut outcomes = Vec::new();
    for &mode in modes {
        match race(plan, mode, args.target.as_deref(), progress) {
            Ok(o) => {
                if !args.json {
                    print_row(&plan, &o);
                }
                outcomes.push(o);
            }
            Err(msg) => {
                eprintln!("locksfile race: {mode}: {msg}");
                return exit::OSERR;
            }
        }
    }
    let all_ok = outcomes.iter().all(Outcome::ok);
    if args.json {
        println!("{}", to_json(&plan, &outcomes));
    } else if all_ok {
        println!(
            "verified: no track ever held by two racers, order kept, every track entered {} times",
            plan.procs as u64 * plan.rounds
        );
    }
    let broken = outcomes
        .iter()
        .any(|o| o.collisions + o.order_breaks + o.count_errors > 0);
    if broken {
        exit::CONFLICT
    } else if !all_ok {
        exit::SOFTWARE
    } else {
        0
    }
}

fn check_plan(p: &Plan) -> Result<(), String> {
    if p.procs == 0 || p.procs > MAX_PROCS {
        return Err(format!("--procs must be 1..={MAX_PROCS}"));
    }
    if p.tracks < 2 || p.tracks > MAX_TRACKS {
        return Err(format!("--tracks must be 2..={MAX_TRACKS}"));
    }
    if p.procs >= p.tracks {
        return Err(format!(
            "{} racers cannot move hand-over-hand round {} tracks: they would deadlock \
             (use fewer racers than tracks)",
            p.procs, p.tracks
        ));
    }
    if p.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    if p.rounds.saturating_mul(p.tracks as u64) > MAX_STEPS {
        return Err("too many rounds".into());
    }
    Ok(())
}

fn print_row(plan: &Plan, o: &Outcome) {
    let steps = plan.steps() as f64;
    let result = if o.ok() {
        "ok".to_string()
    } else {
        let mut parts = Vec::new();
        for (n, what) in [
            (o.collisions, "collisions"),
            (o.order_breaks, "order breaks"),
            (o.count_errors, "wrong track counts"),
            (o.racer_failures, "failed racers"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        format!("FAILED: {}", parts.join(", "))
    };
    println!(
        "{:<8} {:>12} {:>9.3} {:>12.0} {:>9.3}  {result}",
        o.mode.to_string(),
        plan.steps(),
        o.seconds,
        steps / o.seconds,
        o.seconds * 1e6 / steps
    );
    if let (Some(p50), Some(p99)) = (o.waits.quantile_us(0.5), o.waits.quantile_us(0.99)) {
        println!(
            "         lock waits: p50 <= {p50} us, p99 <= {p99} us, max {} us",
            o.waits.max_us
        );
    }
    if o.deadlock_retries > 0 {
        let who = if o.mode == Mode::Shm {
            "the lock table"
        } else {
            "the kernel"
        };
        println!(
            "         {who} answered EDEADLK {} times; those waits were retried",
            o.deadlock_retries
        );
    }
    if let Some(first) = &o.first_problem {
        println!("         first problem: {first}");
    }
}

fn to_json(plan: &Plan, outcomes: &[Outcome]) -> Value {
    let steps = plan.steps() as f64;
    let modes: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            json!({
                "mode": o.mode.to_string(),
                "steps": plan.steps(),
                "seconds": o.seconds,
                "steps_per_second": steps / o.seconds,
                "us_per_step": o.seconds * 1e6 / steps,
                "collisions": o.collisions,
                "order_breaks": o.order_breaks,
                "count_errors": o.count_errors,
                "deadlock_retries": o.deadlock_retries,
                "racer_failures": o.racer_failures,
                "first_problem": o.first_problem,
                "wait_us_histogram": o.waits.to_json(),
                "ok": o.ok(),
            })
        })
        .collect();
    json!({
        "racers": plan.procs,
        "tracks": plan.tracks,
        "rounds": plan.rounds,
        "locking": plan.locking,
        "modes": modes,
        "ok": outcomes.iter().all(Outcome::ok),
    })
}

/// A fresh private directory for the lock file, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for k in 0..100u32 {
            let p = base.join(format!(
                "locksfile-race-{}-{nanos:x}-{k}",
                std::process::id()
            ));
            match fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary directory name"))
    }

    fn remove(&self) {
        // Best effort: a leftover empty directory in the temp dir is harmless.
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        self.remove();
    }
}

fn race(plan: Plan, mode: Mode, target: Option<&str>, progress: bool) -> Result<Outcome, String> {
    let (dir, path) = match target {
        // Each racer connects in its own process, after the fork.
        Some(_) => (None, PathBuf::new()),
        None => {
            let dir = TempDir::new().map_err(|e| format!("temporary directory: {e}"))?;
            let path = dir.0.join("race.lock");
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| format!("creating {}: {e}", path.display()))?;
            (Some(dir), path)
        }
    };
    if let Some(t) = target {
        // Fail early (and once) on a target that does not work.
        LockFile::connect(t).map_err(|e| e.to_string())?;
    }
    let region = SharedWords::new(Board::words_for(plan.procs, plan.tracks))
        .map_err(|e| format!("shared memory: {e}"))?;
    let board = Board {
        w: region.words(),
        procs: plan.procs,
        tracks: plan.tracks as u64,
    };
    let (ready_r, ready_w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (go_r, go_w) = sys::pipe().map_err(|e| format!("pipe: {e}"))?;

    // Flush before forking so no child holds a copy of buffered output.
    let _ = std::io::stdout().flush();
    let mut pids = Vec::with_capacity(plan.procs);
    for racer in 0..plan.procs {
        match sys::fork() {
            Ok(Forked::Child) => {
                drop(go_w);
                drop(ready_r);
                // Nothing may unwind out of here into the parent's code.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_racer(&plan, mode, &board, racer, (&path, target), ready_w, go_r)
                }));
                let code = match result {
                    Ok(Ok(())) => 0,
                    Ok(Err(msg)) => {
                        board.note(None, || format!("racer {racer} failed: {msg}"));
                        exit::SOFTWARE
                    }
                    Err(_) => {
                        board.note(None, || format!("racer {racer} panicked"));
                        exit::SOFTWARE
                    }
                };
                sys::exit_now(code);
            }
            Ok(Forked::Parent(pid)) => pids.push(pid),
            Err(e) => {
                stop(&pids);
                return Err(format!("fork: {e}"));
            }
        }
    }
    drop(ready_w);
    drop(go_r);

    // Every racer holds its starting track once it has written its byte.
    let mut ready_r = fs::File::from(ready_r);
    let mut got = 0;
    let mut buf = [0u8; 64];
    while got < plan.procs {
        match ready_r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got < plan.procs {
        stop(&pids);
        return Err(board
            .first_message()
            .unwrap_or_else(|| "a racer died before the start".into()));
    }
    if let Some(dir) = &dir {
        dir.remove();
    }

    let done = AtomicBool::new(false);
    let started = Instant::now();
    drop(go_w); // the start: every racer's read returns end-of-file
    let (failures, elapsed) = std::thread::scope(|s| {
        if progress {
            s.spawn(|| show_progress(&plan, mode, &board, &done, started));
        }
        let mut failures = 0;
        for &pid in &pids {
            match sys::wait_pid(pid) {
                Ok(status) if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 => {}
                Ok(status) => {
                    failures += 1;
                    if libc::WIFSIGNALED(status) {
                        let sig = libc::WTERMSIG(status);
                        board.note(None, || format!("racer pid {pid} killed by signal {sig}"));
                    }
                }
                Err(_) => failures += 1,
            }
        }
        let elapsed = started.elapsed();
        done.store(true, Ordering::Release);
        (failures, elapsed)
    });

    // The counts are only known when every racer ran to the end.
    let expected = plan.procs as u64 * plan.rounds;
    let mut count_errors = 0;
    for t in (0..plan.tracks as u64).filter(|_| failures == 0) {
        let c = board.counter(t).load(Ordering::Acquire);
        if c != expected {
            count_errors += 1;
            board.note(None, || {
                format!("track {t} was entered {c} times, not {expected}")
            });
        }
    }
    for r in (0..plan.procs).filter(|_| failures == 0) {
        let end = board.start_of(r) + plan.steps_per_racer();
        let at = board.pos(r).load(Ordering::Acquire);
        if at != end {
            count_errors += 1;
            board.note(None, || {
                format!("racer {r} stopped at position {at}, not {end}")
            });
        }
    }
    Ok(Outcome {
        mode,
        seconds: elapsed.as_secs_f64().max(1e-9),
        collisions: board.w[COLLISIONS].load(Ordering::Acquire),
        order_breaks: board.w[ORDER_BREAKS].load(Ordering::Acquire),
        count_errors,
        deadlock_retries: board.w[DEADLOCK_RETRIES].load(Ordering::Acquire),
        racer_failures: failures,
        first_problem: board.first_message(),
        waits: board.all_waits(),
    })
}

fn stop(pids: &[libc::pid_t]) {
    for &pid in pids {
        let _ = sys::kill(pid, libc::SIGKILL);
    }
    for &pid in pids {
        let _ = sys::wait_pid(pid);
    }
}

/// One racer, in its own forked process.
fn run_racer(
    plan: &Plan,
    mode: Mode,
    board: &Board,
    racer: usize,
    (path, target): (&Path, Option<&str>),
    ready_w: OwnedFd,
    go_r: OwnedFd,
) -> Result<(), String> {
    let lf = match target {
        Some(t) => LockFile::connect(t),
        None => LockFile::options().mode(mode).create(false).open(path),
    }
    .map_err(|e| e.to_string())?;
    let n = plan.tracks as u64;
    let lock = |at: u64| -> Result<(), String> {
        if !plan.locking {
            return Ok(());
        }
        loop {
            match lf.acquire(Kind::Exclusive, at % n, Wait::Blocking) {
                Ok(()) => return Ok(()),
                // Process-lock deadlock detection can be wrong about
                // hand-over-hand chains that are still moving; try again
                // (counted, so a detector that cries wolf shows).
                Err(Error::Deadlock { .. }) => {
                    board.w[DEADLOCK_RETRIES].fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(format!("locking track {}: {e}", at % n)),
            }
        }
    };
    let unlock = |at: u64| -> Result<(), String> {
        if !plan.locking {
            return Ok(());
        }
        lf.release(at % n)
            .map_err(|e| format!("releasing track {}: {e}", at % n))
    };

    let start = board.start_of(racer);
    lock(start)?;
    board.enter(racer, start, false);
    let mut ready = fs::File::from(ready_w);
    ready.write_all(b"r").map_err(|e| e.to_string())?;
    drop(ready);
    let mut go = fs::File::from(go_r);
    let mut b = [0u8; 1];
    while go.read(&mut b).map_err(|e| e.to_string())? != 0 {}
    drop(go);

    // Two reads of the vDSO clock per step, against the microseconds a
    // contended step takes; recorded in a private histogram, written to
    // the board once at the end.
    let mut waits = WaitHistogram::default();
    let mut at = start;
    for _ in 0..plan.steps_per_racer() {
        let next = at + 1;
        let asked = Instant::now();
        lock(next)?;
        waits.record(asked.elapsed());
        board.enter(racer, next, true);
        board.check_order(racer, next);
        board.leave(racer, at);
        unlock(at)?;
        at = next;
    }
    board.leave(racer, at);
    unlock(at)?;
    board.put_waits(racer, &waits);
    Ok(())
}

fn show_progress(plan: &Plan, mode: Mode, board: &Board, done: &AtomicBool, started: Instant) {
    const WIDTH: usize = 30;
    let total = plan.steps().max(1);
    let mut drawn = false;
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        // Short runs finish before a bar would be worth reading.
        if started.elapsed() < Duration::from_millis(800) || done.load(Ordering::Acquire) {
            continue;
        }
        let steps: u64 = (0..plan.procs)
            .map(|r| {
                board
                    .pos(r)
                    .load(Ordering::Relaxed)
                    .saturating_sub(board.start_of(r))
            })
            .sum();
        let frac = (steps as f64 / total as f64).min(1.0);
        let fill = (frac * WIDTH as f64) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{mode:<8} [{}{}] {:>5.1}% {steps}/{total} steps",
            "#".repeat(fill),
            "-".repeat(WIDTH - fill),
            frac * 100.0
        );
        let _ = err.flush();
        drawn = true;
    }
    if drawn {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_that_cannot_run_are_refused() {
        let plan = |procs, tracks, rounds| Plan {
            procs,
            tracks,
            rounds,
            locking: true,
        };
        assert!(check_plan(&plan(4, 50, 100)).is_ok());
        assert!(check_plan(&plan(1, 2, 1)).is_ok());
        assert!(check_plan(&plan(4, 4, 1)).is_err());
        assert!(check_plan(&plan(0, 4, 1)).is_err());
        assert!(check_plan(&plan(1, 1, 1)).is_err());
        assert!(check_plan(&plan(1, 4, 0)).is_err());
    }
}
