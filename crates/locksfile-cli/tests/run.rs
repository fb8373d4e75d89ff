//! `locksfile run` against real processes holding real locks.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn lock_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.lock");
    (dir, path)
}

fn try_run(file: &std::path::Path, opts: &[&str]) -> i32 {
    let mut args = vec!["run"];
    args.extend_from_slice(opts);
    args.push(file.to_str().unwrap());
    args.extend_from_slice(&["--", "true"]);
    code(&run(&args))
}

#[test]
fn conflicting_and_free_indices() {
    for mode in ["ofd", "process"] {
        let (_d, f) = lock_file();
        let h = Holder::start(&f, &["--mode", mode, "-i", "3"]);
        for m in ["ofd", "process"] {
            assert_eq!(
                try_run(&f, &["--mode", m, "-n", "-i", "3"]),
                1,
                "{mode}/{m}"
            );
            assert_eq!(try_run(&f, &["--mode", m, "-n", "-i", "2..=3"]), 1);
            assert_eq!(try_run(&f, &["--mode", m, "-n", "-i", ".."]), 1);
            assert_eq!(try_run(&f, &["--mode", m, "-n", "-i", "4"]), 0);
            assert_eq!(try_run(&f, &["--mode", m, "-n", "-i", "0..3"]), 0);
            assert_eq!(
                try_run(&f, &["--mode", m, "-n"]),
                0,
                "default index 0 is free"
            );
        }
        assert_eq!(h.release(), 0);
        assert_eq!(
            try_run(&f, &["-n", "-i", "3"]),
            0,
            "released with the command"
        );
    }
}

#[test]
fn verbose_conflict_names_the_holder() {
    for mode in ["ofd", "process"] {
        let (_d, f) = lock_file();
        let h = Holder::start(&f, &["--mode", mode, "-i", "2..5"]);
        let out = run(&[
            "run",
            "-v",
            "-n",
            "-i",
            "3",
            f.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert_eq!(code(&out), 1);
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "held by pid {} (locksfile running sh -c 'echo ready; read x; exit 0')",
                h.pid()
            )),
            "{err}"
        );
        h.release();
    }
}

#[test]
fn start_and_count_name_a_span() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["--start", "3", "--count", "2"]);
    assert_eq!(try_run(&f, &["-n", "-i", "4"]), 1);
    assert_eq!(try_run(&f, &["-n", "-i", "5"]), 0);
    assert_eq!(try_run(&f, &["-n", "--start", "2"]), 0);
    assert_eq!(try_run(&f, &["-n", "--start", "2", "--count", "2"]), 1);
    h.release();
}

#[test]
fn shared_excludes_only_exclusive() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["-s", "-i", "5"]);
    assert_eq!(try_run(&f, &["-n", "-s", "-i", "5"]), 0);
    assert_eq!(
        try_run(&f, &["-n", "--mode", "process", "--shared", "-i", "5"]),
        0
    );
    assert_eq!(try_run(&f, &["-n", "-x", "-i", "5"]), 1);
    assert_eq!(
        try_run(&f, &["-n", "-i", "5"]),
        1,
        "exclusive is the default"
    );
    h.release();

    let h = Holder::start(&f, &["-x", "-i", "5"]);
    assert_eq!(try_run(&f, &["-n", "-s", "-i", "5"]), 1);
    h.release();
}

#[test]
fn conflict_exit_code() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &[]);
    assert_eq!(try_run(&f, &["-n", "-E", "42"]), 42);
    assert_eq!(try_run(&f, &["-w", "0", "--conflict-exit-code", "7"]), 7);
    assert_eq!(try_run(&f, &["-n", "-E", "42", "-i", "1"]), 0);
    h.release();
}

#[test]
fn timeout_waits_about_as_long_as_asked() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &[]);
    for mode in ["ofd", "process"] {
        let t = Instant::now();
        assert_eq!(try_run(&f, &["--mode", mode, "-w", "0.4", "-E", "9"]), 9);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(400),
            "{mode}: gave up after {took:?}"
        );
        assert!(took < Duration::from_secs(5), "{mode}: took {took:?}");
    }
    h.release();
}

