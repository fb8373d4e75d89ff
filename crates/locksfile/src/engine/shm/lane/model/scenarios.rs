//! The scenarios: each a few operations of two or three owners over the
//! model's world (see `model.rs`), with the historical bug each catches.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};

use loom::sync::{Arc, Mutex};
use loom::thread;

use super::super::super::layout::{fast_word, is_fast, EXCLUSIVE, LANE_WAITING, SHARED};
use super::super::{close_gate, in_way, mark, scan, take, Lanes, Took, Word, KEPT_ENTRIES};
use super::{Step, World, X};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// Owner `o` raises 0..2 through the table and, if granted, holds both
/// indices a moment (the ghost counts check that no one else does).
fn raise_both(w: &World, o: u32) {
    if w.lock().raise(o, 0, 2, EXCLUSIVE) {
        w.enter(0, EXCLUSIVE);
        w.enter(1, EXCLUSIVE);
        w.exit(0, EXCLUSIVE);
        w.exit(1, EXCLUSIVE);
        w.lock().lower(o, 0, 2, 0);
    }
}

/// A word taken while the gate closes (I3): a fast take of index 0
/// against a raise over 0..2 through the table.
#[test]
fn a_word_taken_while_the_gate_closes() {
    model(|| {
        let w = World::new();
        let w2 = w.clone();
        let t = thread::spawn(move || {
            if w2.take_one(0, 0, EXCLUSIVE) {
                w2.enter(0, EXCLUSIVE);
                w2.exit(0, EXCLUSIVE);
                w2.let_go_one(0, 0);
            }
        });
        if w.lock().raise(1, 0, 2, EXCLUSIVE) {
            w.enter(0, EXCLUSIVE);
            w.exit(0, EXCLUSIVE);
            w.lock().lower(1, 0, 2, 0);
        }
        t.join().unwrap();
    });
}

/// A word taken away while the gate was closed is not granted once it
/// opens (I3): owner 1 holds 0..2 (the gate closed); owner 0 writes its
/// word on index 0 and, before it reads the gate, owner 1 raises 0..2
/// again (taking the word away), lets it go (the gate opens) and takes
/// index 0 itself, which it keeps until owner 0 has decided. Owner 0's
/// word goes in first in the run as written, so the bug needs one
/// preemption (after that write), not the two that a table raise first
/// would need to let the word in before its scan.
#[test]
fn a_word_taken_away_is_not_granted_when_the_gate_opens() {
    model(|| {
        let w = World::new();
        w.record_held(1, 0, 2, EXCLUSIVE);
        // Owner 0 keeps this until its take is decided and undone.
        let decided = Arc::new(Mutex::new(()));
        let deciding = decided.lock().unwrap();
        let (w1, decided1) = (w.clone(), decided.clone());
        let t = thread::spawn(move || {
            assert!(w1.lock().raise(1, 0, 2, EXCLUSIVE));
            w1.exit(0, EXCLUSIVE);
            w1.exit(1, EXCLUSIVE);
            w1.lock().lower(1, 0, 2, 0);
            let took = w1.take_one(1, 0, EXCLUSIVE);
            if took {
                w1.enter(0, EXCLUSIVE);
            }
            drop(decided1.lock().unwrap());
            if took {
                w1.exit(0, EXCLUSIVE);
                w1.let_go_one(1, 0);
            }
        });
        if take(&*w, 0, 0, 0, EXCLUSIVE, None) == Took::Granted {
            w.enter(0, EXCLUSIVE);
            w.exit(0, EXCLUSIVE);
            w.let_go_one(0, 0);
        }
        drop(deciding);
        t.join().unwrap();
    });
}

/// A removal from an owner's list takes off one entry of its lane by a
/// swap (I7): owner 0 holds index 0 on the fast lane, and a second thread
/// of owner 0 listed lane 0 too but found the word there, so it strikes
/// its entry off; meanwhile the first thread lets index 0 go and takes
/// index 1, listing lane 1 in the entry freed. Owner 1 then raises 0..2,
/// finding fast holds through the lists: it must see index 1's.
#[test]
fn a_removal_from_a_list_takes_one_entry_of_its_lane() {
    model(|| {
        let w = World::with(true);
        w.fast_held(0, 0, EXCLUSIVE);
        // The second thread's own entry (the first past the kept ones),
        // listed before its CAS failed.
        Word::store(&w.lists[0][KEPT_ENTRIES], 1, Relaxed);
        // The first thread keeps this until owner 1 is done.
        let done = Arc::new(Mutex::new(()));
        let working = done.lock().unwrap();
        let (w1, done1) = (w.clone(), done.clone());
        let first = thread::spawn(move || {
            w1.exit(0, EXCLUSIVE);
            w1.let_go_one(0, 0);
            let took = take(&*w1, 0, 1, 1, EXCLUSIVE, None) == Took::Granted;
            if took {
                w1.enter(1, EXCLUSIVE);
            }
            drop(done1.lock().unwrap());
            if took {
                w1.exit(1, EXCLUSIVE);
                w1.let_go_one(0, 1);
            }
        });
        let w2 = w.clone();
        // What `take` does after its lane CAS failed.
        let second = thread::spawn(move || w2.unlist(0, 0));
        second.join().unwrap();
        raise_both(&w, 1);
        drop(working);
        first.join().unwrap();
    });
}

