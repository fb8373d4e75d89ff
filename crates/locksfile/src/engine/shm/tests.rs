//! Tests of the engine's inner workings: repair, queue order, the fast
//! lane against the table.
#![allow(unsafe_code)]

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::engine::{Engine, Until};
use crate::kind::Kind;
use crate::span::Span;
use crate::sys;

use super::deadlock::topo_sort;
use super::lane::{KEPT, KEPT_ENTRIES, LANE_NAP};
use super::layout::{
    bucket, fast_word, lane_owner, EXCLUSIVE, LANE_EMPTY, LANE_MOVING, LANE_SLOW, LANE_WAITING,
    SHARED,
};
use super::sidecar::network_fs;
use super::waits::Place;
use super::Shm;

#[test]
fn network_file_systems_are_named() {
    assert_eq!(network_fs(0x6969), Some("NFS"));
    assert_eq!(network_fs(0xFF53_4D42_u32 as i32 as i64), Some("CIFS"));
    assert_eq!(network_fs(0xFE53_4D42), Some("SMB2"));
    assert_eq!(network_fs(0x0102_1997), Some("9p"));
    assert_eq!(network_fs(0x00C3_6400), Some("Ceph"));
    assert_eq!(network_fs(0x6573_5546), Some("FUSE"));
    // tmpfs, ext4, btrfs, xfs, overlayfs: local.
    for local in [0x0102_1994, 0xEF53, 0x9123_683E, 0x5846_5342, 0x794C_7630] {
        assert_eq!(network_fs(local), None, "{local:#x}");
    }
}

/// A process that dies holding the table's mutex: the next owner to
/// take it repairs the table, and keeps its own locks (its liveness
/// lock is invisible through its own descriptor) while the dead
/// process's owner loses its.
#[test]
fn repair_after_a_death_in_the_mutex_keeps_the_living() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lock");
    let open = || {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        Shm::open(&path, fd.into(), true).unwrap()
    };
    let a = open();
    assert!(a
        .try_set(Span::new(0, 4).unwrap(), Some(Kind::Exclusive))
        .unwrap());
    // SAFETY: the child only makes plain calls and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let b = open();
        let ok = b
            .try_set(Span::new(10, 12).unwrap(), Some(Kind::Shared))
            .unwrap();
        let g = b.lock().unwrap();
        std::mem::forget(g);
        // SAFETY: ends the child holding the mutex, as a kill would.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    let mut status = 0;
    // SAFETY: our child; valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(status, 0);
    // The mutex comes back EOWNERDEAD: repaired under `a`.
    assert!(a
        .probe(Span::new(10, 12).unwrap(), Kind::Exclusive)
        .unwrap()
        .is_none());
    let g = a.lock().unwrap();
    g.verify(a.fd()).unwrap();
    assert_eq!(g.slot(a.slot as usize).records, 1);
    assert_eq!(
        (0..g.slot_hwm()).filter(|&s| g.slot(s).used == 1).count(),
        1
    );
    drop(g);
    let c = open();
    assert!(!c
        .try_set(Span::new(2, 3).unwrap(), Some(Kind::Shared))
        .unwrap());
    assert!(c
        .try_set(Span::new(10, 12).unwrap(), Some(Kind::Exclusive))
        .unwrap());
}

/// Each entry that must pass another lands just ahead of it; no one
/// else moves; contradicting moves are refused.
#[test]
fn topo_sort_moves_only_what_it_must() {
    let queue: Vec<(Place, u32)> = [7, 8, 9, 10, 11]
        .iter()
        .map(|&e| ((e as u64, e as u64), e))
        .collect();
    assert_eq!(topo_sort(&queue, &[]), Some(vec![7, 8, 9, 10, 11]));
    assert_eq!(topo_sort(&queue, &[(10, 8)]), Some(vec![7, 10, 8, 9, 11]));
    assert_eq!(
        topo_sort(&queue, &[(10, 8), (11, 7)]),
        Some(vec![11, 7, 10, 8, 9])
    );
    // 11 must pass 9, and 10 must pass 11: 10 goes first of the three.
    assert_eq!(
        topo_sort(&queue, &[(11, 9), (10, 11)]),
        Some(vec![7, 8, 10, 11, 9])
    );
    assert_eq!(topo_sort(&queue, &[(10, 8), (8, 10)]), None);
    assert_eq!(topo_sort(&queue, &[(10, 3)]), None);
}

