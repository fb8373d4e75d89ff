//! A change that another owner refuses part-way must leave the kernel
//! exactly as it was: every piece goes back to its own kind, nothing is
//! dropped and nothing is left behind. Checked against the kernel's own
//! list of the owner's locks (`/proc/self/fdinfo`) and from another process.

mod common;

use common::*;
use locksfile::{Error, Kind, LockFile, Mode, ReadGuard, Span, Wait, WriteGuard};
use std::time::Duration;

/// How the first owner takes its locks before the refused change.
#[derive(Clone, Copy, Debug)]
enum Style {
    Guards,
    Explicit,
}

/// A guard of either kind, kept only to be dropped.
#[allow(dead_code)]
enum Held<'a> {
    Read(ReadGuard<&'a LockFile>),
    Write(WriteGuard<&'a LockFile>),
}

/// The first owner's kind at `i` as seen by another process: what a write
/// and a read there run into.
fn seen_from_outside(path: &std::path::Path, i: u64) -> Option<Kind> {
    match probe(path, Kind::Exclusive, i) {
        None => None,
        Some(_) if probe(path, Kind::Shared, i).is_some() => Some(Kind::Exclusive),
        Some(_) => Some(Kind::Shared),
    }
}

/// a: shared 3, exclusive 5 (and shared 0 with `with_zero`); b: shared 7.
/// a asks for exclusive 0..10 in one call and is refused: a's holds, in
/// the bookkeeping and in the kernel, are what they were.
fn refused_change_changes_nothing(mode: Mode, style: Style, wait: Wait, with_zero: bool) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let a = open(&path, mode);
    let mut guards = Vec::new();
    let mut take = |kind: Kind, i: u64| match style {
        Style::Guards => guards.push(match kind {
            Kind::Shared => Held::Read(a.try_read(i).unwrap()),
            Kind::Exclusive => Held::Write(a.try_write(i).unwrap()),
        }),
        Style::Explicit => a.acquire(kind, i, Wait::NonBlocking).unwrap(),
    };
    if with_zero {
        take(Kind::Shared, 0);
    }
    take(Kind::Shared, 3);
    take(Kind::Exclusive, 5);
    let b = hold_elsewhere(&path, mode, Kind::Shared, 7);

    let before = a.held();
    assert_eq!(kernel_held(&a), before, "{mode} {style:?}: before");
    let r = a.acquire(Kind::Exclusive, 0..10, wait);
    match (wait, r) {
        (
            Wait::NonBlocking,
            Err(Error::WouldBlock {
                holder: Some(h), ..
            }),
        ) => {
            assert_eq!(h.kind, Kind::Shared);
            assert!(h.span.contains(7), "{h:?}");
        }
        (Wait::Timeout(_), Err(Error::TimedOut { .. })) => {}
        (_, other) => panic!("{mode} {style:?} {wait:?}: expected a refusal, got {other:?}"),
    }
    assert_eq!(
        a.held(),
        before,
        "{mode} {style:?} {wait:?}: held() changed"
    );
    assert_eq!(
        kernel_held(&a),
        before,
        "{mode} {style:?} {wait:?}: the kernel holds something else than held() says"
    );
    for i in 0..10 {
        let ours = before.iter().find(|(s, _)| s.contains(i)).map(|(_, k)| *k);
        let want = if i == 7 { Some(Kind::Shared) } else { ours };
        assert_eq!(
            seen_from_outside(&path, i),
            want,
            "{mode} {style:?} {wait:?}: another process sees the wrong kind at {i}"
        );
    }

    // Released, nothing of a's is left in the kernel: another owner gets
    // the whole span as soon as b goes too.
    drop(guards);
    a.release_all().unwrap();
    assert_eq!(a.held(), vec![]);
    assert_eq!(kernel_held(&a), vec![], "{mode} {style:?} {wait:?}: leaked");
    b.release();
    assert_eq!(probe(&path, Kind::Exclusive, ..), None);
}

fn every_case(mode: Mode) {
    for style in [Style::Guards, Style::Explicit] {
        for wait in [Wait::NonBlocking, Wait::Timeout(Duration::from_millis(30))] {
            for with_zero in [false, true] {
                refused_change_changes_nothing(mode, style, wait, with_zero);
            }
        }
    }
}

mode_tests! { refused_change_changes_nothing => every_case }

/// The reproduction as written, OFD mode: a third owner must not
/// get a write lock on 3 after a's refused change.
#[test]
fn third_owner_still_excluded_after_refusal_ofd() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (a, b, c) = (
        open(&path, Mode::Ofd),
        open(&path, Mode::Ofd),
        open(&path, Mode::Ofd),
    );
    let _gs = a.read(3).unwrap();
    let _gx = a.write(5).unwrap();
    b.acquire(Kind::Shared, 7, Wait::Blocking).unwrap();
    assert!(matches!(
        a.acquire(Kind::Exclusive, 0..10, Wait::NonBlocking),
        Err(Error::WouldBlock { .. })
    ));
    assert!(matches!(c.try_write(3), Err(Error::WouldBlock { .. })));
    assert!(matches!(c.try_write(5), Err(Error::WouldBlock { .. })));
    assert!(c.try_read(3).is_ok());
    for i in [0, 1, 2, 4, 6, 8, 9] {
        assert!(c.try_write(i).is_ok(), "index {i} should be free");
    }
}