#[test]
fn blocked_run_proceeds_when_the_holder_ends() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["--mode", "process"]);
    let waiter = locksfile()
        .args([
            "run",
            "--mode",
            "process",
            f.to_str().unwrap(),
            "--",
            "echo",
            "got it",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let wpid = waiter.id() as u64;
    // The kernel lists the waiter once it sleeps in F_SETLKW.
    await_lock(&f, |l| l["state"] == "waiting" && l["pid"] == wpid);
    assert_eq!(h.release(), 0);
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(code(&out), 0);
    assert_eq!(stdout(&out), "got it\n");
}

#[test]
fn exit_status_and_signals_pass_through() {
    let (_d, f) = lock_file();
    let p = f.to_str().unwrap();
    assert_eq!(code(&run(&["run", p, "--", "sh", "-c", "exit 7"])), 7);
    assert_eq!(code(&run(&["run", p, "--", "true"])), 0);
    assert_eq!(
        code(&run(&["run", p, "--", "sh", "-c", "kill -TERM $$"])),
        143
    );
    assert_eq!(
        code(&run(&["run", p, "--", "sh", "-c", "kill -KILL $$"])),
        137
    );
    // However the command ended, the lock is free again.
    assert_eq!(try_run(&f, &["-n"]), 0);
    // Options after the command are the command's.
    let out = run(&["run", p, "sh", "-c", "echo \"$0\"", "-x"]);
    assert_eq!(stdout(&out), "-x\n");
}

#[test]
fn a_signal_to_run_goes_to_the_command_and_the_lock_lasts_until_it_ends() {
    let (_d, f) = lock_file();
    // The command catches SIGTERM, says so, and goes on until told to stop:
    // the lock must outlive the signal and last until the command ends.
    let mut child = locksfile()
        .args(["run", f.to_str().unwrap(), "--", "sh", "-c"])
        .arg("trap 'echo term' TERM; echo ready; while :; do read l; [ \"$l\" = stop ] && exit 5; done")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "term\n", "the command got the signal");
    let mut stdin = child.stdin.take().unwrap();
    assert_eq!(
        try_run(&f, &["-n"]),
        1,
        "still locked while the command runs"
    );
    stdin.write_all(b"stop\n").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(5));
    assert_eq!(try_run(&f, &["-n"]), 0);

    // A command that does not catch it dies of it: 128 + 15.
    let mut h = Holder::start(&f, &[]);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(h.pid() as i32, libc::SIGTERM) }, 0);
    assert_eq!(h.child.wait().unwrap().code(), Some(143));
    assert_eq!(try_run(&f, &["-n"]), 0);
}

#[test]
fn the_command_does_not_inherit_the_lock_descriptor() {
    let (_d, f) = lock_file();
    let out = run(&[
        "run",
        f.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "for fd in /proc/$$/fd/*; do readlink \"$fd\"; done; exit 0",
    ]);
    assert_eq!(code(&out), 0);
    let fds = stdout(&out);
    assert!(!fds.is_empty());
    assert!(
        !fds.contains("data.lock"),
        "lock fd leaked into the command:\n{fds}"
    );
}

