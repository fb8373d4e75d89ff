//! Connecting: reaching the server at one of the target's hosts, the
//! startup exchange, and finding (or creating) the namespace.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::config::{Host, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

use super::session::{block_on, server_error, Addr, Rt};
use super::tls::{self, SslMode};
use super::{setup, Conn, Pg, Target, DEFAULT_CONNECT_TIMEOUT};
use crate::error::{Error, TlsError};

pub(super) fn connect_error(shown: &str, kind: io::ErrorKind, msg: impl Into<String>) -> Error {
    Error::Connect {
        target: shown.to_string(),
        source: io::Error::new(kind, msg.into()),
    }
}

fn tls_error(shown: &str, e: TlsError) -> Error {
    Error::Connect {
        target: shown.to_string(),
        source: io::Error::new(e.io_kind(), e),
    }
}

/// Whether `e` is a failure of TLS (after which `prefer` goes on without).
fn is_tls(e: &Error) -> bool {
    matches!(e, Error::Connect { source, .. }
        if source.get_ref().is_some_and(|e| e.is::<TlsError>()))
}

/// How one attempt at a TCP host goes: in the clear, or with TLS to
/// `host`, required or (`prefer`) only when the server offers it.
#[derive(Clone, Copy)]
enum Attempt {
    Plain,
    Tls { required: bool },
}

/// The attempts `sslmode` makes at a TCP host, in order; the next one is
/// made only after a failure of the kind libpq retries after (`allow`:
/// any; `prefer`: of TLS).
fn attempts(mode: SslMode) -> &'static [Attempt] {
    match mode {
        SslMode::Disable => &[Attempt::Plain],
        SslMode::Allow => &[Attempt::Plain, Attempt::Tls { required: true }],
        SslMode::Prefer => &[Attempt::Tls { required: false }, Attempt::Plain],
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            &[Attempt::Tls { required: true }]
        }
    }
}

/// The startup exchange over a connected socket of either kind, with TLS
/// first when `tls` names the host; the session, and the future that
/// drives its connection.
async fn start_up<S>(
    target: &Target,
    mut s: S,
    tls: Option<(&str, bool)>,
) -> Result<(Client, Driver), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shown = &target.shown;
    if let Some((host, required)) = tls {
        let offered = target.config.get_ssl_negotiation() == SslNegotiation::Direct
            || tls::negotiate(&mut s).await.map_err(|e| {
                connect_error(shown, io::ErrorKind::ConnectionAborted, e.to_string())
            })?;
        if offered {
            let s = tls::handshake(&target.tls, host, s)
                .await
                .map_err(|e| tls_error(shown, e))?;
            return start_up_plain(target, s).await;
        }
        if required {
            return Err(tls_error(shown, TlsError::NotOffered));
        }
    }
    start_up_plain(target, s).await
}

/// The startup exchange proper, over a stream that is what it will be.
async fn start_up_plain<S>(target: &Target, s: S) -> Result<(Client, Driver), Error>
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