/// The leak variant: a refused change over mixed pieces must not leave an
/// unknown lock in the kernel that blocks other owners after a released
/// everything (a blocking waiter behind it would wait forever).
#[test]
fn refused_change_leaves_nothing_behind_for_a_blocking_waiter() {
    let _s = serial();
    for mode in MODES {
        let (_dir, path) = lock_path();
        let a = open(&path, mode);
        let g0 = a.read(0).unwrap();
        let g3 = a.read(3).unwrap();
        let g5 = a.write(5).unwrap();
        let b = hold_elsewhere(&path, mode, Kind::Shared, 7);
        assert!(a
            .acquire(Kind::Exclusive, 0..10, Wait::NonBlocking)
            .is_err());
        b.release();
        drop((g0, g3, g5));
        // A blocking writer over everything in another process: it gets in
        // only if a left nothing behind.
        let done = Pipe::new();
        let waiter = fork(|| {
            let c = open(&path, mode);
            let _g = c.write(..).unwrap();
            done.send(1);
        });
        assert_eq!(
            done.try_recv(Duration::from_secs(5)),
            Some(1),
            "{mode}: the writer is still blocked: {:?}",
            kernel_held(&a)
        );
        waiter.join();
    }
}

/// Conversions in both directions mixed in one refused change: an
/// explicit layer with exclusive, shared and nothing next to each other.
#[test]
fn refused_change_over_every_mix_of_kinds() {
    let _s = serial();
    let kinds = [None, Some(Kind::Shared), Some(Kind::Exclusive)];
    for mode in MODES {
        let (_dir, path) = lock_path();
        let a = open(&path, mode);
        let b = hold_elsewhere(&path, mode, Kind::Shared, 7);
        // Every sequence of three kinds on 0..3 (27 of them), then a
        // refused exclusive change over 0..8.
        for n in 0..27usize {
            a.release_all().unwrap();
            for (i, k) in [n % 3, n / 3 % 3, n / 9].into_iter().enumerate() {
                if let Some(k) = kinds[k] {
                    a.acquire(k, i as u64, Wait::NonBlocking).unwrap();
                }
            }
            let before = a.held();
            let r = a.acquire(Kind::Exclusive, 0..8, Wait::NonBlocking);
            assert!(r.is_err(), "{mode}: b's shared 7 must refuse it");
            assert_eq!(a.held(), before, "{mode} case {n}");
            assert_eq!(kernel_held(&a), before, "{mode} case {n}");
            // A shared request over 0..8 goes through (b only reads), and
            // lowers nothing that was exclusive.
            a.acquire(Kind::Shared, 0..8, Wait::NonBlocking).unwrap();
            assert_eq!(kernel_held(&a), a.held(), "{mode} case {n}: shared");
            assert_eq!(a.held(), vec![(Span::new(0, 8).unwrap(), Kind::Shared)]);
        }
        a.release_all().unwrap();
        b.release();
        assert_eq!(kernel_held(&a), vec![]);
    }
}

/// Take shared 0, wait for the other reader, then upgrade with a timeout;
/// report the error and what was held after it.
type Refusal = (Error, (Vec<(Span, Kind)>, Vec<(Span, Kind)>));

fn timed_upgrade(lf: &LockFile, both_read: &std::sync::Barrier) -> Result<Refusal, String> {
    let g = lf.read(0).unwrap();
    both_read.wait();
    let r = ReadGuard::upgrade_with(g, Wait::Timeout(Duration::from_millis(300)));
    // Keep the shared lock until the other side is done too, so the first
    // to time out does not let the other through.
    both_read.wait();
    match r {
        Ok(_) => Err("upgrade granted while the other owner reads".to_string()),
        Err((g, e)) => {
            // Still shared, in the bookkeeping and in the kernel.
            let held = (lf.held(), kernel_held(lf));
            drop(g);
            Ok((e, held))
        }
    }
}

/// OFD mode has no deadlock detection: two readers of one span that both
/// upgrade wait for each other. With timed upgrades both time out and
/// both keep their shared lock, as the `# Deadlocks` docs promise.
#[test]
fn two_timed_upgrades_of_one_span_both_time_out_ofd() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let (a, b) = (open(&path, Mode::Ofd), open(&path, Mode::Ofd));
    let both_read = std::sync::Barrier::new(2);
    let results = std::thread::scope(|s| {
        let ta = s.spawn(|| timed_upgrade(&a, &both_read));
        let tb = s.spawn(|| timed_upgrade(&b, &both_read));
        [ta.join().unwrap(), tb.join().unwrap()]
    });
    let shared_0 = vec![(Span::new(0, 1).unwrap(), Kind::Shared)];
    for r in results {
        let (e, (held, kernel)) = r.unwrap();
        assert!(matches!(e, Error::TimedOut { .. }), "{e:?}");
        assert_eq!(held, shared_0);
        assert_eq!(kernel, shared_0);
    }
    assert_eq!(kernel_held(&a), vec![]);
    assert_eq!(kernel_held(&b), vec![]);
}
