//! `locksfile run`: hold a lock for exactly the lifetime of a command.
//!
//! This process takes the lock, starts the command, waits for it and only
//! then releases. The lock descriptor is close-on-exec, so the command does
//! not own the lock: in OFD and flock mode the lock belongs to this
//! process's open file description, in process mode to this process, in shm
//! mode to this process's handle of the lock table. Whatever the command
//! does with the file, or however it ends, the lock goes away when this
//! process has seen it end (or when this process itself dies).
//!
//! Two `flock(1)` forms work otherwise: `-F` execs the command in this
//! process, which then holds the lock itself, and the descriptor form
//! (`locksfile run 9`, no command) locks a descriptor the caller opened
//! and leaves the lock with the caller's open file description.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use locksfile::{Error, Kind, LockFile, Mode, Span, Wait};

use crate::{exit, procfs, span_arg, sys};

/// Lock mode on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Open-file-description locks (F_OFD_SETLK): owned by this run's open file.
    Ofd,
    /// Classic POSIX record locks (F_SETLK): owned by this process.
    Process,
    /// flock(2) on the whole file, as flock(1) takes it: owned by this run's open file.
    Flock,
    /// A shared-memory lock table in FILE-shm beside FILE: owned by this run's handle.
    Shm,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Ofd => Mode::Ofd,
            ModeArg::Process => Mode::Process,
            ModeArg::Flock => Mode::Flock,
            ModeArg::Shm => Mode::Shm,
        }
    }
}

#[derive(Args, Debug)]
#[command(after_long_help = RUN_NOTES)]
pub struct RunArgs {
    /// Take a shared (read) lock.
    #[arg(short = 's', long, conflicts_with = "exclusive")]
    shared: bool,

    /// Take an exclusive (write) lock (the default; -e is the same, as in flock(1)).
    #[arg(short = 'x', long, short_alias = 'e')]
    exclusive: bool,

    /// Release the span on descriptor FD instead of locking it (descriptor form only).
    #[arg(
        short = 'u',
        long,
        conflicts_with_all = ["shared", "exclusive", "nonblock", "timeout", "no_fork"]
    )]
    unlock: bool,

    /// Lock indices to take: N, A..B, A..=B, A.. (to the end) or .. (all).
    #[arg(
        short = 'i',
        long = "index",
        visible_alias = "span",
        value_name = "SPAN",
        value_parser = span_arg::parse,
        allow_hyphen_values = true,
        conflicts_with_all = ["start", "count"]
    )]
    span: Option<Span>,

    /// First lock index (with --count; the same as --index START..START+COUNT).
    #[arg(long, value_name = "N")]
    start: Option<u64>,

    /// Number of lock indices from --start (default 1).
    #[arg(long, value_name = "M", requires = "start")]
    count: Option<u64>,

    /// Fail at once if the lock is held (exit with the -E code).
    #[arg(short = 'n', long = "nonblock", visible_alias = "nb")]
    nonblock: bool,

    /// Give up after SECS seconds (fractions allowed; 0 = --nonblock; inf = no limit).
    #[arg(
        short = 'w',
        long = "timeout",
        visible_alias = "wait",
        value_name = "SECS",
        value_parser = parse_secs
    )]
    timeout: Option<Duration>,

    /// Exit code when the lock is busy or the timeout passes.
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "N",
        default_value_t = 1
    )]
    conflict_exit_code: u8,

    /// Lock mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Ofd)]
    mode: ModeArg,

    /// Run CMD with `/bin/sh -c CMD` instead of a COMMAND and its arguments.
    #[arg(
        short = 'c',
        long = "command",
        value_name = "CMD",
        conflicts_with = "command"
    )]
    shell_command: Option<OsString>,

    /// Close the lock descriptor before running the command: always done
    /// (it is close-on-exec); accepted for flock(1) compatibility.
    #[arg(short = 'o', long, conflicts_with = "no_fork")]
    close: bool,

    /// Exec the command in this process instead of forking: the command
    /// itself then holds the lock (on an inherited descriptor) until it ends.
    #[arg(short = 'F', long = "no-fork")]
    no_fork: bool,

    /// Lock the file a symbolic link at FILE points to (refused otherwise).
    #[arg(short = 'L', long = "follow-symlinks")]
    follow_symlinks: bool,

    /// Say on stderr what is waited for, who holds it, and how long it took.
    #[arg(short, long)]
    verbose: bool,

    /// The lock file (created if missing; its content is never touched),
    /// or with no command, the number of an open descriptor to lock; or a
    /// lock namespace on a PostgreSQL server:
    /// postgresql://[user@]host[:port]/dbname?name=NAME, or a libpq
    /// key=value string with a name=NAME word (a file named like one is
    /// given as ./NAME).
    #[arg(value_name = "FILE|FD")]
    file: PathBuf,

    /// The command and its arguments; options after it are its own.
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 1..
    )]
    command: Vec<OsString>,
}

