//! One error type for every operation.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::kind::Kind;
use crate::span::Span;

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
    /// More indices than one call may take on a PostgreSQL handle
    /// (`MAX_SPAN`, 4096), or open-ended: each index is a lock on the server.
    TooLong,
    /// Past the last index a PostgreSQL handle has, `i32::MAX` (its keys
    /// are int4).
    PastServerKeys,
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
            SpanError::TooLong => {
                "a PostgreSQL handle takes at most 4096 indices in one call, and no open-ended span"
            }
            SpanError::PastServerKeys => {
                "a PostgreSQL handle's indices stop at 2147483647 (i32::MAX)"
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
    /// For a lock on a PostgreSQL server: the session holding it, as
    /// `pg_locks` and `pg_stat_activity` name it. `None` for file locks.
    pub server: Option<ServerHolder>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lock on {}", self.kind, self.span)?;
        match (self.pid, &self.server) {
            (_, Some(s)) => write!(f, " held by {s}"),
            (Some(pid), None) => write!(f, " held by pid {pid}"),
            (None, None) => f.write_str(" held through another open file description"),
        }
    }
}

/// The server session holding a lock: its backend's pid, its client's
/// address and port (`None` over a Unix socket) and its application name
/// (`locksfile pid N` unless the target set one), as `pg_stat_activity`
/// shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerHolder {
    /// The server process serving the session (`pg_locks.pid`).
    pub backend_pid: u32,
    /// The client's address (`pg_stat_activity.client_addr`).
    pub client_addr: Option<std::net::IpAddr>,
    /// The client's port (`pg_stat_activity.client_port`).
    pub client_port: Option<u16>,
    application_name: &'static str,
}

impl ServerHolder {
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn new(
        backend_pid: u32,
        client_addr: Option<std::net::IpAddr>,
        client_port: Option<u16>,
        application_name: &str,
    ) -> ServerHolder {
        ServerHolder {
            backend_pid,
            client_addr,
            client_port,
            application_name: intern(application_name),
        }
    }

    /// The session's `application_name`.
    pub fn application_name(&self) -> &str {
        self.application_name
    }

    /// The same, for the life of the process (names are kept).
    pub fn application_name_static(&self) -> &'static str {
        self.application_name
    }
}

/// A lock in a PostgreSQL namespace, held or waited for by some session
/// ([`LockFile::server_locks`](crate::LockFile::server_locks)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLock {
    /// The lock (one index), its kind and the session.
    pub holder: Holder,
    /// Granted (`true`) or waited for.
    pub granted: bool,
}

/// Application names, kept for the life of the process so that a `Holder`
/// stays `Copy` and small (errors carry one). Distinct names are few (one
/// per client program); past a cap, new ones are not kept.
fn intern(name: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::Mutex;
    const CAP: usize = 4096;
    static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let set = names.get_or_insert_with(HashSet::new);
    if let Some(known) = set.get(name) {
        return known;
    }
    if set.len() >= CAP {
        return "(unrecorded)";
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    set.insert(leaked);
    leaked
}

impl fmt::Display for ServerHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server backend pid {}", self.backend_pid)?;
        match (self.client_addr, self.client_port) {
            (Some(a), Some(p)) => write!(f, " for client {a} port {p}")?,
            (Some(a), None) => write!(f, " for client {a}")?,
            _ => f.write_str(" for a local client")?,
        }
        if !self.application_name().is_empty() {
            write!(f, " ({})", self.application_name())?;
        }
        Ok(())
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

/// Why TLS to a PostgreSQL server failed: the payload of the
/// [`io::Error`] an [`Error::Connect`] carries (reach it with
/// `source.get_ref()` and `downcast_ref`). Its kind is `InvalidData` for
/// the certificate checks, `Unsupported` when the server offers no TLS,
/// `InvalidInput` for unusable certificate or key files, and
/// `ConnectionAborted` for other handshake failures. Never includes a
/// password or what a key file holds (paths only).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsError {
    /// The server's certificate does not chain to a trusted root (of
    /// `sslrootcert`), or is expired or malformed; the detail says which.
    NotTrusted(String),
    /// The certificate is not for the host connected to (`verify-full`):
    /// the host name.
    NameMismatch(String),
    /// The server offers no TLS and `sslmode` requires it.
    NotOffered,
    /// A root, client certificate or key file cannot be used.
    Files(String),
    /// The handshake failed otherwise (the server refused our certificate,
    /// no common protocol version, ...).
    Handshake(String),
}

