//! Helpers shared by the integration tests: forked children, pipes to step
//! them, probes that look at a lock file from another process, and a view
//! of `/proc/locks` to know when a process sleeps in `F_SETLKW`.
//!
//! Forking from the multi-threaded test harness is safe as long as no other
//! thread holds a lock the child needs (the allocator's are reset by glibc
//! on fork; the crate's process-mode table is a plain mutex). Every test of
//! a binary that forks therefore takes [`serial`] first, and children stay
//! short and always end in `_exit`.
#![allow(dead_code)]

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use locksfile::{Holder, Kind, LockFile, Mode, Span};

/// How long any step may take before the test is declared stuck.
pub const STUCK: Duration = Duration::from_secs(20);

/// Run the tests of one binary one at a time (see the module docs).
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Until dropped, this process uses at most `records` records and
/// `owners` owners of any shm table (see `locksfile::shm::cap_for_tests`):
/// a table that fills at once, as the real one does at gigabytes.
pub struct Capped;

pub fn capped(records: usize, owners: usize) -> Capped {
    locksfile::shm::cap_for_tests(records, owners);
    Capped
}

impl Drop for Capped {
    fn drop(&mut self) {
        locksfile::shm::cap_for_tests(usize::MAX, usize::MAX);
    }
}

/// A fresh temp dir and a lock path in it.
pub fn lock_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("test.lock");
    (dir, path)
}

/// A handle whose threads share its locks ([`Threads::Share`]): these
/// tests drive one owner from several threads to reach the engines'
/// waits; `tests/threads.rs` tests the default, threads that exclude.
pub fn open(path: &Path, mode: Mode) -> LockFile {
    LockFile::options()
        .mode(mode)
        .threads(locksfile::Threads::Share)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} in {mode} mode: {e}", path.display()))
}

pub fn span(s: impl locksfile::IntoSpan) -> Span {
    s.into_span().expect("valid span")
}

pub fn pid() -> u32 {
    std::process::id()
}

/// Wait until `fd` is readable or `timeout` passes.
fn poll_in(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 {
            return false;
        }
        let e = io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR), "poll: {e}");
    }
}

/// A one-way pipe carrying single bytes; both ends live in both processes
/// after a fork, each side uses the end it needs.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    pub fn new() -> Pipe {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid out-array of two ints.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: pipe2 just returned both descriptors; we own them.
        unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        }
    }

    pub fn send(&self, b: u8) {
        self.send_all(&[b]);
    }

    pub fn send_all(&self, mut buf: &[u8]) {
        while !buf.is_empty() {
            // SAFETY: valid descriptor and buffer.
            let n = unsafe { libc::write(self.w.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EINTR), "write to pipe: {e}");
                continue;
            }
            buf = &buf[n as usize..];
        }
    }

    /// The next byte; panics if none comes within [`STUCK`].
    pub fn recv(&self) -> u8 {
        let mut b = [0u8; 1];
        self.recv_exact(&mut b);
        b[0]
    }

    /// The next byte, which must be `want`.
    pub fn expect(&self, want: u8) {
        let got = self.recv();
        assert_eq!(got, want, "unexpected step byte");
    }

    pub fn recv_exact(&self, mut buf: &mut [u8]) {
        while !buf.is_empty() {
            assert!(
                poll_in(self.r.as_raw_fd(), STUCK),
                "nothing came through the pipe within {STUCK:?}"
            );
            // SAFETY: valid descriptor and buffer.
            let n = unsafe { libc::read(self.r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EINTR), "read from pipe: {e}");
                continue;
            }
            assert!(n > 0, "pipe closed early");
            buf = &mut buf[n as usize..];
        }
    }

    /// A byte if one is already there or comes within `timeout`.
    pub fn try_recv(&self, timeout: Duration) -> Option<u8> {
        if !poll_in(self.r.as_raw_fd(), timeout) {
            return None;
        }
        Some(self.recv())
    }

    pub fn send_u64(&self, v: u64) {
        self.send_all(&v.to_le_bytes());
    }

    pub fn recv_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        self.recv_exact(&mut b);
        u64::from_le_bytes(b)
    }
}

