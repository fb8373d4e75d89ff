//! `locksfile run FILE COMMAND` with no index keeps util-linux `flock(1)`
//! out, and is kept out by it, while still excluding byte-range users of
//! the file; flock(1)'s own command line (no `run`) works; `status` names
//! the shell that holds a descriptor-form lock, not `locksfile`.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn lock_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.lock");
    (dir, path)
}

/// Try a write lock on byte 0 of `file` with `fcntl` (`cmd` F_SETLK or
/// F_OFD_SETLK) from this process: true when it was granted.
fn fcntl_byte_0(file: &Path, cmd: libc::c_int) -> bool {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    // SAFETY: an all-zero flock is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    // SAFETY: a valid descriptor and a pointer to a live flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r == -1 {
        let e = std::io::Error::last_os_error().raw_os_error();
        assert!(
            matches!(e, Some(libc::EAGAIN | libc::EACCES)),
            "fcntl: {e:?}"
        );
    }
    r == 0
}

#[test]
fn run_without_an_index_keeps_out_flock_1_and_byte_range_users() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &[]);
    assert_eq!(flock_n(&f, &["-x"]), 1, "flock(1) ran under run's lock");
    assert_eq!(flock_n(&f, &["-s"]), 1);
    assert!(!fcntl_byte_0(&f, libc::F_OFD_SETLK), "OFD lock on byte 0");
    assert!(!fcntl_byte_0(&f, libc::F_SETLK), "POSIX lock on byte 0");
    let st = status_json(&f);
    let mut modes: Vec<&str> = st["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mode"].as_str().unwrap())
        .collect();
    modes.sort_unstable();
    assert_eq!(modes, ["flock", "ofd"], "{st}");
    assert_eq!(h.release(), 0);
    assert_eq!(flock_n(&f, &["-x"]), 0, "released");
    assert!(fcntl_byte_0(&f, libc::F_OFD_SETLK));

    // A shared run lets shared flock(1) users in, not exclusive ones.
    let h = Holder::start(&f, &["-s"]);
    assert_eq!(flock_n(&f, &["-s"]), 0);
    assert_eq!(flock_n(&f, &["-x"]), 1);
    assert_eq!(h.release(), 0);

    // Explicit indices and --mode flock are as before.
    let h = Holder::start(&f, &["-i", "0"]);
    assert_eq!(flock_n(&f, &["-x"]), 0);
    assert_eq!(run_n(&f, &[]), 1, "the OFD range is still taken");
    assert_eq!(flock_n(&f, &["-x"]), 0, "the flock(2) lock was given back");
    assert_eq!(h.release(), 0);
    let h = Holder::start(&f, &["--mode", "flock"]);
    assert!(fcntl_byte_0(&f, libc::F_OFD_SETLK));
    assert_eq!(h.release(), 0);
}

#[test]
fn flock_1_keeps_out_run_without_an_index() {
    let (_d, f) = lock_file();
    let x = FlockCmd::hold(&f, &["-x"]);
    assert_eq!(run_n(&f, &[]), 1, "run ran under flock(1)'s lock");
    assert_eq!(run_n(&f, &["-s"]), 1);
    assert_eq!(run_n(&f, &["-E", "9"]), 9);
    let out = run(&["run", "-w", "0.2", f.to_str().unwrap(), "true"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    // The OFD range was never taken while flock(1) held the file.
    assert!(fcntl_byte_0(&f, libc::F_OFD_SETLK));
    // Indices given: byte-range locks only, as before.
    assert_eq!(run_n(&f, &["-i", "0"]), 0);
    x.release();
    assert_eq!(run_n(&f, &[]), 0);

    let s = FlockCmd::hold(&f, &["-s"]);
    assert_eq!(run_n(&f, &["-s"]), 0);
    assert_eq!(run_n(&f, &[]), 1);
    s.release();
}

#[test]
fn flock_1_command_line_without_run() {
    let (d, f) = lock_file();
    let file = f.to_str().unwrap();
    let out = run(&["-n", file, "-c", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&[file, "-c", "exit 3"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let out = run(&[file, "sh", "-c", "exit 4"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));

    let x = FlockCmd::hold(&f, &["-x"]);
    let out = run(&["-n", file, "-c", "true"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = run(&["-n", "-E", "7", file, "true"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    x.release();

    // A first word naming a subcommand is one; ./run is the file.
    let out = locksfile()
        .args(["-n", "./run", "-c", "true"])
        .current_dir(d.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(d.path().join("run").is_file());
    let out = run(&["status", file]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(code(&run(&["--help"])), 0);
    assert_eq!(code(&run(&["--version"])), 0);
}

/// `( locksfile run 9; locksfile status F ) 9>F`: the holder is the shell
/// that opened descriptor 9, not the `locksfile status` that inherited it
/// nor the `locksfile run` that took the lock and exited.
#[test]
fn status_names_the_shell_behind_a_descriptor_form_lock() {
    let (d, f) = lock_file();
    let g = d.path().join("g.lock");
    let out = Command::new("sh")
        .args([
            "-c",
            r#"exec 8>"$G" 9>"$F"
               "$L" run -n 9 || exit 9
               "$L" run -n --mode flock 8 || exit 8
               echo $$
               "$L" status --json "$F"
               "$L" status --json "$G""#,
        ])
        .env("L", BIN)
        .env("F", &f)
        .env("G", &g)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let shell: u64 = lines.next().unwrap().parse().unwrap();
    for (line, mode) in lines.zip(["ofd", "flock"]) {
        let st: serde_json::Value = serde_json::from_str(line).unwrap();
        let locks = st["locks"].as_array().unwrap();
        assert_eq!(locks.len(), 1, "{st}");
        assert_eq!(locks[0]["mode"], mode, "{st}");
        let pids: Vec<u64> = locks[0]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_u64().unwrap())
            .collect();
        assert_eq!(pids, [shell], "{mode}: {st}");
        assert_eq!(locks[0]["pid"].as_u64(), Some(shell), "{mode}: {st}");
        assert_ne!(locks[0]["command"], "locksfile", "{mode}: {st}");
    }
}
