//! `Mode::Shm` against the raw `F_OFD_SETLK` pair, side by side in one
//! run: the uncontended pair, and the same pair with 1 to 10,000 locks held
//! by another owner of the file. Run with `cargo bench -p locksfile --bench shm`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
mod common;

use std::os::fd::AsRawFd;

use common::raw;
use locksfile::{Kind, LockFile, Mode, Wait};

fn shm(path: &std::path::Path) -> LockFile {
    LockFile::options().mode(Mode::Shm).open(path).unwrap()
}

/// A plain file for the raw calls, beside (never the same as) a table's
/// lock file: the kernel's locks and the table's must not mix.
fn raw_file(dir: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("raw.lock"))
        .unwrap()
}

fn pairs(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let lf = shm(&dir.path().join("bench.lock"));
    let file = raw_file(dir.path());
    let fd = file.as_raw_fd();
    let mut g = c.benchmark_group("shm uncontended write pair");
    g.bench_function("raw F_OFD_SETLK", |b| {
        b.iter(|| {
            raw(fd, libc::F_OFD_SETLK, libc::F_WRLCK, 5);
            raw(fd, libc::F_OFD_SETLK, libc::F_UNLCK, 5);
        })
    });
    g.bench_function("locksfile shm guard", |b| {
        b.iter(|| drop(lf.try_write(5u64).unwrap()))
    });
    g.bench_function("locksfile shm explicit", |b| {
        b.iter(|| {
            lf.acquire(Kind::Exclusive, 5u64, Wait::NonBlocking)
                .unwrap();
            lf.release(5u64).unwrap();
        })
    });
    g.finish();

    // Other owners' locks: the kernel walks one list per file; the table
    // looks an index up in a hash.
    let mut g = c.benchmark_group("write pair beside locks of another owner");
    for n in [1u64, 10, 100, 1000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.lock");
        let lf = shm(&path);
        let other = shm(&path);
        let file = raw_file(dir.path());
        let raw_other = raw_file(dir.path());
        let fd = file.as_raw_fd();
        for i in 0..n {
            // Every other index, so no two locks merge.
            other
                .acquire(Kind::Exclusive, 1000 + 2 * i, Wait::NonBlocking)
                .unwrap();
            raw(
                raw_other.as_raw_fd(),
                libc::F_OFD_SETLK,
                libc::F_WRLCK,
                (1000 + 2 * i) as i64,
            );
        }
        g.bench_with_input(BenchmarkId::new("raw F_OFD_SETLK", n), &n, |b, _| {
            b.iter(|| {
                raw(fd, libc::F_OFD_SETLK, libc::F_WRLCK, 5);
                raw(fd, libc::F_OFD_SETLK, libc::F_UNLCK, 5);
            })
        });
        g.bench_with_input(BenchmarkId::new("locksfile shm guard", n), &n, |b, _| {
            b.iter(|| drop(lf.try_write(5u64).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("locksfile shm explicit", n), &n, |b, _| {
            b.iter(|| {
                lf.acquire(Kind::Exclusive, 5u64, Wait::NonBlocking)
                    .unwrap();
                lf.release(5u64).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = pairs
}
criterion_main!(benches);
