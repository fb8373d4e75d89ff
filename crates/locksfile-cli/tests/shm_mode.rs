//! `locksfile run --mode shm`: shm runs exclude each other, never meet the
//! kernel modes silently (refused, exit 69), cannot hand their lock over
//! (`-F`, the descriptor form), and a killed holder's lock is taken over.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
fn shm_runs_exclude_each_other_by_span_and_kind() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["--mode", "shm", "-i", "3"]);
    let shm = ["--mode", "shm", "-n"];
    let with = |more: &[&'static str]| [&shm[..], more].concat();
    assert_eq!(try_run(&f, &with(&["-i", "3"])), 1);
    assert_eq!(try_run(&f, &with(&["-i", "2..=3"])), 1);
    assert_eq!(try_run(&f, &with(&["-i", ".."])), 1);
    assert_eq!(try_run(&f, &with(&["-s", "-i", "3"])), 1);
    assert_eq!(try_run(&f, &with(&["-i", "4"])), 0);
    assert_eq!(try_run(&f, &with(&["-i", "0..3"])), 0);
    assert_eq!(h.release(), 0);
    assert_eq!(
        try_run(&f, &with(&["-i", "3"])),
        0,
        "released with the command"
    );

    // Shared holders let readers in and keep writers out.
    let r = Holder::start(&f, &["--mode", "shm", "-s", "-i", "5.."]);
    assert_eq!(try_run(&f, &with(&["-s", "-i", "9"])), 0);
    assert_eq!(try_run(&f, &with(&["-i", "9"])), 1);
    assert_eq!(r.release(), 0);
}

#[test]
fn kernel_modes_and_shm_refuse_each_others_files() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["--mode", "shm", "-i", "3"]);
    for m in ["ofd", "process", "flock"] {
        let out = run(&["run", "--mode", m, "-n", f.to_str().unwrap(), "--", "true"]);
        assert_eq!(code(&out), 69, "--mode {m}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("shared-memory lock table"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(h.release(), 0);

    let k = Holder::start(&f, &["--mode", "ofd", "-i", "3"]);
    let out = run(&[
        "run",
        "--mode",
        "shm",
        "-n",
        "-i",
        "9",
        f.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("fcntl record locks"),
        "{}",
        stderr(&out)
    );
    assert_eq!(k.release(), 0);
    assert_eq!(try_run(&f, &["--mode", "shm", "-n", "-i", "9"]), 0);
}

#[test]
fn shm_locks_cannot_be_handed_over() {
    let (_d, f) = lock_file();
    let out = run(&[
        "run",
        "--mode",
        "shm",
        "-F",
        f.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(stderr(&out).contains("-F"), "{}", stderr(&out));
    assert!(!f.exists(), "a refused run created the file");

    std::fs::write(&f, b"").unwrap();
    let script = format!(
        "exec 9<>'{}'; {} run --mode shm -n 9; echo rc=$?",
        f.display(),
        BIN
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains("rc=64"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("--mode shm cannot lock descriptor 9"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn verbose_conflict_names_the_shm_holder() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["--mode", "shm", "-i", "2..5"]);
    let out = run(&[
        "run",
        "--mode",
        "shm",
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
            "exclusive SHM lock on 2..5 held by pid {}",
            h.pid()
        )),
        "{err}"
    );
    h.release();
}

#[test]
fn a_blocked_shm_run_proceeds_when_the_holder_ends_or_is_killed() {
    for kill in [false, true] {
        let (_d, f) = lock_file();
        let mut h = Holder::start(&f, &["--mode", "shm"]);
        let waiter = locksfile()
            .args([
                "run",
                "--mode",
                "shm",
                f.to_str().unwrap(),
                "--",
                "echo",
                "got it",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let wpid = waiter.id() as u64;
        // Queued in the table: status lists it with its pid.
        let w = await_lock(&f, |l| l["state"] == "waiting" && l["pid"] == wpid);
        assert_eq!(w["mode"], "shm");
        let released = Instant::now();
        if kill {
            // SIGKILL the holding locksfile itself: its lock must go with it.
            h.child.kill().unwrap();
            h.child.wait().unwrap();
        } else {
            assert_eq!(h.release(), 0);
        }
        let out = waiter.wait_with_output().unwrap();
        assert_eq!(code(&out), 0);
        assert_eq!(stdout(&out), "got it\n");
        assert!(
            released.elapsed() < Duration::from_secs(2),
            "took {:?} (killed: {kill})",
            released.elapsed()
        );
    }
}

#[test]
fn the_sidecar_gets_the_lock_files_mode_and_the_lock_file_is_untouched() {
    let (_d, f) = lock_file();
    std::fs::write(&f, b"precious").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    let before = std::fs::metadata(&f).unwrap();
    assert_eq!(try_run(&f, &["--mode", "shm", "-i", "0.."]), 0);
    assert_eq!(try_run(&f, &["--mode", "shm", "-s", "-i", "3"]), 0);
    let after = std::fs::metadata(&f).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"precious");
    assert_eq!(
        (before.mtime(), before.mtime_nsec(), before.mode()),
        (after.mtime(), after.mtime_nsec(), after.mode())
    );
    let sidecar = std::fs::metadata(f.with_file_name("data.lock-shm")).unwrap();
    assert_eq!(sidecar.mode() & 0o7777, 0o640);
}

/// Every user of a shm table holds an in-use marker on the lock file (an
/// OFD read lock past the last index): `/proc/locks` shows it, `status`
/// does not list it as anyone's lock.
#[test]
fn status_does_not_list_the_in_use_marker() {
    let (_d, f) = lock_file();
    let h = Holder::start(&f, &["--mode", "shm", "-i", "3"]);
    // The kernel shows a lock on its last byte as running to `EOF`.
    let at = format!(":{} {} EOF", std::fs::metadata(&f).unwrap().ino(), i64::MAX);
    let proc_locks = std::fs::read_to_string("/proc/locks").unwrap();
    assert!(
        proc_locks
            .lines()
            .any(|l| l.contains("OFDLCK") && l.contains(" READ ") && l.ends_with(&at)),
        "no marker in /proc/locks: {proc_locks}"
    );
    let st = status_json(&f);
    let locks = st["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1, "{st}");
    assert_eq!(locks[0]["mode"], "shm", "{st}");
    assert_eq!(h.release(), 0);
    assert!(status_json(&f)["locks"].as_array().unwrap().is_empty());
}
