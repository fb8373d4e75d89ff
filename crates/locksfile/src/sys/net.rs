//! The PostgreSQL session's socket: noticing a hang-up without reading,
//! and TCP keepalive.
//!
//! # Safety
//!
//! `poll`, `setsockopt` and `getsockopt` take a live descriptor and a
//! struct or integer on our stack, valid for the call.

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

/// A TCP socket's keepalive and `TCP_USER_TIMEOUT`: keepalive on or off,
/// the seconds before the first probe, between probes, the probes, and the
/// milliseconds sent data may stay unacknowledged. In [`set_keepalive`], 0
/// leaves the system's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Keepalive {
    pub on: bool,
    pub idle: u32,
    pub interval: u32,
    pub count: u32,
    pub user_timeout_ms: u32,
}

fn setopt(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, v: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
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
}

fn getopt(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a c_int and its length on our stack, valid for the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(u32::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Set a TCP socket's keepalive (`SO_KEEPALIVE`, and with it on
/// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`) and `TCP_USER_TIMEOUT`,
/// so a dead server or a partition is noticed without an operation; a 0
/// leaves that option as the system has it.
pub(crate) fn set_keepalive(fd: BorrowedFd<'_>, k: &Keepalive) -> io::Result<()> {
    setopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, u32::from(k.on))?;
    if k.on {
        for (name, v) in [
            (libc::TCP_KEEPIDLE, k.idle),
            (libc::TCP_KEEPINTVL, k.interval),
            (libc::TCP_KEEPCNT, k.count),
        ] {
            if v > 0 {
                setopt(fd, libc::IPPROTO_TCP, name, v)?;
            }
        }
    }
    if k.user_timeout_ms > 0 {
        setopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            k.user_timeout_ms,
        )?;
    }
    Ok(())
}

/// A TCP socket's keepalive and `TCP_USER_TIMEOUT` as they are (the
/// system's defaults where nothing was set).
pub(crate) fn keepalive_of(fd: BorrowedFd<'_>) -> io::Result<Keepalive> {
    Ok(Keepalive {
        on: getopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        idle: getopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?,
        interval: getopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?,
        count: getopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?,
        user_timeout_ms: getopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?,
    })
}
