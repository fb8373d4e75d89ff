//! `locksfile doctor URL` against real servers: the test's throwaway
//! cluster reached directly (healthy), through PgBouncer in transaction
//! mode (a pooler that hands one client's session locks to another: a
//! hazard) and in session mode (fine), and a cluster of the test's own
//! with a small lock table filled by another session.

mod common;

// The core's test clusters, shared by path: test crates share no module.
#[path = "../../locksfile/tests/pg/bouncer.rs"]
mod bouncer;
#[allow(dead_code)]
#[path = "../../locksfile/tests/pg/cluster.rs"]
mod cluster;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use bouncer::Bouncer;
// `cluster.rs` calls the crate root's `server` and `psql`.
use common::{doctor, finding, psql, server};

#[test]
fn a_direct_connection_is_healthy() {
    let Some(srv) = server() else { return };
    let (c, v) = doctor(&format!("{srv}?name=doctor-direct"));
    assert_eq!(c, 0, "{v}");
    assert_eq!(finding(&v, "pooler").0, "ok");
    assert_eq!(finding(&v, "connection-check").0, "ok");
    let (s, said) = finding(&v, "encryption");
    assert_eq!(s, "ok");
    assert!(said.contains("Unix socket"), "{said}");
    assert!(finding(&v, "deadlock-timeout").1.contains("1000 ms"), "{v}");
}

#[test]
fn a_transaction_pooler_is_a_hazard_and_a_session_pooler_is_not() {
    if server().is_none() {
        return;
    }
    let Some(tx) = Bouncer::start("transaction") else {
        return;
    };
    let (c, v) = doctor(&tx.target("doctor-tx"));
    assert_eq!(c, 1, "{v}");
    let (s, said) = finding(&v, "pooler");
    assert_eq!(s, "hazard", "{said}");
    assert!(said.contains("transaction"), "{said}");
    drop(tx);
    let Some(session) = Bouncer::start("session") else {
        return;
    };
    let (c, v) = doctor(&session.target("doctor-session"));
    assert_eq!(finding(&v, "pooler").0, "ok", "{v}");
    // Loopback TCP without TLS is a notice, not a hazard.
    assert_eq!(finding(&v, "encryption").0, "notice", "{v}");
    assert_eq!(c, 0, "{v}");
}

#[test]
fn a_nearly_full_lock_table_is_a_hazard() {
    let Some(own) =
        cluster::Cluster::start(&["max_locks_per_transaction = 10", "max_connections = 10"])
    else {
        return;
    };
    let target = format!("{}?name=doctor-full", own.socket_url());
    let (c, v) = doctor(&target);
    assert_eq!(c, 0, "{v}");
    assert_eq!(
        finding(&v, "lock-table").0,
        "notice",
        "a small table is worth a notice: {v}"
    );
    // Another session holds 90 of the table's 100 entries.
    let mut filler = Command::new("psql")
        .args([&own.socket_url(), "-XAtq"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = filler.stdin.take().unwrap();
    writeln!(
        stdin,
        "SELECT count(pg_advisory_lock(i)) FROM generate_series(1, 90) i;"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(filler.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "90");
    let (c, v) = doctor(&target);
    assert_eq!(c, 1, "{v}");
    let (s, said) = finding(&v, "lock-table");
    assert_eq!(s, "hazard", "{said}");
    assert!(said.contains("max_locks_per_transaction 10"), "{said}");
    drop(stdin);
    filler.wait().unwrap();
}
