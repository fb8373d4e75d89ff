//! Taking and dropping keys without waiting, and reading back what the
//! session holds after a cancel stopped a statement part way.

use super::{array, bit, clamp, suffix, Conn, Pg, CANCEL_RETRIES, S, X};
use crate::error::Error;
use crate::kind::Kind;
use crate::span::Span;

impl Pg {
    /// Read what the session holds over `keys` back from the server, after
    /// a cancel may have stopped a statement part way.
    pub(super) fn resync(&self, c: &mut Conn, lo: i32, hi: i32) -> Result<(), Error> {
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
    pub(super) fn with_retries<T>(
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
    pub(super) fn try_take(&self, c: &mut Conn, keys: &[i32], kind: Kind) -> Result<bool, Error> {
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
    pub(super) fn drop_kind(&self, c: &mut Conn, keys: &[i32], kind: Kind) -> Result<(), Error> {
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
    pub(super) fn add_shared(&self, c: &mut Conn, keys: &[i32]) -> Result<(), Error> {
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
    pub(super) fn set(&self, c: &mut Conn, span: Span, kind: Option<Kind>) -> Result<bool, Error> {
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
}