impl Default for Pipe {
    fn default() -> Self {
        Pipe::new()
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// A forked child running a closure; its panics come back to the parent
/// as the message of a failed [`Child::join`].
pub struct Child {
    pub pid: u32,
    pidfd: OwnedFd,
    report: Pipe,
    reaped: bool,
}

/// Fork; the child runs `f` and `_exit`s (0 on return, 1 on panic, with
/// the panic message sent back through a pipe).
pub fn fork<F: FnOnce()>(f: F) -> Child {
    let report = Pipe::new();
    // SAFETY: fork has no memory-safety preconditions; the child only runs
    // `f` and then `_exit`s, never returning into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let r = panic::catch_unwind(AssertUnwindSafe(f));
        let code = match r {
            Ok(()) => 0,
            Err(p) => {
                let msg = panic_message(&*p);
                report.send_all(msg.as_bytes());
                1
            }
        };
        // SAFETY: ends the child at once, running no destructors or atexit
        // handlers that belong to the parent.
        unsafe { libc::_exit(code) }
    }
    // SAFETY: plain syscall with an integer pid.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(pidfd >= 0, "pidfd_open: {}", io::Error::last_os_error());
    Child {
        pid: pid as u32,
        // SAFETY: pidfd_open just returned this descriptor.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
        report,
        reaped: false,
    }
}

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Child {
    /// Wait (at most [`STUCK`]) for the child to end; return how it ended.
    pub fn wait(&mut self) -> Exit {
        assert!(!self.reaped, "child already reaped");
        assert!(
            poll_in(self.pidfd.as_raw_fd(), STUCK),
            "child {} still running after {STUCK:?}",
            self.pid
        );
        let mut status = 0;
        // SAFETY: valid out-pointer; the child is ours.
        let r = unsafe { libc::waitpid(self.pid as i32, &mut status, 0) };
        assert_eq!(
            r,
            self.pid as i32,
            "waitpid: {}",
            io::Error::last_os_error()
        );
        self.reaped = true;
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }

    /// Wait for the child and fail with its panic message unless it exited 0.
    pub fn join(mut self) {
        let exit = self.wait();
        if exit != Exit::Code(0) {
            let mut msg = Vec::new();
            while let Some(b) = self.report.try_recv(Duration::ZERO) {
                msg.push(b);
            }
            panic!(
                "child {} failed ({exit:?}): {}",
                self.pid,
                String::from_utf8_lossy(&msg)
            );
        }
    }

    /// What the child reported before it ended (its panic message).
    pub fn message(&self) -> String {
        let mut msg = Vec::new();
        while let Some(b) = self.report.try_recv(Duration::ZERO) {
            msg.push(b);
        }
        String::from_utf8_lossy(&msg).into_owned()
    }

    pub fn kill(&self, sig: i32) {
        // SAFETY: plain syscall; the child is not reaped, so the pid is ours.
        let r = unsafe { libc::kill(self.pid as i32, sig) };
        assert_eq!(r, 0, "kill: {}", io::Error::last_os_error());
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // The test failed before joining: don't leave the child behind.
            // SAFETY: plain syscalls on our own unreaped child.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
                libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// What a lock file looks like from a fresh handle in another process:
/// the first lock in the way of `kind` on `span`.
pub fn probe(path: &Path, kind: Kind, s: impl locksfile::IntoSpan) -> Option<Holder> {
    let s = span(s);
    let out = Pipe::new();
    let child = fork(|| {
        let lf = open(path, fresh_mode(path));
        let h = lf.conflicts(kind, s).expect("conflicts");
        match h {
            None => out.send(0),
            Some(h) => {
                out.send(match h.kind {
                    Kind::Shared => 1,
                    Kind::Exclusive => 2,
                });
                out.send_u64(h.span.start());
                out.send_u64(h.span.end());
                out.send_u64(h.pid.map_or(u64::MAX, u64::from));
            }
        }
    });
    let tag = out.recv();
    let holder = match tag {
        0 => None,
        _ => {
            let kind = if tag == 1 {
                Kind::Shared
            } else {
                Kind::Exclusive
            };
            let start = out.recv_u64();
            let end = out.recv_u64();
            let pid = out.recv_u64();
            Some(Holder {
                span: Span::new(start, end).expect("span from child"),
                kind,
                pid: (pid != u64::MAX).then_some(pid as u32),
                server: None,
            })
        }
    };
    child.join();
    holder
}

/// The pid a holder should carry: the process in process mode, none in OFD mode.
pub fn pid_in(mode: Mode, pid: u32) -> Option<u32> {
    match mode {
        // /proc/locks names the process that took a flock(2) lock.
        Mode::Process | Mode::Flock | Mode::Shm => Some(pid),
        Mode::Ofd | Mode::Postgres => None,
    }
}

pub fn holder(mode: Mode, s: impl locksfile::IntoSpan, kind: Kind, pid: u32) -> Holder {
    Holder {
        span: span(s),
        kind,
        pid: pid_in(mode, pid),
        server: None,
    }
}

/// The kernel's own list of the locks held through `lf`'s descriptor (the
/// `lock:` lines of `/proc/self/fdinfo/FD`), read from the file's lock
/// context directly, so it is exact even while other processes churn the
/// global `/proc/locks` (whose reads can skip or repeat lines then).
pub fn fd_locks(lf: &LockFile) -> Vec<String> {
    if let Some(me) = lf.table_owner() {
        // Shm mode: the table's records, in the kernel's line format.
        return table_held(lf.path(), me)
            .into_iter()
            .map(|(s, k)| {
                let ty = if k == Kind::Exclusive {
                    "WRITE"
                } else {
                    "READ"
                };
                let end = if s.is_to_end() {
                    "EOF".to_string()
                } else {
                    (s.end() - 1).to_string()
                };
                format!("OFDLCK ADVISORY {ty} -1 00:00:0 {} {end}", s.start())
            })
            .collect();
    }
    use std::os::fd::AsFd;
    let fd = lf.as_fd().as_raw_fd();
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("read fdinfo");
    info.lines()
        .filter_map(|l| l.strip_prefix("lock:"))
        .map(|l| {
            // Drop the running number in front ("1: POSIX ...").
            let l = l.trim();
            l.split_once(' ')
                .map_or(l, |(_, rest)| rest)
                .trim()
                .to_string()
        })
        .collect()
}

/// One line of `/proc/locks`. Reads of `/proc/locks` may skip or repeat
/// lines while other processes take and drop locks, so it is only used to
/// wait for something to show up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcLock {
    pub waiting: bool,
    pub ofd: bool,
    pub kind: Kind,
    pub pid: i64,
    pub ino: u64,
    pub start: u64,
    /// Inclusive; `None` for "to EOF".
    pub last: Option<u64>,
}

/// The record locks the kernel lists for the file at `path`.
pub fn proc_locks(path: &Path) -> Vec<ProcLock> {
    let ino = fs::metadata(path).expect("stat lock file").ino();
    let text = fs::read_to_string("/proc/locks").expect("read /proc/locks");
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 2 {
            continue;
        }
        f.remove(0); // "N:"
        let waiting = f[0] == "->";
        if waiting {
            f.remove(0);
        }
        if f.len() < 7 || !(f[0] == "POSIX" || f[0] == "OFDLCK") {
            continue;
        }
        let file_ino: u64 = match f[4].rsplit(':').next().and_then(|s| s.parse().ok()) {
            Some(i) => i,
            None => continue,
        };
        if file_ino != ino {
            continue;
        }
        out.push(ProcLock {
            waiting,
            ofd: f[0] == "OFDLCK",
            kind: if f[2] == "WRITE" {
                Kind::Exclusive
            } else {
                Kind::Shared
            },
            pid: f[3].parse().unwrap_or(-1),
            ino,
            start: f[5].parse().expect("start"),
            last: f[6].parse().ok(),
        });
    }
    out
}

/// Wait until the kernel lists a waiter on `path` whose range starts at
/// `start` (and, for process-associated locks, belongs to `pid`): the
/// process is then asleep in `F_SETLKW`.
pub fn wait_for_waiter(path: &Path, start: u64, pid: Option<u32>) {
    let deadline = Instant::now() + STUCK;
    loop {
        let found = proc_locks(path)
            .into_iter()
            .any(|l| l.waiting && l.start == start && pid.is_none_or(|p| l.pid == i64::from(p)))
            || shm_waiters(path)
                .iter()
                .any(|w| w.span.start() == start && pid.is_none_or(|p| w.pid == p));
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no waiter on {} at {start} after {STUCK:?}: {:?}",
            path.display(),
            proc_locks(path)
        );
        std::thread::yield_now();
    }
}

