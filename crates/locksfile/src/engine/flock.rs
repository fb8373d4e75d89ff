//! The `flock(2)` engine: one lock on the whole file per open file
//! description, the lock util-linux `flock(1)`, Python's `filelock` and
//! `portalocker`, `fd-lock` and Rust's `File::lock` take. On Linux it never
//! meets `fcntl` record locks, so only a handle of this kind excludes them.
//!
//! The owner protocol only ever hands this engine the whole index space
//! (`LockFile` refuses any other span first), so the owner's bookkeeping is
//! one piece and the engine holds one kind, or nothing.
//!
//! Conversion: the kernel converts by removing the old lock, then asking
//! for the new one. A downgrade cannot be refused (both steps run under one
//! kernel lock, and nobody else holds anything while we hold the exclusive
//! lock), but a refused upgrade leaves nothing held. The protocol needs a
//! refused call to change nothing, so a refused upgrade takes the shared
//! lock back at once ([`Error::ConversionLost`] if someone else got in
//! first), and a waiting upgrade polls instead of sleeping in a blocking
//! `flock`, which would hold nothing for the whole wait while the owner's
//! readers believe they still hold the file.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::fcntl::{FIRST_POLL, MAX_POLL};
use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder};
use crate::span::Span;
use crate::sys::{self, FlockOp};
use crate::Kind;

/// How long an interruptible upgrade polls before it returns
/// [`Error::Interrupted`], so its caller can look at signals (a poll's
/// sleep does not end on one); as a wait behind a sibling thread does.
const INTERRUPT_SLICE: Duration = Duration::from_millis(20);

const NOTHING: u8 = 0;
const SHARED: u8 = 1;
const EXCLUSIVE: u8 = 2;

/// One owner's `flock(2)` lock on one file, through its own open file
/// description.
#[derive(Debug)]
pub(crate) struct Flock {
    pub dev: u64,
    pub ino: u64,
    /// `None` only while dropping.
    fd: Option<OwnedFd>,
    writable: bool,
    /// What the owner holds in the kernel. Changed only under the owner's
    /// mutex, or by a waiter while the whole index space is busy (when no
    /// sibling calls the engine), so calls never race on it.
    held: AtomicU8,
}

impl Flock {
    pub fn new(dev: u64, ino: u64, fd: OwnedFd, writable: bool) -> Flock {
        Flock {
            dev,
            ino,
            fd: Some(fd),
            writable,
            held: AtomicU8::new(NOTHING),
        }
    }

    /// The descriptor locks go through.
    #[inline]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("open until dropped").as_fd()
    }

    fn held(&self) -> Option<Kind> {
        match self.held.load(Ordering::Relaxed) {
            SHARED => Some(Kind::Shared),
            EXCLUSIVE => Some(Kind::Exclusive),
            _ => None,
        }
    }

    fn set_held(&self, kind: Option<Kind>) {
        let v = match kind {
            None => NOTHING,
            Some(Kind::Shared) => SHARED,
            Some(Kind::Exclusive) => EXCLUSIVE,
        };
        self.held.store(v, Ordering::Relaxed);
    }

    /// One `flock` call; `EINTR` retried when not `wait` (nothing asked to
    /// stop), returned when `wait`.
    fn call(&self, kind: Option<Kind>, wait: bool) -> io::Result<()> {
        let op = match kind {
            None => FlockOp::Unlock,
            Some(Kind::Shared) => FlockOp::Shared,
            Some(Kind::Exclusive) => FlockOp::Exclusive,
        };
        loop {
            match sys::flock_file(self.fd(), op, wait) {
                Err(e) if !wait && e.raw_os_error() == Some(libc::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// After a conversion from `held` failed: the kernel may have dropped
    /// `held` already, so take it again without waiting (a no-op if it is
    /// still there).
    #[cold]
    fn take_back(&self, held: Kind) -> Result<(), Error> {
        match self.call(Some(held), false) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.set_held(None);
                if is_contention(&e) {
                    Err(Error::ConversionLost { held })
                } else {
                    Err(error(e))
                }
            }
        }
    }

    /// One blocking `flock`, from holding nothing; `EINTR` comes back as
    /// [`Error::Interrupted`].
    fn sleep_set(&self, kind: Kind) -> Result<(), Error> {
        match self.call(Some(kind), true) {
            Ok(()) => {
                self.set_held(Some(kind));
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Err(Error::Interrupted),
            Err(e) => Err(error(e)),
        }
    }

    /// Try, sleep a little, try again, until `deadline` (`None`: forever),
    /// with the fcntl engine's capped back-off.
    fn poll_until(&self, kind: Kind, deadline: Option<Instant>) -> Result<(), Error> {
        let mut pause = FIRST_POLL;
        loop {
            if self.try_set(Span::ALL, Some(kind))? {
                return Ok(());
            }
            let mut nap = pause;
            if let Some(deadline) = deadline {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::TimedOut);
                }
                nap = nap.min(deadline - now);
            }
            std::thread::sleep(nap);
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // Closing a descriptor of the file would drop this process's
        // process-mode record locks on it: the table parks it if so.
        if let Some(fd) = self.fd.take() {
            crate::registry::close(self.dev, self.ino, fd);
        }
    }
}

fn is_contention(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EWOULDBLOCK)
}