/// The error of a failed connection attempt, typed by what went wrong.
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
        let (backend_pid, marker) = block_on(&rt, async {
            tokio::time::timeout(timeout, own_session(&client, &shown))
                .await
                .unwrap_or_else(|_| {
                    Err(connect_error(
                        &shown,
                        io::ErrorKind::TimedOut,
                        format!("the session check took over {timeout:?}"),
                    ))
                })
        })?;
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
            marker,
            marker_gone: AtomicBool::new(false),
            generation: crate::sys::fork_generation(),
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
    pub(super) async fn open(target: &Target) -> Result<(Client, Driver, OwnedFd, Addr), Error> {
        let config = &target.config;
        let ports = config.get_ports();
        let mut last = None;
        for (i, host) in config.get_hosts().iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let steps: &[Attempt] = match host {
                Host::Unix(_) => &[Attempt::Plain],
                Host::Tcp(_) => attempts(target.tls.mode),
            };
            for (n, step) in steps.iter().enumerate() {
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
                            // operation: about 30 s unless the target says.
                            target.keepalive.apply(s.as_fd())?;
                            let addr = s.peer_addr()?;
                            let fd = s.as_fd().try_clone_to_owned()?;
                            Ok((Stream::Tcp(s), fd, Addr::Tcp(addr)))
                        }
                    }
                };
                match attempt.await {
                    Ok((stream, fd, addr)) => {
                        let tls = match (step, host) {
                            (Attempt::Tls { required }, Host::Tcp(h)) => {
                                Some((h.as_str(), *required))
                            }
                            _ => None,
                        };
                        let started = match stream {
                            Stream::Unix(s) => start_up(target, s, None).await,
                            Stream::Tcp(s) => start_up(target, s, tls).await,
                        };
                        match started {
                            Ok((c, driver)) => return Ok((c, driver, fd, addr)),
                            // libpq's second try: `allow` with TLS after any
                            // refusal, `prefer` without after a TLS failure.
                            Err(e)
                                if n + 1 < steps.len()
                                    && (target.tls.mode == SslMode::Allow || is_tls(&e)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
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
    pub(super) async fn setup(client: &Client, name: &str) -> Result<(i32, [Statement; 4]), Error> {
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
        // Each says which backend ran it, for free: one that is not the
        // session's own means a pooler moved the client (`Pg::one`).
        Ok((
            ns,
            [
                prep("SELECT pg_try_advisory_lock($1, $2), pg_backend_pid()").await?,
                prep("SELECT pg_try_advisory_lock_shared($1, $2), pg_backend_pid()").await?,
                prep("SELECT pg_advisory_unlock($1, $2), pg_backend_pid()").await?,
                prep("SELECT pg_advisory_unlock_shared($1, $2), pg_backend_pid()").await?,
            ],
        ))
    }
}

/// The class (high half) of the session markers' int8 advisory keys:
/// "lkfs". Lock indices are two-int4 keys (`objsubid` 2 in `pg_locks`), the
/// markers int8 ones (`objsubid` 1): the two never meet.
pub(super) const MARKER_CLASS: i32 = 0x6C6B_6673;

/// A marker key no other client is likely to draw: the low half random.
fn marker_key() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    (i64::from(MARKER_CLASS) << 32) | i64::from(h.finish() as u32)
}

/// The message of a connection refused because the server session is not
/// the client's own.
pub(crate) const POOLED: &str = "the server session is shared with another client or changes \
     between statements: a pooler in transaction or statement mode (PgBouncer's \
     `pool_mode = transaction`) stands between, under which session locks exclude nobody; \
     connect directly or use the pooler's `pool_mode = session`";

/// Make sure the session is this client's own: take a session lock on a
/// marker key of this client's, then count the markers the server session
/// holds. Another client's beside ours means a pooler handed both clients
/// one server session (PgBouncer in transaction mode reuses its last one),
/// where both would "hold" one exclusive lock; a backend that changed
/// between the two statements means the pooler hands statements to any
/// server session. Either is refused, the marker released first. The
/// backend's pid and the marker key.
async fn own_session(client: &Client, shown: &str) -> Result<(i32, i64), Error> {
    // Simple statements: one round trip each, and each its own
    // transaction, as a pooler in transaction mode sees them.
    let row = |sql: String, op: &'static str| async move {
        let msgs = client
            .simple_query(&sql)
            .await
            .map_err(|e| startup_error(shown, e))?;
        msgs.into_iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some((
                    r.get(0).unwrap_or_default().to_string(),
                    r.get(1).unwrap_or_default().to_string(),
                )),
                _ => None,
            })
            .ok_or_else(|| {
                connect_error(shown, io::ErrorKind::InvalidData, format!("{op}: no row"))
            })
    };
    let mut taken = None;
    for _ in 0..4 {
        let key = marker_key();
        let (got, pid) = row(
            format!("SELECT pg_try_advisory_lock({key}), pg_backend_pid()"),
            "take the session marker",
        )
        .await?;
        if got == "t" {
            taken = Some((key, pid.parse::<i32>().unwrap_or(0)));
            break;
        }
    }
    let Some((key, pid)) = taken else {
        return Err(connect_error(
            shown,
            io::ErrorKind::AlreadyExists,
            "no free session marker key",
        ));
    };
    let (now, markers) = row(
        format!(
            "SELECT pg_backend_pid(), count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND objsubid = 1 AND classid = {MARKER_CLASS}::oid AND granted \
             AND pid = pg_backend_pid()"
        ),
        "count the session markers",
    )
    .await?;
    if now.parse::<i32>().ok() != Some(pid) || markers != "1" {
        let _ = client
            .simple_query(&format!("SELECT pg_advisory_unlock({key})"))
            .await;
        return Err(connect_error(shown, io::ErrorKind::Unsupported, POOLED));
    }
    Ok((pid, key))
}

/// The task that drives a session's socket (it runs whenever a call
/// blocks on the runtime).
pub(super) type Driver = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}
