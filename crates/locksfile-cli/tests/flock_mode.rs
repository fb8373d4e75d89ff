//! `locksfile run --mode flock` against util-linux `flock(1)`: each keeps
//! the other out, both ways, where the record-lock modes see nothing; the
//! span is always the whole file; `status` lists a flock(1) holder.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn lock_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.lock");
    (dir, path)
}

#[test]
fn flock_command_holds_off_run_in_flock_mode() {
    let (_dir, file) = lock_file();
    let x = FlockCmd::hold(&file, &["-x"]);
    assert_eq!(run_n(&file, &["--mode", "flock"]), 1);
    assert_eq!(run_n(&file, &["--mode", "flock", "-s"]), 1);
    assert_eq!(run_n(&file, &["--mode", "flock", "-E", "9"]), 9);
    // What the issue reported: the record-lock modes run anyway.
    assert_eq!(run_n(&file, &["-i", ".."]), 0);
    assert_eq!(run_n(&file, &["--mode", "process", "-i", ".."]), 0);
    // status lists the flock(1) holder.
    let out = run(&["status", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("FLOCK"), "{}", stdout(&out));
    x.release();

    let s = FlockCmd::hold(&file, &["-s"]);
    assert_eq!(run_n(&file, &["--mode", "flock", "-s"]), 0);
    assert_eq!(run_n(&file, &["--mode", "flock"]), 1);
    s.release();
    assert_eq!(run_n(&file, &["--mode", "flock"]), 0);
}

#[test]
fn run_in_flock_mode_holds_off_flock_command() {
    let (_dir, file) = lock_file();
    let h = Holder::start(&file, &["--mode", "flock"]);
    assert_eq!(flock_n(&file, &["-x"]), 1);
    assert_eq!(flock_n(&file, &["-s"]), 1);
    assert_eq!(h.release(), 0);
    assert_eq!(flock_n(&file, &["-x"]), 0);

    let h = Holder::start(&file, &["--mode", "flock", "-s"]);
    assert_eq!(flock_n(&file, &["-s"]), 0);
    assert_eq!(flock_n(&file, &["-x"]), 1);
    assert_eq!(h.release(), 0);

    // An OFD-mode holder, even of every index, is invisible to flock(1).
    let h = Holder::start(&file, &["-i", ".."]);
    assert_eq!(flock_n(&file, &["-x"]), 0);
    assert_eq!(h.release(), 0);
}

#[test]
fn flock_mode_takes_the_whole_file_only() {
    let (_dir, file) = lock_file();
    for opts in [
        &["--mode", "flock", "-i", "0"][..],
        &["--mode", "flock", "-i", "1.."],
        &["--mode", "flock", "--start", "0", "--count", "1"],
    ] {
        let mut args = vec!["run"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[file.to_str().unwrap(), "--", "true"]);
        let out = run(&args);
        assert_eq!(code(&out), 64, "{opts:?}");
        assert!(stderr(&out).contains("whole file"), "{}", stderr(&out));
        assert!(!file.exists(), "refused before the file is created");
    }
    // 0.. is every index too.
    assert_eq!(run_n(&file, &["--mode", "flock", "-i", ".."]), 0);
    assert_eq!(run_n(&file, &["--mode", "flock", "-i", "0.."]), 0);
}

/// flock(1)'s own idiom in flock mode: `( locksfile run --mode flock 9 ...
/// ) 9>file` leaves a `flock(2)` lock with the shell's descriptor, which a
/// `flock(1)` user of the file sees, and `-u 9` drops it again; flock(2)
/// minds no access mode, so a shared lock through `9>file` is fine.
#[test]
fn descriptor_form_in_flock_mode_is_seen_by_flock_1() {
    let (_d, f) = lock_file();
    let out = Command::new("sh")
        .args([
            "-c",
            r#"( "$L" run -n --mode flock 9 || exit 9
                 flock -n "$F" true; echo "held $?"
                 "$L" run -u --mode flock 9; echo "unlock $?"
                 flock -n "$F" true; echo "unlocked $?"
                 "$L" run -n -s --mode flock 9; echo "shared $?"
                 flock -n -s "$F" true; echo "shared by flock(1) too $?"
                 flock -n -x "$F" true; echo "exclusive $?"
               ) 9>"$F"
               flock -n "$F" true; echo "after the subshell $?""#,
        ])
        .env("L", BIN)
        .env("F", &f)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "held 1\nunlock 0\nunlocked 0\nshared 0\nshared by flock(1) too 0\nexclusive 1\n\
         after the subshell 0\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
