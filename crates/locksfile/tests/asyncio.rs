//! The `tokio` feature: `read_async`/`write_async` leave the runtime free
//! while they wait, and a dropped future ends its wait within a slice,
//! holding nothing. Run with `cargo test -p locksfile --features tokio --test asyncio`.
#![cfg(feature = "tokio")]

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How soon a dropped future's wait must end: it is woken where it sleeps.
const PROMPT: Duration = Duration::from_millis(100);
use locksfile::{Error, Kind, LockFile};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
}

/// Run `f` on a thread of its own and fail, rather than hang, if it takes
/// longer than `limit` (a wait that blocked the runtime would never end).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).expect("the test waits"));
    rx.recv_timeout(limit)
        .expect("the runtime was blocked: the test did not finish")
}

/// Poll `cond` until it holds; fail after `limit`.
fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::yield_now();
    }
    start.elapsed()
}

struct Setup {
    _dir: tempfile::TempDir,
    lf: Arc<LockFile>,
    /// A second owner (OFD mode: another handle of this process).
    other: LockFile,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("async.lock");
    Setup {
        lf: Arc::new(LockFile::open(&path).expect("open")),
        other: LockFile::open(&path).expect("open"),
        _dir: dir,
    }
}

#[test]
fn free_locks_are_had_at_once_and_released_on_drop() {
    let s = setup();
    let rt = runtime();
    let g = rt.block_on(s.lf.write_async(0..3, None)).expect("free");
    assert!(matches!(s.other.try_read(2), Err(Error::WouldBlock { .. })));
    drop(g);
    let r = rt
        .block_on(s.lf.read_async(1, Some(Duration::ZERO)))
        .expect("free");
    assert!(s.other.try_read(1).is_ok() && s.other.try_write(1).is_err());
    drop(r);
    assert!(s.lf.held().is_empty());
    assert!(matches!(
        rt.block_on(s.lf.write_async((3, 0), None)), // an empty (start, count)
        Err(Error::InvalidSpan(_))
    ));
}

#[test]
fn the_runtime_keeps_running_while_a_task_waits() {
    within(Duration::from_secs(20), || {
        let s = setup();
        let held = s.other.write(0).expect("free");
        let rt = runtime();
        rt.block_on(async {
            let waiter = tokio::spawn(s.lf.write_async(0, None));
            // The waiter's task went to the pool; this task still runs.
            for _ in 0..10_000 {
                tokio::task::yield_now().await;
            }
            assert!(!waiter.is_finished());
            drop(held); // released from the runtime's own thread
            let g = waiter.await.expect("no panic").expect("granted");
            assert_eq!(
                s.lf.held(),
                vec![(locksfile::Span::new(0, 1).unwrap(), Kind::Exclusive)]
            );
            drop(g);
        });
        assert!(s.other.try_write(0).is_ok());
    });
}

#[test]
fn a_dropped_future_ends_its_wait_holding_nothing() {
    let s = setup();
    // Made first so dropped last: a failing test releases `held` first,
    // and the runtime's shutdown then has no wait left to join.
    let rt = runtime();
    let held = s.other.write(0..2).expect("free");
    let lf = Arc::clone(&s.lf);
    let mine = &s.lf;
    let aborted = rt.block_on(async move {
        let waiter = tokio::spawn(async move { lf.write_async(1..3, None).await });
        // Once the pool thread waits it holds a clone of the handle: the
        // test's, the future's and the pool closure's.
        let start = Instant::now();
        while Arc::strong_count(mine) < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the wait never reached the pool"
            );
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let aborted = Instant::now();
        assert!(waiter.await.unwrap_err().is_cancelled());
        aborted
    });
    // The pool's closure ends (and drops its clone) at once.
    until(
        Duration::from_secs(10),
        "the pool thread to stop waiting",
        || Arc::strong_count(&s.lf) == 1,
    );
    let took = aborted.elapsed();
    assert!(
        took < PROMPT,
        "the wait went on for {took:?} after the drop"
    );
    drop(held);
    assert!(s.lf.held().is_empty());
    // Nothing took the lock after the drop: another owner gets it now.
    let g = s
        .other
        .try_write(0..3)
        .expect("nothing held by the dropped wait");
    drop(g);
}

#[test]
fn a_timeout_ends_the_wait() {
    let s = setup();
    let _held = s.other.read(4).expect("free");
    let rt = runtime();
    let t0 = Instant::now();
    let r = rt.block_on(s.lf.write_async(3..6, Some(Duration::from_millis(100))));
    let took = t0.elapsed();
    assert!(matches!(r, Err(Error::TimedOut { .. })), "{r:?}");
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(matches!(
        rt.block_on(s.lf.write_async(4, Some(Duration::ZERO))),
        Err(Error::TimedOut { .. })
    ));
    // A shared lock is compatible and granted at once.
    let r = rt.block_on(s.lf.read_async(4, Some(Duration::ZERO)));
    assert!(r.is_ok());
    drop(r);
    assert!(s.lf.held().is_empty());
}
