//! The PostgreSQL engine: one owner's locks are session-level advisory
//! locks of one dedicated server session, so owners on several machines
//! exclude each other.
//!
//! Keys: lock `i` of namespace `NAME` is the two-int4 key `(ns, i)`, `ns`
//! the namespace's id in the table `locksfile_namespaces` (created when
//! missing). Indices stop at `i32::MAX` and a span taking locks is capped at
//! [`MAX_SPAN`] keys; [`Engine::check_span`] refuses others before they get here.
//!
//! Session locks stack server-side, so the engine keeps what the session
//! holds per key (`held`, a bit per kind) and only ever asks for a kind a
//! key lacks. An upgraded key keeps its shared lock beside the exclusive
//! one, so a downgrade only unlocks (and never waits).
//!
//! All or nothing: a session lock taken by a statement that then fails
//! stays held, so a statement taking several keys takes them first as
//! transaction locks (released by the statement's failure) and only then,
//! in the same implicit transaction, as session locks, which cannot wait
//! or run short of lock memory then (the session already holds each key in
//! that mode). Only a query cancel can stop that second step part way, and
//! after one the engine reads what the session holds back from `pg_locks`.
//!
//! Threads: the session runs one statement at a time. A waiting statement
//! holds it, so a sibling thread that must release (which must not block)
//! cancels the wait with the session's cancel key, does its work and lets
//! the wait start again; an interruptible wait runs on a helper thread
//! while the caller sleeps in a `read` that a signal interrupts, and a
//! signal cancels the statement.

pub(crate) mod setup;
mod target;
mod tls;

mod connect;
mod deadlock;
pub(crate) mod facts;
mod keepalive;
mod keys;
mod listing;
mod session;
mod wait;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::{CancelToken, Client, Statement};

pub(crate) use target::is_target;
use target::Target;

use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder, SpanError};
use crate::kind::Kind;
use crate::span::{Span, INDEX_END};
use crate::sys;
use session::{send_cancel, Addr, Rt};

/// The most keys one span may take at once: each is one entry of the
/// server's shared lock table (twice while it is being taken), which holds
/// about `max_locks_per_transaction * max_connections` for everyone.
pub const MAX_SPAN: u64 = 4096;
/// The last lock index: keys are int4.
pub const MAX_INDEX: u64 = i32::MAX as u64;
/// How long connecting may take unless the target or the options say.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const S: u8 = 1;
const X: u8 = 2;
/// Retries of a statement a stale cancel request hit.
const CANCEL_RETRIES: u32 = 8;
/// How often a cancel request is sent again while the wait it is for goes
/// on (one sent before the statement started is lost).
const RECANCEL: Duration = Duration::from_millis(20);
/// How long a [`Cancel`](crate::Cancel)'s waker goes on sending cancel
/// requests at most.
const RECANCEL_FOR: Duration = Duration::from_secs(10);

fn bit(kind: Kind) -> u8 {
    match kind {
        Kind::Shared => S,
        Kind::Exclusive => X,
    }
}

struct Conn {
    rt: Rt,
    client: Client,
    try_x: Statement,
    try_s: Statement,
    unlock_x: Statement,
    unlock_s: Statement,
    /// What the session holds, per key: `S`, `X` or both.
    held: BTreeMap<i32, u8>,
}

/// One owner's session.
pub(crate) struct Pg {
    conn: Mutex<Conn>,
    ns: i32,
    shown: String,
    writable: bool,
    backend_pid: i32,
    /// The int8 advisory key the session holds to show it is this
    /// client's own (`connect.rs`), released when the handle goes (a pooler
    /// may hand the server session to another client) unless released
    /// already (`marker_gone`).
    marker: i64,
    marker_gone: AtomicBool,
    /// The process's fork generation at connect: a child must not speak
    /// on its parent's session.
    generation: u64,
    /// A duplicate of the session's socket, polled for a hang-up.
    socket: OwnedFd,
    addr: Addr,
    cancel: CancelToken,
    lost: AtomicBool,
    /// Threads that want the session while a wait holds it.
    preempt: AtomicUsize,
    /// A statement that may wait is running (a cancel would hit it).
    waiting: AtomicBool,
    /// The server's `deadlock_timeout` in ms; 0 until read.
    deadlock_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("target", &self.shown)
            .field("ns", &self.ns)
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

impl Pg {
    /// The target, without a password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The session's socket (readable or hung up when the session ends).
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Whether the session is gone, and every lock with it: a failed call
    /// said so, or the socket shows the server hung up.
    pub fn lost(&self) -> bool {
        if self.lost.load(Ordering::Relaxed) {
            return true;
        }
        if sys::peer_closed(self.socket.as_fd()) {
            self.lost.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Say the session is gone (a watch saw its socket hang up).
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }

    fn lose(&self) -> Error {
        self.lost.store(true, Ordering::Relaxed);
        Error::ConnectionLost {
            target: self.shown.clone(),
        }
    }
}

impl Drop for Pg {
    /// Release the session marker, so that a pooler in session mode that
    /// does not reset sessions can hand the server session to another
    /// client: at most a second, never in a forked child (the parent's
    /// session), never on a lost session.
    fn drop(&mut self) {
        if self.marker_gone.load(Ordering::Relaxed)
            || self.generation != sys::current_fork_generation()
            || self.lost()
        {
            return;
        }
        let c = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        let sql = format!("SELECT pg_advisory_unlock({})", self.marker);
        let _ = session::block_on(&c.rt, async {
            tokio::time::timeout(Duration::from_secs(1), c.client.simple_query(&sql)).await
        });
    }
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn suffix(kind: Kind) -> &'static str {
    match kind {
        Kind::Exclusive => "",
        Kind::Shared => "_shared",
    }
}

/// An int4 array literal, ascending as given.
fn array(keys: &[i32]) -> String {
    let mut s = String::with_capacity(keys.len() * 6 + 16);
    s.push_str("'{");
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}");
    }
    s.push_str("}'::int4[]");
    s
}

