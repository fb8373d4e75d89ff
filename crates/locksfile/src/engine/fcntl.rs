//! The `fcntl` record-lock engine, in two families: open-file-description
//! locks (each handle its own owner) and process-associated locks (the
//! process is the owner; see `registry.rs` for why its descriptors are
//! kept).
//!
//! Waits: a wait yields the CPU and tries again a few times before it
//! sleeps in `F_SETLKW`, whatever its patience, so the kernel's deadlock
//! detection (process mode) answers every wait. The kernel has no timed
//! `F_SETLKW`: a timed or cancellable wait arms a timer that interrupts the
//! sleep with the wake signal (`sys::Alarm`), as `flock -w` does. Only
//! where no wake signal can be had does a timed wait poll.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder};
use crate::kind::Kind;
use crate::span::Span;
use crate::sys::{self, Family, LockType};

/// How long a timed wait sleeps between polls, at most: bounds how late it
/// sees a release, while costing well under 1% of a core.
const MAX_POLL: Duration = Duration::from_millis(1);
const FIRST_POLL: Duration = Duration::from_micros(50);
/// Tries after yielding the CPU before a blocking wait sleeps in the kernel.
const YIELDS_BEFORE_SLEEP: u32 = 2;

/// One owner's record locks on one file.
#[derive(Debug)]
pub(crate) struct Fcntl {
    family: Family,
    /// The file, for the process-mode descriptor table.
    pub dev: u64,
    pub ino: u64,
    /// The descriptor locks are taken through: one of `fds`, which are
    /// never closed while the engine lives, so the raw number stays valid.
    fd: AtomicI32,
    writable: AtomicBool,
    /// Every descriptor this owner keeps open. In process mode closing any
    /// of them would drop the process's locks on the file.
    fds: Mutex<Vec<OwnedFd>>,
}

impl Fcntl {
    pub fn new(family: Family, dev: u64, ino: u64, fd: OwnedFd, writable: bool) -> Fcntl {
        Fcntl {
            family,
            dev,
            ino,
            fd: AtomicI32::new(fd.as_raw_fd()),
            writable: AtomicBool::new(writable),
            fds: Mutex::new(vec![fd]),
        }
    }

    /// The descriptor locks go through.
    #[inline]
    pub fn raw_fd(&self) -> RawFd {
        self.fd.load(Ordering::Relaxed)
    }

    /// The descriptors kept open.
    pub fn fds(&self) -> MutexGuard<'_, Vec<OwnedFd>> {
        self.fds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `fd` open from now on, and lock through it if it is writable
    /// and the current one is not (a process-mode owner joined by a
    /// writable handle).
    pub fn adopt(&self, fd: OwnedFd, writable: bool) {
        let mut fds = self.fds();
        if writable && !self.writable.load(Ordering::Relaxed) {
            self.fd.store(fd.as_raw_fd(), Ordering::Relaxed);
            self.writable.store(true, Ordering::Release);
        }
        fds.push(fd);
    }

    #[inline]
    fn set(&self, span: Span, kind: Option<Kind>, wait: bool) -> io::Result<()> {
        sys::set_lock(
            sys::borrow_raw(self.raw_fd()),
            self.family,
            lock_type(kind),
            span.to_sys(),
            wait,
        )
    }

