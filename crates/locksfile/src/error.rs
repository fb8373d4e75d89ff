//! One error type for every operation.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::{Kind, Span};

/// Why a span was refused before it reached the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpanError {
    /// No index in it (`a..a`, or a count of 0).
    Empty,
    /// The end comes before the start.
    Reversed,
    /// Past the last lock index, `i64::MAX - 1`.
    Overflow,
    /// A negative index (given as a signed integer).
    Negative,
    /// Not the whole index space (`..`), the only span a
    /// [`Mode::Flock`](crate::Mode::Flock) handle can lock: `flock(2)` locks
    /// whole files.
    NotWholeFile,
}

impl fmt::Display for SpanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpanError::Empty => "the span is empty",
            SpanError::Reversed => "the span ends before it starts",
            SpanError::Overflow => "the span goes past the last lock index (i64::MAX - 1)",
            SpanError::Negative => "a lock index cannot be negative",
            SpanError::NotWholeFile => {
                "flock mode locks the whole file only: the span must be `..` (all indices)"
            }
        })
    }
}

/// A lock held by another owner, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The part of the index space the conflicting lock covers.
    pub span: Span,
    /// Its kind.
    pub kind: Kind,
    /// The holding process for a process-associated lock, the process that
    /// took it for a `flock(2)` lock (it may have shared it through `fork`
    /// since), the process that opened the owning handle in
    /// [`Mode::Shm`](crate::Mode::Shm); `None` for an open-file-description
    /// lock, whose owner the kernel does not name.
    pub pid: Option<u32>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lock on {}", self.kind, self.span)?;
        match self.pid {
            Some(pid) => write!(f, " held by pid {pid}"),
            None => f.write_str(" held through another open file description"),
        }
    }
}

/// What kind of file was found at the lock path instead of a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotRegular {
    /// A directory.
    Directory,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character or block device.
    Device,
    /// A symbolic link, not followed because the caller did not opt in.
    Symlink,
    /// Anything else.
    Other,
}

impl fmt::Display for NotRegular {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotRegular::Directory => "a directory",
            NotRegular::Fifo => "a FIFO",
            NotRegular::Socket => "a socket",
            NotRegular::Device => "a device",
            NotRegular::Symlink => "a symbolic link (not followed unless asked)",
            NotRegular::Other => "not a regular file",
        })
    }
}

/// What is wrong with a [`Mode::Shm`](crate::Mode::Shm) sidecar file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SidecarProblem {
    /// It is not empty and does not start with the table's magic number:
    /// some other file, left untouched.
    Foreign,
    /// It was written by a newer version of this library.
    NewerVersion {
        /// The version found.
        found: u32,
    },
    /// Its size is not the table's (truncated or grown by something else).
    WrongSize {
        /// The size found, in bytes.
        found: u64,
        /// The size the table has.
        expected: u64,
    },
    /// Its table belongs to another file than the one now at the lock path
    /// (the lock file was replaced while the table was in use).
    OtherLockFile,
}

impl fmt::Display for SidecarProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SidecarProblem::Foreign => f.write_str("it is not a lock table (wrong magic number)"),
            SidecarProblem::NewerVersion { found } => {
                write!(
                    f,
                    "its table has version {found}, newer than this library's"
                )
            }
            SidecarProblem::WrongSize { found, expected } => {
                write!(f, "it is {found} bytes long, not {expected}")
            }
            SidecarProblem::OtherLockFile => f.write_str(
                "its table belongs to another file than the one at the lock path \
                 (was the lock file replaced while in use?)",
            ),
        }
    }
}