/// The waiters of `path`'s shared-memory table, if it has one in use.
pub fn shm_waiters(path: &Path) -> Vec<locksfile::shm::WaitingLock> {
    locksfile::shm::Snapshot::read(path)
        .map(|s| s.waiters)
        .unwrap_or_default()
}

/// Wait until `n` waiters are listed on `path`.
pub fn wait_for_waiters(path: &Path, n: usize) {
    let deadline = Instant::now() + STUCK;
    loop {
        let count = proc_locks(path).iter().filter(|l| l.waiting).count() + shm_waiters(path).len();
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} waiters on {} after {STUCK:?}: {:?}",
            path.display(),
            proc_locks(path)
        );
        std::thread::yield_now();
    }
}

/// The waiter's pid argument for [`wait_for_waiter`] in a mode.
pub fn waiter_pid(mode: Mode, pid: u32) -> Option<u32> {
    pid_in(mode, pid)
}

pub const MODES: [Mode; 3] = [Mode::Ofd, Mode::Process, Mode::Shm];

/// The mode of another owner beside a handle in `mode`: OFD for the
/// kernel modes (the file's locks are the kernel's), `Shm` for `Shm`.
pub fn other_mode(mode: Mode) -> Mode {
    if mode == Mode::Shm {
        Mode::Shm
    } else {
        Mode::Ofd
    }
}

