//! The session's plumbing: the client runtime, running a statement on it
//! from sync code, and cancel requests over a connection of their own.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, NoTls, SimpleQueryMessage, Statement};

use super::{Conn, Pg, RECANCEL};
use crate::error::Error;

/// How to open a socket to the server again (for cancel requests).
#[derive(Clone, Debug)]
pub(super) enum Addr {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// A client runtime that can be dropped anywhere: tokio refuses to drop a
/// runtime inside another one's async context (a handle dropped in a task),
/// so it is shut down in the background, which never blocks (the session's
/// tasks are dropped either way).
pub(super) struct Rt(Option<Runtime>);

impl Rt {
    pub(super) fn new() -> io::Result<Rt> {
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

impl Pg {
    /// A client error as this crate's, marking the session lost when it is.
    pub(super) fn error(&self, op: &'static str, e: tokio_postgres::Error) -> Error {
        match e.code() {
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Error::Deadlock { at: None },
            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => Error::TimedOut { at: None },
            Some(c) if *c == SqlState::QUERY_CANCELED => Error::Interrupted,
            // A statement the session prepared is missing: another server
            // session ran the call (a pooler moved the client), where the
            // session's locks are not.
            Some(c) if *c == SqlState::INVALID_SQL_STATEMENT_NAME => self.lose(),
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
    pub(super) fn session(&self) -> MutexGuard<'_, Conn> {
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
    pub(super) fn send_cancel(&self) {
        send_cancel(&self.addr, &self.cancel);
    }

    /// Run `sql` (simple protocol, one round trip); its first value.
    pub(super) fn simple(
        &self,
        c: &Conn,
        op: &'static str,
        sql: &str,
    ) -> Result<Option<String>, Error> {
        let msgs = block_on(&c.rt, c.client.simple_query(sql)).map_err(|e| self.error(op, e))?;
        let mut first = None;
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                first = r.get(0).map(str::to_string);
            }
        }
        Ok(first)
    }

    /// A one-key prepared call returning a boolean (and the backend that
    /// ran it: another than the session's own means a pooler hands the
    /// client's statements to any server session, where its locks are not
    /// its own, and the session counts as lost).
    pub(super) fn one(
        &self,
        c: &Conn,
        op: &'static str,
        stmt: &Statement,
        key: i32,
    ) -> Result<bool, Error> {
        let row = block_on(&c.rt, c.client.query_one(stmt, &[&self.ns, &key]))
            .map_err(|e| self.error(op, e))?;
        if row.get::<_, i32>(1) != self.backend_pid {
            return Err(self.lose());
        }
        Ok(row.get::<_, bool>(0))
    }
}

/// `rt.block_on(f)`, also where tokio refuses to start a runtime: inside
/// another one's context (a guard dropped in async code, the first try of
/// `write_async`, a handle opened in a task). There it runs on a thread of
/// its own, outside that context, for the statement's time.
pub(super) fn block_on<F>(rt: &Runtime, f: F) -> F::Output
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
pub(super) fn send_cancel(addr: &Addr, token: &CancelToken) {
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

pub(super) fn server_error(op: &'static str, e: tokio_postgres::Error) -> Error {
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
