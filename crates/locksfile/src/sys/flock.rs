//! Whole-file `flock(2)` locks, and who holds them as `/proc/locks`
//! tells.
//!
//! # Safety
//!
//! `flock(2)` takes a live descriptor and an integer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The operations `flock(2)` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlockOp {
    Shared,
    Exclusive,
    Unlock,
}

/// `flock(fd, LOCK_SH | LOCK_EX | LOCK_UN [| LOCK_NB])`: set, convert or
/// remove the whole-file lock of `fd`'s open file description.
///
/// Converting a held lock is not atomic: the kernel removes the old lock,
/// then asks for the new one, so a refused conversion leaves nothing held.
/// Returns the raw OS error: `EWOULDBLOCK` on conflict without `wait`,
/// `EINTR` for a wait cut short by a signal.
///
/// # References
/// flock(2).
#[doc(alias = "LOCK_EX")]
#[doc(alias = "LOCK_NB")]
#[inline]
pub(crate) fn flock_file(fd: BorrowedFd<'_>, op: FlockOp, wait: bool) -> io::Result<()> {
    let mut op = match op {
        FlockOp::Shared => libc::LOCK_SH,
        FlockOp::Exclusive => libc::LOCK_EX,
        FlockOp::Unlock => libc::LOCK_UN,
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    // SAFETY: `fd` is a live descriptor for the duration of the borrow;
    // flock takes two integers.
    if unsafe { libc::flock(fd.as_raw_fd(), op) } == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `flock(2)` lock as `/proc/locks` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlockLine {
    pub exclusive: bool,
    /// The process that took it (as this pid namespace sees it; 0 or less
    /// when it cannot be named).
    pub pid: i64,
}

/// The `FLOCK` locks held (not waited for) on file (dev, ino), read from
/// `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF`). The
/// kernel names no owner of a flock(2) lock beyond the pid that took it.
/// The kernel rebuilds the list as it is read, so a read while other
/// processes lock and unlock (any file) may skip or repeat a line: it is
/// read until two readings agree about this file (a few times at most).
/// Still a snapshot, good for naming a holder, not for deciding anything.
///
/// # References
/// proc_locks(5).
pub(crate) fn flock_locks(dev: u64, ino: u64) -> io::Result<Vec<FlockLine>> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let mut last = flock_locks_once(&want)?;
    for _ in 0..3 {
        let now = flock_locks_once(&want)?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

fn flock_locks_once(want: &str) -> io::Result<Vec<FlockLine>> {
    let text = std::fs::read_to_string("/proc/locks")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut t = line.split_whitespace().skip(1);
        if t.next() != Some("FLOCK") {
            // Another class, or "->" for a waiter.
            continue;
        }
        let (Some(_advisory), Some(access), Some(pid), Some(file)) =
            (t.next(), t.next(), t.next(), t.next())
        else {
            continue;
        };
        if file != want {
            continue;
        }
        out.push(FlockLine {
            exclusive: access == "WRITE",
            pid: pid.parse().unwrap_or(-1),
        });
    }
    Ok(out)
}
