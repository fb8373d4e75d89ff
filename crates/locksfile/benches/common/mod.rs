//! What the benches share: the raw system call they measure against, and
//! the handles they measure.
#![allow(unsafe_code, dead_code)]

use std::os::fd::AsRawFd;

use locksfile::{LockFile, Mode};

/// A raw `fcntl(fd, cmd, &flock)` on one byte, the floor we measure against.
pub fn raw(fd: i32, cmd: libc::c_int, ty: libc::c_int, index: i64) {
    // SAFETY: plain C struct, zero is valid; fd is a live descriptor.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = index;
    fl.l_len = 1;
    // SAFETY: `fl` outlives the call.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    assert_eq!(r, 0);
}

/// A lock file in a fresh temp dir, opened in OFD and in process mode, and
/// as a plain file for the raw calls.
pub struct Handles {
    pub ofd: LockFile,
    pub process: LockFile,
    pub raw_file: std::fs::File,
    _dir: tempfile::TempDir,
}

impl Handles {
    pub fn new() -> Handles {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.lock");
        let ofd = LockFile::open(&path).unwrap();
        let process = LockFile::options().mode(Mode::Process).open(&path).unwrap();
        let raw_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        Handles {
            ofd,
            process,
            raw_file,
            _dir: dir,
        }
    }

    pub fn fd(&self) -> i32 {
        self.raw_file.as_raw_fd()
    }
}