const RUN_NOTES: &str = "\
The span defaults to lock index 0; use --index .. for the whole index space.
With no index (no -i, no --start) in the default mode, run also locks the
whole file with flock(2), as flock(1) does: flock(2) first, through an open
file description of its own, then the OFD lock on index 0, released in
reverse; -n and -w apply to both (a refusal of the second gives back the
first). It so keeps out flock(1) and other flock(2) users both ways, and
byte-range users of index 0. An index given, or --mode flock, takes only
the one lock. The descriptor form takes only the lock of its mode.
--mode flock locks the whole file, as flock(1) does, and so excludes flock(1)
and other flock(2) users; its span is always .. (any other is a usage error).
--mode shm keeps the locks in a shared-memory table, the file FILE-shm beside
FILE (created like FILE; everyone locking FILE must be able to write it), and
excludes only other shm users: FILE in use with fcntl or flock locks is refused,
as is FILE in another mode while the table is in use (exit 69). It detects
deadlocks (exit 1, as a conflict) and grants in order. Neither -F nor the
descriptor form can hand a shm lock over: it lives in this process.

The lock belongs to this locksfile process, not to COMMAND: the lock's file
descriptor is close-on-exec, so COMMAND never holds it and cannot release it.
It is released when COMMAND has ended, however it ended. Signals sent to this
process (TERM, INT, HUP, QUIT, USR1, USR2) are passed on to COMMAND, and if this
process is killed outright, COMMAND is killed too, so it never runs unlocked.
With -F (--no-fork) locksfile execs COMMAND instead, which then holds the lock
on an inherited descriptor until it and its children have closed it.

With a descriptor number and no command (`( locksfile run -n 9 || exit 1;
...; ) 9>file`), the lock is taken on the caller's open file description
and stays when locksfile exits, until -u releases it or the last descriptor
of it is closed. OFD and flock mode only: a process-mode or shm lock would
die with locksfile.

A shared lock (-s) opens FILE read-only, as flock(1) does.

Exit status:
  the command's own status, or 128+N when it was killed by signal N
  1 (or -E N)  the lock was busy (-n) or the timeout (-w) passed
  64           usage error: unknown option, bad span or number, no command
  66           FILE cannot be opened, or is a directory, FIFO or other non-file,
               or descriptor FD is not open or not a regular file, or FILE-shm
               is not a lock table this version can use
  69           COMMAND cannot be started (not found, not executable); FILE is in
               use with locks of another mode; shm mode on a network file system
  71           a system call failed (fork, memory, descriptors); the shm table is full
  73           FILE cannot be created (read-only file system, no space)
  77           an exclusive lock on a file that can only be opened read-only
               (or a read-only FD), a shared one on a write-only FD";

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if secs.is_nan() || secs < 0.0 {
        return Err(format!("'{s}' is not a number of seconds >= 0"));
    }
    // Longer than a Duration holds (`inf`, `1e30`): no limit at all.
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

