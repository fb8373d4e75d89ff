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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, Client, NoTls, SimpleQueryMessage, Statement};

pub(crate) use target::is_target;
use target::Target;

use super::{Abilities, Engine, Until};
use crate::error::{Error, Holder, ServerHolder, ServerLock, SpanError};
use crate::kind::Kind;
use crate::span::{Span, INDEX_END};
use crate::sys;

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

/// How to open a socket to the server again (for cancel requests).
#[derive(Clone, Debug)]
enum Addr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// A client runtime that can be dropped anywhere: tokio refuses to drop a
/// runtime inside another one's async context (a handle dropped in a task),
/// so it is shut down in the background, which never blocks (the session's
/// tasks are dropped either way).
struct Rt(Option<Runtime>);

impl Rt {
    fn new() -> io::Result<Rt> {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map(|rt| Rt(Some(rt)))
    }
}

impl std::ops::Deref for Rt {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        self.0.as_ref().expect("a runtime until dropped")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
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

fn connect_error(shown: &str, kind: io::ErrorKind, msg: impl Into<String>) -> Error {
    Error::Connect {
        target: shown.to_string(),
        source: io::Error::new(kind, msg.into()),
    }
}

/// The error of a failed connection attempt, typed by what went wrong.
/// The startup exchange over a connected socket of either kind; the
/// session, and the future that drives its connection.
async fn start_up<S>(target: &Target, s: S) -> Result<(Client, Driver), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (c, conn) = target
        .config
        .connect_raw(s, NoTls)
        .await
        .map_err(|e| startup_error(&target.shown, e))?;
    let driver: Driver = Box::pin(async move {
        let _ = conn.await;
    });
    Ok((c, driver))
}

fn startup_error(shown: &str, e: tokio_postgres::Error) -> Error {
    let kind = match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            io::ErrorKind::PermissionDenied
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => io::ErrorKind::NotFound,
        Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => io::ErrorKind::ResourceBusy,
        Some(_) => io::ErrorKind::Other,
        None => io::ErrorKind::ConnectionAborted,
    };
    let msg = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    connect_error(shown, kind, msg)
}

