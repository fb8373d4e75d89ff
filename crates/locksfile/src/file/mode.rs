//! What a handle is opened as: who owns its locks ([`Mode`]) and whether
//! its threads exclude each other ([`Threads`]).

use std::fmt;

#[cfg(doc)]
use crate::error::{Error, SpanError};
#[cfg(doc)]
use crate::party::Party;

/// Whether the threads sharing one handle exclude each other.
///
/// An engine only sees owners (a handle, or in [`Mode::Process`] the
/// process); the threads of one owner are told apart above it. By default
/// ([`Threads::Exclude`]) each thread is its own *party*: a lock one thread
/// of the handle holds keeps the others out, as separate handles would,
/// while the takes of one thread still compose (a thread holding a write
/// lock may take a read lock inside it). Each thread also has its own
/// explicit layer ([`acquire`](crate::LockFile::acquire) /
/// [`release`](crate::LockFile::release)). An async task or a pool thread
/// waiting for someone else takes locks as a [`Party`] of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Threads {
    /// Threads (and tasks) sharing the handle exclude each other.
    #[default]
    Exclude,
    /// The handle's locks are every thread's: they never exclude each
    /// other and any thread may release what another took (the behaviour
    /// of `fcntl` process locks, and of the original `pylocksfile`).
    Share,
}

