//! Exit codes, as `flock(1)` uses them: `sysexits.h` for our own failures,
//! the child's status passed through otherwise.
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | success (`run`: the command exited 0) |
//! | 1 | `run`: the lock was busy or the timeout passed (change with `-E`); `race`: an invariant broke |
//! | 64 `EX_USAGE` | unknown option, bad span or number, missing command, malformed server target |
//! | 66 `EX_NOINPUT` | FILE cannot be opened, does not exist (`status`), or is not a regular file; its shm lock table is not one this version can use |
//! | 69 `EX_UNAVAILABLE` | the command cannot be started (not found, not executable); locks unsupported here (shm mode on a network file system); FILE in use with locks of another mode; the server cannot be reached, does not answer, or the session was lost |
//! | 70 `EX_SOFTWARE` | `race`: a racer failed with an error |
//! | 71 `EX_OSERR` | a system call failed (fork, memory, descriptors); the shm lock table is full |
//! | 73 `EX_CANTCREAT` | FILE cannot be created (read-only file system, no space) |
//! | 77 `EX_NOPERM` | an exclusive lock on a file that can only be opened read-only (or descriptor FD), a shared one on a write-only FD; the server refused the credentials or the namespace table |
//! | 128+N | `run`: the command was killed by signal N |

use std::io;

/// Conflict or timeout in `run` (the default of `-E`), broken invariant in `race`.
pub const CONFLICT: i32 = 1;
pub const USAGE: i32 = 64;
pub const NOINPUT: i32 = 66;
pub const UNAVAILABLE: i32 = 69;
pub const SOFTWARE: i32 = 70;
pub const OSERR: i32 = 71;
pub const CANTCREAT: i32 = 73;
pub const NOPERM: i32 = 77;

/// The sysexits code for a failure to open a lock file, from the kernel's
/// errno, as `flock(1)` picks it.
pub fn for_open_error(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc::ENOMEM | libc::EMFILE | libc::ENFILE) => OSERR,
        Some(libc::EROFS | libc::ENOSPC | libc::EDQUOT) => CANTCREAT,
        _ => NOINPUT,
    }
}

/// The code for a lock error that is neither contention nor bad input.
pub fn for_lock_error(e: &locksfile::Error) -> i32 {
    use locksfile::Error;
    match e {
        Error::WouldBlock { .. } | Error::TimedOut { .. } | Error::Deadlock { .. } => CONFLICT,
        Error::InvalidSpan(_) => USAGE,
        Error::ReadOnly { .. } => NOPERM,
        Error::NotRegularFile { .. } | Error::Sidecar { .. } => NOINPUT,
        Error::Unsupported { .. } | Error::NetworkFileSystem { .. } | Error::MixedModes { .. } => {
            UNAVAILABLE
        }
        Error::TableFull { .. } => OSERR,
        Error::Open { source, .. } | Error::Io { source, .. } => for_open_error(source),
        // A server that cannot be reached or refuses us: unavailable, as
        // a missing lock file's directory is "no input".
        Error::Connect { source, .. } => match source.kind() {
            io::ErrorKind::InvalidInput => USAGE,
            io::ErrorKind::PermissionDenied => NOPERM,
            _ => UNAVAILABLE,
        },
        Error::ConnectionLost { .. } => UNAVAILABLE,
        Error::Server { code, .. } if code == "42501" => NOPERM,
        _ => OSERR,
    }
}