impl Pg {
    /// Connect, find (or create) the namespace, and prepare the hot
    /// statements, all within `timeout`.
    pub fn connect(target: &str, timeout: Option<Duration>, writable: bool) -> Result<Pg, Error> {
        let target = Target::parse(target)?;
        let shown = target.shown.clone();
        let timeout = timeout
            .or(target.config.get_connect_timeout().copied())
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let rt = Rt::new().map_err(|e| Error::io("start the client runtime", e))?;
        let outcome = block_on(&rt, async {
            tokio::time::timeout(timeout, Self::open(&target))
                .await
                .unwrap_or_else(|_| {
                    Err(connect_error(
                        &shown,
                        io::ErrorKind::TimedOut,
                        format!("no answer within {timeout:?}"),
                    ))
                })
        });
        let (client, socket, addr, ns, stmts) = match outcome {
            Ok((client, connection, socket, addr)) => {
                rt.spawn(connection);
                let setup = block_on(&rt, async {
                    tokio::time::timeout(timeout, Self::setup(&client, &target.name))
                        .await
                        .unwrap_or_else(|_| {
                            Err(connect_error(
                                &shown,
                                io::ErrorKind::TimedOut,
                                format!("namespace setup took over {timeout:?}"),
                            ))
                        })
                })?;
                (client, socket, addr, setup.0, setup.1)
            }
            Err(e) => return Err(e),
        };
        let [try_x, try_s, unlock_x, unlock_s] = stmts;
        let backend_pid = block_on(&rt, client.query_one("SELECT pg_backend_pid()", &[]))
            .map_err(|e| startup_error(&shown, e))?
            .get::<_, i32>(0);
        let cancel = client.cancel_token();
        Ok(Pg {
            conn: Mutex::new(Conn {
                rt,
                client,
                try_x,
                try_s,
                unlock_x,
                unlock_s,
                held: BTreeMap::new(),
            }),
            ns,
            shown,
            writable,
            backend_pid,
            socket,
            addr,
            cancel,
            lost: AtomicBool::new(false),
            preempt: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            deadlock_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Try each host in turn; the session and a duplicate of its socket.
    async fn open(target: &Target) -> Result<(Client, Driver, OwnedFd, Addr), Error> {
        let config = &target.config;
        let ports = config.get_ports();
        let mut last = None;
        for (i, host) in config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let attempt = async {
                match host {
                    Host::Unix(dir) => {
                        let path = dir.join(format!(".s.PGSQL.{port}"));
                        let s = tokio::net::UnixStream::connect(&path).await?;
                        let fd = s.as_fd().try_clone_to_owned()?;
                        Ok::<_, io::Error>((Stream::Unix(s), fd, Addr::Unix(path)))
                    }
                    Host::Tcp(h) => {
                        let s = tokio::net::TcpStream::connect((h.as_str(), port)).await?;
                        s.set_nodelay(true)?;
                        // Notice a dead server or a partition without an
                        // operation: about 30 s.
                        sys::set_keepalive(s.as_fd(), 10, 5, 4)?;
                        let addr = s.peer_addr()?;
                        let fd = s.as_fd().try_clone_to_owned()?;
                        Ok((Stream::Tcp(s), fd, Addr::Tcp(addr)))
                    }
                }
            };
            match attempt.await {
                Ok((stream, fd, addr)) => {
                    let (c, driver) = match stream {
                        Stream::Unix(s) => start_up(target, s).await?,
                        Stream::Tcp(s) => start_up(target, s).await?,
                    };
                    return Ok((c, driver, fd, addr));
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"));
        Err(Error::Connect {
            target: target.shown.clone(),
            source: e,
        })
    }

    /// The namespace's id (creating the table or the row when missing) and
    /// the hot statements.
    async fn setup(client: &Client, name: &str) -> Result<(i32, [Statement; 4]), Error> {
        let server = |op: &'static str| move |e: tokio_postgres::Error| server_error(op, e);
        let lookup = "SELECT id FROM locksfile_namespaces WHERE name = $1";
        // `None`: no table yet; `Some(None)`: no row for the name yet.
        let found = match client.query_opt(lookup, &[&name]).await {
            Ok(row) => Some(row.map(|r| r.get::<_, i32>(0))),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => None,
            Err(e) => return Err(server_error("look up the lock namespace", e)),
        };
        let ns = match found {
            Some(Some(ns)) => ns,
            missing => {
                if missing.is_none() {
                    // Only then: `CREATE ... IF NOT EXISTS` still needs the
                    // right to create, which a role set up by a DBA
                    // (`locksfile pg setup`) lacks. Sessions creating the
                    // tables at once would collide in the catalog: the
                    // script takes them one at a time.
                    client
                        .batch_execute(&setup::server_setup_sql(None))
                        .await
                        .map_err(server("create the lock namespace table"))?;
                    let _ = client.batch_execute("ROLLBACK").await;
                }
                client
                    .execute(
                        "INSERT INTO locksfile_namespaces (name) VALUES ($1) ON CONFLICT DO NOTHING",
                        &[&name],
                    )
                    .await
                    .map_err(server("add the lock namespace"))?;
                client
                    .query_one(lookup, &[&name])
                    .await
                    .map_err(server("look up the lock namespace"))?
                    .get(0)
            }
        };
        let prep = |sql: &'static str| async move {
            client
                .prepare(sql)
                .await
                .map_err(|e| server_error("prepare lock statements", e))
        };
        Ok((
            ns,
            [
                prep("SELECT pg_try_advisory_lock($1, $2)").await?,
                prep("SELECT pg_try_advisory_lock_shared($1, $2)").await?,
                prep("SELECT pg_advisory_unlock($1, $2)").await?,
                prep("SELECT pg_advisory_unlock_shared($1, $2)").await?,
            ],
        ))
    }

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

    fn lose(&self) -> Error {
        self.lost.store(true, Ordering::Relaxed);
        Error::ConnectionLost {
            target: self.shown.clone(),
        }
    }

    /// A client error as this crate's, marking the session lost when it is.
    fn error(&self, op: &'static str, e: tokio_postgres::Error) -> Error {
        match e.code() {
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Error::Deadlock { at: None },
            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => Error::TimedOut { at: None },
            Some(c) if *c == SqlState::QUERY_CANCELED => Error::Interrupted,
            Some(c)
                if *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || c.code().starts_with("08") =>
            {
                self.lose()
            }
            Some(_) => server_error(op, e),
            None => self.lose(),
        }
    }

    /// The session for a call that does not wait. A wait holding it is
    /// cancelled (it starts again once we are done): a release must not
    /// wait behind another thread's wait.
    fn session(&self) -> MutexGuard<'_, Conn> {
        match self.conn.try_lock() {
            Ok(c) => return c,
            Err(TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(TryLockError::WouldBlock) => {}
        }
        self.preempt.fetch_add(1, Ordering::SeqCst);
        // A cancel request that reaches the server before the waiting
        // statement starts (or while the waiter is between taking the
        // session and marking itself waiting) cancels nothing: send again
        // every RECANCEL until the session is ours.
        let mut next_cancel = Instant::now();
        let c = loop {
            match self.conn.try_lock() {
                Ok(c) => break c,
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
            if self.waiting.load(Ordering::SeqCst) && Instant::now() >= next_cancel {
                self.send_cancel();
                next_cancel = Instant::now() + RECANCEL;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        self.preempt.fetch_sub(1, Ordering::SeqCst);
        c
    }

    /// Ask the server to cancel the session's running statement.
    fn send_cancel(&self) {
        send_cancel(&self.addr, &self.cancel);
    }

    /// Run `sql` (simple protocol, one round trip); its first value.
    fn simple(&self, c: &Conn, op: &'static str, sql: &str) -> Result<Option<String>, Error> {
        let msgs = block_on(&c.rt, c.client.simple_query(sql)).map_err(|e| self.error(op, e))?;
        let mut first = None;
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                first = r.get(0).map(str::to_string);
            }
        }
        Ok(first)
    }

    /// A one-key prepared call returning a boolean.
    fn one(&self, c: &Conn, op: &'static str, stmt: &Statement, key: i32) -> Result<bool, Error> {
        block_on(&c.rt, c.client.query_one(stmt, &[&self.ns, &key]))
            .map(|r| r.get::<_, bool>(0))
            .map_err(|e| self.error(op, e))
    }

    /// Read what the session holds over `keys` back from the server, after
    /// a cancel may have stopped a statement part way.
    fn resync(&self, c: &mut Conn, lo: i32, hi: i32) -> Result<(), Error> {
        let sql = format!(
            "SELECT coalesce(string_agg(objid::text || ':' || \
             CASE mode WHEN 'ExclusiveLock' THEN 'x' ELSE 's' END, ','), '') \
             FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' \
             AND objsubid = 2 AND classid = {ns}::oid AND granted \
             AND objid BETWEEN {lo}::oid AND {hi}::oid",
            ns = self.ns
        );
        let text = self.simple(c, "read held locks", &sql)?.unwrap_or_default();
        let keys: Vec<i32> = c.held.range(lo..=hi).map(|(k, _)| *k).collect();
        for k in keys {
            c.held.remove(&k);
        }
        for item in text.split(',').filter(|s| !s.is_empty()) {
            if let Some((k, m)) = item.split_once(':') {
                if let Ok(k) = k.parse::<i64>() {
                    let k = k as i32;
                    *c.held.entry(k).or_insert(0) |= if m == "x" { X } else { S };
                }
            }
        }
        Ok(())
    }

    /// Run `f` on the session, again after a stale cancel request hit it,
    /// reading the session's locks back between tries.
    fn with_retries<T>(
        &self,
        c: &mut Conn,
        span: (i32, i32),
        mut f: impl FnMut(&Self, &mut Conn) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut tries = 0;
        loop {
            match f(self, c) {
                Err(Error::Interrupted) if tries < CANCEL_RETRIES => {
                    tries += 1;
                    self.resync(c, span.0, span.1)?;
                }
                other => return other,
            }
        }
    }

    /// Take `kind` on `keys` (each lacking it) without waiting; `false`
    /// when another session is in the way, and then nothing was taken.
    fn try_take(&self, c: &mut Conn, keys: &[i32], kind: Kind) -> Result<bool, Error> {
        if let [key] = keys {
            let stmt = match kind {
                Kind::Exclusive => c.try_x.clone(),
                Kind::Shared => c.try_s.clone(),
            };
            let got = self.one(c, "try an advisory lock", &stmt, *key)?;
            if got {
                *c.held.entry(*key).or_insert(0) |= bit(kind);
            }
            return Ok(got);
        }
        let sfx = suffix(kind);
        let arr = array(keys);
        let ns = self.ns;
        // Transaction locks first (all or none), then the session locks,
        // which are then granted at once.
        let sql = format!(
            "SELECT bool_and(pg_try_advisory_lock{sfx}({ns}, k)) FROM unnest({arr}) k \
             WHERE (SELECT bool_and(pg_try_advisory_xact_lock{sfx}({ns}, j)) FROM unnest({arr}) j)"
        );
        let got = self.simple(c, "try advisory locks", &sql)?.as_deref() == Some("t");
        if got {
            for k in keys {
                *c.held.entry(*k).or_insert(0) |= bit(kind);
            }
        }
        Ok(got)
    }

    /// Drop `kind` on `keys` (each holding it). Never waits.
    fn drop_kind(&self, c: &mut Conn, keys: &[i32], kind: Kind) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        if let [key] = keys {
            let stmt = match kind {
                Kind::Exclusive => c.unlock_x.clone(),
                Kind::Shared => c.unlock_s.clone(),
            };
            self.one(c, "release an advisory lock", &stmt, *key)?;
        } else {
            let sql = format!(
                "SELECT count(pg_advisory_unlock{}({}, k)) FROM unnest({}) k",
                suffix(kind),
                self.ns,
                array(keys)
            );
            self.simple(c, "release advisory locks", &sql)?;
        }
        for k in keys {
            if let Some(b) = c.held.get_mut(k) {
                *b &= !bit(kind);
                if *b == 0 {
                    c.held.remove(k);
                }
            }
        }
        Ok(())
    }

    /// Give exclusive-only keys a shared lock (before dropping their
    /// exclusive one). The blocking call, as the server grants a session
    /// a lock compatible with the ones granted even past queued waiters
    /// when it already holds a stronger one, where `pg_try_*` would refuse.
    fn add_shared(&self, c: &mut Conn, keys: &[i32]) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "SELECT count(*) FROM (SELECT pg_advisory_lock_shared({}, k) FROM unnest({}) k) s",
            self.ns,
            array(keys)
        );
        self.simple(c, "downgrade advisory locks", &sql)?;
        for k in keys {
            *c.held.entry(*k).or_insert(0) |= S;
        }
        Ok(())
    }

    /// Set `span` to `kind` on the session: raises without waiting first
    /// (`false` if refused, nothing changed), then lowering.
    fn set(&self, c: &mut Conn, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
        let (lo, hi) = clamp(span);
        if lo > hi {
            return Ok(true);
        }
        match kind {
            None => {
                let xs: Vec<i32> = c
                    .held
                    .range(lo..=hi)
                    .filter(|(_, b)| *b & X != 0)
                    .map(|(k, _)| *k)
                    .collect();
                let ss: Vec<i32> = c
                    .held
                    .range(lo..=hi)
                    .filter(|(_, b)| *b & S != 0)
                    .map(|(k, _)| *k)
                    .collect();
                self.drop_kind(c, &xs, Kind::Exclusive)?;
                self.drop_kind(c, &ss, Kind::Shared)?;
                Ok(true)
            }
            Some(Kind::Exclusive) => {
                let need: Vec<i32> = (lo..=hi)
                    .filter(|k| c.held.get(k).is_none_or(|b| b & X == 0))
                    .collect();
                if need.is_empty() {
                    return Ok(true);
                }
                self.try_take(c, &need, Kind::Exclusive)
            }
            Some(Kind::Shared) => {
                let mut fresh = Vec::new();
                let mut x_only = Vec::new();
                let mut drop_x = Vec::new();
                for k in lo..=hi {
                    match c.held.get(&k).copied().unwrap_or(0) {
                        0 => fresh.push(k),
                        X => x_only.push(k),
                        b if b & X != 0 => drop_x.push(k),
                        _ => {}
                    }
                }
                if !fresh.is_empty() && !self.try_take(c, &fresh, Kind::Shared)? {
                    return Ok(false);
                }
                self.add_shared(c, &x_only)?;
                drop_x.extend_from_slice(&x_only);
                drop_x.sort_unstable();
                self.drop_kind(c, &drop_x, Kind::Exclusive)?;
                Ok(true)
            }
        }
    }

    /// Wait for `kind` on `keys` (each lacking it) until `until` ends the
    /// wait, in one statement whose `lock_timeout` is all the time left (so
    /// the server's deadlock detector runs at its own `deadlock_timeout`):
    /// transaction locks in ascending order (so a failure leaves nothing),
    /// then the session locks. `abandon` set: give up with
    /// [`Error::Interrupted`] at the next chance. A sibling's cancel starts
    /// the statement again.
    fn wait_keys(
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

    /// The server's `deadlock_timeout`, read once.
    fn deadlock_timeout(&self, c: &Conn) -> Duration {
        let mut ms = self.deadlock_ms.load(Ordering::Relaxed);
        if ms == 0 {
            ms = self
                .simple(
                    c,
                    "read deadlock_timeout",
                    "SELECT setting FROM pg_settings WHERE name = 'deadlock_timeout'",
                )
                .ok()
                .flatten()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&v| v > 0)
                .unwrap_or(1000);
            self.deadlock_ms.store(ms, Ordering::Relaxed);
        }
        Duration::from_millis(ms)
    }

    /// Whether waiting for `kind` on `keys` now would close a cycle of
    /// waits for held advisory locks (hard edges only, as the server's own
    /// detector counts a deadlock): from the sessions holding what we ask
    /// for, through the sessions they wait for, back to us. One consistent
    /// snapshot of `pg_locks`, between two of our statements (so our own
    /// wait is the edge we add). Cycles through other kinds of locks are
    /// left to the server.
    fn closes_cycle(&self, c: &Conn, keys: &[i32], kind: Kind) -> Result<bool, Error> {
        let sql = format!(
            "WITH RECURSIVE l AS (SELECT pid, classid, objid, objsubid, mode, granted \
             FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())), \
             edge AS (SELECT DISTINCT w.pid AS w, h.pid AS h FROM l w JOIN l h \
             ON h.classid = w.classid AND h.objid = w.objid AND h.objsubid = w.objsubid \
             AND h.granted AND NOT w.granted AND h.pid <> w.pid \
             AND (w.mode = 'ExclusiveLock' OR h.mode = 'ExclusiveLock')), \
             reach(pid) AS (SELECT h.pid FROM l h WHERE h.granted \
             AND h.pid <> pg_backend_pid() AND h.classid = {ns}::oid AND h.objsubid = 2 \
             AND h.objid::int8 = ANY({arr}::int8[]) AND ({x} OR h.mode = 'ExclusiveLock') \
             UNION SELECT e.h FROM edge e JOIN reach r ON e.w = r.pid) \
             SELECT EXISTS (SELECT 1 FROM reach WHERE pid = pg_backend_pid())",
            ns = self.ns,
            arr = array(keys),
            x = kind == Kind::Exclusive,
        );
        Ok(self.simple(c, "look for a deadlock", &sql)?.as_deref() == Some("t"))
    }

    /// An interruptible wait: the statement runs on a helper thread (with
    /// signals blocked there) while this thread sleeps in a `read` that a
    /// signal interrupts; then the statement is cancelled and the helper's
    /// answer taken (a grant that won the race is kept).
    fn wait_interruptibly(&self, keys: &[i32], kind: Kind, until: Until<'_>) -> Result<(), Error> {
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

    /// Other sessions' locks in this namespace over `span`: held ones in
    /// the way of `kind` (all held ones for `None`), and with `!first`
    /// also the waiting ones, in index order.
    pub fn locks(
        &self,
        span: Span,
        kind: Option<Kind>,
        first: bool,
    ) -> Result<Vec<ServerLock>, Error> {
        if self.lost() {
            return Err(self.lose());
        }
        let (lo, hi) = clamp(span);
        if lo > hi {
            return Ok(Vec::new());
        }
        let only_x = match kind {
            Some(Kind::Shared) => "AND l.mode = 'ExclusiveLock'",
            _ => "",
        };
        let (granted, limit) = if first {
            ("AND l.granted", "LIMIT 1")
        } else {
            ("", "")
        };
        let sql = format!(
            "SELECT l.objid::int8 || '|' || l.mode || '|' || l.pid || '|' || l.granted || '|' || \
             coalesce(host(a.client_addr), '') || '|' || coalesce(a.client_port, -1) || '|' || \
             coalesce(a.application_name, '') \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.objsubid = 2 {granted} \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND l.classid = {ns}::oid AND l.objid BETWEEN {lo}::oid AND {hi}::oid \
             AND l.pid <> pg_backend_pid() {only_x} \
             ORDER BY l.objid, NOT l.granted, l.mode DESC {limit}",
            ns = self.ns
        );
        let c = self.session();
        let msgs = block_on(&c.rt, c.client.simple_query(&sql))
            .map_err(|e| self.error("look up lock holders", e))?;
        let mut out = Vec::new();
        for m in msgs {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let Some(row) = r.get(0) else { continue };
            let f: Vec<&str> = row.splitn(7, '|').collect();
            if f.len() < 7 {
                continue;
            }
            let idx: u64 = f[0].parse().unwrap_or(0);
            out.push(ServerLock {
                holder: Holder {
                    span: Span::from_checked(idx, idx + 1),
                    kind: if f[1] == "ExclusiveLock" {
                        Kind::Exclusive
                    } else {
                        Kind::Shared
                    },
                    pid: None,
                    server: Some(ServerHolder::new(
                        f[2].parse().unwrap_or(0),
                        f[4].parse().ok(),
                        f[5].parse::<i32>().ok().and_then(|p| u16::try_from(p).ok()),
                        f[6],
                    )),
                },
                // boolean || text gives "true"
                granted: matches!(f[3], "true" | "t"),
            });
        }
        Ok(out)
    }

    /// The next fencing token of `index`, which this session holds
    /// exclusively.
    pub fn fence(&self, index: u64) -> Result<u64, Error> {
        if self.lost() {
            return Err(self.lose());
        }
        let key = i32::try_from(index).unwrap_or(i32::MAX);
        let c = self.session();
        if c.held.get(&key).is_none_or(|b| b & X == 0) {
            return Err(Error::NotHeld { index });
        }
        let sql = format!(
            "INSERT INTO locksfile_fences AS f (ns, idx, epoch) VALUES ({}, {key}, 1) \
             ON CONFLICT (ns, idx) DO UPDATE SET epoch = f.epoch + 1 RETURNING epoch",
            self.ns
        );
        let epoch = self.simple(&c, "bump the fencing token", &sql)?;
        epoch.and_then(|e| e.parse().ok()).ok_or_else(|| {
            Error::io(
                "bump the fencing token",
                io::Error::other("no epoch returned"),
            )
        })
    }
}

/// The task that drives a session's socket (it runs whenever a call
/// blocks on the runtime).
type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `rt.block_on(f)`, also where tokio refuses to start a runtime: inside
/// another one's context (a guard dropped in async code, the first try of
/// `write_async`, a handle opened in a task). There it runs on a thread of
/// its own, outside that context, for the statement's time.
fn block_on<F>(rt: &Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(f);
    }
    std::thread::scope(|s| {
        s.spawn(|| rt.block_on(f))
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Ask the server to cancel a session's running statement, over a new
/// connection as the protocol wants. Best effort: if it fails the wait ends
/// on its own terms.
fn send_cancel(addr: &Addr, token: &CancelToken) {
    let Ok(rt) = Rt::new() else {
        return;
    };
    let addr = addr.clone();
    block_on(&rt, async move {
        let go = async {
            match addr {
                Addr::Unix(p) => {
                    let s = tokio::net::UnixStream::connect(p).await?;
                    token
                        .cancel_query_raw(s, NoTls)
                        .await
                        .map_err(io::Error::other)
                }
                Addr::Tcp(a) => {
                    let s = tokio::net::TcpStream::connect(a).await?;
                    token
                        .cancel_query_raw(s, NoTls)
                        .await
                        .map_err(io::Error::other)
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), go).await;
    });
}

fn server_error(op: &'static str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => Error::Server {
            op,
            code: db.code().code().to_string(),
            message: db.message().to_string(),
        },
        None => Error::Server {
            op,
            code: String::new(),
            message: e.to_string(),
        },
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
            let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
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
        match r {
            Err(Error::ConnectionLost { .. }) => Ok(()),
            other => other.map(drop),
        }
    }
}
