//! The cost of one uncontended lock + unlock pair against the number of
//! locks other owners hold on the same file: 1, 10, 100, 1,000, 10,000.
//!
//! The kernel keeps a file's record locks in one list that every set and
//! unlock walks, so the pair grows with it. The other locks are held by a
//! second open file description (an OFD owner of its own) on even bytes
//! 0, 2, 4, ... — never adjacent, so the kernel cannot merge them — and the
//! pair takes byte 5, which no one else holds. The shm table is measured the
//! same way on a file of its own, the other locks held by a second shm
//! owner (a table never shares a file with kernel locks).

use std::os::fd::AsRawFd;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use locksfile::{Kind, LockFile, Mode, Wait};
use locksfile_bench::raw::{self, Cmd, Type};
use locksfile_bench::{open_rw, ScratchDir};

const N: u64 = 5;
const HELD: [usize; 5] = [1, 10, 100, 1_000, 10_000];

fn held(c: &mut Criterion) {
    let dir = ScratchDir::new("held").expect("scratch dir");
    let mut g = c.benchmark_group("held");
    for n in HELD {
        let path = dir.file(&format!("held-{n}.lock"));
        let holder = open_rw(&path).expect("open");
        for i in 0..n {
            raw::setlk(
                holder.as_raw_fd(),
                Cmd::OfdSetlk,
                Type::Write,
                2 * i as i64,
                1,
            )
            .expect("hold");
        }
        let lf = LockFile::open(&path).expect("open");
        g.bench_with_input(BenchmarkId::new("locksfile_ofd", n), &n, |b, _| {
            b.iter(|| {
                lf.acquire(Kind::Exclusive, N, Wait::NonBlocking)
                    .expect("acquire");
                lf.release(N).expect("release");
            })
        });
        let f = open_rw(&path).expect("open");
        let fd = f.as_raw_fd();
        g.bench_with_input(BenchmarkId::new("fcntl_ofd", n), &n, |b, _| {
            b.iter(|| {
                raw::setlk(fd, Cmd::OfdSetlk, Type::Write, N as i64, 1).expect("lock");
                raw::setlk(fd, Cmd::OfdSetlk, Type::Unlock, N as i64, 1).expect("unlock");
            })
        });
        drop(holder);

        let path = dir.file(&format!("held-shm-{n}.lock"));
        let shm = || LockFile::options().mode(Mode::Shm).open(&path);
        let holder = shm().expect("open");
        for i in 0..n as u64 {
            holder
                .acquire(Kind::Exclusive, 2 * i, Wait::NonBlocking)
                .expect("hold");
        }
        let lf = shm().expect("open");
        g.bench_with_input(BenchmarkId::new("locksfile_shm", n), &n, |b, _| {
            b.iter(|| {
                lf.acquire(Kind::Exclusive, N, Wait::NonBlocking)
                    .expect("acquire");
                lf.release(N).expect("release");
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .sample_size(20);
    targets = held
}
criterion_main!(benches);
