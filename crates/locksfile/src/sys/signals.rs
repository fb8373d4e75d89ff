//! Waking a thread that sleeps in the kernel.
//!
//! `F_SETLKW` and `flock(LOCK_EX)` have no timeout and no way to be woken
//! but a signal. A timed or cancellable wait therefore arms a POSIX timer
//! that sends the *wake signal* to the waiting thread alone
//! (`SIGEV_THREAD_ID`), as util-linux `flock -w` does with `timer_create`;
//! the signal's handler does nothing and is installed without
//! `SA_RESTART`, so the sleeping call returns `EINTR` and the wait looks at
//! why. The timer fires again every [`WAKE_REPEAT`] until the wait ends, so
//! a signal that lands just before the thread enters the kernel cannot leave
//! it asleep. The timers are the kernel's (raw system calls, not librt's
//! wrappers), so nothing beyond libc is linked.
//!
//! # Safety
//!
//! `sigaction`, `sigevent`, `itimerspec`, `timespec` and `sigset_t`
//! structs live on our stack for each call; the handler is a plain
//! `extern "C"` function that touches nothing.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

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