impl TlsError {
    /// The kind of the [`io::Error`] that carries it.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            TlsError::NotTrusted(_) | TlsError::NameMismatch(_) => io::ErrorKind::InvalidData,
            TlsError::NotOffered => io::ErrorKind::Unsupported,
            TlsError::Files(_) => io::ErrorKind::InvalidInput,
            TlsError::Handshake(_) => io::ErrorKind::ConnectionAborted,
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::NotTrusted(why) => write!(f, "server certificate not trusted: {why}"),
            TlsError::NameMismatch(host) => {
                write!(f, "server certificate is not for host name {host:?}")
            }
            TlsError::NotOffered => {
                f.write_str("server does not support TLS, which sslmode requires")
            }
            TlsError::Files(why) => write!(f, "TLS: {why}"),
            TlsError::Handshake(why) => write!(f, "TLS handshake failed: {why}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// What is wrong with a [`Mode::Shm`](crate::Mode::Shm) sidecar file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SidecarProblem {
    /// It is not empty and does not start with the table's magic number:
    /// some other file, left untouched.
    Foreign,
    /// It was written by another version of this library: a newer one, or
    /// (while in use) an older one, whose layout differs (the version
    /// with lock statistics is 5).
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
    /// The lock file has more than one name (hard links). The table is
    /// found by name, so each name would get a table of its own that does
    /// not exclude the others: no handle opens on such a file.
    HardLinked {
        /// The names the lock file has.
        links: u64,
    },
    /// The lock file's table is in use, but the sidecar at its path is
    /// missing or is not that table (it was removed or replaced while in
    /// use): setting up a new one would let two owners hold one lock.
    /// Nothing was created or reset; it clears once every owner of the
    /// old table has closed.
    Replaced,
    /// The table in it is inconsistent (`what` names the first thing found
    /// out of range or contradicting the rest): something wrote over it
    /// while in use. The call changed nothing it could check; it clears
    /// once every user has closed the lock file (the next opener sets the
    /// table up afresh), or once the sidecar is removed with no user left.
    Corrupt {
        /// What was found wrong.
        what: &'static str,
    },
}

impl fmt::Display for SidecarProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SidecarProblem::Foreign => f.write_str("it is not a lock table (wrong magic number)"),
            SidecarProblem::NewerVersion { found } => {
                write!(
                    f,
                    "its table has version {found}, made by another version of locksfile (newer, or an older one still using it)"
                )
            }
            SidecarProblem::WrongSize { found, expected } => {
                write!(f, "it is {found} bytes long, not {expected}")
            }
            SidecarProblem::OtherLockFile => f.write_str(
                "its table belongs to another file than the one at the lock path \
                 (was the lock file replaced while in use?)",
            ),
            SidecarProblem::HardLinked { links } => write!(
                f,
                "the lock file has {links} names (hard links), and each name would \
                 have a table of its own"
            ),
            SidecarProblem::Replaced => f.write_str(
                "the lock file's table is in use, but this sidecar is missing or is not \
                 that table (was it removed while in use?)",
            ),
            SidecarProblem::Corrupt { what } => write!(
                f,
                "its lock table is corrupt ({what} out of range or inconsistent): \
                 stop every process using the lock file, then use it again \
                 (or remove the sidecar) to start a fresh table"
            ),
        }
    }
}

/// Where a refused or timed-out lock was asked for: the lock file, the span
/// and the kind. Carried (boxed, so `Error` stays small) by the contention
/// errors [`Error::WouldBlock`], [`Error::TimedOut`] and [`Error::Deadlock`]
/// that [`LockFile`](crate::LockFile) returns, and shown by their `Display`:
/// `an exclusive lock on 3..5 of /tmp/x.lock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At {
    /// The lock file's path as `Path::display` shows it, or a PostgreSQL
    /// target as shown (without its password).
    pub file: String,
    /// The span asked for.
    pub span: Span,
    /// The kind asked for.
    pub kind: Kind,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = match self.kind {
            Kind::Shared => "a",
            Kind::Exclusive => "an",
        };
        write!(
            f,
            "{a} {} lock on {} of {}",
            self.kind, self.span, self.file
        )
    }
}

