//! The system calls std does not wrap: fork, a shared memory region,
//! waiting for children, forwarding signals to a child, and the descriptor
//! calls of `run -F` and `run FD`.
//!
//! # Safety
//! Every `unsafe` block of the crate is here. Each calls one libc function
//! with arguments checked on the line above; `fork` is only called while
//! the process has a single thread (see [`fork`]).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A pipe `(read end, write end)`, both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Where `fork` returned.
pub enum Forked {
    Child,
    Parent(libc::pid_t),
}

/// `fork()`.
///
/// Call it only while the process has a single thread: the child then
/// has a consistent copy of every lock and allocator state and may do
/// anything, but must leave through [`exit_now`] so it never runs the
/// parent's exit handlers or flushes the parent's buffers.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the caller keeps the process single-threaded (see above).
    match cvt(unsafe { libc::fork() })? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// `_exit(code)`: leave a forked child without running anything of the parent's.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

/// `waitpid(pid, &status, 0)`, retried on `EINTR`; the raw wait status.
pub fn wait_pid(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid place for the wait status.
        match cvt(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(status),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `kill(pid, sig)`.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    cvt(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// An anonymous `MAP_SHARED` region, zero-filled, seen by every process
/// forked after it was made, read and written as 64-bit atomic words.
pub struct SharedWords {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the region is only ever accessed through atomics.
unsafe impl Send for SharedWords {}
// SAFETY: as above.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// `mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)`.
    pub fn new(words: usize) -> io::Result<SharedWords> {
        let len = words
            .checked_mul(8)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad region size"))?;
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedWords { ptr, len })
    }

    /// The region as atomic words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, `len` bytes long, zero-filled
        // (a valid AtomicU64), lives as long as `self`, and is only accessed
        // through these atomics.
        unsafe { std::slice::from_raw_parts(self.ptr as *const AtomicU64, self.len / 8) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no reference outlives self.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);
static PENDING: AtomicI32 = AtomicI32::new(0);

/// The signals `run` passes on to its command.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A signal the kernel sent (the terminal's ^C, a hangup) went to the
    // whole process group, the command included: do not send it twice.
    // SAFETY: SA_SIGINFO handlers get a valid siginfo pointer.
    if !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL {
        return;
    }
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    } else {
        PENDING.store(sig, Ordering::SeqCst);
    }
}

/// Catch the [`FORWARDED`] signals (except those ignored on entry) so that
/// one sent to this process goes on to the command set by [`forward_to`]
/// instead of ending this process while the command runs unlocked.
pub fn catch_forwarded_signals() -> io::Result<()> {
    for sig in FORWARDED {
        // SAFETY: sigaction on zeroed structs, then our handler, which only
        // calls async-signal-safe functions and touches atomics.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            cvt(libc::sigaction(sig, std::ptr::null(), &mut old))?;
            if old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = forward as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            cvt(libc::sigaction(sig, &act, std::ptr::null_mut()))?;
        }
    }
    Ok(())
}

/// Send caught signals to `pid` from now on, and any caught before.
pub fn forward_to(pid: libc::pid_t) {
    CHILD.store(pid, Ordering::SeqCst);
    let sig = PENDING.swap(0, Ordering::SeqCst);
    if sig != 0 {
        // The child may already be gone; nothing more to do then.
        let _ = kill(pid, sig);
    }
}

/// A signal caught before any child was set, if one was.
pub fn pending_signal() -> Option<libc::c_int> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Arrange for `cmd`'s process to be killed (`SIGKILL`) if this process
/// dies first: `prctl(PR_SET_PDEATHSIG)` in the child before `exec`, so a
/// command never goes on running after the process that held its lock.
pub fn kill_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid is async-signal-safe and reads no shared state.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only makes async-signal-safe calls (prctl,
    // getppid) and allocates nothing, as required between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Restore the default action of `SIGPIPE` (the Rust runtime ignores it),
/// so `locksfile status | head` ends quietly like other tools.
pub fn default_sigpipe() {
    // SAFETY: setting a standard disposition; no handler code involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, 0)`: a close-on-exec duplicate of a
/// descriptor this process inherited, sharing its open file description.
/// `EBADF` when `fd` is not open.
pub fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd` (answering EBADF when it is
    // not open) and returns a new descriptor, which we then own.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: fcntl just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `fcntl(fd, F_GETFL)`: whether `fd` was opened write-only (`O_WRONLY`),
/// which a read lock cannot be taken through.
pub fn is_write_only(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: a live descriptor; F_GETFL takes no argument.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(flags & libc::O_ACCMODE == libc::O_WRONLY)
}

/// `fcntl(fd, F_SETFD, flags & !FD_CLOEXEC)`: let `fd` survive `exec`.
pub fn clear_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a live descriptor; F_GETFD takes no argument.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    // SAFETY: as above; F_SETFD takes an int.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC) }).map(drop)
}

/// `flock(fd, LOCK_UN)`: drop the `flock(2)` lock of `fd`'s open file
/// description, whoever took it through it.
pub fn flock_unlock(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a live descriptor; LOCK_UN takes no pointer.
    cvt(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_UN) }).map(drop)
}

/// `fcntl(fd, F_OFD_SETLK, F_UNLCK on start..end)`: release what the open
/// file description of `fd` holds there, whoever took it. `end` is
/// exclusive; `i64::MAX` means to the end of the file (`l_len = 0`).
pub fn ofd_unlock(fd: BorrowedFd<'_>, start: u64, end: u64) -> io::Result<()> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "span beyond off_t");
    let l_start = libc::off_t::try_from(start).map_err(|_| too_big())?;
    let l_len = if end >= i64::MAX as u64 {
        0
    } else {
        libc::off_t::try_from(end - start).map_err(|_| too_big())?
    };
    // SAFETY: `flock` is plain data; zeroed is valid (l_pid must be 0 for
    // OFD requests) and the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_UNLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = l_start;
    fl.l_len = l_len;
    // SAFETY: a live descriptor and a valid `struct flock` for the call.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) }).map(drop)
}
