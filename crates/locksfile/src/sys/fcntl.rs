//! Record locks: `fcntl(2)` set and get, open-file-description or
//! process-associated.
//!
//! # Safety
//!
//! Each call passes a live descriptor and a `flock` struct on our stack
//! that outlives it; the non-waiting set issues the `syscall` instruction
//! itself on x86-64 (its own SAFETY note gives the convention).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
