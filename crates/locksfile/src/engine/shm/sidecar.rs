//! Opening the sidecar `<lock path>-shm` and joining its table: the lock
//! file's in-use marker ([`IN_USE`]), the sidecar's DMS byte, the magic,
//! version, size and lock file checks before mapping, and the first
//! opener's setting up. The header is read here with `pread`, never through
//! a mapping; the table is written only through a `TableLock`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, NotRegular, SidecarProblem};
use crate::sys::{self, Family, FileType, LockType, OpenHow, Range};

use super::layout::{DMS, MAGIC, SIZE, VERSION};
use super::table::Map;

/// Byte of the *lock file* every user of its table holds shared (an OFD
/// read lock through a description of its own), from before it joins the
/// table until after it has let go of it. Whoever gets it exclusively is
/// the only opener, and only then may a table be set up; an opener that
/// cannot finds the sidecar in use, or refuses it as
/// [`SidecarProblem::Replaced`]. It is past the last index
/// ([`INDEX_END`]), so no kernel-mode span but an open-ended one (`a..`,
/// which then meets it) ever covers it, and it tells kernel-mode opens
/// that a table is in use without looking for the sidecar.
pub(crate) const IN_USE: i64 = i64::MAX;

/// The sidecar of a lock path: `<path>-shm`.
pub(crate) fn sidecar_path(lock_path: &Path) -> PathBuf {
    let mut s = lock_path.as_os_str().to_owned();
    s.push("-shm");
    PathBuf::from(s)
}

pub(super) fn cstring(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            "open lock table",
            io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        )
    })
}

/// The network file systems refused, by `f_type` (statfs(2)).
pub(super) fn network_fs(magic: i64) -> Option<&'static str> {
    Some(match magic as u32 {
        0x6969 => "NFS",
        0x517B => "SMB",
        0xFF53_4D42 => "CIFS",
        0xFE53_4D42 => "SMB2",
        0x0102_1997 => "9p",
        0x00C3_6400 => "Ceph",
        0x5346_414F | 0x6B41_4653 => "AFS",
        0x6573_5546 => "FUSE",
        0x7375_7245 => "Coda",
        0x0BD0_0BD0 => "Lustre",
        0x4750_4653 => "GPFS",
        _ => return None,
    })
}

pub(super) fn byte(at: i64) -> Range {
    Range { start: at, len: 1 }
}

/// Open `<lock path>-shm`, creating it (if `create`) with the lock file's
/// permission bits when missing, by the lock file's rules.
pub(super) fn open_sidecar(
    sidecar: &Path,
    mode: u32,
    write: bool,
    create: bool,
) -> Result<OwnedFd, Error> {
    let c = cstring(sidecar)?;
    let open_err = |e: io::Error| -> Error {
        match e.raw_os_error() {
            Some(libc::ELOOP) => Error::NotRegularFile {
                path: sidecar.to_path_buf(),
                found: NotRegular::Symlink,
            },
            Some(libc::EISDIR) => Error::NotRegularFile {
                path: sidecar.to_path_buf(),
                found: NotRegular::Directory,
            },
            _ => Error::Open {
                path: sidecar.to_path_buf(),
                source: e,
            },
        }
    };
    let how = |create_exclusive| OpenHow {
        write,
        create_exclusive,
        create: false,
        follow: false,
        mode,
    };
    let fd = loop {
        if write && create {
            match sys::open(&c, how(true)) {
                Ok(fd) => {
                    sys::fchmod(fd.as_fd(), mode)
                        .map_err(|e| Error::io("set lock table mode", e))?;
                    break fd;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(open_err(e)),
            }
        }
        match sys::open(&c, how(false)) {
            Ok(fd) => break fd,
            Err(e) if write && create && e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(open_err(e)),
        }
    };
    let id = sys::fstat(fd.as_fd()).map_err(|e| Error::io("fstat lock table", e))?;
    if id.file_type != FileType::Regular {
        return Err(Error::NotRegularFile {
            path: sidecar.to_path_buf(),
            found: NotRegular::Other,
        });
    }
    Ok(fd)
}

pub(super) fn set_byte(fd: BorrowedFd<'_>, ty: LockType, at: i64, wait: bool) -> io::Result<()> {
    loop {
        match sys::set_lock(fd, Family::Ofd, ty, byte(at), wait) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r,
        }
    }
}