/// The mode a fresh handle on `path` must use: `Shm` while the file's
/// table is in use (a kernel mode is refused then), else OFD.
pub fn fresh_mode(path: &Path) -> Mode {
    let shm_in_use = locksfile::shm::Snapshot::read(path)
        .map(|s| !s.holders.is_empty() || !s.waiters.is_empty())
        .unwrap_or(false);
    if shm_in_use {
        return Mode::Shm;
    }
    match LockFile::options().mode(Mode::Ofd).open(path) {
        Err(locksfile::Error::MixedModes { .. }) => Mode::Shm,
        _ => Mode::Ofd,
    }
}

/// Counters in memory shared with forked children (`MAP_SHARED`).
pub struct Shared {
    ptr: *mut std::sync::atomic::AtomicU64,
    len: usize,
}

impl Shared {
    pub fn new(len: usize) -> Shared {
        let bytes = len * std::mem::size_of::<u64>();
        // SAFETY: anonymous shared mapping; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
        Shared { ptr: p.cast(), len }
    }

    pub fn slots(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping is zero-filled, aligned to a page, holds `len`
        // u64 slots and lives as long as `self`; AtomicU64 has u64's layout.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len * std::mem::size_of::<u64>());
        }
    }
}

/// What the kernel holds through `lf`'s descriptor, as maximal pieces with
/// their kinds, in the shape of [`LockFile::held`]: the kernel merges a
/// lock owner's touching locks of one kind just as `held()` does, so the
/// two lists must be equal whenever the bookkeeping tells the truth.
pub fn kernel_held(lf: &LockFile) -> Vec<(Span, Kind)> {
    if let Some(me) = lf.table_owner() {
        return table_held(lf.path(), me);
    }
    let mut out: Vec<(Span, Kind)> = fd_locks(lf)
        .iter()
        .map(|l| {
            // "OFDLCK ADVISORY WRITE -1 00:2c:1234 0 3" (the end may be EOF).
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 7, "unexpected fdinfo lock line {l:?}");
            let kind = match f[2] {
                "WRITE" => Kind::Exclusive,
                "READ" => Kind::Shared,
                other => panic!("unexpected lock type {other:?} in {l:?}"),
            };
            let start: u64 = f[5].parse().expect("start");
            let s = match f[6] {
                "EOF" => Span::to_end(start).expect("span to the end"),
                last => Span::new(start, last.parse::<u64>().expect("end") + 1).expect("span"),
            };
            (s, kind)
        })
        .collect();
    out.sort_by_key(|(s, _)| s.start());
    out
}