#[test]
fn bad_input_gets_sysexits_codes_and_messages() {
    let (d, f) = lock_file();
    let p = f.to_str().unwrap();

    let out = run(&["run", "--bogus", p, "--", "true"]);
    assert_eq!(code(&out), 64);
    assert!(stderr(&out).contains("--bogus"));

    let out = run(&["run", "-i", "5..2", p, "--", "true"]);
    assert_eq!(code(&out), 64);
    assert!(
        stderr(&out).contains("ends before it starts"),
        "{}",
        stderr(&out)
    );
    let out = run(&["run", "-i", "x", p, "--", "true"]);
    assert_eq!(code(&out), 64);
    let out = run(&["run", "--start", "1", "--count", "0", p, "--", "true"]);
    assert_eq!(code(&out), 64);
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
    let out = run(&["run", "-w", "soon", p, "--", "true"]);
    assert_eq!(code(&out), 64);

    let out = run(&["run", p]);
    assert_eq!(code(&out), 64);
    assert!(stderr(&out).contains("COMMAND"), "{}", stderr(&out));
    assert_eq!(code(&run(&["run", p, "--"])), 64);
    assert_eq!(code(&run(&["frobnicate"])), 64);

    let out = run(&["run", d.path().to_str().unwrap(), "--", "true"]);
    assert_eq!(code(&out), 66);
    assert!(stderr(&out).contains("directory"), "{}", stderr(&out));

    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let mut child = locksfile()
        .args(["run", fifo.to_str().unwrap(), "--", "true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_bounded(&mut child, Duration::from_secs(10)).expect("a FIFO hung run");
    assert_eq!(st.code(), Some(66));

    let link = d.path().join("link.lock");
    std::os::unix::fs::symlink(&f, &link).unwrap();
    let out = run(&["run", link.to_str().unwrap(), "--", "true"]);
    assert_eq!(code(&out), 66);
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    let h = Holder::start(&f, &[]);
    let out = run(&["run", "-L", "-n", link.to_str().unwrap(), "--", "true"]);
    assert_eq!(code(&out), 1, "-L locks the target: {}", stderr(&out));
    h.release();

    let out = run(&["run", "/nonexistent-dir/x.lock", "--", "true"]);
    assert_eq!(code(&out), 66);
    assert!(
        stderr(&out).contains("cannot open lock file"),
        "{}",
        stderr(&out)
    );

    let out = run(&["run", p, "--", "/nonexistent/command"]);
    assert_eq!(code(&out), 69);
    assert!(stderr(&out).contains("cannot run"), "{}", stderr(&out));
}

#[test]
fn the_lock_file_is_never_written() {
    let (_d, f) = lock_file();
    std::fs::write(&f, b"precious").unwrap();
    let before = std::fs::metadata(&f).unwrap();
    let p = f.to_str().unwrap();
    for args in [
        vec!["run", "-i", "0..", p, "--", "true"],
        vec!["run", "--mode", "process", "-s", "-i", "3", p, "--", "true"],
        vec!["status", p],
    ] {
        assert_eq!(code(&run(&args)), 0);
    }
    let h = Holder::start(&f, &["-i", "1..4"]);
    assert_eq!(try_run(&f, &["-n", "-i", "2"]), 1);
    h.release();
    assert_eq!(std::fs::read(&f).unwrap(), b"precious");
    let after = std::fs::metadata(&f).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (before.mtime(), before.mtime_nsec()),
        (after.mtime(), after.mtime_nsec())
    );

    // A missing file is created empty.
    let (_d2, g) = lock_file();
    assert_eq!(try_run(&g, &[]), 0);
    assert_eq!(std::fs::metadata(&g).unwrap().len(), 0);
}

#[test]
fn the_command_dies_with_run_so_it_never_runs_unlocked() {
    let (_d, f) = lock_file();
    let mut child = locksfile()
        .args([
            "run",
            f.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 600",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    child.kill().unwrap(); // SIGKILL: no chance to pass anything on
    child.wait().unwrap();
    // The command's end of the pipe closes only when the command is gone.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = tx.send(out.read_line(&mut rest).map(|n| (n, rest)).ok());
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    assert!(
        matches!(got, Ok(Some((0, _)))),
        "the command outlived run: {got:?}"
    );
    assert_eq!(try_run(&f, &["-n"]), 0);
}

/// `-w` with more seconds than the clock can hold (or `inf`) waits as long
/// as it takes, sleeping in the kernel like a run without `-w`, and runs the
/// command once the holder is gone; a negative or NaN timeout is a usage
/// error.
#[test]
fn a_timeout_past_the_clocks_range_waits_as_long_as_it_takes() {
    for secs in ["1e19", "inf", "1e300"] {
        let (_d, f) = lock_file();
        let h = Holder::start(&f, &["--mode", "process"]);
        let mut waiter = locksfile()
            .args(["run", "--mode", "process", "-w", secs])
            .arg(&f)
            .args(["--", "echo", "got it"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let wpid = waiter.id() as u64;
        await_lock(&f, |l| l["state"] == "waiting" && l["pid"] == wpid);
        assert!(
            waiter.try_wait().unwrap().is_none(),
            "-w {secs} gave up while the lock was held"
        );
        assert_eq!(h.release(), 0);
        let out = waiter.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "-w {secs}: {}", stderr(&out));
        assert_eq!(stdout(&out), "got it\n");
    }
    let (_d, f) = lock_file();
    for secs in ["-1", "nan", "-inf"] {
        let out = run(&["run", "-w", secs, f.to_str().unwrap(), "--", "true"]);
        assert_eq!(code(&out), 64, "-w {secs}: {}", stderr(&out));
    }
}

/// `locksfile run FILE -- true` with standard descriptors 0, 1, 2 closed and
/// `RLIMIT_NOFILE` at `limit`. The dynamic loader has room (0 is free while
/// it runs); std's start-up then fills 0, 1 and 2 with `/dev/null`, so the
/// program itself has exactly `limit - 3` descriptors left.
fn run_with_descriptor_limit(file: &std::path::Path, limit: u64) -> i32 {
    use std::os::unix::process::CommandExt;
    let mut cmd = locksfile();
    cmd.arg("run").arg(file).args(["--", "true"]);
    // SAFETY: the closure only makes async-signal-safe calls (close,
    // setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in 0..3 {
                libc::close(fd);
            }
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.status()
        .expect("spawn locksfile")
        .code()
        .expect("exited")
}

/// Running out of descriptors is `EX_OSERR` (71), whether opening the lock
/// file meets `EMFILE` or starting the command does; the open's errno is
/// no longer lost on the way.
#[test]
fn out_of_descriptors_exits_71() {
    let (_d, f) = lock_file();
    // No descriptor at all for the lock file.
    assert_eq!(run_with_descriptor_limit(&f, 3), 71, "open meets EMFILE");
    // The lock file opens, the command's start-up pipe does not.
    assert_eq!(run_with_descriptor_limit(&f, 4), 71, "spawn meets EMFILE");
    // Enough room: it runs.
    assert_eq!(run_with_descriptor_limit(&f, 64), 0);
}

/// A lock file that cannot be created on a read-only file system is
/// `EX_CANTCREAT` (73), as documented; a missing directory stays 66.
#[test]
fn read_only_file_system_exits_73() {
    let dir = tempfile::tempdir().unwrap();
    let c = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    let tmpfs = std::ffi::CString::new("tmpfs").unwrap();
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe {
        libc::mount(
            tmpfs.as_ptr(),
            c.as_ptr(),
            tmpfs.as_ptr(),
            libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "mount a read-only tmpfs: {e}"
        );
        eprintln!("skipped: this sandbox does not allow mounting ({e})");
        return;
    }
    struct Unmount<'a>(&'a std::ffi::CString);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            // SAFETY: a valid NUL-terminated path we mounted on.
            unsafe { libc::umount(self.0.as_ptr()) };
        }
    }
    let _unmount = Unmount(&c);
    let f = dir.path().join("data.lock");
    let out = run(&["run", f.to_str().unwrap(), "--", "true"]);
    assert_eq!(code(&out), 73, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    let missing = dir.path().join("no-such-dir").join("data.lock");
    assert_eq!(
        code(&run(&["run", missing.to_str().unwrap(), "--", "true"])),
        66
    );
}

/// Output of `sh -c SCRIPT`, with `$L` naming the binary and `$F` the lock file.
fn shell(script: &str, file: &std::path::Path) -> std::process::Output {
    std::process::Command::new("sh")
        .args(["-c", script])
        .env("L", BIN)
        .env("F", file)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn dash_c_runs_its_command_through_sh() {
    let (_d, f) = lock_file();
    let p = f.to_str().unwrap();
    // A pipe and an exit status only a shell gives, after FILE or before it.
    let out = run(&["run", p, "-c", "echo a b | tr ' ' _; exit 3"]);
    assert_eq!((code(&out), stdout(&out).as_str()), (3, "a_b\n"));
    let out = run(&["run", "-n", "-c", "echo $0", p]);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "/bin/sh\n"));
    // The lock is held while it runs.
    let out = run(&[
        "run",
        p,
        "-c",
        &format!("{BIN} run -n {p} -- true; echo $?"),
    ]);
    assert_eq!(stdout(&out), "1\n");
    // Either -c or a command, not both.
    assert_eq!(code(&run(&["run", p, "-c", "true", "--", "true"])), 64);
}

