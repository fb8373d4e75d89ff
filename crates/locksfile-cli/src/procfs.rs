//! Reading locks and their owners out of `/proc`, the way `lslocks(8)` does.
//!
//! `/proc/locks` lists every lock on the system, one a line:
//!
//! ```text
//! 1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 EOF
//! 1: -> POSIX  ADVISORY  WRITE 1240 fe:00:5678 0 0
//! 2: OFDLCK ADVISORY  READ  -1 fe:00:5678 3 4
//! ```
//!
//! (id, `->` for a waiter blocked behind lock `id`, class, type, access,
//! pid, device major:minor in hex and inode, first and last byte or `EOF`).
//! OFD locks show pid -1: their holders are found in
//! `/proc/PID/fdinfo/FD`, which lists the locks taken through that open
//! file as `lock:\t` followed by the same format. A blocked OFD waiter is
//! found by the system call it sleeps in (`/proc/PID/task/TID/syscall`):
//! `fcntl(fd, F_OFD_SETLKW, &flock)` on a descriptor of the file, with the
//! range read from its memory.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

/// The lock classes `/proc/locks` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Process-associated `fcntl` record lock.
    Posix,
    /// Open-file-description lock.
    Ofd,
    /// `flock(2)` whole-file lock.
    Flock,
    /// A lock in the file's shared-memory lock table (`--mode shm`), which
    /// `/proc/locks` never shows.
    Shm,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Posix => "POSIX",
            Class::Ofd => "OFD",
            Class::Flock => "FLOCK",
            Class::Shm => "SHM",
        }
    }
}

/// One line of `/proc/locks` (or an fdinfo `lock:` line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockLine {
    pub id: u64,
    /// A waiter blocked behind lock `id`, not a held lock.
    pub waiting: bool,
    pub class: Class,
    /// `WRITE` (else `READ`).
    pub exclusive: bool,
    /// The pid field; `-1` for OFD locks.
    pub pid: i64,
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive; `None` for `EOF` (to the end).
    pub last: Option<u64>,
}

impl LockLine {
    /// Parse one line; `None` for leases, delegations and anything unknown.
    pub fn parse(line: &str) -> Option<LockLine> {
        let mut t = line.split_whitespace();
        let id = t.next()?.strip_suffix(':')?.parse().ok()?;
        let mut class = t.next()?;
        let waiting = class == "->";
        if waiting {
            class = t.next()?;
        }
        let class = match class {
            "POSIX" => Class::Posix,
            "OFDLCK" => Class::Ofd,
            "FLOCK" => Class::Flock,
            _ => return None,
        };
        let _advisory = t.next()?;
        let exclusive = match t.next()? {
            "WRITE" => true,
            "READ" => false,
            _ => return None,
        };
        let pid = t.next()?.parse().ok()?;
        let mut dev = t.next()?.split(':');
        let major = u32::from_str_radix(dev.next()?, 16).ok()?;
        let minor = u32::from_str_radix(dev.next()?, 16).ok()?;
        let ino = dev.next()?.parse().ok()?;
        let start = t.next()?.parse().ok()?;
        let last = match t.next()? {
            "EOF" => None,
            n => Some(n.parse().ok()?),
        };
        Some(LockLine {
            id,
            waiting,
            class,
            exclusive,
            pid,
            major,
            minor,
            ino,
            start,
            last,
        })
    }

    fn same_lock(&self, other: &LockLine) -> bool {
        self.class == other.class
            && self.exclusive == other.exclusive
            && (self.major, self.minor, self.ino) == (other.major, other.minor, other.ino)
            && self.start == other.start
            && self.last == other.last
    }
}

/// Device and inode of a file, as `/proc/locks` prints them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &fs::Metadata) -> FileId {
        FileId {
            major: libc::major(meta.dev()),
            minor: libc::minor(meta.dev()),
            ino: meta.ino(),
        }
    }

    fn matches(&self, l: &LockLine) -> bool {
        (l.major, l.minor, l.ino) == (self.major, self.minor, self.ino)
    }
}

/// A process: pid and command name (`None` when it could not be read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub command: Option<String>,
    /// For a `locksfile run` holder, the command line of the command it
    /// runs (its child), shell-quoted.
    pub wraps: Option<String>,
}

