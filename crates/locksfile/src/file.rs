//! The public handle: opening a lock file and taking locks through it.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::engine::fcntl::Fcntl;
use crate::engine::flock::Flock;
#[cfg(feature = "postgres")]
use crate::engine::pg::Pg;
use crate::engine::shm::Shm;
use crate::engine::{self, Engine};
use crate::error::{Error, Holder, NotRegular};
use crate::guard::{ReadGuard, WriteGuard};
use crate::holds::{Change, HandleId};
use crate::kind::Kind;
use crate::owner::Owner;
use crate::party::{Party, EVERYONE};
use crate::registry;
use crate::span::{IntoSpan, Span};
use crate::sys::{self, FileType, OpenHow};
use crate::wait::Wait;

#[cfg(doc)]
use crate::error::SpanError;

/// The owner behind a handle, by engine. One match per call, after which
/// the owner's code is the engine's own (no dynamic call on the hot path).
enum Owners {
    Fcntl(Arc<Owner<Fcntl>>),
    Flock(Arc<Owner<Flock>>),
    Shm(Arc<Owner<Shm>>),
    #[cfg(feature = "postgres")]
    Pg(Arc<Owner<Pg>>),
}

/// Run `$body` with `$o` bound to the owner, whichever engine it has.
macro_rules! with_owner {
    ($owners:expr, $o:ident => $body:expr) => {
        match $owners {
            Owners::Fcntl($o) => $body,
            Owners::Flock($o) => $body,
            Owners::Shm($o) => $body,
            #[cfg(feature = "postgres")]
            Owners::Pg($o) => $body,
        }
    };
}

/// Whether the threads sharing one handle exclude each other.
///
/// An engine only sees owners (a handle, or in [`Mode::Process`] the
/// process); the threads of one owner are told apart above it. By default
/// ([`Threads::Exclude`]) each thread is its own *party*: a lock one thread
/// of the handle holds keeps the others out, as separate handles would,
/// while the takes of one thread still compose (a thread holding a write
/// lock may take a read lock inside it). Each thread also has its own
/// explicit layer ([`LockFile::acquire`] / [`LockFile::release`]). An
/// async task or a pool thread waiting for someone else takes locks as a
/// [`Party`] of its own.
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
    /// it, even one that opens the lock file read-only. It is 3.4 MiB,
    /// sparse: a table in use takes 0.5 to 0.9 MiB of memory (and disk),
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
    /// owner. Made by [`LockFile::connect`] (feature `postgres`), never by
    /// [`OpenOptions::mode`] on a path. Indices stop at `i32::MAX`, and one
    /// call takes at most 4096 of them ([`SpanError::TooLong`] otherwise,
    /// and for open-ended spans). The server detects deadlocks and queues
    /// waiters in order; a lost session loses every lock
    /// ([`Error::ConnectionLost`], [`LockFile::lost`]).
    Postgres,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Ofd => "ofd",
            Mode::Process => "process",
            Mode::Flock => "flock",
            Mode::Shm => "shm",
            Mode::Postgres => "postgres",
        })
    }
}

/// How to open a lock file; [`LockFile::options`] starts one.
///
/// ```
/// use locksfile::{LockFile, Mode};
/// let dir = tempfile::tempdir()?;
/// let lf = LockFile::options()
///     .mode(Mode::Process)
///     .permissions(0o600)
///     .open(dir.path().join("data.lock"))?;
/// assert_eq!(lf.mode(), Mode::Process);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct OpenOptions {
    mode: Mode,
    create: bool,
    write: bool,
    permissions: u32,
    follow_symlinks: bool,
    connect_timeout: Option<Duration>,
    threads: Threads,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            mode: Mode::Ofd,
            create: true,
            write: true,
            permissions: 0o644,
            follow_symlinks: false,
            connect_timeout: None,
            threads: Threads::Exclude,
        }
    }
}

impl OpenOptions {
    /// Defaults: OFD mode, create if missing with mode `0o644`, symlinks refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lock mode (default [`Mode::Ofd`]).
    pub fn mode(&mut self, mode: Mode) -> &mut Self {
        self.mode = mode;
        self
    }

    /// Create the file when missing (default `true`).
    pub fn create(&mut self, create: bool) -> &mut Self {
        self.create = create;
        self
    }