/// A mutex holder that stops mid-adoption leaves exclusion intact (I4):
/// owner 2 raises 0..2 and stops (dies) with owner 0's fast word on index
/// 0 `MOVING`, before or after its record went in; the next mutex holder
/// repairs. Owner 1 takes index 0 meanwhile; owner 0 keeps its hold
/// throughout, and the table or the lane must show it at the end.
#[test]
fn an_owner_stopping_mid_adoption() {
    for step in [Step::Moving, Step::Record] {
        model(move || {
            let w = World::new();
            w.fast_held(0, 0, EXCLUSIVE);
            let w2 = w.clone();
            let adopter = thread::spawn(move || {
                let mut g = w2.lock();
                close_gate(&*w2);
                let x = scan(&*w2, 0);
                if is_fast(x) {
                    g.adopt_until(0, x, step);
                }
                g.stop();
            });
            let w1 = w.clone();
            let taker = thread::spawn(move || {
                if w1.take_one(1, 0, EXCLUSIVE) {
                    w1.enter(0, EXCLUSIVE);
                    w1.exit(0, EXCLUSIVE);
                    w1.let_go_one(1, 0);
                }
            });
            adopter.join().unwrap();
            taker.join().unwrap();
            {
                let g = w.lock();
                let x = Word::load(&w.lanes[0], Acquire);
                let fast = x & !LANE_WAITING == fast_word(0, 0, EXCLUSIVE);
                let record = g.recs.iter().any(|r| r.owner == 0 && r.start == 0);
                assert!(fast || record, "owner 0's hold is lost: lane {x:#x}");
            }
            w.exit(0, EXCLUSIVE);
            w.let_go_one(0, 0);
        });
    }
}

/// A record trimmed to one index goes into its bucket before its lane is
/// taken (I1): owner 1 lets go of index 1 of its 0..2 while owner 0's
/// word on index 0 waits for its gate read.
#[test]
fn a_record_trimmed_to_one_index() {
    model(|| {
        let w = World::new();
        w.record_held(1, 0, 2, EXCLUSIVE);
        let w2 = w.clone();
        let t = thread::spawn(move || {
            if w2.take_one(0, 0, EXCLUSIVE) {
                w2.enter(0, EXCLUSIVE);
                w2.exit(0, EXCLUSIVE);
                w2.let_go_one(0, 0);
            }
        });
        w.exit(1, EXCLUSIVE);
        w.lock().lower(1, 1, 2, 0);
        w.exit(0, EXCLUSIVE);
        w.lock().lower(1, 0, 1, 0);
        t.join().unwrap();
    });
}

/// An owner's own word turns slow, not empty, when it downgrades over a
/// span (I6): owner 0 holds index 0 on the fast lane and makes 0..2
/// shared while owner 1 takes index 0.
#[test]
fn own_words_turn_slow_before_their_records() {
    model(|| {
        let w = World::new();
        w.fast_held(0, 0, EXCLUSIVE);
        let w2 = w.clone();
        let t = thread::spawn(move || {
            if w2.take_one(1, 0, EXCLUSIVE) {
                w2.enter(0, EXCLUSIVE);
                w2.exit(0, EXCLUSIVE);
                w2.let_go_one(1, 0);
            }
        });
        {
            let mut g = w.lock();
            g.set(0, 0, 2, SHARED);
            // The downgrade is done when the guard goes.
            w.ghost[0].fetch_sub(X - 1, AcqRel);
        }
        w.exit(0, SHARED);
        w.lock().lower(0, 0, 2, 0);
        t.join().unwrap();
    });
}

/// A word a waiter marks is still taken over (I5): owner 0 holds index 0
/// on the fast lane, owner 1 waits for it, owner 2 raises 0..2.
#[test]
fn a_word_a_waiter_marks() {
    model(|| {
        let w = World::new();
        w.fast_held(0, 0, EXCLUSIVE);
        let w1 = w.clone();
        let waiter = thread::spawn(move || {
            let l = 0;
            let x = Word::load(&w1.lanes[l], Acquire);
            if in_way(x, 1, 0, EXCLUSIVE) {
                let _ = mark(&*w1, l, x);
            }
        });
        let w2 = w.clone();
        let wide = thread::spawn(move || {
            if w2.lock().raise(2, 0, 2, EXCLUSIVE) {
                w2.enter(0, EXCLUSIVE);
                w2.exit(0, EXCLUSIVE);
                w2.lock().lower(2, 0, 2, 0);
            }
        });
        waiter.join().unwrap();
        wide.join().unwrap();
    });
}