/// Who owns the locks taken through a handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Open-file-description locks (`F_OFD_SETLK`): each handle is its own
    /// owner, so two handles exclude each other even between threads of one
    /// process, and closing other descriptors of the file drops nothing.
    #[default]
    Ofd,
    /// Process-associated locks (`F_SETLK`): all handles of one file in one
    /// process are one owner, and the kernel detects deadlocks between
    /// processes (`EDEADLK`).
    Process,
    /// `flock(2)` locks on the whole file, the ones util-linux `flock(1)`,
    /// Python's `filelock` and `portalocker`, `fd-lock` and Rust's
    /// `File::lock` take; on Linux they never meet `fcntl` record locks, so
    /// only this mode excludes those tools. Each handle is its own owner,
    /// as in OFD mode. The only span is the whole index space (`..`);
    /// any other is [`SpanError::NotWholeFile`].
    ///
    /// Converting a lock is **not atomic** here: the kernel drops the old
    /// lock before it asks for the new one. A refused upgrade takes the
    /// shared lock back at once, and fails with [`Error::ConversionLost`]
    /// if another owner got the file in that moment (the handle then
    /// refuses every lock until its holders let go); a waiting upgrade
    /// polls (with a back-off capped at 1 ms), tries only when
    /// `/proc/locks` shows the way clear, and keeps its shared lock between
    /// tries. A holder is named by the pid `/proc/locks` shows.
    Flock,
    /// A lock table in shared memory: the sidecar file `<lock path>-shm`
    /// beside the lock file, mapped by every owner, guarded by one robust
    /// process-shared mutex. Each handle is its own owner, as in OFD mode,
    /// with the same spans, kinds, in-place conversion and waits, at the
    /// cost of a futex instead of two `fcntl` calls, and:
    /// - **deadlock detection** for any owner and any cycle length: the
    ///   wait that would close a cycle fails with [`Error::Deadlock`] (two
    ///   readers that both upgrade are such a cycle), unless moving waiters
    ///   ahead in the queue breaks it, as PostgreSQL does. Threads sharing one
    ///   handle are one owner: a cycle through a handle counts even when
    ///   another of its threads could still release;
    /// - **fair grants**: a request waits behind earlier conflicting
    ///   waiters of other owners, so readers cannot starve a writer (a
    ///   conversion, and a request whose own locks hold up the earlier
    ///   waiter, go first; non-blocking tries follow the same rule);
    /// - **all-or-nothing waits**: a change of several pieces waits until
    ///   all can be had, holding none of them meanwhile.
    ///
    /// A holder that dies (even `SIGKILL`) loses its locks: each owner
    /// holds an OFD lock on a byte of the sidecar while it lives, and a
    /// waiter checks its blockers that way every 50 ms, so a dead holder's
    /// waiter gets the lock within about 50 ms. No pid is trusted.
    ///
    /// The sidecar is found by the lock file's path with symlinks resolved,
    /// so a lock file with more than one name (hard links) is refused by
    /// every name ([`SidecarProblem::HardLinked`](crate::SidecarProblem::HardLinked));
    /// a handle opened before the second name appeared keeps working. A
    /// file reached by another path that is the same name (a bind mount)
    /// is not told apart: use one path. Every user holds an OFD read lock
    /// on byte 2⁶³ − 1 of the lock file (past the last index; its bytes
    /// and mode stay untouched), so an opener knows the table is in use
    /// even when the sidecar at its path was removed, replaced or never
    /// made (the lock file renamed): it is refused
    /// ([`SidecarProblem::Replaced`](crate::SidecarProblem::Replaced)), nothing
    /// created or reset, until that table's users are gone. The sidecar
    /// stays when the last user leaves (the next first opener resets it).
    /// A sidecar cut short (truncated) under its users is refused to new
    /// openers, but its users fault (`SIGBUS`) at their next touch of the
    /// table, as with any file-backed shared memory: leave it alone.
    /// It is created with the lock file's permission bits (no
    /// symlink followed, `O_CLOEXEC`); every user must be able to write
    /// it, even one that opens the lock file read-only. It is 4.2 MiB,
    /// sparse: a table in use takes 0.5 to 0.9 MiB of memory (and disk)
    /// (with lock statistics recorded, 640 bytes more per index counted),
    /// plus 40 bytes per lock piece held at the busiest moment. It holds up to
    /// 1,024 owners, 1,024 waiting threads and 65,536 lock pieces
    /// ([`Error::TableFull`] beyond that, for raises only: lowering is
    /// never refused. A release or downgrade that splits a piece when even
    /// the 256 pieces kept back for that are gone leaves the table holding
    /// the stronger lock, never a weaker one, until the owner's next call
    /// finds room; others wait meanwhile). The first opener when no one
    /// uses it resets it; a file that is not a table of this version, or
    /// has the wrong size, is refused ([`Error::Sidecar`]) and left alone.
    /// Network file systems are refused ([`Error::NetworkFileSystem`]:
    /// NFS, SMB/CIFS, 9p, Ceph, AFS, FUSE, Coda, Lustre, GPFS), as mapped
    /// memory is not coherent between hosts.
    ///
    /// Kernel locks never meet the table: opening the file in a kernel
    /// mode while its table is in use, or in this mode while it has
    /// `fcntl` or `flock(2)` locks, fails with [`Error::MixedModes`]. Not
    /// seen: a kernel-mode handle opened before the table came into use
    /// that held nothing when this mode opened. [`crate::shm::Snapshot`]
    /// reads the table from outside.
    Shm,
    /// Session-level advisory locks on a PostgreSQL server, for processes
    /// on several machines: each handle is one server session and its own
    /// owner. Made by [`LockFile::connect`](crate::LockFile::connect)
    /// (feature `postgres`), never by
    /// [`OpenOptions::mode`](crate::OpenOptions::mode) on a path. Indices
    /// stop at `i32::MAX`, and one call takes at most 4096 of them ([`SpanError::TooLong`] otherwise,
    /// and for open-ended spans). The server detects deadlocks and queues
    /// waiters in order; a lost session loses every lock
    /// ([`Error::ConnectionLost`], [`LockFile::lost`](crate::LockFile::lost)).
    Postgres,
}

impl Mode {
    /// Every mode, in the order messages list them.
    pub const ALL: [Mode; 5] = [
        Mode::Ofd,
        Mode::Process,
        Mode::Flock,
        Mode::Shm,
        Mode::Postgres,
    ];

    /// The mode's name, as the CLI's `--mode` and Python's `mode=` take it
    /// (and [`FromStr`](std::str::FromStr) reads back).
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Ofd => "ofd",
            Mode::Process => "process",
            Mode::Flock => "flock",
            Mode::Shm => "shm",
            Mode::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`Mode`]'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownMode(pub String);

impl fmt::Display for UnknownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no lock mode is named {:?}", self.0)
    }
}

impl std::error::Error for UnknownMode {}

impl std::str::FromStr for Mode {
    type Err = UnknownMode;

    /// ```
    /// use locksfile::Mode;
    /// assert_eq!("shm".parse::<Mode>(), Ok(Mode::Shm));
    /// assert!(Mode::ALL.iter().all(|m| m.name().parse() == Ok(*m)));
    /// assert!("fcntl".parse::<Mode>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Mode, UnknownMode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}
