//! The PostgreSQL session's socket: noticing a hang-up without reading,
//! and TCP keepalive.
//!
//! # Safety
//!
//! `poll` and `setsockopt` take a live descriptor and a struct or integer
//! on our stack, valid for the call.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `poll(fd, POLLRDHUP, 0)`: whether the peer of a connected socket has
/// closed it or the connection broke (`POLLRDHUP`, `POLLHUP`, `POLLERR`),
/// without reading from it or waiting.
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

/// `poll(fd, POLLRDHUP, ms)`: as [`peer_closed`], waiting up to `ms`
/// milliseconds for it (interrupted: not closed).
pub(crate) fn peer_closed_within(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd on our stack, valid for the call; `fd` is open.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// TCP keepalive on a socket: probe after `idle` seconds without traffic,
/// every `interval` seconds, `count` times, so a dead server or a partition
/// is noticed without an operation. `TCP_USER_TIMEOUT` bounds unacknowledged
/// sends the same way.
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
