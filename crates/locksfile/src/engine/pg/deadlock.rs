//! Our own look for a cycle of waits, for when siblings keep restarting a
//! wait and the server's detector never gets to run.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{array, Conn, Pg};
use crate::error::Error;
use crate::kind::Kind;

impl Pg {
    /// The server's `deadlock_timeout`, read once.
    pub(super) fn deadlock_timeout(&self, c: &Conn) -> Duration {
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
    pub(super) fn closes_cycle(&self, c: &Conn, keys: &[i32], kind: Kind) -> Result<bool, Error> {
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
}
