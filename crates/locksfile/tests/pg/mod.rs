//! Helpers for the tests against a real PostgreSQL server: the server is
//! named by `LOCKSFILE_TEST_PG` (a URL; `scripts/test` starts a throwaway
//! cluster and sets it). Without it a test is skipped with a message,
//! unless `LOCKSFILE_REQUIRE_PG` is set (as `scripts/test` does), when it
//! fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use locksfile::LockFile;

pub mod bouncer;
pub mod cluster;

/// How long any step may take before the test is declared stuck.
pub const STUCK: Duration = Duration::from_secs(20);

/// The server URL (without `name=`), or `None` to skip.
pub fn server() -> Option<String> {
    match std::env::var("LOCKSFILE_TEST_PG") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("LOCKSFILE_REQUIRE_PG").is_none(),
                "LOCKSFILE_TEST_PG is not set but LOCKSFILE_REQUIRE_PG is: \
                 run through scripts/test, which starts a server"
            );
            eprintln!("skipped: no PostgreSQL server (set LOCKSFILE_TEST_PG, or run scripts/test)");
            None
        }
    }
}

/// A target for a namespace of its own for this test.
pub fn target(server: &str, test: &str) -> String {
    let sep = if server.contains('?') { '&' } else { '?' };
    format!("{server}{sep}name={test}-{}", std::process::id())
}

/// A session whose threads share its locks (`Threads::Share`), as
/// `common::open` opens files: these tests drive one owner from several
/// threads; `thread_parties.rs` tests the default.
pub fn connect(target: &str) -> LockFile {
    LockFile::options()
        .threads(locksfile::Threads::Share)
        .connect(target)
        .unwrap_or_else(|e| panic!("connect {target}: {e}"))
}

/// One value from `psql` as the server's superuser (for what the tests
/// check on the server's side).
pub fn psql(server: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([server, "-XAtqc", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Wait until `f` holds, polling the server (a state another session
/// reaches: no pipe reaches into the server).
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < STUCK, "stuck waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How many advisory lock requests wait in the namespace of `target`
/// (so that tests running beside each other do not count each other's).
pub fn waiting(server: &str, target: &str) -> usize {
    let name = target.rsplit_once("name=").map_or("", |(_, n)| n);
    psql(
        server,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND objsubid = 2 AND classid = \
             (SELECT id FROM locksfile_namespaces WHERE name = '{name}')::oid"
        ),
    )
    .parse()
    .unwrap()
}

/// A child process (this test binary, running `child_main`) that connects
/// to `target` and does `action` (`hold-x:IDX`, `wait-x:IDX`), printing
/// `ready` once done (or once its wait is sent).
pub struct ChildProc {
    pub child: Child,
    pub lines: BufReader<std::process::ChildStdout>,
}

impl ChildProc {
    pub fn spawn(test_binary_filter: &str, target: &str, action: &str) -> ChildProc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                test_binary_filter,
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LOCKSFILE_PG_CHILD_TARGET", target)
            .env("LOCKSFILE_PG_CHILD_ACTION", action)
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let lines = BufReader::new(child.stdout.take().unwrap());
        ChildProc { child, lines }
    }

    /// Read lines until `ready`.
    pub fn ready(&mut self) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.lines.read_line(&mut line).unwrap();
            assert!(n > 0, "child ended before it was ready");
            if line.trim_end().ends_with("ready") {
                return;
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of a child process; returns unless this process is one.
pub fn child_main() {
    let (Ok(target), Ok(action)) = (
        std::env::var("LOCKSFILE_PG_CHILD_TARGET"),
        std::env::var("LOCKSFILE_PG_CHILD_ACTION"),
    ) else {
        return;
    };
    let lf = LockFile::connect(&target).expect("child connects");
    let (verb, idx) = action.split_once(':').unwrap();
    let idx: u64 = idx.parse().unwrap();
    match verb {
        "hold-x" => {
            let _g = lf.write(idx).unwrap();
            println!("ready");
            // Until killed, or the parent closes our stdin.
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        }
        "wait-x" => {
            println!("ready");
            let _g = lf.write(idx).unwrap();
            println!("granted");
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        }
        other => panic!("unknown action {other}"),
    }
    std::process::exit(0);
}
