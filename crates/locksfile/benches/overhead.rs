//! What locksfile adds to the raw system calls of an uncontended lock +
//! unlock pair, measured so that it can be told apart from noise on a
//! shared machine. Run with `cargo bench -p locksfile --bench overhead`.
//!
//! Not criterion: the figure wanted is a difference of two times, and the
//! raw pair's own cost drifts by tens of nanoseconds over a run here (the
//! `pair` bench's separate groups see that drift as overhead, or hide it).
//! So blocks of raw pairs and of locksfile pairs alternate, each block
//! timed, and the median of the per-block differences is the overhead.

use std::time::Instant;

mod common;

use common::{raw, Handles};
use locksfile::{Kind, Wait};

const BLOCK: u32 = 1000;
const BLOCKS: usize = 400;

fn per_pair(f: &mut dyn FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..BLOCK {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(BLOCK)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure(name: &str, cmd: libc::c_int, fd: i32, index: i64, ours: &mut dyn FnMut()) {
    let mut raw_pair = || {
        raw(fd, cmd, libc::F_WRLCK, index);
        raw(fd, cmd, libc::F_UNLCK, index);
    };
    // Warm up both.
    per_pair(&mut raw_pair);
    per_pair(ours);
    let (mut raws, mut diffs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..BLOCKS {
        let r = per_pair(&mut raw_pair);
        let o = per_pair(ours);
        raws.push(r);
        diffs.push(o - r);
        ratios.push(o / r);
    }
    println!(
        "{name:<28} raw pair {:>6.0} ns   overhead {:>6.1} ns   ratio {:.3}",
        median(raws),
        median(diffs),
        median(ratios)
    );
}

fn main() {
    let h = Handles::new();
    let (ofd, process, fd) = (&h.ofd, &h.process, h.fd());
    println!("uncontended exclusive pair, median of {BLOCKS} interleaved blocks of {BLOCK} pairs");
    // The first second of a run is slower on these virtual machines (raw
    // pairs about 1.5 µs instead of 1.2), and differences scale with it:
    // the first group measured would carry that alone.
    let warm = Instant::now();
    while warm.elapsed().as_secs() < 2 {
        raw(fd, libc::F_OFD_SETLK, libc::F_WRLCK, 5);
        raw(fd, libc::F_OFD_SETLK, libc::F_UNLCK, 5);
    }
    measure("ofd guard", libc::F_OFD_SETLK, fd, 5, &mut || {
        drop(std::hint::black_box(ofd.try_write(5u64).unwrap()))
    });
    measure("ofd explicit", libc::F_OFD_SETLK, fd, 5, &mut || {
        ofd.acquire(Kind::Exclusive, 5u64, Wait::NonBlocking)
            .unwrap();
        ofd.release(5u64).unwrap();
    });
    measure("process guard", libc::F_SETLK, fd, 6, &mut || {
        drop(std::hint::black_box(process.try_write(6u64).unwrap()))
    });
    measure("process explicit", libc::F_SETLK, fd, 6, &mut || {
        process
            .acquire(Kind::Exclusive, 6u64, Wait::NonBlocking)
            .unwrap();
        process.release(6u64).unwrap();
    });
}