fn error(e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOLCK) => Error::Unsupported {
            what: "flock(2) locks on this file (ENOLCK)",
            source: e,
        },
        _ if is_contention(&e) => Error::WouldBlock { holder: None },
        _ => Error::io("flock", e),
    }
}

impl Engine for Flock {
    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        debug_assert_eq!(
            span,
            Span::ALL,
            "LockFile refuses other spans in flock mode"
        );
        let before = self.held();
        if kind == before {
            return Ok(true);
        }
        match self.call(kind, false) {
            Ok(()) => {
                self.set_held(kind);
                Ok(true)
            }
            Err(e) => {
                if let Some(before) = before {
                    // A conversion: the kernel may have dropped `before`.
                    self.take_back(before)?;
                }
                if is_contention(&e) {
                    Ok(false)
                } else {
                    Err(error(e))
                }
            }
        }
    }

    fn wait_set(&self, span: Span, kind: Kind, until: Until) -> Result<(), Error> {
        debug_assert_eq!(
            span,
            Span::ALL,
            "LockFile refuses other spans in flock mode"
        );
        let converting = self.held().is_some();
        match until {
            Until::Deadline(t) => self.poll_until(kind, Some(t)),
            // A blocking flock from a held lock would drop it for the whole
            // wait: poll instead, keeping it between tries.
            Until::Forever if converting => self.poll_until(kind, None),
            Until::Interruptible if converting => {
                match self.poll_until(kind, Some(Instant::now() + INTERRUPT_SLICE)) {
                    Err(Error::TimedOut) => Err(Error::Interrupted),
                    other => other,
                }
            }
            Until::Interruptible => self.sleep_set(kind),
            Until::Forever => loop {
                match self.sleep_set(kind) {
                    Err(Error::Interrupted) => continue,
                    other => break other,
                }
            },
        }
    }

    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        debug_assert_eq!(
            span,
            Span::ALL,
            "LockFile refuses other spans in flock mode"
        );
        let own = self.held();
        if own == Some(Kind::Exclusive) {
            return Ok(None);
        }
        // flock(2) has no F_GETLK: the kernel's list is the only place that
        // names the holders, and trying a lock on a second description
        // instead would, for a moment, refuse someone else.
        let mut locks =
            sys::flock_locks(self.dev, self.ino).map_err(|e| Error::io("read /proc/locks", e))?;
        if own == Some(Kind::Shared) {
            // Our own lock is one of them; leave one shared line out,
            // ours by pid if it can be told.
            let me = i64::from(std::process::id());
            let at = locks
                .iter()
                .position(|l| !l.exclusive && l.pid == me)
                .or_else(|| locks.iter().position(|l| !l.exclusive));
            if let Some(at) = at {
                locks.remove(at);
            }
        }
        let found = match kind {
            Kind::Shared => locks.iter().find(|l| l.exclusive),
            Kind::Exclusive => locks.iter().find(|l| l.exclusive).or_else(|| locks.first()),
        };
        Ok(found.map(|l| Holder {
            span: Span::ALL,
            kind: if l.exclusive {
                Kind::Exclusive
            } else {
                Kind::Shared
            },
            pid: u32::try_from(l.pid).ok().filter(|&p| p > 0),
        }))
    }

    #[inline]
    fn writable(&self) -> bool {
        // flock(2) would take an exclusive lock through a read-only
        // descriptor, but every mode keeps one rule: who cannot open the
        // file for writing cannot keep writers out of it.
        self.writable
    }

    fn abilities(&self) -> Abilities {
        Abilities {
            detects_deadlocks: false,
            fair: false,
            releases_on_death: true,
        }
    }
}
