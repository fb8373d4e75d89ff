//! The only place this crate talks to the kernel.
//!
//! # Safety
//!
//! Every function here wraps one libc call. The calls take plain integers, a
//! NUL-terminated path built from a `CString`, or a pointer to a `flock`/`stat`
//! struct that lives on our stack for the whole call, so each `unsafe` block
//! only has to show that the descriptor and pointers it passes are valid.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Once;
use std::time::Duration;

/// The lock kinds the kernel knows, as `l_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockType {
    Read,
    Write,
    Unlock,
}

impl LockType {
    #[inline]
    fn raw(self) -> libc::c_short {
        (match self {
            LockType::Read => libc::F_RDLCK,
            LockType::Write => libc::F_WRLCK,
            LockType::Unlock => libc::F_UNLCK,
        }) as libc::c_short
    }
}

/// Which family of record locks: open-file-description or process-associated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Ofd,
    Posix,
}

/// A byte range as the kernel sees it: `len == 0` means "to the end".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Range {
    pub start: i64,
    pub len: i64,
}

#[inline]
fn flock(ty: LockType, range: Range) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty.raw();
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = range.start as libc::off_t;
    fl.l_len = range.len as libc::off_t;
    // OFD locks require l_pid == 0; POSIX ignores it on set.
    fl.l_pid = 0;
    fl
}

#[inline]
fn fcntl_lock(fd: BorrowedFd<'_>, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor for the duration of the borrow and `fl`
    // points to an initialised `flock` that outlives the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `fcntl(fd, F_OFD_SETLK | F_SETLK | F_OFD_SETLKW | F_SETLKW, ...)`: set,
/// convert or remove a record lock on `range`.
///
/// Returns the raw OS error: `EAGAIN`/`EACCES` on conflict, `EDEADLK`,
/// `EINTR` for a wait cut short by a signal. Retrying is the caller's call.
///
/// # References
/// fcntl(2), "Advisory record locking" and "Open file description locks".
#[doc(alias = "F_OFD_SETLK")]
#[doc(alias = "F_SETLKW")]
#[inline]
pub(crate) fn set_lock(
    fd: BorrowedFd<'_>,
    family: Family,
    ty: LockType,
    range: Range,
    wait: bool,
) -> io::Result<()> {
    let cmd = match (family, wait) {
        (Family::Ofd, false) => libc::F_OFD_SETLK,
        (Family::Ofd, true) => libc::F_OFD_SETLKW,
        (Family::Posix, false) => libc::F_SETLK,
        (Family::Posix, true) => libc::F_SETLKW,
    };
    let mut fl = flock(ty, range);
    if wait {
        fcntl_lock(fd, cmd, &mut fl)
    } else {
        fcntl_lock_now(fd, cmd, &mut fl)
    }
}

/// [`fcntl_lock`] for a command that never waits, as the `syscall`
/// instruction itself, not libc's wrapper.
///
/// On x86-64 Linux the wrapper costs about 17 ns a call more than the bare
/// instruction (measured on the uncontended pair, AMD EPYC under KVM):
/// returns right after a system call proved costly there, and the wrapper
/// adds two calls to return through. A lock + unlock pair makes two calls,
/// so this was about two thirds of what locksfile added to the raw pair.
/// The waiting commands keep the wrapper: they are cancellation points
/// there, and a wait dwarfs it. Other targets (x32 included) use the
/// wrapper throughout.
///
/// # References
/// syscall(2), "Architecture calling conventions".
#[cfg(all(
    target_os = "linux",
    target_arch = "x86_64",
    target_pointer_width = "64"
))]
#[inline]
fn fcntl_lock_now(fd: BorrowedFd<'_>, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    let r: isize;
    // SAFETY: the x86-64 Linux system call convention: number in rax,
    // arguments in rdi, rsi, rdx, result in rax, rcx and r11 clobbered, the
    // stack untouched. `fd` is a live descriptor for the borrow, `cmd` a
    // command that takes a `struct flock *`, and `fl` an initialised one
    // that outlives the call (the kernel may write it back; the asm block
    // is assumed to read and write memory). `libc::flock` is the kernel's
    // `struct flock` here (64-bit `off_t`), as the wrapper passes it.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") libc::SYS_fcntl as isize => r,
            in("rdi") fd.as_raw_fd() as isize,
            in("rsi") cmd as isize,
            in("rdx") fl as *mut libc::flock,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // The kernel answers -errno (-4095..=-1) on failure, 0 for these commands.
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r as i32))
    } else {
        Ok(())
    }
}