/// Everything that can go wrong, told apart so callers can react.
///
/// Converts into [`std::io::Error`] with a fitting [`io::ErrorKind`]; the
/// kernel's own error, where there is one, is its `source()`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Another owner holds a conflicting lock and the call was not to wait.
    /// `holder` names it when the kernel could (it may be gone already).
    WouldBlock {
        /// The conflicting lock, where a follow-up `F_GETLK` found one.
        holder: Option<Holder>,
    },
    /// Waiting would deadlock: the kernel said so (`EDEADLK`, process
    /// mode), or the wait would close a cycle of waiting owners
    /// ([`Mode::Shm`](crate::Mode::Shm)). Nothing was changed.
    Deadlock,
    /// The deadline passed before the lock could be had.
    TimedOut,
    /// The wait was interrupted by a signal and the caller asked to hear of it.
    Interrupted,
    /// The span was empty, reversed or too large, or not the whole index
    /// space in [`Mode::Flock`](crate::Mode::Flock).
    InvalidSpan(SpanError),
    /// A [`Mode::Flock`](crate::Mode::Flock) conversion was refused after
    /// `flock(2)` had already dropped the lock it converts (the kernel
    /// converts by unlocking first), and another owner took the file before
    /// that lock could be taken back. The owner now holds nothing, whatever
    /// its guards say: drop them. Rare: it needs another owner to take the
    /// lock in the moment between the two calls.
    ConversionLost {
        /// The kind that was held and is lost.
        held: Kind,
    },
    /// The kernel or file system cannot do what was asked (`ENOLCK`, or
    /// `EINVAL` for open-file-description locks on an old kernel).
    Unsupported {
        /// What was attempted.
        what: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The handle was inherited through `fork`; it does nothing in the child
    /// and never releases the parent's locks.
    Forked,
    /// A write lock was asked of a file that could only be opened read-only.
    ReadOnly {
        /// The lock file.
        path: PathBuf,
    },
    /// The lock path names something that is not a regular file.
    NotRegularFile {
        /// The lock path.
        path: PathBuf,
        /// What is there instead.
        found: NotRegular,
    },
    /// The lock file could not be opened or created (`open(2)` failed):
    /// the path and the kernel's own error, errno and all
    /// ([`io::Error::raw_os_error`]), so callers can tell a missing
    /// directory from a read-only file system or a full descriptor table.
    Open {
        /// The lock path, absolute.
        path: PathBuf,
        /// The kernel's answer to `open(2)`.
        source: io::Error,
    },
    /// The [`Mode::Shm`](crate::Mode::Shm) sidecar file cannot be used; it
    /// is left as it is.
    Sidecar {
        /// The sidecar's path.
        path: PathBuf,
        /// What is wrong with it.
        problem: SidecarProblem,
    },
    /// The [`Mode::Shm`](crate::Mode::Shm) table has no room left for
    /// another owner, lock record or waiter; nothing was changed.
    TableFull {
        /// The sidecar's path.
        path: PathBuf,
        /// What ran out: `"owners"`, `"lock records"` or `"waiters"`.
        what: &'static str,
    },
    /// The lock file is in use by another engine that would not exclude
    /// this one: a [`Mode::Shm`](crate::Mode::Shm) table when opening in a
    /// kernel mode, or kernel locks when opening in `Shm` mode.
    MixedModes {
        /// The lock path.
        path: PathBuf,
        /// What is in use: `"a shared-memory lock table"`, `"fcntl record
        /// locks"` or `"flock(2) locks"`.
        in_use: &'static str,
    },
    /// [`Mode::Shm`](crate::Mode::Shm) refuses a network file system: mapped
    /// memory is not kept coherent between hosts.
    NetworkFileSystem {
        /// The lock path.
        path: PathBuf,
        /// The file system's name.
        fs: &'static str,
    },
    /// Any other failure of a system call.
    Io {
        /// What was being done.
        op: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }

    /// Whether this is contention ([`Error::WouldBlock`] or [`Error::TimedOut`]).
    pub fn is_contention(&self) -> bool {
        matches!(self, Error::WouldBlock { .. } | Error::TimedOut)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::WouldBlock { holder: Some(h) } => write!(f, "lock is busy: {h}"),
            Error::WouldBlock { holder: None } => f.write_str("lock is busy"),
            Error::Deadlock => f.write_str("waiting for the lock would deadlock (EDEADLK)"),
            Error::TimedOut => f.write_str("timed out waiting for the lock"),
            Error::Interrupted => f.write_str("wait for the lock interrupted by a signal"),
            Error::InvalidSpan(e) => write!(f, "invalid lock span: {e}"),
            Error::ConversionLost { held } => write!(
                f,
                "flock(2) dropped the {held} lock to convert it, the conversion was refused, \
                 and another owner took the file before it could be taken back: nothing is held"
            ),
            Error::Unsupported { what, source } => write!(f, "{what} not supported here: {source}"),
            Error::Forked => f.write_str(
                "lock handle used in a forked child; open the lock file again in the child",
            ),
            Error::ReadOnly { path } => write!(
                f,
                "{} could only be opened read-only, so it takes shared locks only",
                path.display()
            ),
            Error::NotRegularFile { path, found } => {
                write!(f, "{} is {found}, not a regular lock file", path.display())
            }
            Error::Open { path, source } => {
                write!(f, "cannot open lock file {}: {source}", path.display())
            }
            Error::Sidecar { path, problem } => {
                write!(f, "cannot use lock table {}: {problem}", path.display())
            }
            Error::TableFull { path, what } => {
                write!(
                    f,
                    "lock table {} has no room for more {what}",
                    path.display()
                )
            }
            Error::MixedModes { path, in_use } => write!(
                f,
                "{} is in use with {in_use}, which this mode would not exclude",
                path.display()
            ),
            Error::NetworkFileSystem { path, fs } => write!(
                f,
                "{} is on a network file system ({fs}): shared-memory lock tables \
                 are not coherent between hosts",
                path.display()
            ),
            Error::Io { op, source } => write!(f, "{op}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Unsupported { source, .. }
            | Error::Open { source, .. }
            | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    /// An [`io::Error`] of the fitting kind that carries `e` (so its
    /// message still names the path). For [`Error::Open`] and
    /// [`Error::Io`] the kind is the kernel's error's, and that error, errno
    /// and all, is the `io::Error`'s [`source`](std::error::Error::source).
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::WouldBlock { .. } => io::ErrorKind::WouldBlock,
            Error::Deadlock => io::ErrorKind::Deadlock,
            Error::TimedOut => io::ErrorKind::TimedOut,
            Error::Interrupted => io::ErrorKind::Interrupted,
            Error::InvalidSpan(_) => io::ErrorKind::InvalidInput,
            Error::Unsupported { .. } => io::ErrorKind::Unsupported,
            Error::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            Error::NotRegularFile { found, .. } => match found {
                NotRegular::Directory => io::ErrorKind::IsADirectory,
                _ => io::ErrorKind::InvalidInput,
            },
            Error::Open { source, .. } | Error::Io { source, .. } => source.kind(),
            Error::Sidecar { .. } => io::ErrorKind::InvalidData,
            Error::TableFull { .. } => io::ErrorKind::OutOfMemory,
            Error::MixedModes { .. } => io::ErrorKind::ResourceBusy,
            Error::NetworkFileSystem { .. } => io::ErrorKind::Unsupported,
            Error::Forked | Error::ConversionLost { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
