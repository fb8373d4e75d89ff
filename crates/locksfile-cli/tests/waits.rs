//! `locksfile run -w SECS` is one engine wait with a deadline: in process
//! mode the kernel still answers it with `EDEADLK`, so a cycle ends at once
//! with the deadlock reported instead of after the timeout, and in shm mode
//! it keeps its place in the fair queue, so busy readers cannot starve it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use locksfile::{LockFile, Mode};

/// How soon a closed cycle must be refused.
const PROMPT: Duration = Duration::from_millis(100);

/// Whether the kernel lists a waiter of process `pid` on `path` (the
/// process sleeps in `F_SETLKW`).
fn waits_in_kernel(path: &Path, pid: u32) -> bool {
    let ino = std::fs::metadata(path).unwrap().ino();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| {
            // "N: -> POSIX ADVISORY WRITE PID MAJ:MIN:INO START END"
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->")
                && f.get(5) == Some(&pid.to_string().as_str())
                && f.get(6).and_then(|d| d.rsplit(':').next()) == Some(&ino.to_string())
        })
}

/// One owner of a cycle: `locksfile run --mode process -F` takes lock
/// `hold` and execs a shell that says `held`, reads a line, then execs
/// `locksfile run --mode process -w 10` for lock `want`: the same process
/// (POSIX locks survive exec) holds one lock and waits for the other.
struct Owner {
    child: Child,
    stdin: ChildStdin,
}

impl Owner {
    fn start(file: &Path, hold: u64, want: u64) -> Owner {
        let f = file.to_str().unwrap();
        let script =
            "echo held; read x; exec \"$0\" run --mode process -w 10 -i \"$1\" \"$2\" -- true";
        let mut child = locksfile()
            .args(["run", "--mode", "process", "-n", "-F", "-i"])
            .arg(hold.to_string())
            .arg(f)
            .args(["--", "sh", "-c", script, BIN])
            .arg(want.to_string())
            .arg(f)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn locksfile");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "held\n", "lock {hold} not taken");
        let stdin = child.stdin.take().unwrap();
        Owner { child, stdin }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Go on to the wait; a thread reports when the process ends, with
    /// its status and stderr.
    fn go(mut self) -> mpsc::Receiver<(Instant, ExitStatus, String)> {
        self.stdin.write_all(b"go\n").unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut child = self.child;
            let status = child.wait().unwrap();
            let ended = Instant::now();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            tx.send((ended, status, err)).unwrap();
        });
        rx
    }
}

/// Two `locksfile run --mode process -w 10` owners in a cycle: the one
/// whose wait closes it is refused with the deadlock reported (exit 1 and
/// the message) within `PROMPT`, not after its 10 s, and the other is
/// granted once it has gone.
#[test]
fn a_timed_wait_that_closes_a_cycle_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.lock");
    let a = Owner::start(&file, 0, 1);
    let b = Owner::start(&file, 1, 0);
    let a_pid = a.pid();
    let a_ended = a.go();
    let start = Instant::now();
    while !waits_in_kernel(&file, a_pid) {
        assert!(start.elapsed() < Duration::from_secs(20), "A never waited");
        std::thread::yield_now();
    }
    let closed = Instant::now();
    let b_ended = b.go();
    let (b_at, b_status, b_err) = b_ended
        .recv_timeout(Duration::from_secs(20))
        .expect("B ended");
    let took = b_at - closed;
    println!(
        "locksfile run -w 10, process mode: deadlock reported {:.1} ms after the cycle closed \
         (exit {:?}): {}",
        took.as_secs_f64() * 1e3,
        b_status.code(),
        b_err.trim()
    );
    assert_eq!(b_status.code(), Some(1), "{b_err}");
    assert!(b_err.contains("would deadlock"), "{b_err}");
    assert!(
        took < PROMPT,
        "the deadlock came {took:?} after the cycle closed"
    );
    let (_, a_status, a_err) = a_ended
        .recv_timeout(Duration::from_secs(20))
        .expect("A ended");
    assert_eq!(a_status.code(), Some(0), "A was not granted: {a_err}");
}

/// `locksfile run --mode shm -w 5` among eight readers that keep lock 0
/// read-locked (each read held 200 ms, a new one every 25 ms, so reads
/// always overlap) is granted within 1 s: shm grants in order.
#[test]
fn a_timed_shm_writer_among_busy_readers_is_granted() {
    const READERS: u32 = 8;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.lock");
    let stop = AtomicBool::new(false);
    let (started_tx, started) = mpsc::channel();
    std::thread::scope(|s| {
        for k in 0..READERS {
            let (file, stop, started_tx) = (&file, &stop, started_tx.clone());
            s.spawn(move || {
                let lf = LockFile::options().mode(Mode::Shm).open(file).unwrap();
                std::thread::sleep(Duration::from_millis(25) * k);
                let mut first = true;
                while !stop.load(Ordering::SeqCst) {
                    let g = lf.read(0).unwrap();
                    if first {
                        started_tx.send(()).unwrap();
                        first = false;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    drop(g);
                }
            });
        }
        for _ in 0..READERS {
            started.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        let started = Instant::now();
        let out = run(&[
            "run",
            "--mode",
            "shm",
            "-v",
            "-w",
            "5",
            "-i",
            "0",
            file.to_str().unwrap(),
            "--",
            "true",
        ]);
        let total = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        let err = stderr(&out);
        assert_eq!(code(&out), 0, "{err}");
        // "locksfile: got exclusive lock on 0 of FILE after 0.190 s"
        let waited: f64 = err
            .lines()
            .find_map(|l| l.split(" after ").nth(1)?.strip_suffix(" s")?.parse().ok())
            .unwrap_or_else(|| panic!("no wait reported: {err}"));
        println!(
            "locksfile run --mode shm -w 5 among {READERS} busy readers: granted after {:.1} ms \
             ({:.1} ms from start to exit)",
            waited * 1e3,
            total.as_secs_f64() * 1e3
        );
        assert!(waited < 1.0, "the writer waited {waited} s");
    });
}
