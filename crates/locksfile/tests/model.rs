//! Property test: the hold bookkeeping against a naive per-index model,
//! with guards and explicit calls mixed, checked both through `held()` and
//! against what the kernel reports to a second owner.

use std::collections::BTreeMap;

use locksfile::{Kind, LockFile, Mode, ReadGuard, Wait, WriteGuard};
use proptest::prelude::*;

/// The model covers indices 0..WIDTH; spans "to the end" start inside it.
const WIDTH: u64 = 12;

#[derive(Clone, Debug)]
enum Op {
    // The first field picks the handle: in process mode two handles share
    // one owner, each with its own explicit layer.
    Acquire(usize, Kind, u64, u64),
    AcquireToEnd(usize, Kind, u64),
    Release(usize, u64, u64),
    ReleaseAll(usize),
    Guard(Kind, u64, u64),
    DropGuard(usize),
    Upgrade(usize),
    Downgrade(usize),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Shared), Just(Kind::Exclusive)]
}

fn span() -> impl Strategy<Value = (u64, u64)> {
    (0..WIDTH, 1..5u64).prop_map(|(a, n)| (a, (a + n).min(WIDTH)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, kind(), span()).prop_map(|(h, k, (a, b))| Op::Acquire(h, k, a, b)),
        1 => (0..2usize, kind(), 0..WIDTH).prop_map(|(h, k, a)| Op::AcquireToEnd(h, k, a)),
        2 => (0..2usize, span()).prop_map(|(h, (a, b))| Op::Release(h, a, b)),
        1 => (0..2usize).prop_map(Op::ReleaseAll),
        3 => (kind(), span()).prop_map(|(k, (a, b))| Op::Guard(k, a, b)),
        2 => any::<usize>().prop_map(Op::DropGuard),
        1 => any::<usize>().prop_map(Op::Upgrade),
        1 => any::<usize>().prop_map(Op::Downgrade),
    ]
}

