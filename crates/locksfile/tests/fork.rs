//! A handle inherited through `fork`: every use in the child fails with
//! `Error::Forked`, and nothing the child does to it (using, unlocking,
//! downgrading, dropping its guards or the handle) touches the parent's
//! locks. In OFD mode this matters most: parent and child share the open
//! file description, so one unlock call from the child would free the
//! parent's locks.

mod common;

use common::*;
use std::sync::Arc;

use locksfile::{Error, Kind, Mode, ReadGuard, Wait, WriteGuard};

fn is_forked<T: std::fmt::Debug>(r: Result<T, Error>) {
    match r {
        Err(Error::Forked) => {}
        other => panic!("expected Error::Forked, got {other:?}"),
    }
}

fn inherited_handle(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let path = &path;
    let parent = pid();
    let h = Arc::new(open(path, mode));
    h.acquire(Kind::Exclusive, 0..4, Wait::NonBlocking).unwrap();
    h.acquire(Kind::Shared, 10, Wait::NonBlocking).unwrap();
    // Guards that own their handle, so the child can take them.
    let mut wg = Some(WriteGuard::acquire(h.clone(), 20..22, Wait::Blocking).unwrap());
    let mut rg = Some(ReadGuard::acquire(h.clone(), 30, Wait::Blocking).unwrap());
    let before = h.held();
    let mut lf = Some(h);
    let expected = |s: locksfile::Span, kind| Some(holder(mode, s, kind, parent));

    let done = Pipe::new();
    let child = fork(|| {
        let lf = lf.take().unwrap();
        // Every operation refuses.
        is_forked(lf.acquire(Kind::Exclusive, 50, Wait::NonBlocking));
        is_forked(lf.acquire(Kind::Shared, 0..4, Wait::Blocking));
        is_forked(lf.try_write(60));
        is_forked(lf.read_for(61, std::time::Duration::from_millis(1)));
        is_forked(lf.release(0..4));
        is_forked(lf.release_all());
        is_forked(lf.conflicts(Kind::Exclusive, 0));
        // The guards too: unlocking reports it, downgrading keeps the
        // parent's write lock as it is.
        let w = wg.take().unwrap();
        let r = WriteGuard::downgrade(w);
        is_forked(ReadGuard::unlock(r));
        let r = rg.take().unwrap();
        match ReadGuard::try_upgrade(r) {
            Ok(_) => panic!("upgraded an inherited guard"),
            Err(r) => drop(r),
        }
        // The bookkeeping the child sees is the parent's, unchanged.
        assert_eq!(lf.held(), before);
        drop(lf);
        // Opening the file afresh in the child works and sees the parent's
        // locks as another owner's.
        let fresh = open(path, mode);
        match fresh.try_read(1) {
            Err(Error::WouldBlock { holder, .. }) => {
                assert_eq!(holder, expected(span(0..4), Kind::Exclusive))
            }
            other => panic!("{other:?}"),
        }
        fresh
            .acquire(Kind::Exclusive, 100, Wait::NonBlocking)
            .unwrap();
        drop(fresh);
        done.send(b'd');
    });
    done.expect(b'd');
    child.join();

    // Seen from a third process: everything the parent held is still held.
    assert_eq!(
        probe(path, Kind::Shared, 0..4),
        expected(span(0..4), Kind::Exclusive)
    );
    assert_eq!(
        probe(path, Kind::Exclusive, 10),
        expected(span(10), Kind::Shared)
    );
    assert_eq!(
        probe(path, Kind::Shared, 20..22),
        expected(span(20..22), Kind::Exclusive)
    );
    assert_eq!(
        probe(path, Kind::Exclusive, 30),
        expected(span(30), Kind::Shared)
    );
    assert_eq!(probe(path, Kind::Shared, 40..), None);

    // And the parent's handle still works normally.
    let h = lf.as_ref().unwrap();
    assert_eq!(h.held(), before);
    h.release(0..2).unwrap();
    drop(wg.take());
    assert_eq!(
        probe(path, Kind::Shared, 0..4),
        expected(span(2..4), Kind::Exclusive)
    );
    assert_eq!(probe(path, Kind::Shared, 20..22), None);
    drop(rg.take());
    drop(lf.take());
    assert_eq!(probe(path, Kind::Exclusive, ..), None);
}

mode_tests! { inherited_handle_is_refused_and_never_releases => inherited_handle }

/// A child that ends without touching the inherited handle, and one that
/// just drops it: the parent's locks stay either way.
fn child_exit(mode: Mode) {
    let _s = serial();
    let (_dir, path) = lock_path();
    let parent = pid();
    let lf = Arc::new(open(&path, mode));
    let mut g = Some(WriteGuard::acquire(lf.clone(), 5, Wait::Blocking).unwrap());
    let mut lf = Some(lf);
    fork(|| {}).join();
    fork(|| drop(lf.take())).join();
    fork(|| drop(g.take())).join();
    fork(|| {
        drop(g.take());
        drop(lf.take());
    })
    .join();
    assert_eq!(
        probe(&path, Kind::Shared, 5),
        Some(holder(mode, 5, Kind::Exclusive, parent))
    );
}

mode_tests! { child_dropping_inherited_handle_keeps_parent_locks => child_exit }

/// In process mode the child's own handles on the same file form a new
/// owner of their own: the inherited entry of the per-file table is not
/// reused, and dropping the child's handles does not disturb the parent.
#[test]
fn child_process_mode_handles_are_a_new_owner() {
    let _s = serial();
    let (_dir, path) = lock_path();
    let parent = pid();
    let mut lf = Some(open(&path, Mode::Process));
    lf.as_ref()
        .unwrap()
        .acquire(Kind::Shared, 0..10, Wait::NonBlocking)
        .unwrap();
    let path_ref = &path;
    let step = Pipe::new();
    let go_on = Pipe::new();
    let child = fork(|| {
        let mine = open(path_ref, Mode::Process);
        let me = pid();
        // A new owner: reads compose with the parent's, writes are kept out.
        assert!(mine.held().is_empty());
        mine.acquire(Kind::Shared, 5..15, Wait::NonBlocking)
            .unwrap();
        match mine.try_write(9) {
            Err(Error::WouldBlock {
                holder: Some(h), ..
            }) => {
                assert_eq!(h, holder(Mode::Process, 0..10, Kind::Shared, parent))
            }
            other => panic!("{other:?}"),
        }
        mine.acquire(Kind::Exclusive, 12, Wait::NonBlocking)
            .unwrap();
        assert_ne!(me, parent);
        step.send(b'h');
        go_on.expect(b'g');
        // Dropping the inherited handle and then the child's own.
        drop(lf.take());
        drop(mine);
    });
    step.expect(b'h');
    assert_eq!(
        probe(&path, Kind::Exclusive, 12),
        Some(holder(Mode::Process, 12, Kind::Exclusive, child.pid))
    );
    go_on.send(b'g');
    child.join();
    assert_eq!(
        probe(&path, Kind::Exclusive, 0..20),
        Some(holder(Mode::Process, 0..10, Kind::Shared, parent))
    );
    drop(lf.take());
    assert_eq!(probe(&path, Kind::Exclusive, ..), None);
}
