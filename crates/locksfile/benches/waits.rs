//! How soon a waiter asleep on a held lock has it once the holder lets go,
//! per engine and patience: an untimed wait, a timed one, and (kernel
//! modes) a timed one that polls, as timed kernel waits did before they
//! slept in `F_SETLKW` with a timer signal (the wake signal turned off
//! makes them poll). Run with `cargo bench -p locksfile --bench waits`.
//!
//! Not criterion: each sample is one hand-over between two threads, timed
//! from the release to the grant, and the figure wanted is its median and
//! 90th percentile.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use locksfile::{IntoSpan, LockFile, Mode, Span, Wait, WriteGuard};

const ROUNDS: usize = 200;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p) as usize]
}

/// `ROUNDS` hand-overs of `span` from `a` to `b`, which waits as `wait`
/// says; microseconds from each release to the grant.
fn hand_overs(a: &LockFile, b: &LockFile, span: Span, wait: fn() -> Wait) -> Vec<f64> {
    let (go, went) = mpsc::channel::<()>();
    let (got, get) = mpsc::channel::<Instant>();
    std::thread::scope(|s| {
        s.spawn(move || {
            while went.recv().is_ok() {
                let guard = WriteGuard::acquire(b, span, wait()).expect("granted");
                got.send(Instant::now()).unwrap();
                drop(guard);
            }
        });
        let mut out = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let held = a.write(span).expect("free");
            go.send(()).unwrap();
            // Long enough for the waiter to be asleep (past its yields, and
            // for a poll, at its capped back-off).
            std::thread::sleep(Duration::from_millis(3));
            let released = Instant::now();
            drop(held);
            let granted = get.recv().unwrap();
            out.push(granted.duration_since(released).as_secs_f64() * 1e6);
        }
        drop(go);
        out
    })
}

fn report(name: &str, mut v: Vec<f64>) {
    let p50 = percentile(&mut v, 0.5);
    let p90 = percentile(&mut v, 0.9);
    println!("{name:<36} release to grant: median {p50:>8.1} µs   p90 {p90:>8.1} µs");
}

fn main() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("waits.lock");
    let untimed = || Wait::Blocking;
    let timed = || Wait::Timeout(Duration::from_secs(10));
    let wake = locksfile::wake_signal();
    // Process-mode handles of one file in one process share one owner, and
    // wait as OFD ones do: OFD stands for both.
    for mode in [Mode::Ofd, Mode::Flock, Mode::Shm] {
        let open = || LockFile::options().mode(mode).open(&path).expect("open");
        let (a, b) = (open(), open());
        // Flock mode takes the whole file only.
        let span = if mode == Mode::Flock {
            Span::ALL
        } else {
            0.into_span().unwrap()
        };
        report(
            &format!("{mode:?}, untimed"),
            hand_overs(&a, &b, span, untimed),
        );
        report(&format!("{mode:?}, timed"), hand_overs(&a, &b, span, timed));
        if mode != Mode::Shm {
            locksfile::set_wake_signal(None).expect("turn the wake signal off");
            report(
                &format!("{mode:?}, timed, polling"),
                hand_overs(&a, &b, span, timed),
            );
            locksfile::set_wake_signal(wake).expect("turn it back on");
        }
    }
}