/// The keys of `span` that can exist (a lowering may name any span).
fn clamp(span: Span) -> (i32, i32) {
    let lo = span.start().min(MAX_INDEX + 1);
    let hi = span.end().saturating_sub(1).min(MAX_INDEX);
    if lo > MAX_INDEX {
        return (1, 0);
    }
    (lo as i32, hi as i32)
}

impl Engine for Pg {
    /// A span that takes locks must fit the server's keys and the per-call
    /// cap, checked before anything is sent.
    fn check_span(&self, span: Span, locks: bool) -> Result<(), Error> {
        if locks {
            if span.end() == INDEX_END || span.end() - span.start() > MAX_SPAN {
                return Err(Error::InvalidSpan(SpanError::TooLong));
            }
            if span.end() - 1 > MAX_INDEX {
                return Err(Error::InvalidSpan(SpanError::PastServerKeys));
            }
        }
        Ok(())
    }

    fn locks_lost(&self) -> Option<Error> {
        self.lost().then(|| Error::ConnectionLost {
            target: self.shown().to_string(),
        })
    }

    fn session_lost(&self) -> bool {
        self.lost()
    }

    fn target(&self) -> Option<&str> {
        Some(self.shown())
    }

    fn try_set(&self, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        if self.lost.load(Ordering::Relaxed) {
            // Nothing is held any more: lowering has nothing to do.
            return match kind {
                None => Ok(true),
                Some(_) => Err(self.lose()),
            };
        }
        let mut c = self.session();
        let range = clamp(span);
        let r = self.with_retries(&mut c, range, |me, c| me.set(c, span, kind));
        match r {
            // Lowering is never refused: on a lost session nothing is held.
            Err(Error::ConnectionLost { .. }) if kind.is_none() => Ok(true),
            other => other,
        }
    }

    fn wait_set(&self, span: Span, kind: Kind, until: Until<'_>) -> Result<(), Error> {
        let (lo, hi) = clamp(span);
        let keys: Vec<i32> = {
            // As any call that does not wait: a sibling's wait holding the
            // session is cancelled (and starts again), never waited for,
            // which would outlast this wait's own deadline, for ever
            // behind an untimed one.
            let c = self.session();
            (lo..=hi)
                .filter(|k| c.held.get(k).copied().unwrap_or(0) & bit(kind) == 0)
                .collect()
        };
        if keys.is_empty() {
            return Ok(());
        }
        // A cancel asks the server to cancel the statement, from a thread
        // of its own (it connects), again every RECANCEL until the wait has
        // ended (a request that came before the statement started is lost):
        // the wait then sees the token cancelled.
        let ended = std::sync::Arc::new(AtomicBool::new(false));
        let _armed = until.cancel.map(|c| {
            let (addr, token, ended) = (self.addr.clone(), self.cancel.clone(), ended.clone());
            c.arm(Box::new(move || {
                let (addr, token, ended) = (addr.clone(), token.clone(), ended.clone());
                std::thread::spawn(move || {
                    let give_up = Instant::now() + RECANCEL_FOR;
                    while !ended.load(Ordering::SeqCst) && Instant::now() < give_up {
                        send_cancel(&addr, &token);
                        std::thread::sleep(RECANCEL);
                    }
                });
            }))
        });
        let _ended = SetOnDrop(&ended);
        if until.interruptible {
            self.wait_interruptibly(&keys, kind, until)
        } else {
            self.wait_keys(&keys, kind, until, &AtomicBool::new(false))
        }
    }

    fn probe(&self, span: Span, kind: Kind) -> Result<Option<Holder>, Error> {
        Ok(self
            .locks(span, Some(kind), true)?
            .into_iter()
            .next()
            .map(|l| l.holder))
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn abilities(&self) -> Abilities {
        Abilities {
            detects_deadlocks: true,
            fair: true,
            releases_on_death: true,
        }
    }

    fn unlock_all(&self) -> Result<(), Error> {
        if self.lost.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut c = self.session();
        let r = self.simple(
            &c,
            "release every advisory lock",
            "SELECT pg_advisory_unlock_all()",
        );
        c.held.clear();
        // The marker too: the owner is going away.
        self.marker_gone.store(true, Ordering::Relaxed);
        match r {
            Err(Error::ConnectionLost { .. }) => Ok(()),
            other => other.map(drop),
        }
    }
}
