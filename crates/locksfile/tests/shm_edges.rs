//! Edge cases of `Mode::Shm` met from outside the engine.
//!
//! Fair queueing must never make a wait that neither ends nor is reported
//! as a deadlock. Owner A holds 7..10 exclusively. B asks for 9..14
//! exclusively and waits for A. C asks for 12.. shared: no lock is in its
//! way, but it queues behind B's earlier conflicting request. Then A
//! extends its lock to 6.. exclusively. No lock of another owner is in A's
//! way (fcntl would grant it at once), and A's own locks hold up B, so A
//! may go before B; but the new pieces (6..7 and 10..) overlap C's
//! request, which A does not hold up, so A queued behind C. A waited for
//! C, C for B, B for A: a cycle, half of it made of queue order, that the
//! deadlock search did not see (it skips queue edges for an owner holding
//! anything in the hull of its request, while the grant rule looked piece
//! by piece), so all three waited forever. A must be granted, or told
//! `Error::Deadlock`.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{lock_path, open, serial, wait_for_waiters};
use locksfile::{Error, Kind, Mode, Wait};

#[test]
fn shm_extension_behind_a_queued_request_it_holds_up_transitively_ends() {
    let _serial = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, Mode::Shm);
    let b = Arc::new(open(&path, Mode::Shm));
    let c = Arc::new(open(&path, Mode::Shm));
    a.acquire(Kind::Exclusive, 7..10, Wait::NonBlocking)
        .expect("A takes 7..10");

    let bw = {
        let b = Arc::clone(&b);
        thread::spawn(move || b.acquire(Kind::Exclusive, 9..14, Wait::Blocking))
    };
    wait_for_waiters(&path, 1);
    let cw = {
        let c = Arc::clone(&c);
        thread::spawn(move || c.acquire(Kind::Shared, 12.., Wait::Blocking))
    };
    wait_for_waiters(&path, 2);

    let patience = Duration::from_secs(2);
    let t0 = Instant::now();
    let got = a.acquire(Kind::Exclusive, 6.., Wait::Timeout(patience));
    let took = t0.elapsed();
    assert!(
        matches!(got, Ok(()) | Err(Error::Deadlock { .. })),
        "A's extension waited out its {patience:?} ({took:?}) in a cycle no one \
         reported: {got:?}; table: {:?}",
        locksfile::shm::Snapshot::read(&path)
    );

    // Whatever A was told, once it lets go B and then C get their locks.
    a.release_all().expect("A releases");
    bw.join().expect("B's thread").expect("B's lock");
    b.release_all().expect("B releases");
    cw.join().expect("C's thread").expect("C's lock");
}

/// Two names of one file (a hard link) must never make two lock tables
/// that exclude nothing: the sidecar is named after the path
/// (`<path>-shm`), so a lock file with more than one name is refused by
/// every name, with a typed error.
#[test]
fn shm_hard_links_to_one_lock_file_share_its_locks() {
    let _serial = serial();
    let (dir, path) = lock_path();
    std::fs::write(&path, b"").unwrap();
    let link = dir.path().join("other-name.lock");
    std::fs::hard_link(&path, &link).unwrap();
    for name in [&path, &link] {
        let got = locksfile::LockFile::options()
            .mode(Mode::Shm)
            .open(name)
            .map(drop);
        assert!(
            matches!(
                got,
                Err(Error::Sidecar {
                    problem: locksfile::SidecarProblem::HardLinked { links: 2 },
                    ..
                })
            ),
            "{}: {got:?}",
            name.display()
        );
    }
}