pub fn main(args: RunArgs) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err((code, msg)) => {
            eprintln!("locksfile: {msg}");
            code
        }
    }
}

fn run(args: RunArgs) -> Result<i32, (i32, String)> {
    let given = match args.start {
        Some(start) => Some(
            span_arg::from_start_count(start, args.count)
                .map_err(|e| (exit::USAGE, format!("bad span: {e}")))?,
        ),
        None => args.span,
    };
    let span = match (args.mode, given) {
        // flock(2) has no ranges: the whole file is the only span, and any
        // other is refused before the file is even opened.
        (ModeArg::Flock, None | Some(Span::ALL)) => Span::ALL,
        (ModeArg::Flock, Some(_)) => {
            let e = Error::InvalidSpan(locksfile::SpanError::NotWholeFile);
            return Err((exit::USAGE, format!("bad span: {e}")));
        }
        (_, given) => given.unwrap_or_else(|| Span::new(0, 1).expect("0..1 is a span")),
    };
    let kind = if args.shared {
        Kind::Shared
    } else {
        Kind::Exclusive
    };
    let wait = match args.timeout {
        _ if args.nonblock => Wait::NonBlocking,
        Some(d) if d.is_zero() => Wait::NonBlocking,
        // A timeout that ends past what the clock can hold is no limit.
        Some(d) if Instant::now().checked_add(d).is_none() => Wait::Blocking,
        Some(d) => Wait::Timeout(d),
        None => Wait::Blocking,
    };
    let conflict = i32::from(args.conflict_exit_code);
    if args.no_fork && args.mode == ModeArg::Shm {
        // The lock lives in this process's handle of the table (its
        // liveness lock and mapping), which an exec would end.
        return Err((
            exit::USAGE,
            "-F cannot hand a shm lock to COMMAND: it belongs to this process's handle of \
             the lock table, which exec ends (drop -F, or use --mode ofd)"
                .into(),
        ));
    }

    let server = args
        .file
        .to_str()
        .filter(|f| LockFile::is_server_target(f))
        .map(str::to_string);
    if server.is_some() {
        if args.mode != ModeArg::Ofd {
            return Err((
                exit::USAGE,
                "--mode applies to lock files: a PostgreSQL target has its own mode".into(),
            ));
        }
        if args.no_fork || args.unlock {
            return Err((
                exit::USAGE,
                "--no-fork and descriptors need a lock file: a PostgreSQL session belongs to \
                 this process"
                    .into(),
            ));
        }
    }

    let argv: Vec<OsString> = match &args.shell_command {
        Some(cmd) => vec!["/bin/sh".into(), "-c".into(), cmd.clone()],
        None => args.command.clone(),
    };
    if argv.is_empty() {
        let Some(fd) = descriptor(&args.file).filter(|_| server.is_none()) else {
            return Err((
                exit::USAGE,
                "no COMMAND to run: give one (or -c CMD), or a descriptor number instead of FILE"
                    .into(),
            ));
        };
        return lock_descriptor(&args, fd, span, kind, wait, conflict);
    }
    if args.unlock {
        return Err((
            exit::USAGE,
            "-u releases a lock held on a descriptor: locksfile run -u FD, with no command".into(),
        ));
    }

    let (lf, shown) = match &server {
        Some(target) => {
            let lf = LockFile::options()
                .write(kind == Kind::Exclusive)
                .connect(target)
                .map_err(|e| (exit::for_lock_error(&e), e.to_string()))?;
            // Never the password: the handle's own form of the target.
            let shown = lf.path().display().to_string();
            (lf, shown)
        }
        None => (open_file(&args, kind)?, args.file.display().to_string()),
    };
    // With no index in the default mode the whole file is locked as
    // flock(1) locks it as well: flock(2) first, through an open file
    // description of its own, then the OFD range, always in this order
    // (released in reverse), under one patience.
    let whole = server.is_none() && args.mode == ModeArg::Ofd && given.is_none();
    let deadline = match wait {
        Wait::Timeout(d) => Instant::now().checked_add(d),
        _ => None,
    };
    let flock = if whole {
        let fl = open_flock_beside(&lf, &args, kind)?;
        let shown = format!("{shown} (flock(2), whole file)");
        if !take(&fl, &args, &shown, kind, Span::ALL, wait)? {
            return Ok(conflict);
        }
        Some(fl)
    } else {
        None
    };
    let wait = match deadline {
        // The second take gets what is left of the same patience.
        Some(end) if flock.is_some() => match end.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Wait::Timeout(left),
            _ => Wait::NonBlocking,
        },
        _ => wait,
    };
    if !take(&lf, &args, &shown, kind, span, wait)? {
        // Dropping the flock handle gives the first lock back.
        drop(flock);
        return Ok(conflict);
    }
    run_locked(&args, lf, flock, argv)
}

