//! Uncontended lock + unlock of one lock, exclusive and shared, for
//! locksfile and every peer, side by side in one run.
//!
//! Each peer gets a file of its own in a scratch directory; lock 5 (byte 5)
//! where the peer has byte ranges, the whole file where it has not.

use std::os::fd::AsRawFd;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use locksfile::{Kind, LockFile, Mode, Wait};
use locksfile_bench::raw::{self, Cmd, Type};
use locksfile_bench::{open_rw, ScratchDir, SharedRwLocks};

const N: u64 = 5;

fn group(c: &mut Criterion, kind: Kind) {
    let dir = ScratchDir::new("pair").expect("scratch dir");
    let name = match kind {
        Kind::Exclusive => "pair_exclusive",
        Kind::Shared => "pair_shared",
    };
    let mut g: BenchmarkGroup<'_, _> = c.benchmark_group(name);
    let ex = kind == Kind::Exclusive;

    // Each mode on a file of its own: shm refuses a file with kernel locks.
    for mode in [Mode::Ofd, Mode::Process, Mode::Shm] {
        let tag = match mode {
            Mode::Ofd => "ofd",
            Mode::Process => "process",
            _ => "shm",
        };
        let lf = LockFile::options()
            .mode(mode)
            .open(dir.file(&format!("locksfile-{tag}.lock")))
            .expect("open");
        g.bench_function(format!("locksfile_{tag}_guard"), |b| {
            if ex {
                b.iter(|| drop(lf.write(N).expect("write")))
            } else {
                b.iter(|| drop(lf.read(N).expect("read")))
            }
        });
        g.bench_function(format!("locksfile_{tag}_explicit"), |b| {
            b.iter(|| {
                lf.acquire(kind, N, Wait::NonBlocking).expect("acquire");
                lf.release(N).expect("release");
            })
        });
    }

    let ty = if ex { Type::Write } else { Type::Read };
    for (id, set) in [("fcntl_ofd", Cmd::OfdSetlk), ("fcntl_posix", Cmd::Setlk)] {
        let f = open_rw(&dir.file(&format!("{id}.lock"))).expect("open");
        let fd = f.as_raw_fd();
        g.bench_function(id, |b| {
            b.iter(|| {
                raw::setlk(fd, set, ty, N as i64, 1).expect("lock");
                raw::setlk(fd, set, Type::Unlock, N as i64, 1).expect("unlock");
            })
        });
    }

    let f = open_rw(&dir.file("flock.lock")).expect("open");
    let fd = f.as_raw_fd();
    let op = if ex { libc::LOCK_EX } else { libc::LOCK_SH };
    g.bench_function("flock", |b| {
        b.iter(|| {
            raw::flock(fd, op | libc::LOCK_NB).expect("lock");
            raw::flock(fd, libc::LOCK_UN).expect("unlock");
        })
    });

    let f = open_rw(&dir.file("file-guard.lock")).expect("open");
    let fl = if ex {
        file_guard::Lock::Exclusive
    } else {
        file_guard::Lock::Shared
    };
    g.bench_function("file_guard", |b| {
        b.iter(|| drop(file_guard::try_lock(&f, fl, N as usize, 1).expect("lock")))
    });

    let mut fdl = fd_lock::RwLock::new(open_rw(&dir.file("fd-lock.lock")).expect("open"));
    g.bench_function("fd_lock", |b| {
        if ex {
            b.iter(|| drop(fdl.try_write().expect("lock")))
        } else {
            b.iter(|| drop(fdl.try_read().expect("lock")))
        }
    });

    let shm = SharedRwLocks::new(1).expect("mmap");
    g.bench_function("pthread_rwlock_pshared", |b| {
        b.iter(|| {
            if ex {
                shm.write(0)
            } else {
                shm.read(0)
            }
            shm.unlock(0);
        })
    });

    let std_rw = std::sync::RwLock::new(0u64);
    g.bench_function("std_rwlock", |b| {
        if ex {
            b.iter(|| drop(std_rw.write().expect("lock")))
        } else {
            b.iter(|| drop(std_rw.read().expect("lock")))
        }
    });

    let pl_rw = parking_lot::RwLock::new(0u64);
    g.bench_function("parking_lot_rwlock", |b| {
        if ex {
            b.iter(|| drop(pl_rw.write()))
        } else {
            b.iter(|| drop(pl_rw.read()))
        }
    });
    g.finish();
}

/// The shm engine's uncontended pairs, both kinds and both APIs, beside
/// the process-shared `pthread_rwlock_t` pairs it is measured against, in
/// one group.
fn shm_against_pthread(c: &mut Criterion) {
    let dir = ScratchDir::new("pair-shm").expect("scratch dir");
    let mut g: BenchmarkGroup<'_, _> = c.benchmark_group("pair_shm_vs_pthread");
    let lf = LockFile::options()
        .mode(Mode::Shm)
        .open(dir.file("locksfile-shm.lock"))
        .expect("open");
    g.bench_function("shm_guard_exclusive", |b| {
        b.iter(|| drop(lf.try_write(N).expect("try_write")))
    });
    g.bench_function("shm_guard_shared", |b| {
        b.iter(|| drop(lf.try_read(N).expect("try_read")))
    });
    for (tag, kind) in [("exclusive", Kind::Exclusive), ("shared", Kind::Shared)] {
        g.bench_function(format!("shm_explicit_{tag}"), |b| {
            b.iter(|| {
                lf.acquire(kind, N, Wait::NonBlocking).expect("acquire");
                lf.release(N).expect("release");
            })
        });
    }
    let shm = SharedRwLocks::new(1).expect("mmap");
    g.bench_function("pthread_rwlock_pshared_write", |b| {
        b.iter(|| {
            shm.write(0);
            shm.unlock(0);
        })
    });
    g.bench_function("pthread_rwlock_pshared_read", |b| {
        b.iter(|| {
            shm.read(0);
            shm.unlock(0);
        })
    });
    g.finish();
}

fn pairs(c: &mut Criterion) {
    group(c, Kind::Exclusive);
    group(c, Kind::Shared);
    shm_against_pthread(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .sample_size(20);
    targets = pairs
}
criterion_main!(benches);
