//! The terminal for `top`: raw mode through termios, the alternate
//! screen, a hidden cursor, the window size, and the signals that must not
//! leave the terminal raw (SIGINT, SIGTERM, SIGHUP: an ssh drop) or that
//! ask for a redraw (SIGWINCH).
//!
//! # Safety
//! The `unsafe` blocks call one libc function each, on descriptors and
//! structures checked on the line above. The signal handler only stores to
//! an atomic and `write`s one byte to a non-blocking pipe, both
//! async-signal-safe.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Leave the alternate screen and show the cursor again.
const LEAVE: &[u8] = b"\x1b[?25h\x1b[?1049l";
/// Enter the alternate screen, hide the cursor, clear.
const ENTER: &[u8] = b"\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J";

/// The termios to put back, shared with the panic hook.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);
/// The last terminating signal caught (0: none).
static CAUGHT: AtomicI32 = AtomicI32::new(0);
/// The write end of the self-pipe that wakes the main loop on a signal.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig != libc::SIGWINCH {
        CAUGHT.store(sig, Ordering::SeqCst);
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops it
        // (one pending byte is enough to wake the loop).
        unsafe { libc::write(fd, b"s".as_ptr().cast(), 1) };
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Put the terminal back as it was: called on drop, from the panic hook,
/// and after a terminating signal. Idempotent.
fn restore() {
    let saved = SAVED.lock().map(|mut s| s.take()).unwrap_or(None);
    if let Some((fd, tio)) = saved {
        // SAFETY: `fd` is the terminal we changed; `tio` its old settings.
        unsafe {
            libc::write(fd, LEAVE.as_ptr().cast(), LEAVE.len());
            libc::tcsetattr(fd, libc::TCSAFLUSH, &tio);
        }
    }
}

/// The terminal in raw mode on the alternate screen, until dropped.
pub struct Screen {
    out: RawFd,
    input: RawFd,
    wake_r: OwnedFd,
    _wake_w: OwnedFd,
}

/// What woke [`Screen::wait`].
pub enum Event {
    /// The refresh interval passed (or the window changed size).
    Tick,
    /// `q` or Ctrl-C.
    Quit,
    /// A terminating signal: exit with 128 + it.
    Signal(i32),
}

impl Screen {
    /// Take over the terminal on stdin/stdout.
    pub fn open() -> io::Result<Screen> {
        let input = io::stdin().as_raw_fd();
        let out = io::stdout().as_raw_fd();
        let (wake_r, wake_w) = crate::sys::pipe()?;
        for fd in [wake_r.as_raw_fd(), wake_w.as_raw_fd()] {
            // SAFETY: fcntl on a pipe end we own.
            let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
            // SAFETY: as above.
            cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
        }
        WAKE_FD.store(wake_w.as_raw_fd(), Ordering::SeqCst);

        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut tio: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `input` is stdin, `tio` a valid place.
        cvt(unsafe { libc::tcgetattr(input, &mut tio) })?;
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((input, tio));

        // A panic must not leave the user's shell raw and on the
        // alternate screen: restore first, then report as usual.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));

        // No SA_RESTART: poll must return at once so the loop sees the signal.
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH] {
            // SAFETY: a zeroed sigaction with our handler and an empty mask.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                cvt(libc::sigaction(sig, &sa, std::ptr::null_mut()))?;
            }
        }

        let mut raw = tio;
        // SAFETY: cfmakeraw edits the copy in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // poll decides when to read; a read then returns what is there.
        raw.c_cc[libc::VMIN] = 0;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `input` is the terminal, `raw` a valid termios.
        cvt(unsafe { libc::tcsetattr(input, libc::TCSAFLUSH, &raw) })?;
        let s = Screen {
            out,
            input,
            wake_r,
            _wake_w: wake_w,
        };
        s.write_all(ENTER)?;
        Ok(s)
    }

    fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            // SAFETY: `buf` is valid for its length; `out` is stdout.
            let n = unsafe { libc::write(self.out, buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            buf = &buf[n as usize..];
        }
        Ok(())
    }

    /// The window's (columns, rows).
    pub fn size(&self) -> (usize, usize) {
        size_of(self.out).unwrap_or((80, 24))
    }

    /// Draw `lines` from the top left, each cleared to the end of its
    /// line, and clear below: no flicker from a full clear per frame.
    pub fn draw(&self, lines: &[String]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 8).sum::<usize>() + 16);
        buf.extend_from_slice(b"\x1b[H");
        for (i, l) in lines.iter().enumerate() {
            if i > 0 {
                // Raw mode has no output processing: \n alone would not
                // return the carriage.
                buf.extend_from_slice(b"\r\n");
            }
            buf.extend_from_slice(l.as_bytes());
            buf.extend_from_slice(b"\x1b[K");
        }
        buf.extend_from_slice(b"\x1b[J");
        self.write_all(&buf)
    }

    /// Wait up to `timeout` for a key or a signal.
    pub fn wait(&self, timeout: Duration) -> Event {
        let mut fds = [
            libc::pollfd {
                fd: self.input,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        let sig = CAUGHT.load(Ordering::SeqCst);
        if sig != 0 {
            return Event::Signal(sig);
        }
        if r <= 0 {
            return Event::Tick;
        }
        if fds[1].revents != 0 {
            let mut b = [0u8; 64];
            // SAFETY: drain the non-blocking pipe into `b`.
            unsafe { libc::read(self.wake_r.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            // The terminal went away (an ssh drop without SIGHUP).
            return Event::Signal(libc::SIGHUP);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut b = [0u8; 64];
            // SAFETY: read into `b`, at most its length.
            let n = unsafe { libc::read(self.input, b.as_mut_ptr().cast(), b.len()) };
            if n == 0 {
                return Event::Signal(libc::SIGHUP);
            }
            if n > 0
                && b[..n as usize]
                    .iter()
                    .any(|&c| matches!(c, b'q' | b'Q' | 3))
            {
                return Event::Quit;
            }
        }
        Event::Tick
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
        WAKE_FD.store(-1, Ordering::SeqCst);
    }
}

/// The (columns, rows) of the terminal on `fd`, if it is one.
pub fn size_of(fd: RawFd) -> Option<(usize, usize)> {
    // SAFETY: winsize is plain data; the ioctl fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col as usize, ws.ws_row as usize))
}