/// A second handle on the file `lf` has open, in flock mode, with an open
/// file description of its own (opened again through `/proc/self/fd`, so
/// it is the same file even if FILE was renamed or replaced meanwhile).
fn open_flock_beside(lf: &LockFile, args: &RunArgs, kind: Kind) -> Result<LockFile, (i32, String)> {
    let again = PathBuf::from(format!("/proc/self/fd/{}", lf.as_fd().as_raw_fd()));
    LockFile::options()
        .mode(Mode::Flock)
        .write(kind == Kind::Exclusive)
        // The /proc link is the one to follow; FILE itself was checked
        // when it was opened.
        .follow_symlinks(true)
        .open(&again)
        .map_err(|e| (exit::for_lock_error(&e), open_message(&args.file, &e)))
}

fn open_file(args: &RunArgs, kind: Kind) -> Result<LockFile, (i32, String)> {
    LockFile::options()
        .mode(args.mode.into())
        // Shared locks need no write access: open read-only, as flock(1)
        // does, so a file we may only read (another user's, or a script
        // locking itself) is never opened for writing.
        .write(kind == Kind::Exclusive)
        .follow_symlinks(args.follow_symlinks)
        .open(&args.file)
        .map_err(|e| (exit::for_lock_error(&e), open_message(&args.file, &e)))
}

/// Run the command with the lock held, and release it once it ended.
fn run_locked(
    args: &RunArgs,
    lf: LockFile,
    flock: Option<LockFile>,
    argv: Vec<OsString>,
) -> Result<i32, (i32, String)> {
    let program = &argv[0];
    let cannot_run = |e: std::io::Error| {
        // Out of processes, memory or descriptors is our failure, not the
        // command's.
        let code = match e.raw_os_error() {
            Some(libc::ENOMEM | libc::EAGAIN | libc::EMFILE | libc::ENFILE) => exit::OSERR,
            _ => exit::UNAVAILABLE,
        };
        (
            code,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        )
    };
    let mut command = Command::new(program);
    command.args(&argv[1..]);

    if args.no_fork {
        // The command replaces this process and must hold the lock itself:
        // its descriptor has to survive the exec. In process mode too, as
        // POSIX locks survive exec but an exec that closes a descriptor of
        // the file drops them all.
        for held in std::iter::once(&lf).chain(flock.as_ref()) {
            sys::clear_cloexec(held.as_fd()).map_err(|e| (exit::OSERR, format!("fcntl: {e}")))?;
        }
        let e = command.exec();
        // Only a failed exec returns; the lock is released as usual.
        return Err(cannot_run(e));
    }

    // From here a signal sent to this process goes to the command, which
    // ends it, and the lock is released when we have seen it end.
    sys::catch_forwarded_signals().map_err(|e| (exit::OSERR, format!("sigaction: {e}")))?;
    if let Some(sig) = sys::pending_signal() {
        return Ok(128 + sig);
    }
    sys::kill_with_parent(&mut command);
    let mut child = command.spawn().map_err(cannot_run)?;
    sys::forward_to(child.id() as libc::pid_t);
    let status = child
        .wait()
        .map_err(|e| (exit::OSERR, format!("waiting for the command: {e}")))?;
    if let Err(e) = lf.release_all() {
        eprintln!("locksfile: releasing the lock: {e}");
    }
    drop(lf);
    // The flock(2) lock, taken first, goes last.
    if let Some(fl) = flock {
        if let Err(e) = fl.release_all() {
            eprintln!("locksfile: releasing the flock(2) lock: {e}");
        }
    }
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => exit::OSERR,
    })
}