pub(super) fn is_contention(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

/// Map the sidecar open as `fd` through a new open file description of
/// it. A mapping keeps its open file description alive, and children
/// inherit mappings: mapped through `fd`, a forked child would keep the
/// owner's liveness lock (held through `fd`'s description) after the owner
/// died.
pub(super) fn map_table(fd: BorrowedFd<'_>) -> io::Result<Map> {
    let again = reopen(fd, true)?;
    Map::new(again.as_fd())
}

/// Read the header's first fields with `pread` (never through a mapping,
/// which a short file would fault).
pub(super) fn read_header(fd: BorrowedFd<'_>) -> io::Result<(u64, u32, u64, u64, u64)> {
    let mut buf = [0u8; 40];
    let n = sys::pread(fd, &mut buf, 0)?;
    if n < buf.len() {
        return Ok((0, 0, 0, 0, 0));
    }
    let u64_at = |i: usize| u64::from_ne_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
    let version = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
    Ok((u64_at(0), version, u64_at(16), u64_at(24), u64_at(32)))
}

/// Join the table in `sidecar` for the lock file (dev, ino): reset it if
/// no one uses it, else check it and map it. Only the `first` opener (it
/// holds the lock file's [`IN_USE`] byte exclusively) may set a table up;
/// any other gets `Ok(None)` where it would have to: the table in use is
/// not this file, or its users are coming or going (try again).
#[allow(unsafe_code)] // the first opener makes the table's mutex
pub(super) fn join(
    sidecar: &Path,
    fd: BorrowedFd<'_>,
    dev: u64,
    ino: u64,
    first: bool,
) -> Result<Option<Map>, Error> {
    let bad = |problem| Error::Sidecar {
        path: sidecar.to_path_buf(),
        problem,
    };
    let io_err = |op| move |e| Error::io(op, e);
    // A table whose first opener died while setting it up has no magic
    // number yet: whoever holds it shared lets go and tries again, until
    // one opener finds the DMS byte free and sets it up.
    for _ in 0..1000 {
        match set_byte(fd, LockType::Write, DMS, false) {
            Ok(()) if !first => {
                // Others hold the lock file's marker but not this table.
                set_byte(fd, LockType::Unlock, DMS, false).map_err(io_err("unlock lock table"))?;
                return Ok(None);
            }
            Ok(()) => {
                // No one has the table open: reset it, unless it is not
                // ours (a file of the table's size that starts with zeros
                // is ours, its setting up cut short).
                let st = sys::fstat(fd).map_err(io_err("fstat lock table"))?;
                if st.size > 0 {
                    let (magic, version, ..) =
                        read_header(fd).map_err(io_err("read lock table"))?;
                    let unfinished = magic == 0 && st.size == SIZE as u64;
                    if magic != MAGIC && !unfinished {
                        return Err(bad(SidecarProblem::Foreign));
                    }
                    if version > VERSION {
                        return Err(bad(SidecarProblem::NewerVersion { found: version }));
                    }
                }
                sys::ftruncate(fd, 0).map_err(io_err("reset lock table"))?;
                sys::ftruncate(fd, SIZE as u64).map_err(io_err("size lock table"))?;
                let map = map_table(fd).map_err(io_err("map lock table"))?;
                // SAFETY: we hold the DMS byte exclusively, so no one else
                // has the table mapped and in use; the mutex memory is ours.
                unsafe { map.init_mutex() }.map_err(io_err("initialise lock table mutex"))?;
                {
                    let (mut g, _) = map.lock().map_err(io_err("lock table mutex"))?;
                    g.init(dev, ino);
                    // Last: a table with its magic number is complete.
                    g.header().magic = MAGIC;
                }
                // Atomic conversion: no opener slips in between.
                set_byte(fd, LockType::Read, DMS, false).map_err(io_err("share lock table"))?;
                return Ok(Some(map));
            }
            Err(e) if is_contention(&e) => {
                // In use, or being set up: wait for a share.
                set_byte(fd, LockType::Read, DMS, true).map_err(io_err("share lock table"))?;
                let (magic, ..) = read_header(fd).map_err(io_err("read lock table"))?;
                let st = sys::fstat(fd).map_err(io_err("fstat lock table"))?;
                if magic == 0 && (st.size == 0 || st.size == SIZE as u64) {
                    set_byte(fd, LockType::Unlock, DMS, false)
                        .map_err(io_err("unlock lock table"))?;
                    if !first {
                        // Only a first opener sets a table up.
                        return Ok(None);
                    }
                    std::thread::yield_now();
                    continue;
                }
                let map = check_and_map(sidecar, fd, Some((dev, ino)))?;
                return Ok(Some(map));
            }
            Err(e) => return Err(Error::io("lock lock table", e)),
        }
    }
    Err(Error::io(
        "open lock table",
        io::Error::other("its first opener never finished setting it up"),
    ))
}

/// Check a sidecar in use (magic, version, size, lock file) and map it.
pub(super) fn check_and_map(
    sidecar: &Path,
    fd: BorrowedFd<'_>,
    lock_file: Option<(u64, u64)>,
) -> Result<Map, Error> {
    let bad = |problem| Error::Sidecar {
        path: sidecar.to_path_buf(),
        problem,
    };
    let st = sys::fstat(fd).map_err(|e| Error::io("fstat lock table", e))?;
    let (magic, version, size, dev, ino) =
        read_header(fd).map_err(|e| Error::io("read lock table", e))?;
    if magic != MAGIC {
        return Err(bad(SidecarProblem::Foreign));
    }
    if version != VERSION {
        return Err(bad(SidecarProblem::NewerVersion { found: version }));
    }
    if st.size != SIZE as u64 || size != SIZE as u64 {
        return Err(bad(SidecarProblem::WrongSize {
            found: st.size,
            expected: SIZE as u64,
        }));
    }
    if let Some(id) = lock_file {
        if (dev, ino) != id {
            return Err(bad(SidecarProblem::OtherLockFile));
        }
    }
    map_table(fd).map_err(|e| Error::io("map lock table", e))
}

/// The path the lock file really has (symlinks resolved), so that every
/// name that reaches it through a symlink finds one sidecar. The kernel
/// tells it for the open descriptor; `given` where it cannot.
pub(super) fn real_path(given: &Path, fd: BorrowedFd<'_>) -> PathBuf {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(p) if p.is_absolute() && !p.as_os_str().as_bytes().ends_with(b" (deleted)") => p,
        _ => given.to_path_buf(),
    }
}

