//! Opening a lock file and what the kernel says about it: `open`,
//! `fstat`/`stat`, `fstatfs`, the access mode, and the few calls that
//! touch a file's size or bytes (the shm table's file).
//!
//! # Safety
//!
//! Paths are NUL-terminated `CString`s that outlive each call; `stat` and
//! `statfs` structs live on our stack; buffers are Rust slices that
//! outlive the call that fills them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// What `fstat` tells us about an opened lock file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub file_type: FileType,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub size: u64,
    /// Names (hard links) the file has.
    pub nlink: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileType {
    Regular,
    Directory,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Symlink,
    Other,
}

/// `fstat(fd)`: device, inode and type.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<FileId> {
    // SAFETY: `stat` is plain data; zeroed is valid and fstat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: live descriptor, `st` is a valid out-pointer for the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(file_id(&st))
}

/// `stat(path)` (`lstat` unless `follow`): device, inode and type of what
/// the path names now, without opening it.
pub(crate) fn stat(path: &CString, follow: bool) -> io::Result<FileId> {
    // SAFETY: `stat` is plain data; zeroed is valid and stat overwrites it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = if follow {
        // SAFETY: NUL-terminated path that outlives the call; valid out-pointer.
        unsafe { libc::stat(path.as_ptr(), &mut st) }
    } else {
        // SAFETY: as above.
        unsafe { libc::lstat(path.as_ptr(), &mut st) }
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(file_id(&st))
}

fn file_id(st: &libc::stat) -> FileId {
    let file_type = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileType::Regular,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFIFO => FileType::Fifo,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::Other,
    };
    FileId {
        dev: st.st_dev,
        ino: st.st_ino,
        file_type,
        mode: st.st_mode & 0o7777,
        size: st.st_size as u64,
        // `nlink_t` is 32 bits on some targets.
        #[allow(clippy::unnecessary_cast)]
        nlink: st.st_nlink as u64,
    }
}

/// `fcntl(fd, F_GETFL)`: whether `fd` was opened for writing.
pub(crate) fn is_writable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: live descriptor; F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(matches!(
        flags & libc::O_ACCMODE,
        libc::O_RDWR | libc::O_WRONLY
    ))
}

/// How to open a lock file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OpenHow {
    pub write: bool,
    pub create_exclusive: bool,
    pub create: bool,
    pub follow: bool,
    pub mode: u32,
}

impl OpenHow {
    /// An existing file only: never created, a symlink never followed.
    pub(crate) const fn existing(write: bool) -> OpenHow {
        OpenHow {
            write,
            create_exclusive: false,
            create: false,
            follow: false,
            mode: 0,
        }
    }
}

/// `open(path, O_CLOEXEC | O_NOCTTY | O_NONBLOCK | ...)`.
///
/// `O_NONBLOCK` keeps a FIFO from hanging the open; it has no effect on
/// record locks of a regular file, which is all we ever lock through it.
pub(crate) fn open(path: &CString, how: OpenHow) -> io::Result<OwnedFd> {
    let mut flags = libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
    flags |= if how.write {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    if how.create {
        flags |= libc::O_CREAT;
    }
    if how.create_exclusive {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    if !how.follow {
        flags |= libc::O_NOFOLLOW;
    }
    loop {
        // SAFETY: `path` is NUL-terminated and outlives the call; the mode is
        // passed as the variadic third argument exactly as open(2) expects.
        let fd = unsafe { libc::open(path.as_ptr(), flags, how.mode as libc::c_uint) };
        if fd >= 0 {
            // SAFETY: open just returned this descriptor and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// `fchmod(fd, mode)`: give a file we just created the mode asked for,
/// whatever the umask took away.
pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: live descriptor, integer mode.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fstatfs(fd)`: the file system's magic number (`f_type`).
pub(crate) fn fs_type(fd: BorrowedFd<'_>) -> io::Result<i64> {
    // SAFETY: `statfs` is plain data; zeroed is valid and fstatfs overwrites it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: live descriptor, valid out-pointer.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// `ftruncate(fd, len)`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: live descriptor, integer length.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `pread(fd, buf, offset)` until `buf` is full or the file ends: the
/// number of bytes read.
pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: live descriptor; the pointer and length describe the
        // unfilled tail of `buf`, which outlives the call.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}