/// FILE as a descriptor number, as `flock(1)` reads a lone number with no
/// command (name a file `9` as `./9`).
fn descriptor(file: &Path) -> Option<RawFd> {
    let s = file.to_str()?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The descriptor form: lock (or with `-u`, unlock) the caller's descriptor
/// `fd` and exit, leaving the lock with the caller's open file description.
fn lock_descriptor(
    args: &RunArgs,
    fd: RawFd,
    span: Span,
    kind: Kind,
    wait: Wait,
    conflict: i32,
) -> Result<i32, (i32, String)> {
    if matches!(args.mode, ModeArg::Process | ModeArg::Shm) {
        let mode = if args.mode == ModeArg::Process {
            "process"
        } else {
            "shm"
        };
        return Err((
            exit::USAGE,
            format!(
                "--mode {mode} cannot lock descriptor {fd} for the caller: a {mode}-mode \
                 lock belongs to locksfile and ends when it exits (use --mode ofd)"
            ),
        ));
    }
    if args.no_fork {
        return Err((exit::USAGE, "-F needs a command to run".into()));
    }
    let shown = format!("descriptor {fd}");
    // A duplicate shares the caller's open file description, which is what
    // OFD locks belong to; the caller's own descriptor is left as it is.
    let dup = sys::dup_cloexec(fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => (exit::NOINPUT, format!("{shown} is not open")),
        _ => (exit::OSERR, format!("duplicating {shown}: {e}")),
    })?;
    let lf = LockFile::options()
        .mode(args.mode.into())
        .write(kind == Kind::Exclusive && !args.unlock)
        .open_fd(dup)
        .map_err(|e| (exit::for_lock_error(&e), format!("{shown}: {e}")))?;
    if args.unlock {
        // The handle knows nothing of what the description holds, so the
        // unlock goes straight to the kernel.
        let unlocked = match args.mode {
            ModeArg::Flock => sys::flock_unlock(lf.as_fd()),
            _ => sys::ofd_unlock(lf.as_fd(), span.start(), span.end()),
        };
        unlocked.map_err(|e| (exit::OSERR, format!("unlocking {shown}: {e}")))?;
        return Ok(0);
    }
    // A read lock needs a readable descriptor (fcntl answers EBADF;
    // flock(2) minds no access mode): refused like an exclusive lock on a
    // read-only one.
    if args.mode != ModeArg::Flock
        && kind == Kind::Shared
        && sys::is_write_only(lf.as_fd()).unwrap_or(false)
    {
        return Err((
            exit::NOPERM,
            format!(
                "{shown} is open write-only: a shared lock needs it readable (9<file or 9<>file)"
            ),
        ));
    }
    if !take(&lf, args, &shown, kind, span, wait)? {
        return Ok(conflict);
    }
    // The lock is the caller's now: it must outlive this process. Dropping
    // the handle would unlock it (OFD handles release what they took), so
    // the handle is leaked instead; exiting closes our duplicate, which
    // leaves the lock with the caller's descriptors of the description.
    std::mem::forget(lf);
    Ok(0)
}