/// A waiter is woken by the release (I5): owner 1 waits on owner 0's
/// fast hold of index 0, which owner 0 lets go.
#[test]
fn a_waiter_woken_by_a_release() {
    model(|| {
        let w = World::new();
        w.fast_held(0, 0, EXCLUSIVE);
        let w2 = w.clone();
        let t = thread::spawn(move || {
            if w2.wait_one(1, 0, EXCLUSIVE) {
                w2.enter(0, EXCLUSIVE);
                w2.exit(0, EXCLUSIVE);
                w2.let_go_one(1, 0);
            }
        });
        w.exit(0, EXCLUSIVE);
        w.let_go_one(0, 0);
        t.join().unwrap();
    });
}

/// The kept entry moves with the owner's fast holds (I7): owner 0 takes
/// and lets go of index 0 as its fast path does, keeping lane 0 listed,
/// then takes index 1 the same way, while owner 1 raises 0..2 finding
/// fast holds through the lists: it must see index 1's, so the entry that
/// still names lane 0 must be moved to lane 1 before that word goes in.
#[test]
fn the_kept_entry_moves_with_the_fast_hold() {
    model(|| {
        let w = World::with(true);
        let w0 = w.clone();
        let t = thread::spawn(move || {
            for i in [0, 1] {
                if w0.take_one_keeping(0, i, EXCLUSIVE, Some(0)) {
                    w0.enter(i, EXCLUSIVE);
                    w0.exit(i, EXCLUSIVE);
                    w0.let_go_one_keeping(0, i, true);
                }
            }
        });
        raise_both(&w, 1);
        t.join().unwrap();
    });
}

/// A walk hand over hand through two kept entries (the fast path's two
/// slots): owner 0 holds index 0 on the fast lane, listed by entry 0, and
/// entry 1 still names lane 0 from an earlier hold; it takes index 1
/// through entry 1 (which moves, as entry 0 still lists lane 0), then lets
/// go of both, while owner 1 raises 0..2 finding fast holds through the
/// lists.
#[test]
fn a_walk_hand_over_hand_through_two_kept_entries() {
    model(|| {
        let w = World::with(true);
        w.fast_held(0, 0, EXCLUSIVE);
        Word::store(&w.lists[0][1], 1, Relaxed);
        let w0 = w.clone();
        let t = thread::spawn(move || {
            let took = w0.take_one_keeping(0, 1, EXCLUSIVE, Some(1));
            if took {
                w0.enter(1, EXCLUSIVE);
            }
            w0.exit(0, EXCLUSIVE);
            w0.let_go_one_keeping(0, 0, true);
            if took {
                w0.exit(1, EXCLUSIVE);
                w0.let_go_one_keeping(0, 1, true);
            }
        });
        raise_both(&w, 1);
        t.join().unwrap();
    });
}

/// Each historical exclusion bug, put back alone, and the scenario that
/// must then fail; the last two are no historical bugs but the ones a
/// repair of a half-made adoption could make (undoing it to an empty
/// lane, which forgets a hold) and a kept entry trusted for any lane, so
/// that their scenarios are seen to catch something.
const MUTATIONS: [(&str, &str); 9] = [
    (
        "grant-on-open-gate",
        "a_word_taken_away_is_not_granted_when_the_gate_opens",
    ),
    (
        "list-remove-by-store",
        "a_removal_from_a_list_takes_one_entry_of_its_lane",
    ),
    ("weak-gate", "a_word_taken_while_the_gate_closes"),
    ("lane-before-bucket", "a_record_trimmed_to_one_index"),
    ("drop-to-empty", "own_words_turn_slow_before_their_records"),
    ("no-mark-retry", "a_word_a_waiter_marks"),
    ("release-no-wake", "a_waiter_woken_by_a_release"),
    ("undo-moving-to-empty", "an_owner_stopping_mid_adoption"),
    (
        "kept-entry-trusted",
        "the_kept_entry_moves_with_the_fast_hold",
    ),
];

/// Runs this test binary once per historical bug, with the bug put back,
/// on the scenario written for it: each run must fail.
#[test]
fn each_historical_bug_is_caught() {
    if std::env::var_os("LOCKSFILE_MUTATION").is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for (bug, scenario) in MUTATIONS {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                &format!("engine::shm::lane::model::scenarios::{scenario}"),
            ])
            .env("LOCKSFILE_MUTATION", bug)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        // A deadlock ends the process itself, with no summary.
        assert!(
            !out.status.success(),
            "{bug}: {scenario} did not fail:\n{said}"
        );
        assert!(
            !said.contains("0 failed"),
            "{bug}: {scenario} did not run:\n{said}"
        );
        eprintln!("{bug}: caught by {scenario}");
    }
}