/// A reordering cut short by a death may leave two waiters at one
/// place: repair gives them distinct places, in their order.
#[test]
fn repair_separates_waiters_left_at_one_place() {
    let (_dir, [a, b]) = handles::<2>();
    let mut g = a.lock().unwrap();
    let (i, ti) = g.push_waiter(a.slot, 0, &[one(1)], SHARED, None).unwrap();
    let (j, tj) = g.push_waiter(b.slot, 0, &[one(2)], SHARED, None).unwrap();
    let place = g.waiter(i as usize).order;
    g.waiter(j as usize).order = place;
    assert!(g.verify(a.fd()).is_err());
    g.repair(a.fd(), a.map.proc);
    g.verify(a.fd()).unwrap();
    let (wi, wj) = (*g.waiter(i as usize), *g.waiter(j as usize));
    assert_eq!((wi.owner, wj.owner), (a.slot + 1, b.slot + 1));
    assert!(wi.place() < wj.place() && wi.order != wj.order);
    g.remove_waiter(a.slot, i, ti, false);
    g.remove_waiter(b.slot, j, tj, false);
    g.verify(a.fd()).unwrap();
}

fn open_shm(path: &Path) -> Shm {
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    Shm::open(path, fd.into(), true).unwrap()
}

/// `N` owners of a fresh table (the directory goes with the first).
fn handles<const N: usize>() -> (tempfile::TempDir, [Shm; N]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.lock");
    (dir, std::array::from_fn(|_| open_shm(&path)))
}

fn one(i: u64) -> Span {
    Span::new(i, i + 1).unwrap()
}

fn lane_of(shm: &Shm, i: u64) -> u64 {
    shm.map.lane(bucket(i)).load(Ordering::SeqCst)
}