    /// Open for writing when the file allows it (default `true`). With
    /// `false` the file is opened `O_RDONLY` only (and created that way when
    /// missing), as `flock(1)` opens it: the handle takes shared locks
    /// ([`Error::ReadOnly`] for exclusive ones), and a file the caller may
    /// not write never sees a write-open attempt.
    ///
    /// ```
    /// use locksfile::LockFile;
    /// let dir = tempfile::tempdir()?;
    /// let lf = LockFile::options().write(false).open(dir.path().join("data.lock"))?;
    /// assert!(!lf.is_writable());
    /// let _shared = lf.read(0..4)?;
    /// assert!(lf.try_write(5).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write(&mut self, write: bool) -> &mut Self {
        self.write = write;
        self
    }

    /// Permission bits of a file this call creates (default `0o644`),
    /// applied exactly, whatever the process umask. An existing file's
    /// mode is never changed.
    pub fn permissions(&mut self, mode: u32) -> &mut Self {
        self.permissions = mode & 0o7777;
        self
    }

    /// Follow a symbolic link at the lock path (default `false`: refused).
    pub fn follow_symlinks(&mut self, follow: bool) -> &mut Self {
        self.follow_symlinks = follow;
        self
    }

    /// Whether threads sharing the handle exclude each other (default
    /// [`Threads::Exclude`]).
    ///
    /// ```
    /// use locksfile::{LockFile, Threads};
    /// let dir = tempfile::tempdir()?;
    /// let lf = LockFile::open(dir.path().join("data.lock"))?;
    /// let _g = lf.write(0)?;
    /// std::thread::scope(|s| {
    ///     s.spawn(|| assert!(lf.try_write(0).is_err())); // another thread: kept out
    /// });
    /// let shared = LockFile::options().threads(Threads::Share).open(dir.path().join("other.lock"))?;
    /// let _g = shared.write(0)?;
    /// std::thread::scope(|s| {
    ///     s.spawn(|| assert!(shared.try_write(0).is_ok())); // shared: composes
    /// });
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn threads(&mut self, threads: Threads) -> &mut Self {
        self.threads = threads;
        self
    }

    /// How long [`connect`](Self::connect) may take in all (default: the
    /// target's `connect_timeout`, else 10 s).
    pub fn connect_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Connect to a lock namespace on a PostgreSQL server (feature
    /// `postgres`): a new session, dedicated to this handle, whose
    /// session-level advisory locks are the handle's locks. `target` is a
    /// URL, `postgresql://[user[:password]@]host[:port]/dbname?name=NAME`
    /// (a Unix socket's directory as a %-encoded host or `?host=/dir`), or
    /// a libpq key=value string with a `name=NAME` word (`host=/run/pg
    /// dbname=app name=jobs`). `NAME` names the namespace: handles with the
    /// same server, database and name share locks. Unset parts come from
    /// `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE` and `PGPASSWORD` or the
    /// password file (`PGPASSFILE`, `~/.pgpass`) as libpq takes them; the
    /// application name defaults to `locksfile pid N`, which
    /// [`conflicts`](LockFile::conflicts) shows. No TLS. `write(false)`
    /// gives a handle that takes shared locks only; the other options do
    /// not apply. The password is never shown: not in errors, `Debug` or
    /// [`LockFile::path`].
    ///
    /// The namespace table `locksfile_namespaces` (and `locksfile_fences`,
    /// for [`LockFile::fence`]) is created when missing, which needs the
    /// right to create tables in the database once.
    ///
    /// # Errors
    /// [`Error::Connect`], its source's kind telling a malformed target
    /// (`InvalidInput`), refused credentials (`PermissionDenied`), a
    /// missing database or socket (`NotFound`), a refused connection or a
    /// server that does not answer within the timeout (`TimedOut`);
    /// [`Error::Server`] when the namespace table cannot be created.
    #[cfg(feature = "postgres")]
    pub fn connect(&self, target: &str) -> Result<LockFile, Error> {
        let engine = Pg::connect(target, self.connect_timeout, self.write)?;
        let path = PathBuf::from(engine.shown());
        let owner = Owners::Pg(Arc::new(Owner::new(engine)));
        let handle = with_owner!(&owner, o => o.new_handle_id());
        Ok(LockFile {
            owner,
            handle,
            mode: Mode::Postgres,
            path,
            threads: self.threads,
            layers: Layers::default(),
        })
    }

    /// Open (or create) the lock file. Its content is never read, written
    /// or truncated. A file that can only be opened read-only still takes
    /// shared locks.
    ///
    /// # Errors
    /// [`Error::NotRegularFile`] for a directory, FIFO, socket, device or
    /// (unless followed) a symlink; [`Error::Open`] when the file cannot be
    /// opened or created (with the kernel's errno: `ENOENT`, `EACCES`,
    /// `EROFS`, `EMFILE`, ...); [`Error::Unsupported`] when OFD locks are
    /// not available.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<LockFile, Error> {
        self.not_server_mode()?;
        let path = path.as_ref();
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let c = CString::new(abs.as_os_str().as_bytes()).map_err(|_| {
            Error::io(
                "open lock file",
                io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
            )
        })?;
        let owner = match self.reuse(&abs, &c)? {
            Some(owner) => owner,
            None => {
                let (fd, writable) = self.open_path(&abs, &c)?;
                self.owner_of(&abs, fd, writable)?
            }
        };
        self.handle_on(owner, abs)
    }

    /// Lock through a descriptor the caller already has instead of opening
    /// a path: `fstat(fd)` checks that it is a regular file, and
    /// `fcntl(fd, F_GETFL)` whether it was opened for writing (needed for
    /// exclusive locks). Nothing else is done to it: no flag is changed and
    /// no lock is taken or dropped. `create`, `permissions` and
    /// `follow_symlinks` do not apply.
    ///
    /// The handle owns `fd` and closes it when dropped; pass a duplicate
    /// (`try_clone`) to keep yours. In [`Mode::Ofd`] the locks belong to the
    /// open file description, which every duplicate of `fd` shares, also in
    /// other processes (a descriptor a shell opened and passed down): they
    /// last until it is unlocked or its last descriptor is closed, not just
    /// this one. Dropping the handle unlocks what it locked, as always. In
    /// [`Mode::Process`] they belong to this process, as for [`open`](Self::open).
    ///
    /// # Errors
    /// [`Error::NotRegularFile`] when `fd` is not a regular file;
    /// [`Error::Io`] when `fstat` or `fcntl` fails; [`Error::Unsupported`]
    /// when OFD locks are not available.
    ///
    /// # Examples
    /// ```
    /// use locksfile::{Error, Kind, LockFile, Wait};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("data.lock");
    /// let file = std::fs::File::create(&path)?;
    /// let lf = LockFile::options().open_fd(file.try_clone()?.into())?;
    /// lf.acquire(Kind::Exclusive, 2, Wait::NonBlocking)?;
    /// assert!(LockFile::open(&path)?.try_read(2).is_err());
    ///
    /// let dir_fd = std::fs::File::open(dir.path())?;
    /// let refused = LockFile::options().open_fd(dir_fd.into());
    /// assert!(matches!(refused, Err(Error::NotRegularFile { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # References
    /// fcntl(2), "Open file description locks (non-POSIX)".
    pub fn open_fd(&self, fd: OwnedFd) -> Result<LockFile, Error> {
        self.not_server_mode()?;
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap_or_else(|_| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())));
        let writable = self.write
            && sys::is_writable(fd.as_fd()).map_err(|e| Error::io("fcntl lock descriptor", e))?;
        let owner = self.owner_of(&path, fd, writable)?;
        self.handle_on(owner, path)
    }

    /// [`Mode::Postgres`] names no file: refused on a path or descriptor.
    fn not_server_mode(&self) -> Result<(), Error> {
        if self.mode == Mode::Postgres {
            return Err(Error::Unsupported {
                what: "Mode::Postgres on a file (use OpenOptions::connect)",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        Ok(())
    }

    fn handle_on(&self, owner: Owners, path: PathBuf) -> Result<LockFile, Error> {
        let handle = with_owner!(&owner, o => o.new_handle_id());
        let lf = LockFile {
            owner,
            handle,
            mode: self.mode,
            path,
            threads: self.threads,
            layers: Layers::default(),
        };
        if self.mode == Mode::Ofd {
            lf.check_ofd_supported()?;
        }
        Ok(lf)
    }

    /// The owner for a handle on the freshly opened `fd`.
    fn owner_of(&self, path: &Path, fd: OwnedFd, writable: bool) -> Result<Owners, Error> {
        let id = sys::fstat(fd.as_fd()).map_err(|e| Error::io("fstat lock file", e))?;
        if id.file_type != FileType::Regular {
            return Err(Error::NotRegularFile {
                path: path.to_path_buf(),
                found: not_regular(id.file_type),
            });
        }
        self.own(path, id.dev, id.ino, fd, writable)
    }

    /// A new owner of (dev, ino) on `fd` (joining the process-mode one).
    fn own(
        &self,
        path: &Path,
        dev: u64,
        ino: u64,
        fd: OwnedFd,
        writable: bool,
    ) -> Result<Owners, Error> {
        if self.mode != Mode::Shm && engine::table_in_use(path, Some(fd.as_fd())) {
            // Closed through the registry: a process-mode owner of the file
            // in this process would lose its locks to a plain close.
            registry::close(dev, ino, fd);
            return Err(table_in_use(path));
        }
        Ok(match self.mode {
            // `not_server_mode` keeps Postgres away from files.
            Mode::Ofd | Mode::Postgres => Owners::Fcntl(Arc::new(Owner::new(Fcntl::new(
                sys::Family::Ofd,
                dev,
                ino,
                fd,
                writable,
            )))),
            Mode::Process => Owners::Fcntl(registry::join(dev, ino, fd, writable)),
            Mode::Flock => Owners::Flock(Arc::new(Owner::new(Flock::new(dev, ino, fd, writable)))),
            Mode::Shm => Owners::Shm(Arc::new(Owner::new(Shm::open(path, fd, writable)?))),
        })
    }

    /// An owner for a new handle without opening a new descriptor, where the
    /// file already has a process-mode owner in this process. Each
    /// descriptor opened then would have to stay open as long as that owner
    /// lives (closing it would drop the owner's locks), so a process-mode
    /// handle joins the owner and an OFD or flock handle takes a parked
    /// descriptor, an open file description no one else uses (see
    /// `registry`). `None`: open as usual.
    fn reuse(&self, path: &Path, c: &CString) -> Result<Option<Owners>, Error> {
        if !registry::has_owners() {
            return Ok(None);
        }
        // What the path names now; if that goes stale before we use it, the
        // handle is on the file the path named a moment ago, as an open
        // racing a rename would be.
        let Ok(id) = sys::stat(c, self.follow_symlinks) else {
            return Ok(None);
        };
        if id.file_type != FileType::Regular {
            return Ok(None);
        }
        let family = match self.mode {
            Mode::Ofd | Mode::Flock | Mode::Shm | Mode::Postgres => sys::Family::Ofd,
            Mode::Process => sys::Family::Posix,
        };
        let reused = |r| match r {
            registry::Reuse::Joined(_) if engine::table_in_use(path, None) => {
                Some(Err(table_in_use(path)))
            }
            registry::Reuse::Joined(owner) => Some(Ok(Owners::Fcntl(owner))),
            // A parked descriptor may be writable; a read-only handle
            // still takes shared locks only.
            registry::Reuse::Lent(fd, writable) => {
                Some(self.own(path, id.dev, id.ino, fd, writable && self.write))
            }
            registry::Reuse::NoFit | registry::Reuse::NoOwner => None,
        };
        let reused = |r| reused(r).transpose();
        if !self.write {
            // Shared locks only: a descriptor of either kind serves.
            return reused(registry::reuse(id.dev, id.ino, family, true));
        }
        match registry::reuse(id.dev, id.ino, family, false) {
            registry::Reuse::NoOwner => return Ok(None),
            registry::Reuse::NoFit => {}
            r => return reused(r),
        }
        // Nothing writable to reuse. If the file opens for writing now, that
        // descriptor is worth keeping (writable ones are lent again); if it
        // does not, a read-only one is reused rather than one more opened.
        match sys::open(c, self.how(true, false)) {
            Ok(fd) => self.owner_of(path, fd, true).map(Some),
            Err(e) if only_read_only(&e) => reused(registry::reuse(id.dev, id.ino, family, true)),
            // Let the usual open meet and report it.
            Err(_) => Ok(None),
        }
    }

    fn how(&self, write: bool, create_exclusive: bool) -> OpenHow {
        OpenHow {
            write,
            create_exclusive,
            create: false,
            follow: self.follow_symlinks,
            mode: self.permissions,
        }
    }

    fn open_path(&self, path: &Path, c: &CString) -> Result<(OwnedFd, bool), Error> {
        let how = |write, create_exclusive| self.how(write, create_exclusive);
        let open_err = |e: io::Error| -> Error {
            if e.raw_os_error() == Some(libc::ELOOP) && !self.follow_symlinks {
                return Error::NotRegularFile {
                    path: path.to_path_buf(),
                    found: NotRegular::Symlink,
                };
            }
            if e.raw_os_error() == Some(libc::EISDIR) {
                return Error::NotRegularFile {
                    path: path.to_path_buf(),
                    found: NotRegular::Directory,
                };
            }
            if e.raw_os_error() == Some(libc::ENXIO) {
                // open(2) answers ENXIO for a Unix socket (and for a device
                // with no driver): name what is there, as fstat would have.
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::metadata(path) {
                    let t = meta.file_type();
                    let found = if t.is_socket() {
                        Some(NotRegular::Socket)
                    } else if t.is_char_device() || t.is_block_device() {
                        Some(NotRegular::Device)
                    } else {
                        None
                    };
                    if let Some(found) = found {
                        return Error::NotRegularFile {
                            path: path.to_path_buf(),
                            found,
                        };
                    }
                }
            }
            // The kernel's error as it came (errno and all), beside the path.
            Error::Open {
                path: path.to_path_buf(),
                source: e,
            }
        };
        // Two tries: create it exclusively (so we know the mode is ours to
        // set), else open what is there. A file deleted between the two
        // sends us round again.
        for _ in 0..8 {
            if self.create {
                match sys::open(c, how(self.write, true)) {
                    Ok(fd) => {
                        sys::fchmod(fd.as_fd(), self.permissions)
                            .map_err(|e| Error::io("set lock file mode", e))?;
                        return Ok((fd, self.write));
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(open_err(e)),
                }
            }
            match sys::open(c, how(self.write, false)) {
                Ok(fd) => return Ok((fd, self.write)),
                Err(e) if self.write && only_read_only(&e) => {
                    return sys::open(c, how(false, false))
                        .map(|fd| (fd, false))
                        .map_err(open_err);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && self.create => {
                    if self.follow_symlinks {
                        // A dangling symlink: O_EXCL refuses it, so create
                        // through it without O_EXCL (the mode is the umask's).
                        let mut h = how(self.write, false);
                        h.create = true;
                        return sys::open(c, h).map(|fd| (fd, self.write)).map_err(open_err);
                    }
                    continue;
                }
                Err(e) => return Err(open_err(e)),
            }
        }
        Err(Error::io(
            "open lock file",
            io::Error::other("the file kept disappearing"),
        ))
    }
}

fn table_in_use(path: &Path) -> Error {
    Error::MixedModes {
        path: path.to_path_buf(),
        in_use: "a shared-memory lock table",
    }
}

/// Whether a failed open for writing means the file can still be opened
/// read-only (and take shared locks).
fn only_read_only(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::ETXTBSY)
    )
}

fn not_regular(t: FileType) -> NotRegular {
    match t {
        FileType::Directory => NotRegular::Directory,
        FileType::Fifo => NotRegular::Fifo,
        FileType::Socket => NotRegular::Socket,
        FileType::CharDevice | FileType::BlockDevice => NotRegular::Device,
        FileType::Symlink => NotRegular::Symlink,
        FileType::Regular | FileType::Other => NotRegular::Other,
    }
}

/// A handle on a lock file: many numbered reader/writer locks in one file,
/// lock `n` being byte `n`.
///
/// Locks are taken two ways that mix freely: explicitly, as in the original
/// `pylocksfile` ([`acquire`](Self::acquire) / [`release`](Self::release),
/// where the last call on an index wins), and through scoped guards
/// ([`read`](Self::read), [`write`](Self::write) and their `try_`, `_for`
/// and `_until` forms). An index stays locked while any of them covers it,
/// at the strongest kind asked for.
///
/// # Threads
/// `LockFile` is `Send + Sync`. Threads sharing one handle exclude each
/// other as separate handles would, in every mode, while the takes of one
/// thread compose; each thread has its own explicit layer. A guard
/// belongs to the thread that took it, wherever it is dropped. Open with
/// [`Threads::Share`] for handles whose locks are every thread's (see
/// [`Threads`]), and take locks as a [`Party`] of its own for a task.
///
/// # Fork
/// A handle inherited through `fork` fails with [`Error::Forked`] in the
/// child, and dropping it there releases nothing of the parent's.
///
/// ```
/// use locksfile::{Kind, LockFile, Wait};
/// let dir = tempfile::tempdir()?;
/// let lf = LockFile::open(dir.path().join("data.lock"))?;
/// {
///     let _g = lf.write(1..4)?;          // locks 1, 2 and 3, exclusive
///     assert!(LockFile::open(dir.path().join("data.lock"))?.try_read(2).is_err());
/// }                                       // released here
/// lf.acquire(Kind::Shared, 0, Wait::Blocking)?;
/// lf.release_all()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct LockFile {
    owner: Owners,
    /// The explicit layer of the first party to use one.
    handle: HandleId,
    mode: Mode,
    path: PathBuf,
    threads: Threads,
    layers: Layers,
}

/// Which party's explicit layer is which.
#[derive(Default)]
struct Layers {
    /// The party whose layer is the handle's own id (0: none yet).
    first: AtomicU64,
    /// The layers of other parties.
    others: Mutex<Vec<(Party, HandleId)>>,
}

impl fmt::Debug for LockFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockFile")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl LockFile {
    /// Open or create `path` in [`Mode::Ofd`] with the default options.
    ///
    /// # Errors
    /// As [`OpenOptions::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<LockFile, Error> {
        OpenOptions::new().open(path)
    }

    /// Start building [`OpenOptions`].
    pub fn options() -> OpenOptions {
        OpenOptions::new()
    }

    /// [`OpenOptions::connect`] with the default options: a handle on a
    /// lock namespace on a PostgreSQL server (feature `postgres`).
    ///
    /// # Errors
    /// As [`OpenOptions::connect`].
    #[cfg(feature = "postgres")]
    pub fn connect(target: &str) -> Result<LockFile, Error> {
        OpenOptions::new().connect(target)
    }

    /// Whether `s` names a lock namespace on a server rather than a lock
    /// file, where both are accepted (the CLI, Python): a `postgresql://`
    /// or `postgres://` URL, or a libpq key=value string whose first word
    /// is `key=value` (lowercase key) and which has a `name=` word. A file
    /// named like that is given as `./host=...`.
    ///
    /// ```
    /// use locksfile::LockFile;
    /// assert!(LockFile::is_server_target("postgresql://db/app?name=jobs"));
    /// assert!(LockFile::is_server_target("host=/run/postgresql dbname=app name=jobs"));
    /// assert!(!LockFile::is_server_target("./host=x name=y"));
    /// assert!(!LockFile::is_server_target("/var/lock/app.lock"));
    /// ```
    #[cfg(feature = "postgres")]
    pub fn is_server_target(s: &str) -> bool {
        engine::is_server_target(s)
    }

    /// Whether the handle's server session is lost (server restart,
    /// failover, network loss, the backend terminated), and every lock
    /// with it: calls then fail with [`Error::ConnectionLost`] and
    /// [`held`](Self::held) is empty. Checks without a round trip (a flag
    /// set by a failed call, and a `poll` of the socket for a hang-up), so
    /// a partition shows once TCP keepalive gives up (about 30 s). Always
    /// `false` for a lock file.
    pub fn lost(&self) -> bool {
        with_owner!(&self.owner, o => o.engine.session_lost())
    }

    /// Whether the owner's locks are gone while its guards live: its
    /// server session was lost ([`lost`](Self::lost)), or a
    /// [`Mode::Flock`] conversion was lost ([`Error::ConversionLost`]).
    pub(crate) fn locks_lost(&self) -> bool {
        with_owner!(&self.owner, o => o.engine.locks_lost().is_some())
    }

    /// Every lock other sessions hold or wait for in this handle's
    /// PostgreSQL namespace, in index order, from `pg_locks` and
    /// `pg_stat_activity` (feature `postgres`); what `locksfile status`
    /// shows. A snapshot.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a lock file; [`Error::ConnectionLost`];
    /// [`Error::Server`].
    #[cfg(feature = "postgres")]
    pub fn server_locks(&self) -> Result<Vec<crate::ServerLock>, Error> {
        match &self.owner {
            Owners::Pg(o) => o.engine.locks(Span::ALL, None, false),
            _ => Err(Error::Unsupported {
                what: "listing server locks (PostgreSQL handles only)",
                source: io::Error::from(io::ErrorKind::Unsupported),
            }),
        }
    }

    /// A fencing token for lock `index`, which this handle must hold
    /// exclusively (feature `postgres`): a number that grows with every
    /// call for that lock of the namespace, whoever makes it
    /// (`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` on the table
    /// `locksfile_fences`). Take one after each exclusive grant and send it
    /// with every write to a resource outside the database; the resource
    /// keeps the highest token it has seen and refuses writes with a lower
    /// one, so a holder that lost its lock without knowing (a pause, a
    /// partition) cannot write over its successor.
    ///
    /// # Errors
    /// [`Error::NotHeld`] unless held exclusively; [`Error::Unsupported`]
    /// for a lock file; [`Error::ConnectionLost`]; [`Error::Server`].
    pub fn fence(&self, index: u64) -> Result<u64, Error> {
        match &self.owner {
            #[cfg(feature = "postgres")]
            Owners::Pg(o) => {
                if o.is_inherited() {
                    return Err(Error::Forked);
                }
                o.engine.fence(index)
            }
            _ => {
                let _ = index;
                Err(Error::Unsupported {
                    what: "fencing tokens (PostgreSQL handles only)",
                    source: io::Error::from(io::ErrorKind::Unsupported),
                })
            }
        }
    }

    /// The lock mode chosen at open.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The absolute path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this handle's mode offers beyond mutual exclusion: whether a
    /// wait that would deadlock is refused ([`Error::Deadlock`], process
    /// and shm modes) or waits forever (OFD mode), whether waiters are
    /// served in order (shm mode), whether a dead holder's locks are freed.
    ///
    /// ```
    /// use locksfile::{LockFile, Mode};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("data.lock");
    /// assert!(!LockFile::open(&path)?.abilities().detects_deadlocks);
    /// let p = LockFile::options().mode(Mode::Process).open(&path)?;
    /// assert!(p.abilities().detects_deadlocks);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn abilities(&self) -> crate::Abilities {
        with_owner!(&self.owner, o => o.engine.abilities())
    }

    /// In [`Mode::Shm`], this handle's owner id as
    /// [`shm::Snapshot`](crate::shm::Snapshot) lists it; `None` in the
    /// kernel modes.
    pub fn table_owner(&self) -> Option<u64> {
        match &self.owner {
            Owners::Shm(o) => Some(o.engine.owner_id()),
            _ => None,
        }
    }

    /// Whether the file could be opened for writing (needed for exclusive locks).
    pub fn is_writable(&self) -> bool {
        with_owner!(&self.owner, o => o.engine.writable())
    }

    fn check_ofd_supported(&self) -> Result<(), Error> {
        // F_OFD_GETLK on an old kernel answers EINVAL: say so now rather
        // than at the first lock, and never fall back to process locks.
        with_owner!(&self.owner, o => o.probe(Span::ALL, Kind::Shared).map(|_| ()))
    }

    /// Who the calling thread takes locks for.
    #[inline]
    pub(crate) fn party(&self) -> Party {
        match self.threads {
            Threads::Exclude => Party::current(),
            Threads::Share => EVERYONE,
        }
    }

    /// Whether threads sharing this handle exclude each other.
    pub fn threads(&self) -> Threads {
        self.threads
    }

    /// The explicit layer of `party` (`None` if it has none and `make` is false).
    #[inline]
    fn layer(&self, party: Party, make: bool) -> Option<HandleId> {
        if self.layers.first.load(Ordering::Relaxed) == party.id() {
            return Some(self.handle);
        }
        self.other_layer(party, make)
    }

    #[cold]
    #[inline(never)]
    fn other_layer(&self, party: Party, make: bool) -> Option<HandleId> {
        let mut others = self.layers.others.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(_, h)) = others.iter().find(|(p, _)| *p == party) {
            return Some(h);
        }
        if !make {
            return None;
        }
        let first = &self.layers.first;
        if first
            .compare_exchange(0, party.id(), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            || first.load(Ordering::Relaxed) == party.id()
        {
            return Some(self.handle);
        }
        let h = with_owner!(&self.owner, o => o.new_handle_id());
        others.push((party, h));
        Some(h)
    }

    /// Every explicit layer of this handle, with its party.
    fn all_layers(&self) -> Vec<(Party, HandleId)> {
        if self.threads == Threads::Share {
            return vec![(EVERYONE, self.handle)];
        }
        let others = self.layers.others.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = others.clone();
        match self.layers.first.load(Ordering::Relaxed) {
            0 => {}
            // A handle whose threads share was never claimed by a party.
            id => all.push((Party::from_id(id), self.handle)),
        }
        all
    }

    /// Explicit change of the calling party's layer.
    fn explicit(
        &self,
        span: Span,
        kind: Option<Kind>,
        wait: Wait,
        cancel: Option<&Cancel>,
    ) -> Result<(), Error> {
        let party = self.party();
        let Some(handle) = self.layer(party, kind.is_some()) else {
            // Nothing of this party's to release.
            return with_owner!(&self.owner, o => if o.is_inherited() { Err(Error::Forked) } else { Ok(()) });
        };
        self.change_or_cancel(Change::Explicit { handle, span, kind }, wait, cancel, party)
    }

    /// [`LockFile::change`] for `party`, and a wait ends when `cancel` is cancelled.
    #[inline]
    pub(crate) fn change_or_cancel(
        &self,
        change: Change,
        wait: Wait,
        cancel: Option<&Cancel>,
        party: Party,
    ) -> Result<(), Error> {
        // Only a change asking for exclusive can need an exclusive lock, and
        // an owner that cannot write never holds one: refuse it here, where
        // the path is known, before anything is tried.
        let wants_exclusive = match change {
            Change::Guard { to, .. } => to == Some(Kind::Exclusive),
            Change::Explicit { kind, .. } => kind == Some(Kind::Exclusive),
        };
        let done = with_owner!(&self.owner, o => self.change_on(o, change, wait, cancel, wants_exclusive, party));
        match done {
            Ok(()) => Ok(()),
            Err(e) => Err(self.locate(e, change)),
        }
    }

    /// A contention error from `change`, saying where: this handle's lock
    /// file (or server target), the span and the kind asked for.
    #[cold]
    #[inline(never)]
    fn locate(&self, e: Error, change: Change) -> Error {
        let kind = match change {
            Change::Guard { to, .. } => to,
            Change::Explicit { kind, .. } => kind,
        };
        let Some(kind) = kind else { return e };
        e.located(|| crate::error::At {
            file: self.shown(),
            span: change.span(),
            kind,
        })
    }

    /// The lock file's path, or the server target without its password.
    fn shown(&self) -> String {
        match with_owner!(&self.owner, o => o.engine.target()) {
            Some(target) => target.to_string(),
            None => self.path.display().to_string(),
        }
    }

    /// [`LockFile::change`] on one engine: what it can never do is
    /// refused before anything is tried (a span it cannot take, a lock
    /// asked of an owner whose locks are lost, an exclusive one of a
    /// read-only file).
    #[inline]
    fn change_on<E: Engine>(
        &self,
        o: &Owner<E>,
        change: Change,
        wait: Wait,
        cancel: Option<&Cancel>,
        wants_exclusive: bool,
        party: Party,
    ) -> Result<(), Error> {
        let wants_lock = match change {
            Change::Guard { to, .. } => to.is_some(),
            Change::Explicit { kind, .. } => kind.is_some(),
        };
        o.engine.check_span(change.span(), wants_lock)?;
        if wants_exclusive && !o.engine.writable() {
            return Err(self.read_only());
        }
        if wants_lock {
            if let Some(e) = o.engine.locks_lost() {
                return Err(e);
            }
        }
        o.change_or_cancel(change, wait, cancel, party)
    }

    #[cold]
    fn read_only(&self) -> Error {
        Error::ReadOnly {
            path: self.path.clone(),
        }
    }

    /// `fcntl(F_OFD_SETLK | F_SETLK[W])`: lock `span` at `kind` in this
    /// handle's explicit layer (`flock(LOCK_SH | LOCK_EX)` on the whole file
    /// in [`Mode::Flock`]). Acquiring over a span it already holds converts
    /// it in place (atomically in the kernel, except in [`Mode::Flock`]: see
    /// there): the last call wins.
    /// Acquiring what the owner already holds at that kind makes no system call.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] (with the holder) when `wait` is
    /// [`Wait::NonBlocking`] and another owner is in the way;
    /// [`Error::TimedOut`]; [`Error::Deadlock`] (process mode);
    /// [`Error::InvalidSpan`] (in [`Mode::Flock`] for any span but `..`);
    /// [`Error::ReadOnly`] for an exclusive lock on a read-only file;
    /// [`Error::Forked`]. On error nothing changed, except after
    /// [`Error::ConversionLost`] (flock mode), which says what was lost.
    ///
    /// # References
    /// fcntl(2), "Advisory record locking".
    #[doc(alias = "F_SETLK")]
    #[doc(alias = "F_OFD_SETLK")]
    pub fn acquire(&self, kind: Kind, span: impl IntoSpan, wait: Wait) -> Result<(), Error> {
        let span = span.into_span()?;
        self.explicit(span, Some(kind), wait, None)
    }

    /// As [`acquire`](Self::acquire), and [`Cancel::cancel`] from another
    /// thread (or task) ends the wait with [`Error::Cancelled`], nothing
    /// changed. The wait is one wait for the engine whatever `wait` says,
    /// so fair queueing and deadlock detection hold for it.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire), and [`Error::Cancelled`].
    pub fn acquire_cancellable(
        &self,
        kind: Kind,
        span: impl IntoSpan,
        wait: Wait,
        cancel: &Cancel,
    ) -> Result<(), Error> {
        let span = span.into_span()?;
        self.explicit(span, Some(kind), wait, Some(cancel))
    }

    /// Drop this handle's explicit locks on `span`. Indices still covered by
    /// a guard (or, in process mode, another handle) stay locked at the kind
    /// those need. Releasing what is not held is harmless. Never blocks.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`], [`Error::Forked`], or a failed unlock call.
    pub fn release(&self, span: impl IntoSpan) -> Result<(), Error> {
        let span = span.into_span()?;
        self.explicit(span, None, Wait::NonBlocking, None)
    }

    /// Drop all of this handle's explicit locks. Guards stay.
    ///
    /// # Errors
    /// As [`release`](Self::release).
    pub fn release_all(&self) -> Result<(), Error> {
        self.release(Span::ALL)
    }

    /// Everything the owner holds (the handle in OFD mode; every handle of
    /// this file in this process in process mode), with guards, piece by piece.
    /// A lost server session holds nothing, whatever guards remain.
    pub fn held(&self) -> Vec<(Span, Kind)> {
        if self.lost() {
            return Vec::new();
        }
        with_owner!(&self.owner, o => o.held())
    }

    /// This handle's explicit locks only.
    pub fn held_explicitly(&self) -> Vec<(Span, Kind)> {
        if self.lost() {
            return Vec::new();
        }
        match self.layer(self.party(), false) {
            Some(handle) => with_owner!(&self.owner, o => o.explicit(handle)),
            None => Vec::new(),
        }
    }

    /// `fcntl(F_OFD_GETLK | F_GETLK)`: the first lock of another owner that
    /// would conflict with `kind` on `span`, or `None`. A snapshot: it may
    /// be stale by the time it returns. In [`Mode::Flock`], which has no
    /// such call, the `FLOCK` lines of `/proc/locks`, with the pid that took
    /// the lock.
    ///
    /// # Errors
    /// [`Error::InvalidSpan`], [`Error::Forked`], or the call failing.
    #[doc(alias = "F_GETLK")]
    #[doc(alias = "F_OFD_GETLK")]
    pub fn conflicts(&self, kind: Kind, span: impl IntoSpan) -> Result<Option<Holder>, Error> {
        let span = span.into_span()?;
        with_owner!(&self.owner, o => {
            o.engine.check_span(span, false)?;
            o.probe(span, kind)
        })
    }

    /// Wait for a shared lock on `span`; released when the guard drops.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    pub fn read(&self, span: impl IntoSpan) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::Blocking)
    }

    /// Wait for an exclusive lock on `span`; released when the guard drops.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    pub fn write(&self, span: impl IntoSpan) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::Blocking)
    }

    /// A shared lock on `span` if no one is in the way.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] on conflict; else as [`acquire`](Self::acquire).
    pub fn try_read(&self, span: impl IntoSpan) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::NonBlocking)
    }

    /// An exclusive lock on `span` if no one is in the way.
    ///
    /// # Errors
    /// [`Error::WouldBlock`] on conflict; else as [`acquire`](Self::acquire).
    pub fn try_write(&self, span: impl IntoSpan) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::NonBlocking)
    }

    /// A shared lock on `span`, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn read_for(
        &self,
        span: impl IntoSpan,
        timeout: Duration,
    ) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::Timeout(timeout))
    }

    /// An exclusive lock on `span`, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn write_for(
        &self,
        span: impl IntoSpan,
        timeout: Duration,
    ) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::Timeout(timeout))
    }

    /// A shared lock on `span`, waiting until `deadline` at the latest.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn read_until(
        &self,
        span: impl IntoSpan,
        deadline: Instant,
    ) -> Result<ReadGuard<&Self>, Error> {
        ReadGuard::acquire(self, span, Wait::Deadline(deadline))
    }

    /// An exclusive lock on `span`, waiting until `deadline` at the latest.
    ///
    /// # Errors
    /// [`Error::TimedOut`]; else as [`acquire`](Self::acquire).
    pub fn write_until(
        &self,
        span: impl IntoSpan,
        deadline: Instant,
    ) -> Result<WriteGuard<&Self>, Error> {
        WriteGuard::acquire(self, span, Wait::Deadline(deadline))
    }
}

impl AsFd for LockFile {
    /// The descriptor locks go through. Closing a duplicate of it in
    /// process mode would drop the process's locks on the file: don't.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.owner {
            Owners::Fcntl(o) => {
                let raw = o.engine.raw_fd();
                // The owner keeps every descriptor it ever held open as long
                // as it lives, and `self` keeps the owner alive.
                sys::borrow_raw(raw)
            }
            Owners::Flock(o) => o.engine.fd(),
            Owners::Shm(o) => o.engine.lock_fd(),
            #[cfg(feature = "postgres")]
            Owners::Pg(o) => o.engine.socket(),
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if with_owner!(&self.owner, o => o.is_inherited()) {
            // Inherited through fork: the parent's locks are not ours (a
            // flock(2) lock, like an OFD one, is shared with the child
            // through the open file description: unlocking would free it).
            return;
        }
        match &self.owner {
            Owners::Fcntl(o) if self.mode == Mode::Process => {
                for (party, handle) in self.all_layers() {
                    let _ = o.forget_handle(handle, party);
                }
                registry::leave(o);
            }
            owners => with_owner!(owners, o => o.unlock_everything()),
        }
    }
}
