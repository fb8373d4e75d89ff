//! `locksfile status`: holders and waiters named by pid in every mode with
//! numbered locks (the kernel's, and the shm table's).

mod common;

use std::process::Stdio;

use common::*;

fn lock_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.lock");
    (dir, path)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn names_the_holder_in_every_mode() {
    for (mode, shown) in [("ofd", "ofd"), ("process", "posix"), ("shm", "shm")] {
        let (_d, f) = lock_file();
        let h = Holder::start(&f, &["--mode", mode, "-i", "2..5"]);
        let st = status_json(&f);
        let locks = st["locks"].as_array().unwrap();
        assert_eq!(locks.len(), 1, "{st}");
        let l = &locks[0];
        assert_eq!(l["state"], "held");
        assert_eq!(l["mode"], shown);
        assert_eq!(l["kind"], "exclusive");
        assert_eq!(l["span"], "2..5");
        assert_eq!((l["start"].as_u64(), l["end"].as_u64()), (Some(2), Some(5)));
        assert_eq!(l["pid"].as_u64(), Some(h.pid() as u64), "{mode}: {st}");
        assert_eq!(l["command"], "locksfile");
        // The command the holder runs, not only `locksfile`.
        let wrapped = "sh -c 'echo ready; read x; exit 0'";
        assert_eq!(l["wraps"], wrapped, "{st}");
        assert_eq!(l["processes"][0]["wraps"], wrapped, "{st}");

        let out = run(&["status", f.to_str().unwrap()]);
        assert_eq!(code(&out), 0);
        let text = stdout(&out);
        assert!(text.contains(&h.pid().to_string()), "{text}");
        assert!(
            text.contains("2..5") && text.contains(&format!("locksfile ({wrapped})")),
            "{text}"
        );
        let lane = text
            .lines()
            // Shm lanes name the table's owner after the pid.
            .find(|l| l.starts_with(&format!("{} ", h.pid())) && l.contains(" locksfile"))
            .unwrap_or_else(|| panic!("no lane for the holder:\n{text}"));
        assert!(lane.ends_with("..###"), "{text}");

        h.release();
        let st = status_json(&f);
        assert_eq!(st["locks"].as_array().unwrap().len(), 0, "{st}");
        assert!(stdout(&run(&["status", f.to_str().unwrap()])).starts_with("no locks on"));
    }
}

#[test]
fn shared_holders_and_a_blocked_waiter() {
    for (mode, shown) in [("ofd", "ofd"), ("process", "posix"), ("shm", "shm")] {
        let (_d, f) = lock_file();
        let a = Holder::start(&f, &["--mode", mode, "-s", "-i", "7.."]);
        let b = Holder::start(&f, &["--mode", mode, "-s", "-i", "7.."]);
        let mut waiter = locksfile()
            .args([
                "run",
                "--mode",
                mode,
                "-i",
                "8",
                f.to_str().unwrap(),
                "--",
                "true",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let w = await_lock(&f, |l| l["state"] == "waiting");
        assert_eq!(w["mode"], shown);
        assert_eq!(w["span"], "8");
        // An OFD waiter is found through /proc/PID/syscall and /proc/PID/mem,
        // which need ptrace rights over it (always there for root).
        // The shm table records every waiter's pid.
        if mode != "ofd" || is_root() {
            assert_eq!(w["pid"].as_u64(), Some(waiter.id() as u64), "{w}");
        }

        let st = status_json(&f);
        let mut held: Vec<u64> = st["locks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["state"] == "held")
            .map(|l| {
                assert_eq!(l["kind"], "shared");
                assert_eq!(l["end"], serde_json::Value::Null, "to the end: {l}");
                l["pid"].as_u64().unwrap()
            })
            .collect();
        held.sort_unstable();
        let mut want = vec![a.pid() as u64, b.pid() as u64];
        want.sort_unstable();
        assert_eq!(held, want, "{st}");

        a.release();
        b.release();
        assert_eq!(waiter.wait().unwrap().code(), Some(0));
    }
}

#[test]
fn status_never_creates_or_accepts_odd_files() {
    let (d, f) = lock_file();
    let out = run(&["status", f.to_str().unwrap()]);
    assert_eq!(code(&out), 66);
    assert!(!f.exists(), "status created the file");

    let out = run(&["status", d.path().to_str().unwrap()]);
    assert_eq!(code(&out), 66);
    assert!(stderr(&out).contains("directory"));

    let out = run(&["status", "--frob", f.to_str().unwrap()]);
    assert_eq!(code(&out), 64);
}

#[test]
fn shm_owners_are_told_apart_and_shown_in_the_table_and_the_lanes() {
    let (_d, f) = lock_file();
    let a = Holder::start(&f, &["--mode", "shm", "-i", "2..5"]);
    let b = Holder::start(&f, &["--mode", "shm", "-s", "-i", "7.."]);
    let st = status_json(&f);
    let locks = st["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 2, "{st}");
    let (la, lb) = (&locks[0], &locks[1]);
    assert_eq!(
        (la["span"].as_str(), la["kind"].as_str()),
        (Some("2..5"), Some("exclusive"))
    );
    assert_eq!(
        (lb["span"].as_str(), lb["kind"].as_str()),
        (Some("7.."), Some("shared"))
    );
    assert_eq!(la["pid"].as_u64(), Some(a.pid() as u64));
    assert_eq!(lb["pid"].as_u64(), Some(b.pid() as u64));
    // Table owners, not kernel lock ids.
    assert!(la["id"].is_null() && la["owner"].is_u64(), "{st}");
    assert_ne!(la["owner"], lb["owner"], "{st}");

    let text = stdout(&run(&["status", f.to_str().unwrap()]));
    let owner_a = la["owner"].as_u64().unwrap();
    let row = text
        .lines()
        .find(|l| l.starts_with("2..5"))
        .unwrap_or_else(|| panic!("no row for 2..5:\n{text}"));
    assert!(
        row.contains("SHM") && row.contains(&format!("held (owner {owner_a})")),
        "{text}"
    );
    let lane = text
        .lines()
        .find(|l| l.starts_with(&format!("{} (owner {owner_a}) locksfile", a.pid())))
        .unwrap_or_else(|| panic!("no lane for the holder:\n{text}"));
    assert!(lane.ends_with("..###..."), "{text}");

    a.release();
    b.release();
    // The table is no longer in use: nothing listed, nothing created.
    let st = status_json(&f);
    assert_eq!(st["locks"].as_array().unwrap().len(), 0, "{st}");
}

#[test]
fn a_foreign_sidecar_is_a_clear_error_and_left_alone() {
    let (_d, f) = lock_file();
    std::fs::write(&f, b"").unwrap();
    let sidecar = f.with_file_name("data.lock-shm");
    std::fs::write(&sidecar, b"not a lock table").unwrap();
    // Not in use (no one holds it open): nothing to read, nothing touched.
    let out = run(&["status", f.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(std::fs::read(&sidecar).unwrap(), b"not a lock table");
    // And run refuses it as a table, leaving it as it was.
    let out = run(&["run", "--mode", "shm", f.to_str().unwrap(), "--", "true"]);
    assert_eq!(code(&out), 66, "{}", stderr(&out));
    assert!(stderr(&out).contains("magic"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&sidecar).unwrap(), b"not a lock table");
}