enum Held<'a> {
    Read(ReadGuard<&'a LockFile>),
    Write(WriteGuard<&'a LockFile>),
}

#[derive(Default)]
struct Model {
    /// Explicit layers, one per handle: index -> kind (indices >= WIDTH
    /// share one entry, WIDTH).
    explicit: [BTreeMap<u64, Kind>; 2],
    /// Guards: (kind, start, end) with end == u64::MAX for "to the end".
    guards: Vec<(Kind, u64, u64)>,
}

impl Model {
    fn effective(&self, i: u64) -> Option<Kind> {
        let mut k = self.explicit[0].get(&i).copied();
        k = k.max(self.explicit[1].get(&i).copied());
        for &(gk, a, b) in &self.guards {
            if a <= i && i < b {
                k = k.max(Some(gk));
            }
        }
        k
    }
}

/// Index `WIDTH` stands for everything from `WIDTH` on.
fn covered(a: u64, b: u64) -> impl Iterator<Item = u64> {
    a..b.min(WIDTH + 1)
}

fn run(mode: Mode, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.lock");
    let lf = LockFile::options().mode(mode).open(&path).unwrap();
    // In OFD mode a second handle would be a second owner, so both
    // selectors use the same handle there.
    let second =
        (mode == Mode::Process).then(|| LockFile::options().mode(mode).open(&path).unwrap());
    let handles = [&lf, second.as_ref().unwrap_or(&lf)];
    let layer = |h: usize| if mode == Mode::Process { h } else { 0 };
    // The observer is another owner in both modes: an OFD handle never
    // shares an owner with anything else.
    let observer = LockFile::open(&path).unwrap();
    let mut model = Model::default();
    let mut guards: Vec<Held> = Vec::new();

    for op in ops {
        match op {
            Op::Acquire(h, k, a, b) => {
                handles[h].acquire(k, a..b, Wait::NonBlocking).unwrap();
                for i in covered(a, b) {
                    model.explicit[layer(h)].insert(i, k);
                }
            }
            Op::AcquireToEnd(h, k, a) => {
                handles[h].acquire(k, a.., Wait::NonBlocking).unwrap();
                for i in covered(a, u64::MAX) {
                    model.explicit[layer(h)].insert(i, k);
                }
            }
            Op::Release(h, a, b) => {
                handles[h].release(a..b).unwrap();
                for i in covered(a, b) {
                    model.explicit[layer(h)].remove(&i);
                }
            }
            Op::ReleaseAll(h) => {
                handles[h].release_all().unwrap();
                model.explicit[layer(h)].clear();
            }
            Op::Guard(k, a, b) => {
                guards.push(match k {
                    Kind::Shared => Held::Read(lf.try_read(a..b).unwrap()),
                    Kind::Exclusive => Held::Write(lf.try_write(a..b).unwrap()),
                });
                model.guards.push((k, a, b));
            }
            Op::DropGuard(n) if !guards.is_empty() => {
                let n = n % guards.len();
                drop(guards.remove(n));
                model.guards.remove(n);
            }
            Op::Upgrade(n) if !guards.is_empty() => {
                let n = n % guards.len();
                if let Held::Read(_) = guards[n] {
                    let Held::Read(g) = guards.remove(n) else {
                        unreachable!()
                    };
                    // Nobody else holds anything: the upgrade must succeed.
                    let w = ReadGuard::try_upgrade(g)
                        .map_err(|_| "upgrade refused")
                        .unwrap();
                    guards.insert(n, Held::Write(w));
                    model.guards[n].0 = Kind::Exclusive;
                }
            }
            Op::Downgrade(n) if !guards.is_empty() => {
                let n = n % guards.len();
                if let Held::Write(_) = guards[n] {
                    let Held::Write(g) = guards.remove(n) else {
                        unreachable!()
                    };
                    guards.insert(n, Held::Read(WriteGuard::downgrade(g)));
                    model.guards[n].0 = Kind::Shared;
                }
            }
            _ => {}
        }
        check(&lf, &observer, &model)?;
    }
    drop(guards);
    lf.release_all().unwrap();
    if let Some(second) = second {
        // Dropping a handle releases its own layer and nothing else.
        model.explicit[0].clear();
        model.guards.clear();
        check(&lf, &observer, &model)?;
        drop(second);
        model.explicit[1].clear();
        check(&lf, &observer, &model)?;
    }
    prop_assert!(lf.held().is_empty());
    prop_assert_eq!(observer.conflicts(Kind::Exclusive, ..).unwrap(), None);
    Ok(())
}

fn check(lf: &LockFile, observer: &LockFile, model: &Model) -> Result<(), TestCaseError> {
    let held = lf.held();
    let held_at = |i: u64| held.iter().find(|(s, _)| s.contains(i)).map(|(_, k)| *k);
    for i in 0..=WIDTH {
        let want = model.effective(i);
        prop_assert_eq!(held_at(i), want, "held() at index {}", i);
        // What the kernel tells another owner.
        let blocks_read = observer.conflicts(Kind::Shared, i).unwrap().is_some();
        let blocks_write = observer.conflicts(Kind::Exclusive, i).unwrap().is_some();
        prop_assert_eq!(
            blocks_read,
            want == Some(Kind::Exclusive),
            "kernel read at {}",
            i
        );
        prop_assert_eq!(blocks_write, want.is_some(), "kernel write at {}", i);
    }
    // The far end of the index space follows the "to the end" holds.
    let far = locksfile::INDEX_END - 1;
    prop_assert_eq!(
        held_at(far),
        model.effective(WIDTH),
        "held() at the far end"
    );
    // held() reports maximal pieces: neighbours always differ.
    for w in held.windows(2) {
        prop_assert!(
            w[0].0.end() < w[1].0.start() || w[0].1 != w[1].1,
            "unmerged pieces {:?}",
            held
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn ofd_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(Mode::Ofd, ops)?;
    }

    #[test]
    fn process_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(Mode::Process, ops)?;
    }
}