#[cfg(not(all(
    target_os = "linux",
    target_arch = "x86_64",
    target_pointer_width = "64"
)))]
#[inline]
fn fcntl_lock_now(fd: BorrowedFd<'_>, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    fcntl_lock(fd, cmd, fl)
}

/// The operations `flock(2)` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlockOp {
    Shared,
    Exclusive,
    Unlock,
}

/// `flock(fd, LOCK_SH | LOCK_EX | LOCK_UN [| LOCK_NB])`: set, convert or
/// remove the whole-file lock of `fd`'s open file description.
///
/// Converting a held lock is not atomic: the kernel removes the old lock,
/// then asks for the new one, so a refused conversion leaves nothing held.
/// Returns the raw OS error: `EWOULDBLOCK` on conflict without `wait`,
/// `EINTR` for a wait cut short by a signal.
///
/// # References
/// flock(2).
#[doc(alias = "LOCK_EX")]
#[doc(alias = "LOCK_NB")]
#[inline]
pub(crate) fn flock_file(fd: BorrowedFd<'_>, op: FlockOp, wait: bool) -> io::Result<()> {
    let mut op = match op {
        FlockOp::Shared => libc::LOCK_SH,
        FlockOp::Exclusive => libc::LOCK_EX,
        FlockOp::Unlock => libc::LOCK_UN,
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    // SAFETY: `fd` is a live descriptor for the duration of the borrow;
    // flock takes two integers.
    if unsafe { libc::flock(fd.as_raw_fd(), op) } == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `flock(2)` lock as `/proc/locks` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlockLine {
    pub exclusive: bool,
    /// The process that took it (as this pid namespace sees it; 0 or less
    /// when it cannot be named).
    pub pid: i64,
}

/// The `FLOCK` locks held (not waited for) on file (dev, ino), read from
/// `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF`). The
/// kernel names no owner of a flock(2) lock beyond the pid that took it.
/// The kernel rebuilds the list as it is read, so a read while other
/// processes lock and unlock (any file) may skip or repeat a line: it is
/// read until two readings agree about this file (a few times at most).
/// Still a snapshot, good for naming a holder, not for deciding anything.
///
/// # References
/// proc_locks(5).
pub(crate) fn flock_locks(dev: u64, ino: u64) -> io::Result<Vec<FlockLine>> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let mut last = flock_locks_once(&want)?;
    for _ in 0..3 {
        let now = flock_locks_once(&want)?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

fn flock_locks_once(want: &str) -> io::Result<Vec<FlockLine>> {
    let text = std::fs::read_to_string("/proc/locks")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut t = line.split_whitespace().skip(1);
        if t.next() != Some("FLOCK") {
            // Another class, or "->" for a waiter.
            continue;
        }
        let (Some(_advisory), Some(access), Some(pid), Some(file)) =
            (t.next(), t.next(), t.next(), t.next())
        else {
            continue;
        };
        if file != want {
            continue;
        }
        out.push(FlockLine {
            exclusive: access == "WRITE",
            pid: pid.parse().unwrap_or(-1),
        });
    }
    Ok(out)
}

/// A lock the kernel reported in the way of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Blocker {
    pub ty: LockType,
    pub range: Range,
    /// `-1` for open-file-description locks.
    pub pid: i32,
}

/// `fcntl(fd, F_OFD_GETLK | F_GETLK, ...)`: the first lock that would block
/// `ty` on `range`, ignoring the caller's own locks, or `None`.
#[doc(alias = "F_GETLK")]
#[doc(alias = "F_OFD_GETLK")]
pub(crate) fn get_lock(
    fd: BorrowedFd<'_>,
    family: Family,
    ty: LockType,
    range: Range,
) -> io::Result<Option<Blocker>> {
    let cmd = match family {
        Family::Ofd => libc::F_OFD_GETLK,
        Family::Posix => libc::F_GETLK,
    };
    let mut fl = flock(ty, range);
    fcntl_lock(fd, cmd, &mut fl)?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    let ty = if fl.l_type == libc::F_WRLCK as libc::c_short {
        LockType::Write
    } else {
        LockType::Read
    };
    Ok(Some(Blocker {
        ty,
        range: Range {
            start: fl.l_start,
            len: fl.l_len,
        },
        pid: fl.l_pid,
    }))
}

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

/// Borrow a raw descriptor that the caller keeps open for `'a`.
#[inline]
pub(crate) fn borrow_raw<'a>(fd: RawFd) -> BorrowedFd<'a> {
    // SAFETY: callers only pass descriptors owned by an `OwnedFd` that lives
    // at least as long as the returned borrow (see `owner::Owner`).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Bumped in every child right after `fork`, so that a handle can tell it
/// was inherited without paying for a `getpid` syscall on every operation.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many descriptors [`close_in_children`] can hold at once.
pub(crate) const CLOSE_IN_CHILDREN_MAX: usize = 4096;

/// Descriptors closed in every child right after `fork` (`-1`: free). A
/// fixed array of atomics, as the hook runs in the child of a process that
/// may have had other threads mid-call: no lock may be taken there.
static CLOSE_IN_CHILD: [AtomicI32; CLOSE_IN_CHILDREN_MAX] =
    [const { AtomicI32::new(-1) }; CLOSE_IN_CHILDREN_MAX];

/// Have every child made by `fork` from now on close `fd` at once, before
/// it runs any code of its own: `false` when the table is full.
pub(crate) fn close_in_children(fd: RawFd) -> bool {
    fork_generation();
    CLOSE_IN_CHILD.iter().any(|slot| {
        slot.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

/// Undo [`close_in_children`] before `fd` is closed.
pub(crate) fn keep_in_children(fd: RawFd) {
    for slot in &CLOSE_IN_CHILD {
        if slot
            .compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
    for slot in &CLOSE_IN_CHILD {
        let fd = slot.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: close(2) is async-signal-safe; the descriptor was
            // registered by its owner, which never closes it in a child.
            unsafe { libc::close(fd) };
        }
    }
}

/// The current fork generation; registers the `pthread_atfork` hook on first use.
pub(crate) fn fork_generation() -> u64 {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: the handler is a plain `extern "C"` function that only
        // touches an atomic, which is async-signal-safe after fork.
        let r = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        assert_eq!(r, 0, "pthread_atfork failed");
    });
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// The fork generation without registering anything (hot path).
#[inline]
pub(crate) fn current_fork_generation() -> u64 {
    FORK_GENERATION.load(Ordering::Relaxed)
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

/// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)`.
pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<*mut u8> {
    // SAFETY: no fixed address, so nothing existing is replaced; the
    // caller checked that the file is at least `len` bytes long.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// `munmap(ptr, len)`.
///
/// # Safety
/// `ptr` and `len` are a mapping made by [`map_shared`] that nothing uses
/// any more.
pub(crate) unsafe fn unmap(ptr: *mut u8, len: usize) {
    // SAFETY: as the caller promises.
    unsafe { libc::munmap(ptr.cast(), len) };
}

/// `futex(word, FUTEX_WAIT, expected, timeout)` on a word in shared memory
/// (no `FUTEX_PRIVATE_FLAG`: other processes wake it). `Ok(())` when woken
/// or the word had changed; `ETIMEDOUT` and `EINTR` come back as errors.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> io::Result<()> {
    // SAFETY: `word` is a live, aligned 32-bit word.
    unsafe { futex_wait_raw(word.as_ptr(), expected, timeout) }
}

/// `futex(word, FUTEX_WAKE, INT_MAX)`: wake every waiter on `word`.
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned 32-bit word.
    unsafe { futex_wake_all_raw(word.as_ptr()) }
}

/// `futex(word, FUTEX_WAIT, expected, timeout)` on the 32-bit half of a
/// word used as a 64-bit atomic elsewhere (the kernel reads it only).
/// `Ok` also when the word did not hold `expected`.
///
/// # Safety
/// `word` is aligned and stays mapped for the call.
pub(crate) unsafe fn futex_wait_raw(
    word: *const u32,
    expected: u32,
    timeout: Duration,
) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: as the caller promises; `ts` outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// `futex(word, FUTEX_WAKE, INT_MAX)` on a word as [`futex_wait_raw`] has it.
///
/// # Safety
/// `word` is aligned and stays mapped for the call.
pub(crate) unsafe fn futex_wake_all_raw(word: *const u32) {
    // SAFETY: as the caller promises.
    unsafe {
        libc::syscall(libc::SYS_futex, word, libc::FUTEX_WAKE, libc::c_int::MAX);
    }
}

/// `pthread_mutex_init` of a robust, process-shared mutex at `m`.
///
/// # Safety
/// `m` points to writable memory for a `pthread_mutex_t` that no one uses.
pub(crate) unsafe fn robust_mutex_init(m: *mut libc::pthread_mutex_t) -> io::Result<()> {
    // SAFETY: the attribute lives on our stack for the whole block; `m` is
    // as the caller promises.
    unsafe {
        let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
        let mut r = libc::pthread_mutexattr_init(&mut attr);
        if r == 0 {
            r = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
        }
        if r == 0 {
            r = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
        }
        if r == 0 {
            r = libc::pthread_mutex_init(m, &attr);
        }
        libc::pthread_mutexattr_destroy(&mut attr);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// How taking a robust mutex went.
pub(crate) enum Locked {
    Clean,
    /// The previous holder died holding it: repair what it guards, then
    /// [`robust_mutex_consistent`].
    OwnerDied,
}

/// `pause`s [`robust_mutex_lock`] spends watching the mutex before it
/// sleeps (about 30 µs here)...
const MUTEX_PATIENCE: u32 = 1280;
/// ... between looks that start 4 `pause`s apart and double up to this
/// (about 1.5 µs here). A holder on another CPU lets go within a
/// microsecond or so, and a look soon after catches it; backing off
/// further lets a running holder take the mutex again with its line still
/// in its cache rather than pulling the line back and forth. Measured on
/// the ring race (8 processes on 2 CPUs, interleaved with semaphores):
/// 1.08× the semaphores' time against 1.26× looking every 64 `pause`s and
/// about the same looking every 4; with 2 processes on disjoint indices of
/// one table 280–390 ns a pair against 550–1,000 ns looking every 4.
const MUTEX_MAX_GAP: u32 = 64;

/// The owner's thread id in a robust mutex's lock word (`FUTEX_TID_MASK`):
/// zero when the mutex is free, or its holder died (then the kernel left
/// only `FUTEX_OWNER_DIED`, and locking reports `EOWNERDEAD`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const FUTEX_TID_MASK: i32 = 0x3fff_ffff;

/// Whether the robust mutex `m` looks taken, by a plain read of its lock
/// word: glibc keeps the futex word first in `pthread_mutex_t` on Linux.
/// Waiters read rather than try to write, so that the line holding it is
/// not pulled away from the holder on every try (test and test-and-set).
///
/// # Safety
/// As [`robust_mutex_lock`].
#[inline]
unsafe fn looks_taken(m: *mut libc::pthread_mutex_t) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: the word is an aligned i32 at the start of the mutex,
        // written by other threads only atomically (futex operations).
        let word = unsafe { &*(m as *const std::sync::atomic::AtomicI32) };
        word.load(std::sync::atomic::Ordering::Relaxed) & FUTEX_TID_MASK != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = m;
        false
    }
}

/// `pthread_mutex_lock(m)` of a robust mutex.
///
/// # Safety
/// `m` points to a mutex made by [`robust_mutex_init`], mapped for as long
/// as the caller holds it.
#[inline]
pub(crate) unsafe fn robust_mutex_lock(m: *mut libc::pthread_mutex_t) -> io::Result<Locked> {
    // Held for well under a microsecond at a time: while its holder runs
    // on another CPU, waiting a moment is much cheaper than sleeping in the
    // kernel and being woken (a system call on each side).
    let mut gap = 4;
    let mut patience = MUTEX_PATIENCE;
    while patience > 0 {
        // SAFETY: as the caller promises.
        if !unsafe { looks_taken(m) } {
            // SAFETY: as the caller promises.
            match unsafe { libc::pthread_mutex_trylock(m) } {
                0 => return Ok(Locked::Clean),
                libc::EOWNERDEAD => return Ok(Locked::OwnerDied),
                libc::EBUSY => {}
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
        for _ in 0..gap {
            std::hint::spin_loop();
        }
        patience = patience.saturating_sub(gap);
        gap = (gap * 2).min(MUTEX_MAX_GAP);
    }
    // SAFETY: as the caller promises.
    match unsafe { libc::pthread_mutex_lock(m) } {
        0 => Ok(Locked::Clean),
        libc::EOWNERDEAD => Ok(Locked::OwnerDied),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// `pthread_mutex_consistent(m)`, after repairing.
///
/// # Safety
/// As [`robust_mutex_lock`], and the caller holds `m`.
pub(crate) unsafe fn robust_mutex_consistent(m: *mut libc::pthread_mutex_t) {
    // SAFETY: as the caller promises.
    unsafe { libc::pthread_mutex_consistent(m) };
}

/// `pthread_mutex_unlock(m)`.
///
/// # Safety
/// As [`robust_mutex_lock`], and the caller holds `m`.
#[inline]
pub(crate) unsafe fn robust_mutex_unlock(m: *mut libc::pthread_mutex_t) {
    // SAFETY: as the caller promises.
    unsafe { libc::pthread_mutex_unlock(m) };
}

/// `poll(fd, POLLRDHUP, 0)`: whether the peer of a connected socket has
/// closed it or the connection broke (`POLLRDHUP`, `POLLHUP`, `POLLERR`),
/// without reading from it or waiting.
#[cfg(feature = "postgres")]
pub(crate) fn peer_closed(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd on our stack, valid for the call; `fd` is open.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// TCP keepalive on a socket: probe after `idle` seconds without traffic,
/// every `interval` seconds, `count` times, so a dead server or a partition
/// is noticed without an operation. `TCP_USER_TIMEOUT` bounds unacknowledged
/// sends the same way.
#[cfg(feature = "postgres")]
pub(crate) fn set_keepalive(
    fd: BorrowedFd<'_>,
    idle: u32,
    interval: u32,
    count: u32,
) -> io::Result<()> {
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: a c_int on our stack, its size passed with it.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let clamp = |v: u32| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, clamp(idle.max(1)))?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        clamp(interval.max(1)),
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, clamp(count.max(1)))?;
    let user_timeout_ms = idle
        .saturating_add(interval.saturating_mul(count))
        .saturating_mul(1000);
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        clamp(user_timeout_ms),
    )
}

// ---- Waking a thread that sleeps in the kernel ----
//
// `F_SETLKW` and `flock(LOCK_EX)` have no timeout and no way to be woken
// but a signal. A timed or cancellable wait therefore arms a POSIX timer
// that sends the *wake signal* to the waiting thread alone
// (`SIGEV_THREAD_ID`), as util-linux `flock -w` does with `timer_create`;
// the signal's handler does nothing and is installed without
// `SA_RESTART`, so the sleeping call returns `EINTR` and the wait looks at
// why. The timer fires again every [`WAKE_REPEAT`] until the wait ends, so
// a signal that lands just before the thread enters the kernel cannot leave
// it asleep. The timers are the kernel's (raw system calls, not librt's
// wrappers), so nothing beyond libc is linked.

/// How often an armed timer fires again once it has fired.
const WAKE_REPEAT: Duration = Duration::from_millis(2);

/// Not looked up yet.
const WAKE_UNSET: i32 = -1;
/// The resolved wake signal: a signal number, 0 for none (timed waits then
/// poll), [`WAKE_UNSET`] before the first timed wait.
static WAKE_SIGNAL: AtomicI32 = AtomicI32::new(WAKE_UNSET);
static WAKE_SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());

extern "C" fn on_wake_signal(_: libc::c_int) {}

/// The default wake signal: a real-time signal clear of glibc's own (below
/// `SIGRTMIN()`) and of the first and last ones, which programs pick most.
pub(crate) fn default_wake_signal() -> i32 {
    libc::SIGRTMIN() + 7
}

/// Install the do-nothing handler on `sig` unless another handler is
/// there: `Ok(false)` when the signal is someone else's.
fn install_wake_handler(sig: i32) -> io::Result<bool> {
    if !(libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: sigaction structs on our stack; the handler is a plain
    // `extern "C"` function that touches nothing.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        let ours = on_wake_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        if old.sa_sigaction == ours {
            return Ok(true);
        }
        if old.sa_sigaction != libc::SIG_DFL {
            return Ok(false);
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ours;
        // No SA_RESTART: the sleeping call must return EINTR.
        sa.sa_flags = libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

/// Use `sig` as the wake signal from now on (`None`: no signal; timed and
/// cancellable kernel waits then poll). Installs its handler.
pub(crate) fn set_wake_signal(sig: Option<i32>) -> io::Result<()> {
    let _setup = WAKE_SETUP.lock().unwrap_or_else(|p| p.into_inner());
    let resolved = match sig {
        None => 0,
        Some(sig) => {
            if !install_wake_handler(sig)? {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("signal {sig} already has a handler"),
                ));
            }
            sig
        }
    };
    WAKE_SIGNAL.store(resolved, Ordering::SeqCst);
    Ok(())
}

/// The wake signal, set up at the first call: `LOCKSFILE_WAKE_SIGNAL` (a
/// number, or `off`), else [`default_wake_signal`]. `None` when there is
/// none (turned off, or the signal has a handler that is not ours).
pub(crate) fn wake_signal() -> Option<i32> {
    let mut sig = WAKE_SIGNAL.load(Ordering::Relaxed);
    if sig == WAKE_UNSET {
        let _setup = WAKE_SETUP.lock().unwrap_or_else(|p| p.into_inner());
        sig = WAKE_SIGNAL.load(Ordering::SeqCst);
        if sig == WAKE_UNSET {
            let wanted = match std::env::var("LOCKSFILE_WAKE_SIGNAL") {
                Ok(v) if v.trim().eq_ignore_ascii_case("off") || v.trim() == "0" => None,
                Ok(v) => Some(v.trim().parse().unwrap_or(-1)),
                Err(_) => Some(default_wake_signal()),
            };
            sig = match wanted {
                Some(w) if matches!(install_wake_handler(w), Ok(true)) => w,
                _ => 0,
            };
            WAKE_SIGNAL.store(sig, Ordering::SeqCst);
        }
    }
    (sig > 0).then_some(sig)
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// A kernel timer that sends the wake signal to the thread that made it,
/// with that signal unblocked in the thread while the alarm lives.
pub(crate) struct Alarm {
    id: libc::c_int,
    /// The thread's signal mask before, restored on drop.
    mask: libc::sigset_t,
}

impl Alarm {
    /// A disarmed timer for the calling thread.
    pub(crate) fn new(sig: i32) -> io::Result<Alarm> {
        // SAFETY: a zeroed sigevent (every field plain data) filled in; the
        // kernel writes the timer's id to `id` on our stack.
        let id = unsafe {
            let mut ev: libc::sigevent = std::mem::zeroed();
            ev.sigev_signo = sig;
            ev.sigev_notify = libc::SIGEV_THREAD_ID;
            // Not libc::gettid, which glibc before 2.30 lacks.
            ev.sigev_notify_thread_id = libc::syscall(libc::SYS_gettid) as libc::c_int;
            let mut id: libc::c_int = 0;
            if libc::syscall(
                libc::SYS_timer_create,
                libc::CLOCK_MONOTONIC,
                &mut ev as *mut libc::sigevent,
                &mut id as *mut libc::c_int,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            id
        };
        // SAFETY: sigset_t values on our stack, filled before use.
        let mask = unsafe {
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, sig);
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, &mut old);
            old
        };
        Ok(Alarm { id, mask })
    }

    /// Fire after `after`, then every [`WAKE_REPEAT`] until dropped.
    pub(crate) fn arm(&self, after: Duration) {
        arm_timer(self.id, after);
    }

    /// Something that fires this alarm at once from another thread (a
    /// [`Cancel`](crate::Cancel)'s waker). It must not be used after the
    /// alarm is dropped.
    pub(crate) fn trigger(&self) -> impl Fn() + Send + 'static {
        let id = self.id;
        move || arm_timer(id, Duration::ZERO)
    }
}

fn arm_timer(id: libc::c_int, after: Duration) {
    let spec = libc::itimerspec {
        it_interval: timespec(WAKE_REPEAT),
        // Zero would disarm it: fire at the next nanosecond instead.
        it_value: timespec(after.max(Duration::from_nanos(1))),
    };
    // SAFETY: an itimerspec on our stack; a stale id fails with EINVAL.
    unsafe {
        libc::syscall(
            libc::SYS_timer_settime,
            id,
            0,
            &spec as *const libc::itimerspec,
            std::ptr::null_mut::<libc::itimerspec>(),
        );
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        // SAFETY: our timer id, deleted once; the mask saved by `new`. A
        // signal the timer raised before the delete is delivered (to the
        // do-nothing handler) by the time the delete returns, as it is
        // unblocked in this very thread.
        unsafe {
            libc::syscall(libc::SYS_timer_delete, self.id);
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.mask, std::ptr::null_mut());
        }
    }
}

/// One `nanosleep(d)`, not resumed after a signal: `Err` (`EINTR`) when a
/// signal's handler cut it short, so an interruptible poll can end.
pub(crate) fn nap(d: Duration) -> io::Result<()> {
    let ts = timespec(d);
    // SAFETY: a timespec on our stack; the remaining time is not wanted.
    if unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A futex word a [`Cancel`](crate::Cancel)'s waker changes and wakes, so
/// that a waiter asleep on it (or about to sleep on the value it read)
/// looks again.
pub(crate) struct WordWaker(*const AtomicU32);

// SAFETY: the word is an atomic in a shared mapping; the waker is only
// called while the waiter that made it keeps the mapping alive (it takes
// the waker back before it returns).
unsafe impl Send for WordWaker {}

impl WordWaker {
    /// # Safety
    /// `word` stays mapped until the waker is dropped.
    pub(crate) unsafe fn new(word: &AtomicU32) -> WordWaker {
        WordWaker(word as *const AtomicU32)
    }

    pub(crate) fn wake(&self) {
        // SAFETY: as `new` was promised.
        let word = unsafe { &*self.0 };
        word.fetch_add(1, Ordering::SeqCst);
        futex_wake_all(word);
    }
}

/// Block every blockable signal in the calling thread, so that the kernel
/// delivers them to another thread: a thread that waits on the caller's
/// behalf must not swallow the signal that should interrupt the caller.
#[cfg(feature = "postgres")]
pub(crate) fn block_signals_in_this_thread() {
    // SAFETY: a sigset_t on our stack, filled by sigfillset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn one(start: i64) -> Range {
        Range { start, len: 1 }
    }

    /// The non-waiting set answers as `fcntl(2)` does: granted, refused with
    /// the kernel's errno, and a bad argument as its own errno.
    #[test]
    fn set_lock_answers_with_the_kernels_errno() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let (a, b) = (open(), open());
        let set = |f: &std::fs::File, ty, range| set_lock(f.as_fd(), Family::Ofd, ty, range, false);
        set(&a, LockType::Write, one(3)).unwrap();
        let refused = set(&b, LockType::Read, one(3)).unwrap_err();
        assert!(
            matches!(
                refused.raw_os_error(),
                Some(libc::EAGAIN) | Some(libc::EACCES)
            ),
            "{refused:?}"
        );
        set(&b, LockType::Write, one(4)).unwrap();
        let blocker = get_lock(b.as_fd(), Family::Ofd, LockType::Read, one(3))
            .unwrap()
            .expect("a's lock");
        assert_eq!((blocker.ty, blocker.range), (LockType::Write, one(3)));
        set(&a, LockType::Unlock, one(3)).unwrap();
        set(&b, LockType::Read, one(3)).unwrap();

        // A negative start is the kernel's EINVAL; a read-only descriptor
        // cannot take a write lock (EBADF).
        let bad = set(&a, LockType::Write, one(-1)).unwrap_err();
        assert_eq!(bad.raw_os_error(), Some(libc::EINVAL));
        let ro = std::fs::File::open(&path).unwrap();
        let bad = set(&ro, LockType::Write, one(9)).unwrap_err();
        assert_eq!(bad.raw_os_error(), Some(libc::EBADF));
    }
}
