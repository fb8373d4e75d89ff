//! The owner protocol against the in-memory engine: after every step the
//! engine must hold exactly what the bookkeeping says, whatever other
//! owners and sibling threads do. No system call is made here.

use std::time::Duration;

use proptest::prelude::*;

use super::Owner;
use crate::engine::fake::{Fake, FakeTable};
use crate::error::Error;
use crate::holds::{Change, HandleId, FIRST_HANDLE};
use crate::kind::Kind;
use crate::span::Span;
use crate::wait::Wait;

const S: Option<Kind> = Some(Kind::Shared);
const X: Option<Kind> = Some(Kind::Exclusive);

fn span(a: u64, b: u64) -> Span {
    Span::new(a, b).unwrap()
}

fn guard(a: u64, b: u64, from: Option<Kind>, to: Option<Kind>) -> Change {
    Change::Guard {
        span: span(a, b),
        from,
        to,
    }
}

fn explicit(a: u64, b: u64, kind: Option<Kind>) -> Change {
    Change::Explicit {
        handle: FIRST_HANDLE,
        span: span(a, b),
        kind,
    }
}

fn owners(n: usize) -> (FakeTable, Vec<Owner<Fake>>) {
    let table = FakeTable::default();
    let owners = (0..n)
        .map(|_| {
            let o = Owner::new(table.owner());
            o.new_handle_id();
            o
        })
        .collect();
    (table, owners)
}

fn agrees(table: &FakeTable, o: &Owner<Fake>) {
    assert_eq!(table.held(o.engine.id), o.held(), "engine vs bookkeeping");
}

#[test]
fn refused_change_puts_every_piece_back() {
    for first_shared_0 in [false, true] {
        let (table, o) = owners(2);
        let (a, b) = (&o[0], &o[1]);
        if first_shared_0 {
            a.change(guard(0, 1, None, S), Wait::NonBlocking).unwrap();
        }
        a.change(guard(3, 4, None, S), Wait::NonBlocking).unwrap();
        a.change(guard(5, 6, None, X), Wait::NonBlocking).unwrap();
        b.change(explicit(7, 8, S), Wait::NonBlocking).unwrap();
        let before = a.held();
        let r = a.change(explicit(0, 10, X), Wait::NonBlocking);
        match r {
            Err(Error::WouldBlock {
                holder: Some(h), ..
            }) => assert_eq!(h.span, span(7, 8)),
            other => panic!("{other:?}"),
        }
        assert_eq!(a.held(), before);
        agrees(&table, a);
        // Timed: waits for the pieces, then gives all of them back.
        let r = a.change(explicit(0, 10, X), Wait::Timeout(Duration::from_millis(20)));
        assert!(matches!(r, Err(Error::TimedOut { .. })), "{r:?}");
        assert_eq!(a.held(), before);
        agrees(&table, a);
    }
}

#[test]
fn what_is_held_already_makes_no_engine_call() {
    let (table, o) = owners(1);
    let a = &o[0];
    a.change(explicit(0, 4, X), Wait::NonBlocking).unwrap();
    let calls = table.calls(0);
    a.change(explicit(0, 4, X), Wait::NonBlocking).unwrap();
    a.change(guard(1, 3, None, X), Wait::NonBlocking).unwrap();
    a.change(guard(0, 4, None, S), Wait::NonBlocking).unwrap();
    a.change(guard(1, 3, X, None), Wait::NonBlocking).unwrap();
    a.change(guard(0, 4, S, None), Wait::NonBlocking).unwrap();
    assert_eq!(table.calls(0), calls);
    agrees(&table, a);
}

#[test]
fn an_engine_error_half_way_rolls_back() {
    let (table, o) = owners(1);
    let a = &o[0];
    a.change(guard(3, 4, None, S), Wait::NonBlocking).unwrap();
    let before = a.held();
    // Raises 0..3, 3 and 4..10 are three calls: fail the third.
    table.fail_call(0, 3);
    let r = a.change(explicit(0, 10, X), Wait::Blocking);
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert_eq!(a.held(), before);
    agrees(&table, a);
}

/// A sibling thread releases inside the span another thread of the same
/// owner waits on: the engine is left alone there until the waiter wakes,
/// which then puts it right, whether it got its locks or timed out.
#[test]
fn releases_during_a_siblings_wait_are_put_right_by_the_waiter() {
    for waiter_gets_it in [true, false] {
        let (table, o) = owners(2);
        let (a, b) = (&o[0], &o[1]);
        a.change(guard(0, 1, None, S), Wait::NonBlocking).unwrap();
        b.change(explicit(1, 2, S), Wait::NonBlocking).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let wait = if waiter_gets_it {
                    Wait::Blocking
                } else {
                    Wait::Timeout(Duration::from_millis(300))
                };
                a.change(guard(0, 2, None, X), wait)
            });
            while table.waiting() == 0 {
                std::thread::yield_now();
            }
            // Lowering only: goes ahead at once, but not to the engine.
            a.change(guard(0, 1, S, None), Wait::NonBlocking).unwrap();
            if waiter_gets_it {
                b.change(explicit(1, 2, None), Wait::NonBlocking).unwrap();
                waiter.join().unwrap().unwrap();
                assert_eq!(a.held(), vec![(span(0, 2), Kind::Exclusive)]);
            } else {
                let r = waiter.join().unwrap();
                assert!(matches!(r, Err(Error::TimedOut { .. })), "{r:?}");
                // The waiter took 0 exclusive and then gave it all back.
                assert_eq!(a.held(), vec![]);
            }
        });
        agrees(&table, a);
        agrees(&table, b);
    }
}

