//! `locksfile doctor FILE`: each hazard it claims to find, made for real
//! (a flock(1) user beside a byte-range user, a table beside kernel locks,
//! a second name, a file replaced in use, a FUSE mount), and a healthy
//! file passing. The NFS mount options are checked on a mountinfo fixture
//! (the doctor's unit tests); no NFS server runs here.

mod common;

use std::path::Path;

use common::{code, finding, run, FlockCmd, Holder};
use serde_json::Value;

/// `doctor --json FILE`: the exit code and the findings.
fn doctor(file: &Path) -> (i32, Value) {
    common::doctor(file.to_str().unwrap())
}

fn status_of<'a>(v: &'a Value, check: &str) -> (&'a str, &'a str) {
    finding(v, check)
}

fn hazards(v: &Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] == "hazard")
        .map(|f| f["check"].as_str().unwrap().to_string())
        .collect()
}

fn lock_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let p = dir.path().join("app.lock");
    std::fs::write(&p, b"content").unwrap();
    p
}

#[test]
fn a_plain_file_in_use_the_usual_ways_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let f = lock_file(&dir);
    let (c, v) = doctor(&f);
    assert_eq!((c, v["healthy"].as_bool()), (0, Some(true)), "{v}");
    // flock(1) and `run` without an index (flock and a byte range, in one
    // process) are one kind of user each: no hazard.
    let h = Holder::start(&f, &[]);
    let (c, v) = doctor(&f);
    assert_eq!(c, 0, "{v}");
    assert_eq!(status_of(&v, "lock-kinds").0, "ok");
    h.release();
    let fl = FlockCmd::hold(&f, &[]);
    assert_eq!(doctor(&f).0, 0);
    fl.release();
    // The text form says the same.
    let out = run(&["doctor", f.to_str().unwrap()]);
    assert_eq!(code(&out), 0);
    assert!(common::stdout(&out).contains("no hazard found"));
    assert_eq!(
        std::fs::read(&f).unwrap(),
        b"content",
        "the file is never changed"
    );
}

#[test]
fn flock_and_byte_range_users_of_one_file_are_a_hazard() {
    let dir = tempfile::tempdir().unwrap();
    let f = lock_file(&dir);
    let fl = FlockCmd::hold(&f, &[]);
    let ranged = Holder::start(&f, &["-i", "3"]);
    let (c, v) = doctor(&f);
    assert_eq!(c, 1, "{v}");
    assert_eq!(hazards(&v), ["lock-kinds"]);
    let (_, said) = status_of(&v, "lock-kinds");
    assert!(said.contains(&ranged.pid().to_string()), "{said}");
    ranged.release();
    // One kind left: healthy again.
    assert_eq!(doctor(&f).0, 0);
    fl.release();
}

#[test]
fn a_table_in_use_beside_kernel_locks_is_a_hazard() {
    let dir = tempfile::tempdir().unwrap();
    let f = lock_file(&dir);
    let table = Holder::start(&f, &["--mode", "shm", "-i", "1"]);
    let (c, v) = doctor(&f);
    assert_eq!(c, 0, "a table alone is fine: {v}");
    assert!(status_of(&v, "table-and-kernel").1.contains("in use"));
    let fl = FlockCmd::hold(&f, &[]);
    let (c, v) = doctor(&f);
    assert_eq!(c, 1, "{v}");
    assert!(hazards(&v).contains(&"table-and-kernel".to_string()), "{v}");
    fl.release();
    table.release();
}

#[test]
fn a_second_name_is_a_hazard() {
    let dir = tempfile::tempdir().unwrap();
    let f = lock_file(&dir);
    std::fs::hard_link(&f, dir.path().join("other-name.lock")).unwrap();
    let (c, v) = doctor(&f);
    assert_eq!((c, hazards(&v)), (1, vec!["names".to_string()]), "{v}");
    assert!(status_of(&v, "names").1.contains("2 names"));
}

#[test]
fn a_lock_file_replaced_while_in_use_is_a_hazard_naming_its_users() {
    let dir = tempfile::tempdir().unwrap();
    let f = lock_file(&dir);
    let old = Holder::start(&f, &["-i", "0"]);
    assert_eq!(doctor(&f).0, 0);
    // What a careless deploy does: write a new file and rename it over.
    let new = dir.path().join("app.lock.new");
    std::fs::write(&new, b"new").unwrap();
    std::fs::rename(&new, &f).unwrap();
    let (c, v) = doctor(&f);
    assert_eq!((c, hazards(&v)), (1, vec!["replaced".to_string()]), "{v}");
    let said = status_of(&v, "replaced").1;
    assert!(said.contains(&old.pid().to_string()), "{said}");
    old.release();
    assert_eq!(doctor(&f).0, 0, "nobody holds the old file any more");
}

#[test]
fn a_fuse_mount_is_a_hazard() {
    let dir = tempfile::tempdir().unwrap();
    let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("bindfs")
        .arg(&src)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("a_fuse_mount_is_a_hazard: cannot mount with bindfs here; not run");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&mnt);
    let f = mnt.join("app.lock");
    std::fs::write(&f, b"x").unwrap();
    let (c, v) = doctor(&f);
    assert_eq!(c, 1, "{v}");
    let (status, said) = status_of(&v, "file-system");
    assert_eq!(status, "hazard", "{said}");
    assert!(said.contains("fuse") && said.contains("FUSE"), "{said}");
    // The same file under its own name, outside the mount: local.
    let (c, v) = doctor(&src.join("app.lock"));
    assert_eq!((c, status_of(&v, "file-system").0), (0, "ok"), "{v}");
}

#[test]
fn what_is_not_a_lock_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["doctor", dir.path().to_str().unwrap()]);
    assert_eq!(code(&out), 66);
    let out = run(&["doctor", dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(code(&out), 66);
    assert!(
        !dir.path().join("missing").exists(),
        "doctor creates nothing"
    );
}
