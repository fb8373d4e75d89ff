//! Waiting for keys: one statement that waits for all of them, started
//! again when a sibling thread needs the session, and the interruptible
//! form that a signal cancels.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::TryLockError;
use std::time::{Duration, Instant};

use super::super::Until;
use super::{array, bit, suffix, Pg, RECANCEL};
use crate::error::Error;
use crate::kind::Kind;
use crate::sys;

impl Pg {
    /// Wait for `kind` on `keys` (each lacking it) until `until` ends the
    /// wait, in one statement whose `lock_timeout` is all the time left (so
    /// the server's deadlock detector runs at its own `deadlock_timeout`):
    /// transaction locks in ascending order (so a failure leaves nothing),
    /// then the session locks. `abandon` set: give up with
    /// [`Error::Interrupted`] at the next chance. A sibling's cancel starts
    /// the statement again.
    pub(super) fn wait_keys(
        &self,
        keys: &[i32],
        kind: Kind,
        until: Until<'_>,
        abandon: &AtomicBool,
    ) -> Result<(), Error> {
        let sfx = suffix(kind);
        let arr = array(keys);
        let ns = self.ns;
        let (lo, hi) = (keys[0], keys[keys.len() - 1]);
        // When to look for a cycle ourselves (see `closes_cycle`), once a
        // sibling's call has made the wait start again.
        let mut next_check: Option<Instant> = None;
        let started = Instant::now();
        loop {
            while self.preempt.load(Ordering::SeqCst) > 0 {
                std::thread::yield_now();
            }
            // The session runs one statement at a time: a sibling's wait
            // holds it. Wait our turn, still ending on our deadline, signal
            // or cancel.
            let mut pause = Duration::from_micros(100);
            let mut c = loop {
                match self.conn.try_lock() {
                    Ok(c) => break c,
                    Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                    Err(TryLockError::WouldBlock) => {}
                }
                if abandon.load(Ordering::SeqCst) {
                    return Err(Error::Interrupted);
                }
                if let Some(e) = until.ended() {
                    return Err(e);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            };
            if self.preempt.load(Ordering::SeqCst) > 0 {
                continue;
            }
            if self.lost.load(Ordering::Relaxed) {
                return Err(self.lose());
            }
            if let Some(e) = until.ended() {
                return Err(e);
            }
            if next_check.is_some_and(|t| Instant::now() >= t) {
                if self.closes_cycle(&c, keys, kind)? {
                    return Err(Error::Deadlock { at: None });
                }
                next_check = Some(Instant::now() + self.deadlock_timeout(&c));
            }
            // lock_timeout counts whole milliseconds; 0 is "none".
            let timeout_ms = until
                .left()
                .map_or(0, |left| left.as_millis().clamp(1, i32::MAX as u128));
            let mut sql = String::new();
            let _ = write!(
                sql,
                "SELECT set_config('lock_timeout', '{timeout_ms}', true); \
                 SELECT count(*) FROM (SELECT pg_advisory_xact_lock{sfx}({ns}, k) FROM unnest({arr}) k) s; \
                 SELECT bool_and(pg_try_advisory_lock{sfx}({ns}, k)) FROM unnest({arr}) k"
            );
            self.waiting.store(true, Ordering::SeqCst);
            let r = if abandon.load(Ordering::SeqCst) || until.ended().is_some() {
                Err(Error::Interrupted)
            } else {
                self.simple(&c, "wait for advisory locks", &sql)
            };
            self.waiting.store(false, Ordering::SeqCst);
            match r {
                Ok(got) => {
                    if got.as_deref() != Some("t") {
                        return Err(Error::Io {
                            op: "wait for advisory locks",
                            source: io::Error::other(
                                "a held transaction lock was refused as a session lock",
                            ),
                        });
                    }
                    for k in keys {
                        *c.held.entry(*k).or_insert(0) |= bit(kind);
                    }
                    return Ok(());
                }
                Err(Error::Interrupted) => {
                    // A cancel: from a sibling that needs the session (wait
                    // again once it is done) or from a signal (give up). It
                    // may have stopped the session step part way. A cancel
                    // that comes late hits what runs next: these steps try
                    // again then, as every call does, rather than end the
                    // wait.
                    self.with_retries(&mut c, (lo, hi), |me, c| me.resync(c, lo, hi))?;
                    let extra: Vec<i32> = keys
                        .iter()
                        .copied()
                        .filter(|k| c.held.get(k).is_some_and(|b| b & bit(kind) != 0))
                        .collect();
                    self.with_retries(&mut c, (lo, hi), |me, c| {
                        let still: Vec<i32> = extra
                            .iter()
                            .copied()
                            .filter(|k| c.held.get(k).is_some_and(|b| b & bit(kind) != 0))
                            .collect();
                        me.drop_kind(c, &still, kind)
                    })?;
                    if abandon.load(Ordering::SeqCst) {
                        return Err(Error::Interrupted);
                    }
                    if let Some(e) = until.ended() {
                        return Err(e);
                    }
                    // Starting again restarts the server's deadlock_timeout:
                    // siblings calling more often than that would keep its
                    // detector from ever running, so look ourselves then.
                    if next_check.is_none() {
                        next_check = Some(started + self.deadlock_timeout(&c));
                    }
                }
                Err(e) => {
                    // The server reports an error before it ends the
                    // transaction, so its locks outlive the report by a
                    // moment; one more round trip waits the end out, so a
                    // refused span is gone once the caller hears of it.
                    if !matches!(e, Error::ConnectionLost { .. }) {
                        let _ = self.simple(&c, "end a failed wait", "SELECT 1");
                    }
                    return Err(e);
                }
            }
        }
    }

    /// An interruptible wait: the statement runs on a helper thread (with
    /// signals blocked there) while this thread sleeps in a `read` that a
    /// signal interrupts; then the statement is cancelled and the helper's
    /// answer taken (a grant that won the race is kept).
    pub(super) fn wait_interruptibly(
        &self,
        keys: &[i32],
        kind: Kind,
        until: Until<'_>,
    ) -> Result<(), Error> {
        let (mut rx, tx) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
        let abandon = AtomicBool::new(false);
        std::thread::scope(|s| {
            let helper = s.spawn(|| {
                sys::block_signals_in_this_thread();
                let r = self.wait_keys(keys, kind, until, &abandon);
                let _ = (&tx).write_all(&[1]);
                r
            });
            let mut byte = [0u8];
            if let Err(e) = rx.read(&mut byte) {
                if e.kind() == io::ErrorKind::Interrupted {
                    abandon.store(true, Ordering::SeqCst);
                    // Cancel until the helper is done (a request that came
                    // before its statement started is lost); it ends soon,
                    // cancelled or granted.
                    let _ = rx.set_read_timeout(Some(RECANCEL));
                    loop {
                        if self.waiting.load(Ordering::SeqCst) {
                            self.send_cancel();
                        }
                        match rx.read(&mut byte) {
                            Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => continue,
                            _ => break,
                        }
                    }
                }
            }
            helper.join().unwrap_or(Err(Error::Interrupted))
        })
    }
}
