//! A server restart loses every lock: the handle says so without an
//! operation, reports nothing held and fails every call. Its own test
//! binary, as the restart would break the other tests' sessions (cargo
//! runs test binaries one at a time).

mod pg;

use std::process::Command;

use locksfile::{Error, Kind, Wait};
use pg::{connect, server, target, until};

#[test]
fn a_server_restart_makes_held_locks_report_lost() {
    let Some(srv) = server() else { return };
    let dir = std::env::var("LOCKSFILE_TEST_PG_DIR")
        .expect("LOCKSFILE_TEST_PG_DIR: the cluster's directory, for scripts/pg restart");
    let t = target(&srv, "restart");
    let a = connect(&t);
    let _w = a.write(1).unwrap();
    a.acquire(Kind::Shared, 5..7, Wait::NonBlocking).unwrap();
    assert_eq!(a.held().len(), 2);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg");
    let st = Command::new("bash")
        .args([script, "restart", &dir])
        .status()
        .unwrap();
    assert!(st.success());
    until("the loss to show without an operation", || a.lost());
    assert!(a.held().is_empty());
    assert!(a.held_explicitly().is_empty());
    assert!(matches!(a.try_read(9), Err(Error::ConnectionLost { .. })));
    assert!(matches!(
        a.acquire(Kind::Exclusive, 1, Wait::Blocking),
        Err(Error::ConnectionLost { .. })
    ));
    // Releasing is never an error; a new handle gets the locks.
    a.release_all().unwrap();
    let b = connect(&t);
    assert!(b.try_write(1).is_ok());
    assert!(b.try_write(5..7).is_ok());
}
