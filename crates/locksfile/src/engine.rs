//! The lock engine: turns "hold this span at this kind" into kernel calls.
//!
//! Today there is one engine, `fcntl` record locks, in two families (OFD and
//! process-associated). Everything above this module speaks in spans and
//! kinds only, so a second engine (say, a lock table in shared memory) can
//! take its place behind the same [`crate::LockFile`] API.

use std::io;
use std::os::fd::RawFd;

use crate::error::{Error, Holder};
use crate::span::Span;
use crate::sys::{self, Family, LockType};
use crate::Kind;

/// One descriptor and the family of locks taken through it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fcntl {
    pub fd: RawFd,
    pub family: Family,
}

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

impl Fcntl {
    /// Set `span` to `kind` (unlock for `None`) without waiting.
    /// A conflict comes back as `Ok(false)`.
    pub fn try_set(self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        loop {
            match sys::set_lock(
                sys::borrow_raw(self.fd),
                self.family,
                lock_type(kind),
                span.to_sys(),
                false,
            ) {
                Ok(()) => return Ok(true),
                Err(e) if is_contention(&e) => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(self.error(e)),
            }
        }
    }

    /// Set `span` to `kind`, sleeping in the kernel until it is granted.
    /// `EINTR` comes back as [`Error::Interrupted`]; the caller decides
    /// whether to go round again.
    pub fn wait_set(self, span: Span, kind: Kind) -> Result<(), Error> {
        sys::set_lock(
            sys::borrow_raw(self.fd),
            self.family,
            lock_type(Some(kind)),
            span.to_sys(),
            true,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINTR) => Error::Interrupted,
            _ => self.error(e),
        })
    }

    /// The first lock of another owner in the way of `kind` on `span`.
    pub fn probe(self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        let found = sys::get_lock(
            sys::borrow_raw(self.fd),
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
        }))
    }

    fn error(self, e: io::Error) -> Error {
        match e.raw_os_error() {
            Some(libc::EDEADLK) => Error::Deadlock,
            Some(libc::ENOLCK) => Error::Unsupported {
                what: "record locks on this file (ENOLCK)",
                source: e,
            },
            Some(libc::EINVAL) if self.family == Family::Ofd => Error::Unsupported {
                what: "open file description locks (F_OFD_SETLK)",
                source: e,
            },
            _ if is_contention(&e) => Error::WouldBlock { holder: None },
            _ => Error::io("fcntl record lock", e),
        }
    }
}