/// What owner `me` holds in the shared-memory table of `path`, merged into
/// maximal pieces as [`LockFile::held`] shows them.
pub fn table_held(path: &Path, me: u64) -> Vec<(Span, Kind)> {
    let snap = locksfile::shm::Snapshot::read(path).expect("read lock table");
    let mut mine: Vec<(Span, Kind)> = snap
        .holders
        .iter()
        .filter(|h| h.owner == me)
        .map(|h| (h.span, h.kind))
        .collect();
    mine.sort_by_key(|(s, _)| s.start());
    let mut out: Vec<(Span, Kind)> = Vec::new();
    for (s, k) in mine {
        match out.last_mut() {
            Some((last, lk)) if *lk == k && last.end() == s.start() => {
                *last = Span::new(last.start(), s.end()).expect("merged span");
            }
            _ => out.push((s, k)),
        }
    }
    out
}

/// One test per lock mode for each function given, written once:
/// `mode_tests! { ring => ring }` defines `ring::ofd`, `ring::process` and
/// `ring::shm`,
/// and `mode_tests! { name => |m| f(m, true) }` passes other arguments. A
/// new mode is one more line here, and every suite runs on it.
#[macro_export]
macro_rules! mode_tests {
    ($($name:ident => $f:expr),* $(,)?) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn ofd() {
                ($f)(locksfile::Mode::Ofd)
            }

            #[test]
            fn process() {
                ($f)(locksfile::Mode::Process)
            }

            #[test]
            fn shm() {
                ($f)(locksfile::Mode::Shm)
            }
        }
    )*};
}

/// A lock held by another process (so another owner in every mode) until
/// [`Holding::release`].
pub struct Holding {
    child: Child,
    go: Pipe,
}

/// Fork a process that opens `path` in `mode`, takes `kind` on `s` and
/// holds it until released; returns once it holds it.
pub fn hold_elsewhere(path: &Path, mode: Mode, kind: Kind, s: impl locksfile::IntoSpan) -> Holding {
    let s = span(s);
    let (ready, go) = (Pipe::new(), Pipe::new());
    let child = fork(|| {
        let h = open(path, mode);
        h.acquire(kind, s, locksfile::Wait::NonBlocking).unwrap();
        ready.send(b'h');
        go.expect(b'd');
    });
    ready.expect(b'h');
    Holding { child, go }
}

impl Holding {
    pub fn pid(&self) -> u32 {
        self.child.pid
    }

    /// Let go, and wait for the process to end.
    pub fn release(self) {
        self.go.send(b'd');
        self.child.join();
    }
}

/// The calling thread's kernel id, for `/proc/self/task`.
pub fn tid() -> libc::pid_t {
    // SAFETY: no arguments, no memory.
    unsafe { libc::gettid() }
}

/// Wait until the thread with kernel id `tid` sleeps in a system call (its
/// wait's sleep: a signal sent before it gets there would find no call to
/// end, as for any wait that a signal ends by interrupting a call).
pub fn asleep_in_kernel(tid: libc::pid_t) {
    let start = std::time::Instant::now();
    loop {
        let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
        let call = fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap();
        if state == Some("S") && !call.starts_with("running") {
            return;
        }
        assert!(start.elapsed() < STUCK, "thread {tid} never slept");
        std::thread::yield_now();
    }
}