#[test]
fn dash_e_is_exclusive_and_dash_o_is_accepted() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["-s"]);
    assert_eq!(try_run(&f, &["-s", "-n"]), 0);
    assert_eq!(try_run(&f, &["-e", "-n"]), 1, "-e takes an exclusive lock");
    assert_eq!(try_run(&f, &["-x", "-n"]), 1);
    h.release();
    // -o closes the lock descriptor before the command: ours always is.
    let out = run(&[
        "run",
        "-o",
        f.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "for fd in /proc/$$/fd/*; do readlink \"$fd\"; done; exit 0",
    ]);
    assert_eq!(code(&out), 0);
    assert!(!stdout(&out).contains("data.lock"), "{}", stdout(&out));
    assert_eq!(code(&run(&["run", "-o", "-F", "x", "--", "true"])), 64);
}

/// The descriptor form of flock(1): the lock is taken on the shell's open
/// file description, outlives `locksfile run`, and ends with the subshell
/// (or `-u`).
#[test]
fn descriptor_form_leaves_the_lock_with_the_shell() {
    let (_d, f) = lock_file();
    let out = shell(
        r#"( "$L" run -n 9 || exit 9
             "$L" run -n "$F" -- true; echo "held $?"
             "$L" run -n -s -i 1 "$F" -- true; echo "other index $?"
             "$L" run -u 9; echo "unlock $?"
             "$L" run -n "$F" -- true; echo "unlocked $?"
             "$L" run -n -i 0..4 9; echo "relock $?"
             "$L" run -n -i 3 "$F" -- true; echo "held again $?"
           ) 9>"$F"
           "$L" run -n -i 0..4 "$F" -- true; echo "after the subshell $?""#,
        &f,
    );
    assert_eq!(
        stdout(&out),
        "held 1\nother index 0\nunlock 0\nunlocked 0\nrelock 0\nheld again 1\n\
         after the subshell 0\n",
        "{}",
        stderr(&out)
    );

    // A held lock makes the descriptor form wait, or fail with -n (-E).
    let h = Holder::start(&f, &[]);
    let out = shell(r#"( "$L" run -n -E 7 9; echo "busy $?" ) 9>"$F""#, &f);
    assert_eq!(stdout(&out), "busy 7\n", "{}", stderr(&out));
    h.release();

    // Read-only descriptor: shared yes, exclusive is EX_NOPERM.
    let out = shell(
        r#"( "$L" run -s -n 9; echo "shared $?"; "$L" run -x -n 9; echo "exclusive $?" ) 9<"$F""#,
        &f,
    );
    assert_eq!(stdout(&out), "shared 0\nexclusive 77\n", "{}", stderr(&out));
    // Write-only descriptor: the other way round.
    let out = shell(
        r#"( "$L" run -s -n 9; echo "shared $?"; "$L" run -x -n 9; echo "exclusive $?" ) 9>"$F""#,
        &f,
    );
    assert_eq!(stdout(&out), "shared 77\nexclusive 0\n", "{}", stderr(&out));

    // Not open, process mode, a command with -u: refused.
    let out = shell(r#"exec 9>&-; "$L" run 9"#, &f);
    assert_eq!(code(&out), 66, "{}", stderr(&out));
    assert!(stderr(&out).contains("not open"), "{}", stderr(&out));
    let out = shell(r#""$L" run --mode process 9 9>"$F""#, &f);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("process"), "{}", stderr(&out));
    assert_eq!(
        code(&run(&["run", "-u", f.to_str().unwrap(), "--", "true"])),
        64
    );
}

/// `-F` execs the command in place (same pid), and the command holds the
/// lock through the descriptor it inherits, in both modes.
#[test]
fn no_fork_execs_the_command_which_holds_the_lock() {
    for mode in ["ofd", "process"] {
        let (_d, f) = lock_file();
        let p = f.to_str().unwrap();
        let child = locksfile()
            .args(["run", "-F", "--mode", mode, p, "--", "sh", "-c"])
            .arg(format!(
                "echo $$; {BIN} run -n {p} -- true; echo $?; {BIN} run -n -i 1 {p} -- true; echo $?"
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            stdout(&out),
            format!("{pid}\n1\n0\n"),
            "{mode}: not exec'd or lock not held"
        );
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(try_run(&f, &["-n"]), 0, "released when the command ended");
    }
}

/// The open flags of the lock descriptors of the `locksfile run` that is
/// the command's parent, as the command sees them in /proc (with no index,
/// two: the flock(2) one and the OFD one, opened alike).
fn lock_fd_flags(opts: &[&str]) -> u32 {
    let (_d, f) = lock_file();
    let mut args = vec!["run"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[f.to_str().unwrap(), "--", "sh", "-c"]);
    let script = format!(
        "for fd in /proc/$PPID/fd/*; do [ \"$(readlink $fd)\" = {} ] && \
         sed -n 's/^flags:[[:space:]]*//p' /proc/$PPID/fdinfo/${{fd##*/}}; done; exit 0",
        f.display()
    );
    args.push(&script);
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let flags: Vec<u32> = stdout(&out)
        .lines()
        .map(|l| u32::from_str_radix(l.trim(), 8).expect("octal flags lines"))
        .collect();
    assert!(!flags.is_empty(), "no lock descriptor found");
    let acc = libc::O_ACCMODE as u32;
    assert!(flags.iter().all(|f| f & acc == flags[0] & acc), "{flags:?}");
    flags[0]
}

#[test]
fn a_shared_lock_opens_the_file_read_only() {
    let acc = libc::O_ACCMODE as u32;
    assert_eq!(lock_fd_flags(&["-s"]) & acc, libc::O_RDONLY as u32);
    assert_eq!(
        lock_fd_flags(&["-s", "--mode", "process"]) & acc,
        libc::O_RDONLY as u32
    );
    assert_eq!(lock_fd_flags(&[]) & acc, libc::O_RDWR as u32);
}

/// As another user: shared locks on a file we may only read work (a script
/// locking itself with `-s "$0"`), exclusive ones are EX_NOPERM (77).
#[test]
fn another_users_file_takes_shared_locks() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if !root || !setpriv.exists() {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = dir.path().join("data.lock");
    std::fs::write(&f, b"").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The other user runs a copy of the binary from this world-readable
    // directory: the build's own folder may be closed to others.
    let bin_copy = dir.path().join("locksfile");
    std::fs::copy(BIN, &bin_copy).unwrap();
    std::fs::set_permissions(&bin_copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shown = bin_copy.display();
    let script = dir.path().join("self-locking");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$LOCKER\" = \"$0\" ] || exec env LOCKER=\"$0\" {shown} run -s -n \"$0\" \"$0\" \"$@\"\n\
             {shown} status --json \"$0\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let bin = bin_copy.as_os_str();
    let out = nobody(&[
        bin,
        "run".as_ref(),
        "-s".as_ref(),
        f.as_ref(),
        "true".as_ref(),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = nobody(&[
        bin,
        "run".as_ref(),
        "-x".as_ref(),
        f.as_ref(),
        "true".as_ref(),
    ]);
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    let out = nobody(&[script.as_os_str()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The script runs under its own shared lock (with no index, a
    // flock(2) lock on the whole file and an OFD lock on index 0).
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let locks = st["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 2, "{st}");
    for l in locks {
        assert_eq!(
            (l["kind"].as_str(), l["state"].as_str()),
            (Some("shared"), Some("held")),
            "{st}"
        );
    }
}
