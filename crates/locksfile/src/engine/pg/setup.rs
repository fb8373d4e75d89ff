//! What a database needs before roles without `CREATE` can take locks:
//! the two tables, made once by someone who may (a DBA, `locksfile pg
//! setup`), and the least rights an application role needs on them.
//! `docs/POSTGRES.md` gives the whole setup.

use std::io;
use std::time::Duration;

use super::connect::connect_error;
use super::session::{block_on, server_error, Rt};
use super::{Pg, Target, DEFAULT_CONNECT_TIMEOUT};
use crate::error::Error;

/// Serialises creating the tables between sessions (a one-bigint advisory
/// key, which never meets the two-int4 keys of locks).
pub(super) const SETUP_KEY: i64 = 0x6c6f_636b_7366_696c;

/// The statements that create the tables, inside one transaction that
/// holds [`SETUP_KEY`]: sessions creating them at once would collide in
/// the catalog.
pub(super) fn tables() -> String {
    format!(
        "SELECT pg_advisory_xact_lock({SETUP_KEY});
CREATE TABLE IF NOT EXISTS locksfile_namespaces (
    name text PRIMARY KEY, id serial UNIQUE);
CREATE TABLE IF NOT EXISTS locksfile_fences (
    ns int, idx int, epoch bigint NOT NULL,
    PRIMARY KEY (ns, idx));
"
    )
}

/// `name` as an SQL identifier, quoted: any role name is taken as given.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The setup script: the tables, and with `role` the rights it needs and
/// no more (find and add namespaces, bump fencing counters). Idempotent.
///
/// ```
/// let sql = locksfile::server_setup_sql(Some("app"));
/// assert!(sql.contains("GRANT SELECT, INSERT ON locksfile_namespaces TO \"app\""));
/// ```
pub fn server_setup_sql(role: Option<&str>) -> String {
    let mut sql = String::from("BEGIN;\n");
    sql.push_str(&tables());
    if let Some(role) = role {
        let r = ident(role);
        sql.push_str(&format!(
            "GRANT SELECT, INSERT ON locksfile_namespaces TO {r};
GRANT USAGE ON SEQUENCE locksfile_namespaces_id_seq TO {r};
GRANT SELECT, INSERT, UPDATE ON locksfile_fences TO {r};
"
        ));
    }
    sql.push_str("COMMIT;\n");
    sql
}

/// Connect to `target` (a server target as [`LockFile::connect`](crate::LockFile::connect)
/// takes it; `name=` may be left out) and run [`server_setup_sql`] there,
/// as the target's user, who must be allowed to create tables (and grant
/// on them, for `role`).
///
/// # Errors
/// [`Error::Connect`] for a malformed target (`InvalidInput`) or one that
/// cannot be reached;
/// [`Error::Server`] when the server refuses a statement (no right to
/// create, an unknown role), nothing made then.
pub fn set_up_server(target: &str, role: Option<&str>) -> Result<(), Error> {
    let target = match Target::parse(target) {
        Ok(t) => t,
        // The namespace does not matter here: any will do to parse.
        Err(_) => Target::parse(&with_name(target))?,
    };
    let timeout = target
        .config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let rt = Rt::new().map_err(|e| Error::io("start the client runtime", e))?;
    let shown = target.shown.clone();
    let sql = server_setup_sql(role);
    block_on(&rt, async {
        let go = async {
            let (client, driver, _socket, _addr) = Pg::open(&target).await?;
            let running = tokio::spawn(driver);
            let done = client.batch_execute(&sql).await;
            drop(client);
            let _ = running.await;
            done.map_err(|e| server_error("set up the lock tables", e))
        };
        tokio::time::timeout(timeout + Duration::from_secs(20), go)
            .await
            .unwrap_or_else(|_| {
                Err(connect_error(
                    &shown,
                    io::ErrorKind::TimedOut,
                    "the setup did not finish in time",
                ))
            })
    })
}

/// `s` with a `name=` (which setting up does not use) added in its form.
fn with_name(s: &str) -> String {
    if s.contains("://") {
        let sep = if s.contains('?') { '&' } else { '?' };
        format!("{s}{sep}name=setup")
    } else {
        format!("{s} name=setup")
    }
}
