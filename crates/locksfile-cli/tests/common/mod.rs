//! Helpers shared by the integration tests: the real binary, a holder
//! process that signals through a pipe once it has the lock, and status
//! snapshots.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_locksfile");

pub fn locksfile() -> Command {
    Command::new(BIN)
}

/// Run the binary to completion with no stdin.
pub fn run(args: &[&str]) -> Output {
    locksfile()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run locksfile")
}

/// `locksfile run -n OPTS FILE -- true`: its exit code (1 when refused).
pub fn run_n(file: &Path, opts: &[&str]) -> i32 {
    let mut args = vec!["run", "-n"];
    args.extend_from_slice(opts);
    args.push(file.to_str().unwrap());
    args.extend_from_slice(&["--", "true"]);
    code(&run(&args))
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `locksfile run OPTS FILE -- sh -c 'echo ready; read x'`: holds its lock
/// from the moment it says "ready" until [`Holder::release`].
pub struct Holder {
    pub child: Child,
    stdin: Option<ChildStdin>,
}

impl Holder {
    pub fn start(file: &Path, opts: &[&str]) -> Holder {
        let mut child = locksfile()
            .arg("run")
            .args(opts)
            .arg(file)
            .args(["--", "sh", "-c", "echo ready; read x; exit 0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn holder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n", "holder did not get its lock");
        let stdin = child.stdin.take();
        Holder { child, stdin }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Let the command finish; returns the wrapper's exit code.
    pub fn release(mut self) -> i32 {
        self.stdin.take().unwrap().write_all(b"done\n").unwrap();
        self.child.wait().unwrap().code().unwrap()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait for a child with a watchdog (a test must fail, not hang).
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `locksfile status --json FILE`, parsed.
pub fn status_json(file: &Path) -> serde_json::Value {
    let out = run(&["status", "--json", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "status failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// Poll status until `pred` holds for some lock entry (the kernel shows a
/// blocked waiter only once it sleeps; there is no event to wait on).
pub fn await_lock(file: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status_json(file);
        if let Some(l) = st["locks"].as_array().unwrap().iter().find(|l| pred(l)) {
            return l.clone();
        }
        assert!(Instant::now() < until, "never saw the lock: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `flock -n ARGS FILE true`: 0 when it got the lock, 1 when busy.
pub fn flock_n(file: &Path, args: &[&str]) -> i32 {
    Command::new("flock")
        .arg("-n")
        .args(args)
        .arg(file)
        .arg("true")
        .status()
        .expect("run flock(1) from util-linux")
        .code()
        .unwrap()
}

/// A `flock(1)` process holding FILE until its stdin closes.
pub struct FlockCmd(std::process::Child);

impl FlockCmd {
    pub fn hold(file: &Path, args: &[&str]) -> FlockCmd {
        let mut child = Command::new("flock")
            .args(args)
            .arg(file)
            .args(["sh", "-c", "echo held; read _ || true"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run flock(1) from util-linux");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "held\n", "flock(1) did not take the lock");
        FlockCmd(child)
    }

    pub fn release(mut self) {
        drop(self.0.stdin.take());
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for FlockCmd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test's PostgreSQL server (`LOCKSFILE_TEST_PG`, which `scripts/test`
/// sets), or `None` to skip; with `LOCKSFILE_REQUIRE_PG` set a missing
/// server fails the test instead.
pub fn server() -> Option<String> {
    match std::env::var("LOCKSFILE_TEST_PG") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("LOCKSFILE_REQUIRE_PG").is_none(),
                "LOCKSFILE_TEST_PG is not set but LOCKSFILE_REQUIRE_PG is"
            );
            eprintln!("skipped: no PostgreSQL server (set LOCKSFILE_TEST_PG, or run scripts/test)");
            None
        }
    }
}

/// One value from `psql` as the server's superuser.
pub fn psql(srv: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([srv, "-XAtqc", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `locksfile doctor --json TARGET`: its exit code and findings.
pub fn doctor(target: &str) -> (i32, serde_json::Value) {
    let out = run(&["doctor", "--json", target]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("doctor printed no JSON: {}", stderr(&out)));
    (code(&out), v)
}

/// The status and message of doctor's finding `check`.
pub fn finding<'a>(v: &'a serde_json::Value, check: &str) -> (&'a str, &'a str) {
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {v}"));
    (
        f["status"].as_str().unwrap(),
        f["message"].as_str().unwrap(),
    )
}
