//! Reading the server's lock table: other sessions' locks over a span,
//! and fencing tokens.

use std::io;

use tokio_postgres::SimpleQueryMessage;

use super::session::block_on;
use super::{clamp, Pg, X};
use crate::error::{Error, Holder, ServerHolder, ServerLock};
use crate::kind::Kind;
use crate::span::Span;

impl Pg {
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
