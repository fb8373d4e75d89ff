//! `locksfile status`: holders and waiters named by pid in both modes.

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
fn names_the_holder_in_both_modes() {
    for (mode, shown) in [("ofd", "ofd"), ("process", "posix")] {
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
            .find(|l| l.starts_with(&format!("{} locksfile", h.pid())))
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
    for (mode, shown) in [("ofd", "ofd"), ("process", "posix")] {
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
        if mode == "process" || is_root() {
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