#[test]
fn the_fast_lane_gives_way_to_the_table_and_comes_back() {
    let (_dir, [a, b]) = handles();
    assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    assert_eq!(
        lane_of(&a, 5),
        fast_word(a.slot, 5, EXCLUSIVE),
        "taken on the fast lane"
    );
    // A wide request sees the fast hold: refused, and told whose it is.
    assert!(!b
        .try_set(Span::new(0, 10).unwrap(), Some(Kind::Shared))
        .unwrap());
    assert!(!b.try_set(Span::ALL, Some(Kind::Exclusive)).unwrap());
    let h = b.probe(one(5), Kind::Shared).unwrap().expect("held");
    assert_eq!((h.span, h.kind), (one(5), Kind::Exclusive));
    // The probe made the hold a record: the lane is the table's now.
    assert_eq!(lane_of(&a, 5), LANE_SLOW);
    a.lock().unwrap().verify(a.fd()).unwrap();
    // Its release goes through the mutex, and gives the lane back.
    assert!(!a.fast_lower(one(5), false));
    assert!(a.try_set(one(5), None).unwrap());
    assert_eq!(lane_of(&a, 5), LANE_EMPTY);
    assert!(
        b.map.gate().load(Ordering::SeqCst) == 0,
        "nothing wide is left"
    );
    assert!(b
        .try_set(Span::new(0, 10).unwrap(), Some(Kind::Shared))
        .unwrap());
    // Shared over 0..10 closes the gate: no fast hold meanwhile, and the
    // slow way refuses what it covers.
    assert!(
        !a.fast_raise(one(20), Kind::Exclusive, None),
        "the gate is closed"
    );
    assert!(!a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    assert!(a.try_set(one(20), Some(Kind::Exclusive)).unwrap());
    assert!(b.try_set(Span::new(0, 10).unwrap(), None).unwrap());
    assert!(a.try_set(one(20), None).unwrap());
    a.lock().unwrap().verify(a.fd()).unwrap();
    assert_eq!(b.map.gate().load(Ordering::SeqCst), 0, "open again");
    assert!(a.fast_raise(one(20), Kind::Shared, None));
}

#[test]
fn a_shared_fast_hold_admits_readers_and_converts() {
    let (_dir, [a, b, c]) = handles();
    assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert_eq!(lane_of(&a, 5), fast_word(a.slot, 5, SHARED));
    // A second reader goes through the table, which takes a's over.
    assert!(b.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert_eq!(lane_of(&a, 5), LANE_SLOW);
    assert!(!c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    assert!(b.try_set(one(5), None).unwrap());
    assert!(a.try_set(one(5), None).unwrap());
    assert_eq!(lane_of(&a, 5), LANE_EMPTY);
    // Upgrade and downgrade of a fast hold, seen by others.
    assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    assert!(!c.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert!(c.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert!(!b.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    a.lock().unwrap().verify(a.fd()).unwrap();
    assert!(c.try_set(one(5), None).unwrap());
    assert!(a.try_set(one(5), None).unwrap());
    assert!(b.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    a.lock().unwrap().verify(a.fd()).unwrap();
}

#[test]
fn a_waiter_sleeping_on_a_fast_hold_is_woken_by_its_release() {
    let (_dir, [a, b]) = handles();
    // Unwoken, b would take 5 only when its nap ends (LANE_NAP after it
    // began): woken, at once. A busy machine may delay a wake-up now and
    // then, or let b's nap run out before the release (the table's wait
    // then takes the word over), so one quick round of those in which b
    // slept on the lane is asked for, of five such rounds at most.
    let mut quickest = Duration::MAX;
    let mut on_lane = 0;
    for _ in 0..50 {
        assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        let a_word = lane_of(&a, 5);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                b.wait_set(one(5), Kind::Exclusive, Until::FOREVER)
                    .map(|()| Instant::now())
            });
            // Until b sleeps on the lane (it marks the word first), or the
            // table has taken the word over; a's release comes either way,
            // so that the waiter always ends.
            let until = Instant::now() + Duration::from_secs(10);
            let marked = loop {
                let w = lane_of(&a, 5);
                if w == a_word | LANE_WAITING {
                    break true;
                }
                if w != a_word || Instant::now() > until {
                    break false;
                }
                std::thread::yield_now();
            };
            let released = Instant::now();
            assert!(a.try_set(one(5), None).unwrap());
            let granted = waiter.join().unwrap().unwrap();
            if marked {
                on_lane += 1;
                quickest = quickest.min(granted - released);
                // Taken on the fast lane.
                assert_eq!(lane_of(&a, 5), fast_word(b.slot, 5, EXCLUSIVE));
            }
        });
        assert!(b.try_set(one(5), None).unwrap());
        if on_lane == 5 {
            break;
        }
    }
    assert!(on_lane > 0, "b never slept on the lane");
    assert!(quickest < LANE_NAP / 2, "never woken: {quickest:?}");
}

#[test]
fn a_word_a_waiter_marks_meanwhile_is_still_taken_over() {
    let (_dir, [a, b]) = handles();
    assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    let l = bucket(5);
    let w = lane_of(&a, 5);
    // A waiter marks the word after the table read it.
    a.map.lane(l).store(w | LANE_WAITING, Ordering::SeqCst);
    let mut g = b.lock().unwrap();
    assert!(g.adopt(l, w));
    assert_eq!(
        g.map.lane(l).load(Ordering::SeqCst),
        LANE_SLOW,
        "taken over"
    );
    drop(g);
    assert!(!b
        .try_set(Span::new(0, 1000).unwrap(), Some(Kind::Exclusive))
        .unwrap());
    b.lock().unwrap().verify(b.fd()).unwrap();
    assert!(a.try_set(one(5), None).unwrap());
    assert!(b
        .try_set(Span::new(0, 1000).unwrap(), Some(Kind::Exclusive))
        .unwrap());
}

#[test]
fn a_reader_is_not_kept_waiting_by_a_fast_reader() {
    let (_dir, [a, b, c]) = handles();
    assert!(a.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert!(b.try_set_before_wait(one(5), Kind::Shared).unwrap());
    assert!(!c.try_set_before_wait(one(5), Kind::Exclusive).unwrap());
}

#[test]
fn a_fast_hold_taken_after_the_gate_closed_is_taken_away() {
    let (_dir, [a, b, c]) = handles();
    assert!(b
        .try_set(Span::new(0, 10).unwrap(), Some(Kind::Exclusive))
        .unwrap());
    // As if `a` wrote its word after the gate closed and has not yet
    // read the gate: the table must not count that hold granted.
    half_taken(&a, 5);
    // `c` comes to that lane: it takes the word away, as b holds 5.
    assert!(!c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    // Taken away (off a's list too), and the empty lane given back.
    assert_eq!(lane_of(&a, 5), LANE_EMPTY);
    assert_eq!(a.map.fast_list(a.slot)[0].load(Ordering::SeqCst), 0);
    let h = c.probe(one(5), Kind::Shared).unwrap().expect("held by b");
    assert_eq!(h.span, Span::new(0, 10).unwrap());
    c.lock().unwrap().verify(c.fd()).unwrap();
    // a holds nothing at 5: once b lets go, c gets it.
    assert!(b.try_set(Span::ALL, None).unwrap());
    assert!(c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    assert!(c.try_set(one(5), None).unwrap());
    // With nothing in the way the same word is granted as a record.
    assert!(c
        .try_set(Span::new(30, 40).unwrap(), Some(Kind::Shared))
        .unwrap());
    half_taken(&a, 7);
    assert!(!c.try_set(one(7), Some(Kind::Shared)).unwrap());
    let h = c.probe(one(7), Kind::Shared).unwrap().expect("held by a");
    assert_eq!((h.span, h.pid), (one(7), Some(std::process::id())));
    c.lock().unwrap().verify(c.fd()).unwrap();
    assert!(a.try_set(one(7), None).unwrap());
    assert!(c.try_set(one(7), Some(Kind::Shared)).unwrap());
}

/// As if `shm` had written its fast word for `i` and not yet read the
/// gate: its list entry and the word, as `fast_raise` leaves them.
fn half_taken(shm: &Shm, i: u64) -> (usize, u64) {
    let l = bucket(i);
    let w = fast_word(shm.slot, i, EXCLUSIVE);
    shm.map.fast_list(shm.slot)[0].store(l as u32 + 1, Ordering::SeqCst);
    shm.map.lane(l).store(w, Ordering::SeqCst);
    (l, w)
}

#[test]
fn a_word_taken_away_while_the_gate_was_closed_is_not_granted_once_it_opens() {
    let (_dir, [a, b, c]) = handles();
    assert!(b
        .try_set(Span::new(0, 10).unwrap(), Some(Kind::Exclusive))
        .unwrap());
    let (l, w) = half_taken(&a, 5);
    // c takes the word away (b holds 5), then b lets go: the gate opens.
    assert!(!c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    assert!(b.try_set(Span::new(0, 10).unwrap(), None).unwrap());
    assert_eq!(a.map.gate().load(Ordering::SeqCst), 0);
    // a now reads the gate open: not granted, as its word is gone.
    assert!(!a.confirm_fast(l, w));
    assert!(c.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    assert!(!a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
    a.lock().unwrap().verify(a.fd()).unwrap();
}

#[test]
fn a_record_trimmed_to_one_index_keeps_a_late_fast_word_out() {
    let (_dir, [a, m, c]) = handles();
    assert!(m
        .try_set(Span::new(3, 10).unwrap(), Some(Kind::Exclusive))
        .unwrap());
    let (l, w) = half_taken(&a, 3);
    // m's record shrinks to 3..4, whose lane holds a's late word: the
    // table must see m's record in its way and take the word away.
    assert!(m.try_set(Span::new(4, 10).unwrap(), None).unwrap());
    assert_ne!(a.map.lane(l).load(Ordering::SeqCst), w);
    assert!(!a.confirm_fast(l, w));
    m.lock().unwrap().verify(m.fd()).unwrap();
    let h = c.probe(one(3), Kind::Shared).unwrap().expect("m holds 3");
    assert_eq!(h.span, one(3));
    // a holds nothing: once m lets go, c gets 3.
    assert!(m.try_set(one(3), None).unwrap());
    assert!(c.try_set(one(3), Some(Kind::Exclusive)).unwrap());
    c.lock().unwrap().verify(c.fd()).unwrap();
}

#[test]
fn a_death_while_adopting_a_fast_hold_keeps_it() {
    for made in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.lock");
        let a = open_shm(&path);
        assert!(a.try_set(one(5), Some(Kind::Exclusive)).unwrap());
        // SAFETY: the child only makes plain calls and `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let b = open_shm(&path);
            let mut g = b.lock().unwrap();
            let l = bucket(5);
            let w = g.map.lane(l).load(Ordering::SeqCst);
            g.map.lane(l).store(w | LANE_MOVING, Ordering::SeqCst);
            if made {
                let n = g.new_record(5, 6, EXCLUSIVE, lane_owner(w));
                g.link(n);
            }
            std::mem::forget(g);
            // SAFETY: ends the child holding the mutex, as a kill would.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our child; valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(status, 0);
        let c = open_shm(&path);
        assert!(
            !c.try_set(one(5), Some(Kind::Shared)).unwrap(),
            "made: {made}"
        );
        c.lock().unwrap().verify(c.fd()).unwrap();
        assert!(a.try_set(one(5), None).unwrap());
        assert!(
            c.try_set(one(5), Some(Kind::Shared)).unwrap(),
            "made: {made}"
        );
        c.lock().unwrap().verify(c.fd()).unwrap();
    }
}

#[test]
fn this_file_system_is_local() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("x")).unwrap();
    let t = sys::fs_type(f.as_fd()).unwrap();
    assert_eq!(network_fs(t), None, "{t:#x}");
}

/// The lanes an owner's fast list names, entry by entry (0: none).
fn list_of(shm: &Shm) -> Vec<u32> {
    shm.map
        .fast_list(shm.slot)
        .iter()
        .map(|e| e.load(Ordering::SeqCst))
        .collect()
}

#[test]
fn the_kept_entry_follows_the_fast_path_and_is_seen_by_wide_requests() {
    let (_dir, [a, b]) = handles();
    let wide = Span::new(0, 1000).unwrap();
    // A pair kept: the entry stays, naming lane 5's bucket; no other entry.
    assert!(a.fast_raise(one(5), Kind::Shared, Some(KEPT)));
    assert!(a.fast_lower(one(5), true));
    let kept = bucket(5) as u32 + 1;
    assert_eq!(list_of(&a)[KEPT], kept);
    assert_eq!(list_of(&a).iter().filter(|&&v| v != 0).count(), 1);
    // Again on 5: nothing new is listed.
    assert!(a.fast_raise(one(5), Kind::Exclusive, Some(KEPT)));
    assert_eq!(list_of(&a).iter().filter(|&&v| v != 0).count(), 1);
    assert!(a.fast_lower(one(5), true));
    // On 7: the kept entry moves there, and a wide request (scanning the
    // lists, as it spans more than a fine scan) sees the hold.
    assert!(a.fast_raise(one(7), Kind::Exclusive, Some(KEPT)));
    assert_eq!(list_of(&a)[KEPT], bucket(7) as u32 + 1);
    assert_eq!(list_of(&a).iter().filter(|&&v| v != 0).count(), 1);
    assert!(!b.try_set(wide, Some(Kind::Shared)).unwrap());
    // The wide request took the word over as a record: struck off, and
    // the release goes through the table.
    assert_eq!(list_of(&a)[KEPT], 0);
    assert!(!a.fast_lower(one(7), true));
    assert!(a.try_set(one(7), None).unwrap());
    assert!(b.try_set(wide, Some(Kind::Shared)).unwrap());
    assert!(b.try_set(wide, None).unwrap());
    // A word still in the lane the kept entry names keeps its entry: a
    // take that would keep another is refused (its release would leave an
    // entry behind); the usual way lists the lane beside it, and both are
    // seen.
    assert!(a.fast_raise(one(5), Kind::Exclusive, Some(KEPT)));
    assert!(!a.fast_raise(one(9), Kind::Exclusive, Some(KEPT)));
    assert!(a.fast_raise(one(9), Kind::Exclusive, None));
    assert_eq!(list_of(&a)[KEPT], kept);
    assert!(list_of(&a).contains(&(bucket(9) as u32 + 1)));
    let h = b.probe(wide, Kind::Shared).unwrap().expect("held");
    assert!(h.span == one(5) || h.span == one(9), "{:?}", h.span);
    assert!(!b.try_set(one(5), Some(Kind::Shared)).unwrap());
    assert!(!b.try_set(one(9), Some(Kind::Shared)).unwrap());
    a.lock().unwrap().verify(a.fd()).unwrap();
    // The usual way's own entries are struck off when their words go,
    // before the kept one.
    assert!(a.try_set(Span::ALL, None).unwrap());
    assert!(a.fast_raise(one(11), Kind::Shared, None));
    assert!(a.fast_lower(one(11), false));
    assert_eq!(
        list_of(&a)[KEPT + KEPT_ENTRIES..]
            .iter()
            .filter(|&&v| v != 0)
            .count(),
        0
    );
    a.lock().unwrap().verify(a.fd()).unwrap();
}
