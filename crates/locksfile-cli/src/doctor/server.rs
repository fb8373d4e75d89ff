//! The checks of a lock namespace on a PostgreSQL server, through one
//! session of the engine's own.

use locksfile::ServerFacts;

use super::{Finding, Status};

/// A server's lock table this full (in percent) leaves too little room for
/// a large take of someone's.
const FULL_PERCENT: i64 = 80;

/// The checks, from the facts two sessions open at once read.
pub fn examine(f: &ServerFacts, other: &ServerFacts) -> Vec<Finding> {
    vec![
        pooler(f, other),
        lock_table(f),
        deadlock_timeout(f),
        connection_check(f),
        encryption(f),
    ]
}

/// Two sessions of ours open at once that meet in one server process, or
/// one whose statements wander between server processes, are behind a
/// pooler in transaction or statement mode.
fn pooler(f: &ServerFacts, other: &ServerFacts) -> Finding {
    let pids = |f: &ServerFacts| {
        let mut v = vec![f.backend_pid];
        v.extend(&f.statement_pids);
        v
    };
    let (a, b) = (pids(f), pids(other));
    let shared = a.iter().any(|p| b.contains(p));
    if f.pooled() || other.pooled() || shared {
        let list = |v: &[i32]| v.iter().map(i32::to_string).collect::<Vec<_>>().join(", ");
        return Finding::new(
            "pooler",
            Status::Hazard,
            format!(
                "two sessions opened at once ran their statements in server processes [{}] and \
                 [{}]{}: a pooler in transaction or statement mode stands between, which hands \
                 one client's session locks to another or drops them; connect directly or use \
                 the pooler's session mode",
                list(&a),
                list(&b),
                if shared {
                    ", some the same"
                } else {
                    ", changing"
                }
            ),
        );
    }
    Finding::new(
        "pooler",
        Status::Ok,
        format!(
            "every statement ran in the session's own server process ({})",
            f.backend_pid
        ),
    )
}

/// Whether `e` is the engine's refusal of a server session that is not
/// the client's own (shared with another client, or changing between
/// statements): a pooler in transaction or statement mode.
pub fn is_pooled(e: &locksfile::Error) -> bool {
    matches!(e, locksfile::Error::Connect { source, .. }
        if source.kind() == std::io::ErrorKind::Unsupported)
}

/// The pooler finding when the engine refused a session (`is_pooled`).
pub fn refused(e: &locksfile::Error) -> Finding {
    let why = match e {
        locksfile::Error::Connect { source, .. } => source.to_string(),
        e => e.to_string(),
    };
    Finding::new(
        "pooler",
        Status::Hazard,
        format!("a second session opened at once was refused: {why}"),
    )
}

fn lock_table(f: &ServerFacts) -> Finding {
    let size = f.lock_table_size();
    let used = f.locks_in_use;
    let said = format!(
        "{used} of about {size} lock table entries in use (max_locks_per_transaction {} × \
         (max_connections {} + max_prepared_transactions {}))",
        f.max_locks_per_transaction, f.max_connections, f.max_prepared_transactions
    );
    if size > 0 && used.saturating_mul(100) >= size.saturating_mul(FULL_PERCENT) {
        return Finding::new(
            "lock-table",
            Status::Hazard,
            format!("{said}: nearly full, takes will fail with \"out of shared memory\"; raise max_locks_per_transaction"),
        );
    }
    let span = f.largest_take();
    if size < span * 4 {
        return Finding::new(
            "lock-table",
            Status::Notice,
            format!("{said}: room for few large takes ({span} entries each at most); raise max_locks_per_transaction for many"),
        );
    }
    Finding::new("lock-table", Status::Ok, said)
}

fn deadlock_timeout(f: &ServerFacts) -> Finding {
    let ms = f.deadlock_timeout_ms;
    let said = format!(
        "deadlock_timeout {ms} ms: a wait that closes a cycle is answered DeadlockError after that long"
    );
    if ms > 10_000 {
        return Finding::new(
            "deadlock-timeout",
            Status::Notice,
            format!("{said}, a long time"),
        );
    }
    Finding::new("deadlock-timeout", Status::Ok, said)
}

fn connection_check(f: &ServerFacts) -> Finding {
    let ms = f.client_connection_check_interval_ms;
    if ms == 0 {
        return Finding::new(
            "connection-check",
            Status::Notice,
            "client_connection_check_interval is off: a waiter whose client died can still \
             be granted a lock, which then stays held until the server notices the dead \
             connection (set it to a few hundred ms)",
        );
    }
    Finding::new(
        "connection-check",
        Status::Ok,
        format!("client_connection_check_interval {ms} ms: a dead waiter is noticed within that"),
    )
}

fn encryption(f: &ServerFacts) -> Finding {
    match (f.tcp_peer, f.encrypted) {
        (None, _) => Finding::new(
            "encryption",
            Status::Ok,
            "a Unix socket: never leaves this machine, no TLS needed",
        ),
        (Some(a), Some(true)) => Finding::new(
            "encryption",
            Status::Ok,
            format!(
                "TCP to {a}, encrypted ({})",
                f.tls_version.as_deref().unwrap_or("TLS")
            ),
        ),
        (Some(a), _) if a.ip().is_loopback() => Finding::new(
            "encryption",
            Status::Notice,
            format!(
                "TCP to {a} without TLS: on loopback, but use sslmode=verify-full across machines"
            ),
        ),
        (Some(a), _) => Finding::new(
            "encryption",
            Status::Hazard,
            format!(
                "TCP to {a} without TLS: passwords and locks cross the network in the clear; \
                 use sslmode=verify-full with the server's CA (sslrootcert=)"
            ),
        ),
    }
}
