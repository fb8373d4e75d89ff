//! `run`, `status` and `race` on a lock namespace on a real PostgreSQL
//! server (`LOCKSFILE_TEST_PG`, set by scripts/test; without it these
//! tests skip, or fail when `LOCKSFILE_REQUIRE_PG` is set).

mod common;

use std::path::Path;

use common::{code, run, stderr, stdout, Holder};

fn server() -> Option<String> {
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

fn target(srv: &str, test: &str) -> String {
    format!("{srv}?name=cli-{test}-{}", std::process::id())
}

#[test]
fn run_excludes_across_sessions_and_status_names_the_holder() {
    let Some(srv) = server() else { return };
    let t = target(&srv, "run");
    let holder = Holder::start(Path::new(&t), &["-x", "--span", "3..5"]);
    let out = run(&["run", "-n", "--span", "4", &t, "--", "true"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = run(&["run", "-n", "--span", "5", &t, "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&["run", "-v", "-n", "-s", "--span", "3", &t, "--", "true"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("backend pid"), "{}", stderr(&out));

    let out = run(&["status", "--json", &t]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let locks = v["locks"].as_array().unwrap();
    let indices: Vec<u64> = locks.iter().map(|l| l["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, vec![3, 4]);
    assert!(
        locks
            .iter()
            .all(|l| l["state"] == "held" && l["kind"] == "exclusive"),
        "{v}"
    );
    // The holder is the `locksfile run` process (the command runs under it).
    let app = format!("locksfile pid {}", holder.pid());
    assert!(
        locks.iter().all(|l| l["application_name"] == app.as_str()),
        "{v}"
    );
    let table = stdout(&run(&["status", &t]));
    assert!(
        table.contains("exclusive") && table.contains(&app),
        "{table}"
    );

    assert_eq!(holder.release(), 0);
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["status", "--json", &t]))).unwrap();
    assert!(v["locks"].as_array().unwrap().is_empty());
}

#[test]
fn bad_targets_are_usage_or_unavailable_errors_without_the_password() {
    let Some(srv) = server() else { return };
    let out = run(&[
        "run",
        "postgresql://u:hunter2@h:notaport/db?name=x",
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"));
    let dir = tempfile::tempdir().unwrap();
    let down = format!(
        "postgresql://u:hunter2@{}/db?name=x",
        dir.path().display().to_string().replace('/', "%2F")
    );
    let out = run(&["status", &down]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"));
    let out = run(&[
        "run",
        "--mode",
        "flock",
        &target(&srv, "mode"),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 64);
}

#[test]
fn race_over_the_server_is_verified() {
    let Some(srv) = server() else { return };
    let out = run(&[
        "race",
        "-k",
        "3",
        "-n",
        "12",
        "-r",
        "10",
        &target(&srv, "race"),
    ]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("postgres"));
    assert!(stdout(&out).contains("verified"), "{}", stdout(&out));
    // The same race without locks is caught, so the check means something.
    let out = run(&[
        "race",
        "-k",
        "3",
        "-n",
        "12",
        "-r",
        "10",
        "--unsafe-skip-locking",
        &target(&srv, "race-unlocked"),
    ]);
    assert_ne!(code(&out), 0);
}