/// Whether the sidecar of `lock_path` is in use (someone holds its DMS
/// byte): a kernel-mode open must then be refused.
pub(crate) fn table_in_use(lock_path: &Path, lock_fd: Option<BorrowedFd<'_>>) -> bool {
    if let Some(fd) = lock_fd {
        match sys::get_lock(fd, Family::Ofd, LockType::Write, byte(IN_USE)) {
            Ok(None) => return false,
            // Starting at the marker (the kernel tells a lock on the last
            // byte as running to the end): a table's user. Anything else
            // covering it is a kernel lock on `a..`: ask the sidecar.
            Ok(Some(b)) if b.range.start == IN_USE => return true,
            _ => {}
        }
    }
    let real = match lock_fd {
        Some(fd) => real_path(lock_path, fd),
        None => std::fs::canonicalize(lock_path).unwrap_or_else(|_| lock_path.to_path_buf()),
    };
    let sidecar = sidecar_path(&real);
    let Ok(c) = CString::new(sidecar.as_os_str().as_bytes()) else {
        return false;
    };
    let how = OpenHow::existing(false);
    let Ok(fd) = sys::open(&c, how) else {
        return false;
    };
    match sys::fstat(fd.as_fd()) {
        Ok(id) if id.file_type == FileType::Regular => {}
        _ => return false,
    }
    matches!(
        sys::get_lock(fd.as_fd(), Family::Ofd, LockType::Write, byte(DMS)),
        Ok(Some(_))
    )
}