impl Proc {
    pub(crate) fn new(pid: u32) -> Proc {
        let command = fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_string());
        let wraps = if command.as_deref() == Some("locksfile") {
            wrapped_command(pid)
        } else {
            None
        };
        Proc {
            pid,
            command,
            wraps,
        }
    }
}

/// The command line of the command `locksfile run` process `pid` runs:
/// its child, the one process whose parent it is (a `run` starts one).
fn wrapped_command(pid: u32) -> Option<String> {
    let argv = cmdline(pid)?;
    if argv.get(1).map(String::as_str) != Some("run") {
        return None;
    }
    let child = children(pid).into_iter().next()?;
    let argv = cmdline(child)?;
    Some(
        argv.iter()
            .map(|a| shell_quoted(a))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!argv.is_empty()).then_some(argv)
}

/// Children of `pid`: from `/proc/PID/task/*/children` where the kernel
/// has it, else by the parent pid in every `/proc/*/stat`.
fn children(pid: u32) -> Vec<u32> {
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        let mut found = Vec::new();
        let mut readable = false;
        for t in tasks.flatten() {
            if let Ok(list) = fs::read_to_string(t.path().join("children")) {
                readable = true;
                found.extend(
                    list.split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        if readable {
            return found;
        }
    }
    pids()
        .into_iter()
        .filter(|&c| {
            // Field 4 of stat, after the command name in parentheses.
            fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = &st[st.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// `arg` as a POSIX shell reads it back: bare when it is only safe
/// characters, else in single quotes.
fn shell_quoted(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A lock on the file, with the processes found behind it.
#[derive(Clone, Debug)]
pub struct Found {
    pub line: LockLine,
    /// Empty when nobody could be named ("unknown").
    pub procs: Vec<Proc>,
    /// A shm lock's owner (a handle), as the table numbers them.
    pub table_owner: Option<u64>,
}

/// Whether `line` is the in-use marker of a shm table's user: not a lock
/// of anyone's (the table's locks are read from the table).
pub fn is_shm_marker(line: &LockLine) -> bool {
    let at = locksfile::shm::IN_USE_BYTE;
    line.class == Class::Ofd
        && !line.exclusive
        && !line.waiting
        && line.start == at
        // The kernel shows a lock on the last byte as running to `EOF`.
        && line.last.is_none_or(|last| last == at)
}

/// Every lock and waiter on `file`, with their processes.
pub fn locks_on(file: FileId) -> std::io::Result<Vec<Found>> {
    let lines = lines_on(file)?;
    let mut found: Vec<Found> = lines
        .into_iter()
        .filter(|line| !is_shm_marker(line))
        .map(|line| {
            let procs = match u32::try_from(line.pid) {
                Ok(pid) if pid > 0 => vec![Proc::new(pid)],
                _ => Vec::new(),
            };
            Found {
                line,
                procs,
                table_owner: None,
            }
        })
        .collect();

    let ofd_held = found
        .iter()
        .any(|f| matches!(f.line.class, Class::Ofd | Class::Flock) && !f.line.waiting);
    if ofd_held {
        name_ofd_holders(file, &mut found);
    }
    let ofd_waiting = found
        .iter()
        .any(|f| f.line.class == Class::Ofd && f.line.waiting);
    if ofd_waiting {
        name_ofd_waiters(file, &mut found);
    }
    Ok(found)
}

/// The lines of `/proc/locks` about `file`, from a consistent snapshot.
///
/// The kernel builds `/proc/locks` a page per `read` call, walking the
/// global lock list afresh each time: locks taken or dropped anywhere on
/// the system between two calls shift the list, so a lock can be printed
/// twice or not at all. Each read here asks for everything at once (one
/// page is one walk), and the whole file is read until two readings in a
/// row agree on this file's lines and ids.
pub fn lines_on(file: FileId) -> std::io::Result<Vec<LockLine>> {
    let read = || -> std::io::Result<Vec<LockLine>> {
        let text = read_all("/proc/locks")?;
        Ok(text
            .lines()
            .filter_map(LockLine::parse)
            .filter(|l| file.matches(l))
            .collect())
    };
    let mut last = read()?;
    for _ in 0..20 {
        let now = read()?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Read a file with large `read` calls (`read_to_string` starts with a
/// small probe, which splits a `/proc` file into more walks than needed).
fn read_all(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Pids whose fdinfo lists each held OFD or flock(2) lock; identical
/// locks (same span and kind, several owners) are shared out one process
/// each when the counts agree, else each lists every candidate.
///
/// The pid `/proc/locks` gives a flock(2) lock is the process that took
/// it, which may have passed it on (the descriptor form) and be gone: the
/// processes that hold its open file description are named instead, when
/// any is found (matched by that pid too, which fdinfo repeats). This
/// process itself is left out unless nothing else holds the lock: it only
/// inherited the descriptor (`locksfile status` run from a shell that
/// holds a lock on one) and never opened the file.
fn name_ofd_holders(file: FileId, found: &mut [Found]) {
    let named = |c: Class| matches!(c, Class::Ofd | Class::Flock);
    let same =
        |a: &LockLine, b: &LockLine| a.same_lock(b) && (a.class != Class::Flock || a.pid == b.pid);
    let mut seen: Vec<(LockLine, u32)> = Vec::new();
    for pid in pids() {
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        for entry in dir.flatten() {
            let Ok(info) = fs::read_to_string(entry.path()) else {
                continue;
            };
            for l in info.lines() {
                let Some(rest) = l.strip_prefix("lock:") else {
                    continue;
                };
                if let Some(line) = LockLine::parse(rest) {
                    if named(line.class)
                        && file.matches(&line)
                        && !seen.iter().any(|(s, p)| *p == pid && same(s, &line))
                    {
                        seen.push((line, pid));
                    }
                }
            }
        }
    }
    let me = std::process::id();
    let held: Vec<usize> = (0..found.len())
        .filter(|&i| named(found[i].line.class) && !found[i].line.waiting)
        .collect();
    let mut done = vec![false; found.len()];
    for &i in &held {
        if done[i] {
            continue;
        }
        let twins: Vec<usize> = held
            .iter()
            .copied()
            .filter(|&j| same(&found[j].line, &found[i].line))
            .collect();
        let mut pids: Vec<u32> = seen
            .iter()
            .filter(|(s, _)| same(s, &found[i].line))
            .map(|&(_, p)| p)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        if pids.iter().any(|&p| p != me) {
            pids.retain(|&p| p != me);
        }
        if pids.is_empty() && found[i].line.class == Class::Flock {
            // Nobody found through fdinfo: keep the taker /proc/locks names.
            continue;
        }
        for (k, &j) in twins.iter().enumerate() {
            found[j].procs = if pids.len() == twins.len() {
                vec![Proc::new(pids[k])]
            } else {
                pids.iter().map(|&p| Proc::new(p)).collect()
            };
            done[j] = true;
        }
    }
}

/// Threads asleep in `fcntl(fd, F_OFD_SETLKW, &flock)` on a descriptor of
/// `file`, matched to waiter lines by their range and type.
fn name_ofd_waiters(file: FileId, found: &mut [Found]) {
    let mut sleepers: Vec<(u32, bool, u64, Option<u64>)> = Vec::new();
    for pid in pids() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Some((exclusive, start, last)) = ofd_wait_of(pid, &task.path(), file) {
                sleepers.push((pid, exclusive, start, last));
            }
        }
    }
    for f in found
        .iter_mut()
        .filter(|f| f.line.class == Class::Ofd && f.line.waiting)
    {
        let mut pids: Vec<u32> = sleepers
            .iter()
            .filter(|&&(_, x, s, l)| x == f.line.exclusive && s == f.line.start && l == f.line.last)
            .map(|&(p, ..)| p)
            .collect();
        pids.dedup();
        f.procs = pids.into_iter().map(Proc::new).collect();
    }
}

/// What one thread waits for, if it sleeps in `F_OFD_SETLKW` on `file`:
/// (exclusive, first byte, last byte or `None` for to the end).
fn ofd_wait_of(pid: u32, task: &Path, file: FileId) -> Option<(bool, u64, Option<u64>)> {
    let text = fs::read_to_string(task.join("syscall")).ok()?;
    let mut f = text.split_whitespace();
    let nr: i64 = f.next()?.parse().ok()?;
    if nr != libc::SYS_fcntl {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let fd = hex(f.next()?)?;
    let cmd = hex(f.next()?)?;
    let arg = hex(f.next()?)?;
    if cmd != libc::F_OFD_SETLKW as u64 {
        return None;
    }
    let meta = fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
    if FileId::of(&meta) != file {
        return None;
    }
    // struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; ... }
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = [0u8; std::mem::size_of::<libc::flock>()];
    mem.read_exact_at(&mut buf, arg).ok()?;
    let l_type = i16::from_ne_bytes([buf[0], buf[1]]);
    let l_whence = i16::from_ne_bytes([buf[2], buf[3]]);
    let off = std::mem::offset_of!(libc::flock, l_start);
    let start = i64::from_ne_bytes(buf[off..off + 8].try_into().ok()?);
    let off = std::mem::offset_of!(libc::flock, l_len);
    let len = i64::from_ne_bytes(buf[off..off + 8].try_into().ok()?);
    if l_whence != libc::SEEK_SET as i16 || start < 0 || len < 0 {
        return None;
    }
    let start = start as u64;
    let last = (len > 0).then(|| start + len as u64 - 1);
    Some((l_type == libc::F_WRLCK as i16, start, last))
}

fn pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every lock and queued request in the shm lock table of the lock file at
/// `path` (none when it has no table in use), in the shape of
/// [`locks_on`]'s: holders first, by start, then waiters, oldest first.
pub fn shm_locks_on(path: &Path, file: FileId) -> Result<Vec<Found>, locksfile::Error> {
    let snap = locksfile::shm::Snapshot::read(path)?;
    let line = |waiting: bool, span: locksfile::Span, kind: locksfile::Kind, pid: u32| LockLine {
        id: 0,
        waiting,
        class: Class::Shm,
        exclusive: kind == locksfile::Kind::Exclusive,
        pid: i64::from(pid),
        major: file.major,
        minor: file.minor,
        ino: file.ino,
        start: span.start(),
        last: (!span.is_to_end()).then(|| span.end() - 1),
    };
    let held = snap.holders.iter().map(|h| Found {
        line: line(false, h.span, h.kind, h.pid),
        procs: vec![Proc::new(h.pid)],
        table_owner: Some(h.owner),
    });
    let waiting = snap.waiters.iter().map(|w| Found {
        line: line(true, w.span, w.kind, w.pid),
        procs: vec![Proc::new(w.pid)],
        table_owner: Some(w.owner),
    });
    Ok(held.chain(waiting).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_arguments_for_the_shell() {
        assert_eq!(shell_quoted("make"), "make");
        assert_eq!(shell_quoted("a b"), "'a b'");
        assert_eq!(shell_quoted("it's"), r"'it'\''s'");
        assert_eq!(shell_quoted(""), "''");
    }

    #[test]
    fn parses_proc_locks_lines() {
        let l = LockLine::parse("1: POSIX  ADVISORY  WRITE 1234 fe:01:5678 0 EOF").unwrap();
        assert_eq!(
            (l.id, l.waiting, l.class, l.exclusive, l.pid),
            (1, false, Class::Posix, true, 1234)
        );
        assert_eq!(
            (l.major, l.minor, l.ino, l.start, l.last),
            (0xfe, 1, 5678, 0, None)
        );

        let w = LockLine::parse("12: -> OFDLCK ADVISORY  READ  -1 00:2f:99 3 4").unwrap();
        assert!(w.waiting);
        assert_eq!(
            (w.id, w.class, w.exclusive, w.pid),
            (12, Class::Ofd, false, -1)
        );
        assert_eq!((w.minor, w.start, w.last), (0x2f, 3, Some(4)));

        let fdinfo = "\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10 7 7";
        assert_eq!(LockLine::parse(fdinfo).unwrap().last, Some(7));

        assert!(LockLine::parse("3: LEASE  ACTIVE    READ 99 fe:00:1 0 EOF").is_none());
        assert!(LockLine::parse("garbage").is_none());
        assert!(LockLine::parse("").is_none());
    }
}