/// A second waiter of the same owner over an overlapping span waits for
/// the first, and a non-blocking one is refused rather than touching the
/// engine under it.
#[test]
fn overlapping_waits_of_one_owner_take_turns() {
    let (table, o) = owners(2);
    let (a, b) = (&o[0], &o[1]);
    b.change(explicit(2, 3, X), Wait::NonBlocking).unwrap();
    std::thread::scope(|s| {
        let first = s.spawn(|| a.change(guard(0, 4, None, X), Wait::Blocking));
        while table.waiting() == 0 {
            std::thread::yield_now();
        }
        let r = a.change(guard(1, 2, None, S), Wait::NonBlocking);
        assert!(matches!(r, Err(Error::WouldBlock { .. })), "{r:?}");
        let second = s.spawn(|| a.change(guard(3, 6, None, S), Wait::Blocking));
        b.change(explicit(2, 3, None), Wait::NonBlocking).unwrap();
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
    });
    assert_eq!(
        a.held(),
        vec![(span(0, 4), Kind::Exclusive), (span(4, 6), Kind::Shared)]
    );
    agrees(&table, a);
}

#[derive(Clone, Debug)]
enum Op {
    Explicit(usize, HandleId, Option<Kind>, u64, u64),
    Guard(usize, Kind, u64, u64),
    Convert(usize, usize),
    Drop(usize, usize),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Shared), Just(Kind::Exclusive)]
}

fn op() -> impl Strategy<Value = Op> {
    let span = (0..12u64, 1..10u64).prop_map(|(a, n)| (a, a + n));
    prop_oneof![
        3 => (0..3usize, 1..3u64, proptest::option::of(kind()), span.clone())
            .prop_map(|(o, h, k, (a, b))| Op::Explicit(o, h, k, a, b)),
        3 => (0..3usize, kind(), span).prop_map(|(o, k, (a, b))| Op::Guard(o, k, a, b)),
        1 => (0..3usize, any::<usize>()).prop_map(|(o, g)| Op::Convert(o, g)),
        2 => (0..3usize, any::<usize>()).prop_map(|(o, g)| Op::Drop(o, g)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Three owners (each with two explicit layers and guards) take, change
    /// and drop locks over each other's: every refused change leaves the
    /// engine as it was, every granted one makes it agree.
    #[test]
    fn engine_always_agrees_with_the_bookkeeping(ops in proptest::collection::vec(op(), 1..60)) {
        let (table, o) = owners(3);
        for owner in &o {
            owner.new_handle_id();
        }
        let mut guards: Vec<Vec<(Kind, Span)>> = vec![Vec::new(); 3];
        for op in ops {
            match op {
                Op::Explicit(i, h, k, a, b) => {
                    let before = o[i].held();
                    let r = o[i].change(
                        Change::Explicit { handle: h, span: span(a, b), kind: k },
                        Wait::NonBlocking,
                    );
                    if r.is_err() {
                        prop_assert_eq!(o[i].held(), before);
                    }
                }
                Op::Guard(i, k, a, b) => {
                    let r = o[i].change(guard(a, b, None, Some(k)), Wait::NonBlocking);
                    if r.is_ok() {
                        guards[i].push((k, span(a, b)));
                    }
                }
                Op::Convert(i, g) if !guards[i].is_empty() => {
                    let g = g % guards[i].len();
                    let (k, s) = guards[i][g];
                    let to = match k {
                        Kind::Shared => Kind::Exclusive,
                        Kind::Exclusive => Kind::Shared,
                    };
                    let c = Change::Guard { span: s, from: Some(k), to: Some(to) };
                    if o[i].change(c, Wait::NonBlocking).is_ok() {
                        guards[i][g].0 = to;
                    }
                }
                Op::Drop(i, g) if !guards[i].is_empty() => {
                    let g = g % guards[i].len();
                    let (k, s) = guards[i].remove(g);
                    let c = Change::Guard { span: s, from: Some(k), to: None };
                    o[i].change(c, Wait::NonBlocking).unwrap();
                }
                _ => {}
            }
            for owner in &o {
                prop_assert_eq!(table.held(owner.engine.id), owner.held());
            }
        }
    }
}