/// What kernel locks the lock file has, if any: `Shm` refuses to join
/// then.
pub(super) fn kernel_locks(lock_fd: BorrowedFd<'_>, dev: u64, ino: u64) -> Option<&'static str> {
    // Every index, not the in-use marker other users of the table hold.
    let all = Range {
        start: 0,
        len: IN_USE,
    };
    if let Ok(Some(_)) = sys::get_lock(lock_fd, Family::Ofd, LockType::Write, all) {
        return Some("fcntl record locks");
    }
    // flock(2) locks are listed only in /proc/locks, whose every read
    // walks every lock of the machine under a global lock: a table with
    // many owners holds many. Its users are refused to flock users of
    // this library, so the first opener alone looks.
    if matches!(
        sys::get_lock(lock_fd, Family::Ofd, LockType::Write, byte(IN_USE)),
        Ok(Some(b)) if b.range.start == IN_USE
    ) {
        return None;
    }
    if let Ok(lines) = sys::flock_locks(dev, ino) {
        if !lines.is_empty() {
            return Some("flock(2) locks");
        }
    }
    None
}

/// A new open file description of the file open as `fd`.
pub(super) fn reopen(fd: BorrowedFd<'_>, write: bool) -> io::Result<OwnedFd> {
    let proc =
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number");
    let how = OpenHow {
        write,
        create_exclusive: false,
        create: false,
        follow: true,
        mode: 0,
    };
    let again = sys::open(&proc, how)?;
    let (a, b) = (sys::fstat(fd)?, sys::fstat(again.as_fd())?);
    if (a.dev, a.ino) != (b.dev, b.ino) {
        return Err(io::Error::other(
            "the file changed while being opened again",
        ));
    }
    Ok(again)
}

/// Take the lock file's [`IN_USE`] byte through `mark`: exclusively when
/// no one else holds it (`true`: the first opener, the only one that may
/// set a table up), else shared, once no first opener is setting up. A
/// read-only description can only share it: it is first when no one else
/// holds it (two such openers at once may both be; the sidecar's DMS byte
/// still lets only one set the table up).
pub(super) fn take_marker(mark: BorrowedFd<'_>, write: bool) -> io::Result<bool> {
    if !write {
        set_byte(mark, LockType::Read, IN_USE, true)?;
        return Ok(sys::get_lock(mark, Family::Ofd, LockType::Write, byte(IN_USE))?.is_none());
    }
    match set_byte(mark, LockType::Write, IN_USE, false) {
        Ok(()) => return Ok(true),
        Err(e) if is_contention(&e) => {}
        Err(e) => return Err(e),
    }
    set_byte(mark, LockType::Read, IN_USE, true)?;
    // Everyone else may have gone meanwhile: then this opener is first.
    match set_byte(mark, LockType::Write, IN_USE, false) {
        Ok(()) => Ok(true),
        Err(e) if is_contention(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Tries of [`join_marked`] while others hold the marker but not the table
/// (openers that have not joined it yet): the first few after yielding,
/// the rest after 1 ms each.
pub(super) const MARKED_TRIES: u32 = 200;

/// Take the in-use marker through `mark` and join the table in `sidecar`:
/// its descriptor (carrying a share of the DMS byte) and mapping. Holding
/// the marker shared while the sidecar is missing, or no one holds its DMS
/// byte, means the table in use was removed or replaced: refused, nothing
/// created or reset.
pub(super) fn join_marked(
    sidecar: &Path,
    mark: BorrowedFd<'_>,
    write: bool,
    id: &sys::FileId,
) -> Result<(OwnedFd, Map), Error> {
    let replaced = || Error::Sidecar {
        path: sidecar.to_path_buf(),
        problem: SidecarProblem::Replaced,
    };
    for attempt in 0..MARKED_TRIES {
        let first = take_marker(mark, write).map_err(|e| Error::io("lock lock file", e))?;
        let fd = match open_sidecar(sidecar, id.mode, true, first) {
            Ok(fd) => Some(fd),
            // Removed, or (read-only openers) not created yet.
            Err(Error::Open { source, .. })
                if !first && source.raw_os_error() == Some(libc::ENOENT) =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        let Some(fd) = fd else {
            set_byte(mark, LockType::Unlock, IN_USE, false)
                .map_err(|e| Error::io("unlock lock file", e))?;
            pause(attempt);
            continue;
        };
        let raw = fd.as_raw_fd();
        // A child must never keep this owner alive, nor the table in use.
        if !sys::close_in_children(raw) {
            return Err(Error::TableFull {
                path: sidecar.to_path_buf(),
                what: "shm handles in this process",
            });
        }
        let joined = join(sidecar, fd.as_fd(), id.dev, id.ino, first);
        if !matches!(joined, Ok(Some(_))) {
            sys::keep_in_children(raw);
        }
        match joined {
            Ok(Some(map)) => {
                if first {
                    // Atomic conversion: the table is set up.
                    if let Err(e) = set_byte(mark, LockType::Read, IN_USE, false) {
                        sys::keep_in_children(raw);
                        return Err(Error::io("share lock file", e));
                    }
                }
                return Ok((fd, map));
            }
            Ok(None) => {
                drop(fd);
                set_byte(mark, LockType::Unlock, IN_USE, false)
                    .map_err(|e| Error::io("unlock lock file", e))?;
                pause(attempt);
            }
            Err(e) => return Err(e),
        }
    }
    Err(replaced())
}

/// Between tries of [`join_marked`]: others' openings take microseconds,
/// unless they are descheduled.
pub(super) fn pause(attempt: u32) {
    if attempt < 10 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_millis(1));
    }
}
