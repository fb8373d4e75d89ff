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
//! readers believe they still hold the file. The poll only tries when
//! `/proc/locks` shows the way clear (and now and then regardless), so the
//! moments without the shared lock stay few.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};

use super::fcntl::{poll, sleep_until};
use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder, SpanError};
use crate::kind::Kind;
use crate::span::Span;
use crate::sys::{self, FlockOp};

/// While converting, every how many polls a try is made even though
/// `/proc/locks` shows the file taken (about every 64 ms once the back-off
/// is at its cap).
const TRY_ANYWAY_EVERY: u32 = 64;

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
    /// The kind a conversion lost ([`Error::ConversionLost`]), until the
    /// owner unlocks: meanwhile the bookkeeping still shows it held, and a
    /// new guard over it would make no call, so `LockFile` refuses every
    /// lock until the owner's holders are gone.
    lost: AtomicU8,
}

impl Flock {
    pub fn new(dev: u64, ino: u64, fd: OwnedFd, writable: bool) -> Flock {
        Flock {
            dev,
            ino,
            fd: Some(fd),
            writable,
            held: AtomicU8::new(NOTHING),
            lost: AtomicU8::new(NOTHING),
        }
    }

    /// The descriptor locks go through.
    #[inline]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_ref().expect("open until dropped").as_fd()
    }

    fn held(&self) -> Option<Kind> {
        kind_of(self.held.load(Ordering::Relaxed))
    }

    fn set_held(&self, kind: Option<Kind>) {
        self.held.store(code_of(kind), Ordering::Relaxed);
    }

    /// The kind a conversion lost, while the owner still thinks it holds it.
    #[inline]
    pub fn lost(&self) -> Option<Kind> {
        kind_of(self.lost.load(Ordering::Relaxed))
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
                self.lost.store(code_of(Some(held)), Ordering::Relaxed);
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

    /// Try, sleep a little, try again, until `until` ends the wait, with
    /// the fcntl engine's capped back-off.
    fn poll_until(&self, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        let mut polls: u32 = 0;
        poll(until, || {
            // A conversion's try drops the held lock for a moment (the
            // kernel unlocks first), opening a gap for others each time:
            // skip it while `/proc/locks` shows someone in the way, but try
            // now and then anyway, in case that snapshot is wrong.
            let worth_trying = self.held().is_none()
                || polls % TRY_ANYWAY_EVERY == 0
                || !matches!(self.probe(Span::ALL, kind), Ok(Some(_)));
            polls = polls.wrapping_add(1);
            Ok(worth_trying && self.try_set(Span::ALL, Some(kind))?)
        })
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // Closing a descriptor of the file would drop this process's
        // process-mode record locks on it: the table parks it if so.
        if let Some(fd) = self.fd.take() {
            crate::descriptors::close(self.dev, self.ino, fd);
        }
    }
}

fn kind_of(code: u8) -> Option<Kind> {
    match code {
        SHARED => Some(Kind::Shared),
        EXCLUSIVE => Some(Kind::Exclusive),
        _ => None,
    }
}

fn code_of(kind: Option<Kind>) -> u8 {
    match kind {
        None => NOTHING,
        Some(Kind::Shared) => SHARED,
        Some(Kind::Exclusive) => EXCLUSIVE,
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
        _ if is_contention(&e) => Error::WouldBlock {
            holder: None,
            at: None,
        },
        _ => Error::io("flock", e),
    }
}

impl Engine for Flock {
    /// Any span but the whole index space is refused before anything is
    /// tried: flock(2) has no ranges, and taking the whole file for part
    /// of it would exclude more than asked, silently.
    fn check_span(&self, span: Span, _locks: bool) -> Result<(), Error> {
        if span != Span::ALL {
            return Err(Error::InvalidSpan(SpanError::NotWholeFile));
        }
        Ok(())
    }

    fn locks_lost(&self) -> Option<Error> {
        self.lost().map(|held| Error::ConversionLost { held })
    }

    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        debug_assert_eq!(span, Span::ALL, "check_span refuses other spans");
        let before = self.held();
        if kind.is_none() {
            // The owner lets go of everything: from here on its bookkeeping
            // and the kernel agree again, even after a lost conversion.
            self.lost.store(NOTHING, Ordering::Relaxed);
        }
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
                    #[cfg(test)]
                    tests::between_calls();
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

    fn wait_set(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        debug_assert_eq!(span, Span::ALL, "check_span refuses other spans");
        if self.held().is_some() {
            // A blocking flock from a held lock would drop it for the whole
            // wait: poll instead, keeping it between tries.
            return self.poll_until(kind, until);
        }
        if until.deadline.is_none() && until.cancel.is_none() {
            return loop {
                match self.sleep_set(kind) {
                    Err(Error::Interrupted) if !until.interruptible => continue,
                    other => break other,
                }
            };
        }
        sleep_until(until, || self.sleep_set(kind)).unwrap_or_else(|| self.poll_until(kind, until))
    }

    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        debug_assert_eq!(span, Span::ALL, "check_span refuses other spans");
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
            server: None,
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

#[cfg(test)]
mod tests {
    //! The lost conversion needs another owner to take the file between
    //! the engine's two calls, which no outside process can time: a hook
    //! runs there instead.

    use std::cell::RefCell;
    use std::fs::File;
    use std::os::fd::AsFd;

    use crate::sys::{self, FlockOp};
    use crate::{Error, Kind, LockFile, Mode, ReadGuard};

    thread_local! {
        static BETWEEN: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
    }

    /// Runs the hook set on this thread, once.
    pub(super) fn between_calls() {
        if let Some(f) = BETWEEN.with(|b| b.borrow_mut().take()) {
            f();
        }
    }

    #[test]
    fn lost_conversion_is_reported_and_refuses_locks_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.lock");
        let lf = LockFile::options().mode(Mode::Flock).open(&path).unwrap();
        let reader = File::open(&path).unwrap();
        let writer = File::open(&path).unwrap();
        sys::flock_file(reader.as_fd(), FlockOp::Shared, false).unwrap();
        let r = lf.read(..).unwrap();
        assert!(r.is_held());

        // Between the refused upgrade (the other reader is in the way) and
        // taking the shared lock back, that reader leaves and a writer
        // takes the file.
        BETWEEN.with(|b| {
            *b.borrow_mut() = Some(Box::new(move || {
                sys::flock_file(reader.as_fd(), FlockOp::Unlock, false).unwrap();
                sys::flock_file(writer.as_fd(), FlockOp::Exclusive, false)
                    .expect("the upgrade dropped our shared lock");
                std::mem::forget(writer); // hold it for the rest of the test
            }))
        });
        let r = match ReadGuard::upgrade(r) {
            Err((r, Error::ConversionLost { held: Kind::Shared })) => r,
            other => panic!("expected ConversionLost, got {other:?}"),
        };
        // The guard says it holds nothing, and no lock may be built on it
        // until it is gone.
        assert!(!r.is_held());
        assert!(matches!(
            lf.try_read(..),
            Err(Error::ConversionLost { held: Kind::Shared })
        ));
        drop(r);
        assert!(matches!(lf.try_read(..), Err(Error::WouldBlock { .. })));
    }
}