/// Take the lock, saying what happens with `-v`. `Ok(false)`: busy or
/// timed out (already reported).
fn take(
    lf: &LockFile,
    args: &RunArgs,
    shown: &str,
    kind: Kind,
    span: Span,
    wait: Wait,
) -> Result<bool, (i32, String)> {
    let started = Instant::now();
    if args.verbose {
        let how = match wait {
            Wait::NonBlocking => "without waiting".to_string(),
            Wait::Timeout(d) => format!("waiting up to {} s", d.as_secs_f64()),
            _ => "waiting as long as it takes".to_string(),
        };
        eprintln!("locksfile: taking {kind} lock on {span} of {shown}, {how}");
    }
    if let Err(e) = lf.acquire(kind, span, wait) {
        return match e {
            Error::WouldBlock { .. } | Error::TimedOut { .. } | Error::Deadlock { .. } => {
                if args.verbose || matches!(e, Error::Deadlock { .. }) {
                    eprintln!("locksfile: {shown}: {e}");
                }
                if args.verbose {
                    if lf.mode() == Mode::Postgres {
                        if let Ok(Some(h)) = lf.conflicts(kind, span) {
                            eprintln!("locksfile:   {h}");
                        }
                    } else {
                        name_holders(lf.path(), lf.mode(), span, kind);
                    }
                }
                Ok(false)
            }
            e => Err((exit::for_lock_error(&e), format!("{shown}: {e}"))),
        };
    }
    if args.verbose {
        eprintln!(
            "locksfile: got {kind} lock on {span} of {shown} after {:.3} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(true)
}

/// Say who holds what is in the way (OFD holders are found through
/// `/proc`, which the kernel's own answer does not name; shm holders in
/// the table).
fn name_holders(file: &std::path::Path, mode: Mode, span: Span, kind: Kind) {
    let Ok(meta) = std::fs::metadata(file) else {
        return;
    };
    let id = procfs::FileId::of(&meta);
    let Ok(mut locks) = procfs::locks_on(id) else {
        return;
    };
    // A shm table's locks are in the table, not in /proc/locks.
    locks.extend(procfs::shm_locks_on(file, id).unwrap_or_default());
    // Only the locks of the table this mode locks in are in its way.
    let in_the_way = |class: procfs::Class| match mode {
        Mode::Flock => class == procfs::Class::Flock,
        Mode::Shm => class == procfs::Class::Shm,
        _ => matches!(class, procfs::Class::Posix | procfs::Class::Ofd),
    };
    for f in locks
        .iter()
        .filter(|f| !f.line.waiting && in_the_way(f.line.class))
    {
        let end = f
            .line
            .last
            .map_or(locksfile::INDEX_END, |l| l.saturating_add(1));
        let overlaps = f.line.start < span.end() && span.start() < end;
        if !overlaps || (kind == Kind::Shared && !f.line.exclusive) {
            continue;
        }
        let what = if f.line.exclusive {
            "exclusive"
        } else {
            "shared"
        };
        let shown = Span::new(f.line.start, end.min(locksfile::INDEX_END))
            .map(|s| s.to_string())
            .unwrap_or_else(|_| format!("{}..", f.line.start));
        let who = if f.procs.is_empty() {
            "an unknown process".to_string()
        } else {
            f.procs
                .iter()
                .map(|p| {
                    let command = p.command.as_deref().unwrap_or("?");
                    match &p.wraps {
                        Some(w) => format!("pid {} ({command} running {w})", p.pid),
                        None => format!("pid {} ({command})", p.pid),
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        eprintln!(
            "locksfile:   {what} {} lock on {shown} held by {who}",
            f.line.class.name()
        );
    }
}

/// The message for a lock file that could not be opened.
pub fn open_message(path: &std::path::Path, e: &Error) -> String {
    match e {
        // Both name the path already.
        Error::NotRegularFile { .. }
        | Error::Open { .. }
        | Error::Sidecar { .. }
        | Error::TableFull { .. }
        | Error::MixedModes { .. }
        | Error::NetworkFileSystem { .. } => e.to_string(),
        Error::Io { source, .. } => format!("cannot open lock file {}: {source}", path.display()),
        e => format!("{}: {e}", path.display()),
    }
}
