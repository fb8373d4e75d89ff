//! Uncontended lock + unlock pairs: locksfile against the raw system call it
//! makes, side by side in one run. Run with `cargo bench -p locksfile`.

use criterion::{criterion_group, criterion_main, Criterion};
mod common;

use common::{raw, Handles};
use locksfile::{Kind, LockFile, Mode, Wait};

fn pairs(c: &mut Criterion) {
    let h = Handles::new();
    let (ofd, process, fd) = (&h.ofd, &h.process, h.fd());
    let mut g = c.benchmark_group("uncontended write pair");
    g.bench_function("raw F_OFD_SETLK", |b| {
        b.iter(|| {
            raw(fd, libc::F_OFD_SETLK, libc::F_WRLCK, 5);
            raw(fd, libc::F_OFD_SETLK, libc::F_UNLCK, 5);
        })
    });
    g.bench_function("locksfile ofd guard", |b| {
        b.iter(|| drop(ofd.try_write(5u64).unwrap()))
    });
    g.bench_function("locksfile ofd explicit", |b| {
        b.iter(|| {
            ofd.acquire(Kind::Exclusive, 5u64, Wait::NonBlocking)
                .unwrap();
            ofd.release(5u64).unwrap();
        })
    });
    g.bench_function("raw F_SETLK", |b| {
        b.iter(|| {
            raw(fd, libc::F_SETLK, libc::F_WRLCK, 5);
            raw(fd, libc::F_SETLK, libc::F_UNLCK, 5);
        })
    });
    g.bench_function("locksfile process guard", |b| {
        b.iter(|| drop(process.try_write(6u64).unwrap()))
    });
    g.bench_function("locksfile process explicit", |b| {
        b.iter(|| {
            process
                .acquire(Kind::Exclusive, 6u64, Wait::NonBlocking)
                .unwrap();
            process.release(6u64).unwrap();
        })
    });
    g.finish();

    // Lock statistics (`OpenOptions::stats`), off and on, side by side:
    // off is the default, so off must cost nothing measurable.
    let mut g = c.benchmark_group("uncontended write pair, statistics off and on");
    let dir = tempfile::tempdir().unwrap();
    for mode in [Mode::Shm, Mode::Ofd] {
        let path = dir.path().join(format!("{mode}.lock"));
        for on in [false, true] {
            let lf = LockFile::options()
                .mode(mode)
                .stats(on)
                .open(&path)
                .unwrap();
            let name = format!("{mode} guard, stats {}", if on { "on" } else { "off" });
            g.bench_function(name, |b| b.iter(|| drop(lf.try_write(5u64).unwrap())));
        }
    }
    g.finish();

    // Re-acquiring what is held at the same kind stays in user space.
    let mut g = c.benchmark_group("already held");
    let _held = ofd.write(7u64).unwrap();
    g.bench_function("raw F_OFD_SETLK relock", |b| {
        b.iter(|| raw(fd, libc::F_OFD_SETLK, libc::F_WRLCK, 9))
    });
    g.bench_function("locksfile nested guard", |b| {
        b.iter(|| drop(ofd.try_write(7u64).unwrap()))
    });
    g.bench_function("locksfile explicit re-acquire", |b| {
        b.iter(|| {
            ofd.acquire(Kind::Exclusive, 7u64, Wait::NonBlocking)
                .unwrap()
        })
    });
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
