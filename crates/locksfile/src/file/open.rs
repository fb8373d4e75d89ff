//! Opening a lock file: [`OpenOptions`], and the owner a new handle gets
//! (a new one, or the process-mode owner and parked descriptors of the file
//! in this process).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::mode::{Mode, Threads};
use super::{Layers, LockFile, Owners};
use crate::engine;
use crate::engine::fcntl::Fcntl;
use crate::engine::flock::Flock;
#[cfg(feature = "postgres")]
use crate::engine::pg::Pg;
use crate::engine::shm::Shm;
use crate::error::{Error, NotRegular};
use crate::owner::Owner;
use crate::registry;
use crate::sys::{self, FileType, OpenHow};

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
    stats: bool,
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
            stats: crate::stats::env_default(),
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

    /// Record lock statistics ([`LockFile::stats`]): per index and per
    /// owner, acquisitions, contention, timeouts, deadlocks, wait and hold
    /// times. Off by default (on when the environment variable
    /// `LOCKSFILE_STATS` is `1`): recording reads the clock at every grant
    /// and release. In [`Mode::Shm`] the figures are the table's, kept in
    /// its shared memory for every owner that records; elsewhere the
    /// handle's own (in process mode, shared by the process's handles on
    /// the file, which are one owner).
    pub fn stats(&mut self, record: bool) -> &mut Self {
        self.stats = record;
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
    /// [`conflicts`](LockFile::conflicts) shows. libpq's `keepalives`,
    /// `keepalives_idle`, `keepalives_interval`, `keepalives_count` and
    /// `tcp_user_timeout` set the TCP session's keepalive (default: 10 s,
    /// 4 probes 5 s apart, 30 s). `write(false)`
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
    /// server that does not answer within the timeout (`TimedOut`), a
    /// server session that is not the handle's own, shared with another
    /// client or changing between statements, as behind PgBouncer in
    /// transaction mode (`Unsupported`); [`Error::Server`] when the
    /// namespace table cannot be created.
    #[cfg(feature = "postgres")]
    pub fn connect(&self, target: &str) -> Result<LockFile, Error> {
        let engine = Pg::connect(target, self.connect_timeout, self.write)?;
        let path = PathBuf::from(engine.shown());
        let owner = Owners::Pg(Arc::new(Owner::new(engine)));
        if self.stats {
            with_owner!(&owner, o => o.record_stats());
        }
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
        if self.stats {
            with_owner!(&owner, o => o.record_stats());
        }
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
            crate::descriptors::close(dev, ino, fd);
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
}