    /// The rest of [`Engine::try_set`] once the first call failed, out of
    /// line so that the granted case stays small.
    #[cold]
    #[inline(never)]
    fn try_set_failed(&self, span: Span, kind: Option<Kind>, e: io::Error) -> Result<bool, Error> {
        let mut e = e;
        loop {
            if is_contention(&e) {
                return Ok(false);
            }
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(self.error(e));
            }
            match self.set(span, kind, false) {
                Ok(()) => return Ok(true),
                Err(again) => e = again,
            }
        }
    }

    /// One `F_SETLKW`; `EINTR` comes back as [`Error::Interrupted`].
    fn sleep_set(&self, span: Span, kind: Kind) -> Result<(), Error> {
        self.set(span, Some(kind), true)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINTR) => Error::Interrupted,
                _ => self.error(e),
            })
    }

    /// Give the CPU away and try again, a few times, before sleeping in the
    /// kernel. A lock held for a moment (hand-over-hand, above all with more
    /// processes than cores) is often free once its holder has run, and a
    /// failed try costs far less than a sleep and a wake-up.
    fn yield_and_retry(&self, span: Span, kind: Kind) -> Result<bool, Error> {
        for _ in 0..YIELDS_BEFORE_SLEEP {
            std::thread::yield_now();
            if self.try_set(span, Some(kind))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Sleep in `F_SETLKW` until granted or `until` ends the wait: a timer
    /// interrupts the sleep at the deadline, and a cancel fires it at once.
    /// `None` when no timer can be had (no wake signal).
    fn sleep_until(&self, span: Span, kind: Kind, until: Until<'_>) -> Option<Result<(), Error>> {
        sleep_until(until, || self.sleep_set(span, kind))
    }

    /// Try, sleep a little, try again, until `until` ends the wait: for
    /// when no wake signal can be had. Polling with a capped back-off keeps
    /// both the lateness after a release and the CPU cost small, but the
    /// kernel's deadlock detection never sees such a wait.
    fn poll_until(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        poll(until, || self.try_set(span, Some(kind)))
    }

    fn error(&self, e: io::Error) -> Error {
        match e.raw_os_error() {
            Some(libc::EDEADLK) => Error::Deadlock { at: None },
            Some(libc::ENOLCK) => Error::Unsupported {
                what: "record locks on this file (ENOLCK)",
                source: e,
            },
            Some(libc::EINVAL) if self.family == Family::Ofd => Error::Unsupported {
                what: "open file description locks (F_OFD_SETLK)",
                source: e,
            },
            _ if is_contention(&e) => Error::WouldBlock {
                holder: None,
                at: None,
            },
            _ => Error::io("fcntl record lock", e),
        }
    }
}

impl Drop for Fcntl {
    fn drop(&mut self) {
        let fds = std::mem::take(self.fds.get_mut().unwrap_or_else(|p| p.into_inner()));
        for fd in fds {
            crate::descriptors::close(self.dev, self.ino, fd);
        }
    }
}

/// Call `sleep_once` (a blocking call that a signal cuts short with
/// [`Error::Interrupted`]) until it grants or `until` ends the wait: a
/// timer interrupts the sleep at the deadline, and a cancel fires it at
/// once. `None` when no timer can be had (no wake signal).
pub(super) fn sleep_until(
    until: Until<'_>,
    mut sleep_once: impl FnMut() -> Result<(), Error>,
) -> Option<Result<(), Error>> {
    let alarm = sys::Alarm::new(sys::wake_signal()?).ok()?;
    if let Some(left) = until.left() {
        alarm.arm(left);
    }
    // Dropped before the alarm: no cancel fires a deleted timer.
    let _armed = until.cancel.map(|c| c.arm(Box::new(alarm.trigger())));
    Some(loop {
        if let Some(e) = until.ended() {
            break Err(e);
        }
        match sleep_once() {
            Err(Error::Interrupted) => {
                if let Some(e) = until.ended_by_signal() {
                    break Err(e);
                }
            }
            other => break other,
        }
    })
}

/// Call `try_once` with a capped back-off between calls until it grants
/// (`Ok(true)`) or `until` ends the wait. Signals do not cut a pause short:
/// an interruptible wait looks for one after each pause (a pending signal
/// interrupts the next pause at once, and then ends the wait).
pub(super) fn poll(
    until: Until<'_>,
    mut try_once: impl FnMut() -> Result<bool, Error>,
) -> Result<(), Error> {
    let mut pause = FIRST_POLL;
    loop {
        if try_once()? {
            return Ok(());
        }
        if let Some(e) = until.ended() {
            return Err(e);
        }
        let nap = until.left().map_or(pause, |left| pause.min(left));
        if sys::nap(nap).is_err() {
            if let Some(e) = until.ended_by_signal() {
                return Err(e);
            }
        }
        pause = (pause * 2).min(MAX_POLL);
    }
}

#[inline]
fn lock_type(kind: Option<Kind>) -> LockType {
    match kind {
        None => LockType::Unlock,
        Some(Kind::Shared) => LockType::Read,
        Some(Kind::Exclusive) => LockType::Write,
    }
}

fn is_contention(e: &io::Error) -> bool {
    // POSIX allows either for a conflicting F_SETLK.
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

impl Engine for Fcntl {
    #[inline]
    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        match self.set(span, kind, false) {
            Ok(()) => Ok(true),
            Err(e) => self.try_set_failed(span, kind, e),
        }
    }

    fn wait_set(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        if self.yield_and_retry(span, kind)? {
            return Ok(());
        }
        if until.deadline.is_none() && until.cancel.is_none() {
            // Only a grant or a signal wakes this sleep.
            return loop {
                match self.sleep_set(span, kind) {
                    Err(Error::Interrupted) if !until.interruptible => continue,
                    other => break other,
                }
            };
        }
        match self.sleep_until(span, kind, until) {
            Some(outcome) => outcome,
            None => self.poll_until(span, kind, until),
        }
    }

    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        let found = sys::get_lock(
            sys::borrow_raw(self.raw_fd()),
            self.family,
            lock_type(Some(kind)),
            span.to_sys(),
        )
        .map_err(|e| self.error(e))?;
        Ok(found.map(|b| Holder {
            span: Span::from_sys(b.range),
            kind: if b.ty == LockType::Write {
                Kind::Exclusive
            } else {
                Kind::Shared
            },
            pid: u32::try_from(b.pid).ok().filter(|&p| p > 0),
            server: None,
        }))
    }

    #[inline]
    fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    fn abilities(&self) -> Abilities {
        Abilities {
            // F_SETLKW detects cycles between processes; OFD locks never.
            detects_deadlocks: self.family == Family::Posix,
            fair: false,
            releases_on_death: true,
        }
    }
}