/// Everything that can go wrong, told apart so callers can react.
///
/// The contention errors ([`Error::WouldBlock`], [`Error::TimedOut`],
/// [`Error::Deadlock`]) say where: an `at` field ([`At`]: the lock file,
/// the span, the kind) that [`LockFile`](crate::LockFile) fills in before
/// returning, so their `Display` names the file and the span (and the
/// holder, where known) and no other variant repeats it. The context is a
/// field of those variants, not a wrapping variant (`Error::At { source }`
/// would let `matches!(e, Error::TimedOut { .. })` compile and silently
/// stop matching): a match on them writes `Error::TimedOut { .. }`.
/// [`Error::Interrupted`] and [`Error::Cancelled`] answer the caller's own
/// signal or cancel and stay unit variants.
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
        /// The lock asked for, where it was known.
        at: Option<Box<At>>,
    },
    /// Waiting would deadlock: the kernel (`EDEADLK`, process mode), the
    /// wait would close a cycle of waiting owners
    /// ([`Mode::Shm`](crate::Mode::Shm)), or the PostgreSQL server
    /// (SQLSTATE `40P01`) found a cycle of waiters. Nothing was changed.
    Deadlock {
        /// The lock asked for, where it was known.
        at: Option<Box<At>>,
    },
    /// The deadline passed before the lock could be had.
    TimedOut {
        /// The lock asked for, where it was known.
        at: Option<Box<At>>,
    },
    /// The wait was interrupted by a signal and the caller asked to hear of it.
    Interrupted,
    /// The wait was ended through its [`Cancel`](crate::Cancel) (a dropped
    /// future, a cancelled task). Nothing was changed.
    Cancelled,
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
    /// A PostgreSQL handle's session is gone (server restart or failover,
    /// network loss, backend terminated): every lock it held is lost.
    /// Open a new handle; this one only fails from now on.
    ConnectionLost {
        /// The target, without its password.
        target: String,
    },
    /// Connecting to a PostgreSQL server failed, within the connect
    /// timeout: the `source`'s kind tells why (`InvalidInput`: malformed
    /// target; `PermissionDenied`: authentication; `NotFound`: no such
    /// database or socket; `ConnectionRefused`; `TimedOut`: no answer;
    /// `Unsupported`: the server session is shared with another client or
    /// changes between statements, a pooler in transaction or statement
    /// mode).
    Connect {
        /// The target, without its password.
        target: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The PostgreSQL server refused a statement (no permission to create
    /// the namespace table, out of lock memory, ...).
    Server {
        /// What was being done.
        op: &'static str,
        /// The SQLSTATE, e.g. `42501` (no permission), `53200` (out of
        /// shared memory: raise `max_locks_per_transaction`).
        code: String,
        /// The server's message.
        message: String,
    },
    /// A fencing token was asked for an index the handle does not hold
    /// exclusively.
    NotHeld {
        /// The index.
        index: u64,
    },
    /// Any other failure of a system call.
    Io {
        /// What was being done.
        op: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
}

/// Which [`Error`] variant an error is, without its fields: compare with
/// `==` instead of matching `Error::WouldBlock { .. }`
/// ([`Error::kind`]). One variant for each of [`Error`]'s, named alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::WouldBlock`].
    WouldBlock,
    /// [`Error::Deadlock`].
    Deadlock,
    /// [`Error::TimedOut`].
    TimedOut,
    /// [`Error::Interrupted`].
    Interrupted,
    /// [`Error::Cancelled`].
    Cancelled,
    /// [`Error::InvalidSpan`].
    InvalidSpan,
    /// [`Error::ConversionLost`].
    ConversionLost,
    /// [`Error::Unsupported`].
    Unsupported,
    /// [`Error::Forked`].
    Forked,
    /// [`Error::ReadOnly`].
    ReadOnly,
    /// [`Error::NotRegularFile`].
    NotRegularFile,
    /// [`Error::Open`].
    Open,
    /// [`Error::Sidecar`].
    Sidecar,
    /// [`Error::TableFull`].
    TableFull,
    /// [`Error::MixedModes`].
    MixedModes,
    /// [`Error::NetworkFileSystem`].
    NetworkFileSystem,
    /// [`Error::ConnectionLost`].
    ConnectionLost,
    /// [`Error::Connect`].
    Connect,
    /// [`Error::Server`].
    Server,
    /// [`Error::NotHeld`].
    NotHeld,
    /// [`Error::Io`].
    Io,
}

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Error {
        Error::Io { op, source }
    }

    /// Which variant this is, fields left out.
    ///
    /// ```
    /// use locksfile::{ErrorKind, LockFile};
    /// let dir = tempfile::tempdir()?;
    /// let a = LockFile::open(dir.path().join("data.lock"))?;
    /// let b = LockFile::open(dir.path().join("data.lock"))?;
    /// let _g = a.write(0)?;
    /// assert_eq!(b.try_read(0).unwrap_err().kind(), ErrorKind::WouldBlock);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::WouldBlock { .. } => ErrorKind::WouldBlock,
            Error::Deadlock { .. } => ErrorKind::Deadlock,
            Error::TimedOut { .. } => ErrorKind::TimedOut,
            Error::Interrupted => ErrorKind::Interrupted,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::InvalidSpan(_) => ErrorKind::InvalidSpan,
            Error::ConversionLost { .. } => ErrorKind::ConversionLost,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Forked => ErrorKind::Forked,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::NotRegularFile { .. } => ErrorKind::NotRegularFile,
            Error::Open { .. } => ErrorKind::Open,
            Error::Sidecar { .. } => ErrorKind::Sidecar,
            Error::TableFull { .. } => ErrorKind::TableFull,
            Error::MixedModes { .. } => ErrorKind::MixedModes,
            Error::NetworkFileSystem { .. } => ErrorKind::NetworkFileSystem,
            Error::ConnectionLost { .. } => ErrorKind::ConnectionLost,
            Error::Connect { .. } => ErrorKind::Connect,
            Error::Server { .. } => ErrorKind::Server,
            Error::NotHeld { .. } => ErrorKind::NotHeld,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    /// Whether this is [`Error::WouldBlock`]: another owner was in the way
    /// of a call that was not to wait.
    #[must_use]
    pub fn is_would_block(&self) -> bool {
        matches!(self, Error::WouldBlock { .. })
    }

    /// Whether this is contention ([`Error::WouldBlock`] or [`Error::TimedOut`]).
    pub fn is_contention(&self) -> bool {
        matches!(self, Error::WouldBlock { .. } | Error::TimedOut { .. })
    }

    /// Where a contention error's lock was asked for, if it says.
    pub fn at(&self) -> Option<&At> {
        match self {
            Error::WouldBlock { at, .. } | Error::Deadlock { at } | Error::TimedOut { at } => {
                at.as_deref()
            }
            _ => None,
        }
    }

    /// A [`Error::WouldBlock`] as the [`Error::TimedOut`] of a wait that
    /// gave up on it, still saying where; any other error as it is.
    pub fn into_timed_out(self) -> Error {
        match self {
            Error::WouldBlock { at, .. } => Error::TimedOut { at },
            e => e,
        }
    }

    /// The same error, saying where (a contention error that does not yet).
    #[cold]
    pub(crate) fn located(mut self, here: impl FnOnce() -> At) -> Error {
        if let Error::WouldBlock { at, .. } | Error::Deadlock { at } | Error::TimedOut { at } =
            &mut self
        {
            if at.is_none() {
                *at = Some(Box::new(here()));
            }
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::WouldBlock { holder, at } => {
                match at {
                    Some(at) => write!(f, "cannot take {at} without waiting")?,
                    None => f.write_str("lock is busy")?,
                }
                match holder {
                    Some(h) => write!(f, ": {h}"),
                    None => Ok(()),
                }
            }
            Error::Deadlock { at: Some(at) } => write!(f, "waiting for {at} would deadlock"),
            Error::Deadlock { at: None } => f.write_str("waiting for the lock would deadlock"),
            Error::TimedOut { at: Some(at) } => write!(f, "timed out waiting for {at}"),
            Error::TimedOut { at: None } => f.write_str("timed out waiting for the lock"),
            Error::Interrupted => f.write_str("wait for the lock interrupted by a signal"),
            Error::Cancelled => f.write_str("wait for the lock cancelled"),
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
            Error::ConnectionLost { target } => write!(
                f,
                "the session with {target} is lost, and every lock it held with it"
            ),
            Error::Connect { target, source } => write!(f, "cannot connect to {target}: {source}"),
            Error::Server { op, code, message } => {
                write!(f, "{op}: the server said: {message} (SQLSTATE {code})")
            }
            Error::NotHeld { index } => {
                write!(f, "lock {index} is not held exclusively by this handle")
            }
            Error::Io { op, source } => write!(f, "{op}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Unsupported { source, .. }
            | Error::Open { source, .. }
            | Error::Connect { source, .. }
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
            Error::Deadlock { .. } => io::ErrorKind::Deadlock,
            Error::TimedOut { .. } => io::ErrorKind::TimedOut,
            Error::Interrupted => io::ErrorKind::Interrupted,
            Error::Cancelled => io::ErrorKind::Interrupted,
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
            Error::Connect { source, .. } => source.kind(),
            Error::ConnectionLost { .. } => io::ErrorKind::ConnectionAborted,
            Error::Server { code, .. } if code == "42501" => io::ErrorKind::PermissionDenied,
            Error::Server { .. } => io::ErrorKind::Other,
            Error::NotHeld { .. } => io::ErrorKind::InvalidInput,
            Error::Forked | Error::ConversionLost { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
