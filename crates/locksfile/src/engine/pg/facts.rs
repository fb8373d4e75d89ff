//! What a session can tell about its server that bears on its locks: a
//! pooler between them, the room in the server's lock table, the deadlock
//! detector's delay, encryption. Read-only; for diagnostics
//! (`locksfile doctor`), never on a lock's path.

use tokio_postgres::SimpleQueryMessage;

use super::session::{block_on, Addr};
use super::Pg;
use crate::error::Error;

/// Facts about a PostgreSQL server as one handle's session sees them
/// ([`LockFile::server_facts`](crate::LockFile::server_facts)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerFacts {
    /// The server's version (`server_version`).
    pub server_version: String,
    /// The backend process the session had when it connected.
    pub backend_pid: i32,
    /// The backend process each of several statements, sent one by one,
    /// ran in. More than one value (or one other than `backend_pid`) means
    /// a pooler hands the client's statements to several server sessions:
    /// transaction or statement pooling, under which session locks are
    /// dropped or given to other clients (the handle is then lost).
    pub statement_pids: Vec<i32>,
    /// `max_locks_per_transaction`.
    pub max_locks_per_transaction: i64,
    /// `max_connections`.
    pub max_connections: i64,
    /// `max_prepared_transactions`.
    pub max_prepared_transactions: i64,
    /// Entries of the server's lock table in use now (`pg_locks` rows held
    /// or awaited by every session).
    pub locks_in_use: i64,
    /// `deadlock_timeout`, in milliseconds: how long a wait lasts before
    /// the server looks for a cycle.
    pub deadlock_timeout_ms: i64,
    /// `client_connection_check_interval`, in milliseconds (0: off, so a
    /// waiter whose client died may still be granted a lock).
    pub client_connection_check_interval_ms: i64,
    /// The server's address when the session reaches it over TCP; `None`
    /// for a Unix socket, which never carries TLS nor leaves the machine.
    pub tcp_peer: Option<std::net::SocketAddr>,
    /// Whether the session is encrypted (`pg_stat_ssl`); `None` when the
    /// server would not say.
    pub encrypted: Option<bool>,
    /// The TLS version, when encrypted.
    pub tls_version: Option<String>,
}

impl ServerFacts {
    /// Room in the server's shared lock table, in entries: about
    /// `max_locks_per_transaction × (max_connections +
    /// max_prepared_transactions)` for every session together.
    pub fn lock_table_size(&self) -> i64 {
        self.max_locks_per_transaction
            .saturating_mul(self.max_connections + self.max_prepared_transactions)
    }

    /// Entries of the server's lock table that one take of the largest
    /// span needs at its peak (each key is taken twice over while the take
    /// is all or nothing).
    pub fn largest_take(&self) -> i64 {
        2 * super::MAX_SPAN as i64
    }

    /// Whether the statements ran in another server session than the one
    /// connected: a pooler in transaction or statement mode.
    pub fn pooled(&self) -> bool {
        self.statement_pids.iter().any(|p| *p != self.backend_pid)
    }
}

/// The setting's value in the unit `pg_settings` gives, turned into
/// milliseconds for the time units.
fn millis(value: &str, unit: &str) -> i64 {
    let v: i64 = value.parse().unwrap_or(0);
    match unit {
        "s" => v.saturating_mul(1000),
        "min" => v.saturating_mul(60_000),
        "us" => v / 1000,
        _ => v,
    }
}

impl Pg {
    /// Reads [`ServerFacts`] through this owner's session.
    pub fn facts(&self) -> Result<ServerFacts, Error> {
        if self.lost() {
            return Err(self.lose());
        }
        let c = self.session();
        let rows = |sql: &str| -> Result<Vec<Vec<String>>, Error> {
            let msgs = block_on(&c.rt, c.client.simple_query(sql))
                .map_err(|e| self.error("read the server's settings", e))?;
            Ok(msgs
                .into_iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(
                        (0..r.len())
                            .map(|i| r.get(i).unwrap_or_default().to_string())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect())
        };
        // Each its own statement (and so, outside a transaction block, its
        // own transaction), as a pooler in transaction mode would see them.
        let mut statement_pids = Vec::new();
        for _ in 0..3 {
            let r = rows("SELECT pg_backend_pid()")?;
            if let Some(pid) = r.first().and_then(|r| r[0].parse().ok()) {
                statement_pids.push(pid);
            }
        }
        if statement_pids.iter().any(|p| *p != self.backend_pid) {
            // The session's locks are not where it took them.
            self.mark_lost();
        }
        let settings = rows(
            "SELECT name, setting, coalesce(unit, '') FROM pg_settings WHERE name IN \
             ('server_version', 'max_locks_per_transaction', 'max_connections', \
             'max_prepared_transactions', 'deadlock_timeout', \
             'client_connection_check_interval')",
        )?;
        let get = |name: &str| settings.iter().find(|r| r[0] == name);
        let num = |name: &str| get(name).map_or(0, |r| millis(&r[1], &r[2]));
        let locks_in_use = rows("SELECT count(*) FROM pg_locks")?
            .first()
            .and_then(|r| r[0].parse().ok())
            .unwrap_or(0);
        let ssl = rows(
            "SELECT ssl::text, coalesce(version, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )?;
        let (encrypted, tls_version) = match ssl.first() {
            Some(r) => {
                let on = r[0] == "true";
                (Some(on), on.then(|| r[1].clone()))
            }
            None => (None, None),
        };
        Ok(ServerFacts {
            server_version: get("server_version")
                .map(|r| r[1].clone())
                .unwrap_or_default(),
            backend_pid: self.backend_pid,
            statement_pids,
            max_locks_per_transaction: num("max_locks_per_transaction"),
            max_connections: num("max_connections"),
            max_prepared_transactions: num("max_prepared_transactions"),
            locks_in_use,
            deadlock_timeout_ms: num("deadlock_timeout"),
            client_connection_check_interval_ms: num("client_connection_check_interval"),
            tcp_peer: match &self.addr {
                Addr::Tcp(a) => Some(*a),
                Addr::Unix(_) => None,
            },
            encrypted,
            tls_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::millis;

    #[test]
    fn settings_turn_into_milliseconds() {
        assert_eq!(millis("1000", "ms"), 1000);
        assert_eq!(millis("2", "s"), 2000);
        assert_eq!(millis("3", "min"), 180_000);
        assert_eq!(millis("64", ""), 64);
        assert_eq!(millis("nonsense", "ms"), 0);
    }
}
