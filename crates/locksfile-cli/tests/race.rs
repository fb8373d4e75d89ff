//! `locksfile race`: the verified race passes, and a race without locks
//! is caught by the verifier.

mod common;

use common::*;

fn race_json(args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["race", "--json"];
    all.extend_from_slice(args);
    let out = run(&all);
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("race --json printed no JSON ({e}): {}", stderr(&out)));
    (code(&out), v)
}

#[test]
fn the_race_passes_in_every_mode() {
    let (rc, v) = race_json(&["-k", "3", "-n", "6", "-r", "50"]);
    assert_eq!(rc, 0, "{v}");
    assert_eq!(v["ok"], true);
    let modes = v["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["ofd", "process", "shm"]);
    for m in modes {
        assert_eq!(m["steps"].as_u64(), Some(3 * 6 * 50));
        assert_eq!(m["collisions"].as_u64(), Some(0));
        assert_eq!(m["order_breaks"].as_u64(), Some(0));
        assert_eq!(m["count_errors"].as_u64(), Some(0));
        assert!(m["steps_per_second"].as_f64().unwrap() > 0.0);
        assert!(m["us_per_step"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn the_default_race_passes_and_reports_speed() {
    let out = run(&["race"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("4 racers, 50 tracks, 100 rounds"), "{text}");
    assert!(
        text.contains("steps/s") && text.contains("us/step"),
        "{text}"
    );
    for mode in ["ofd", "process", "shm"] {
        let row = text.lines().find(|l| l.starts_with(mode)).unwrap();
        assert!(row.ends_with("ok"), "{text}");
    }
}

#[test]
fn a_race_without_locks_is_caught() {
    for mode in ["ofd", "process", "shm"] {
        let (rc, v) = race_json(&[
            "-k",
            "3",
            "-n",
            "4",
            "-r",
            "2000",
            "--mode",
            mode,
            "--unsafe-skip-locking",
        ]);
        assert_eq!(rc, 1, "{v}");
        assert_eq!(v["ok"], false);
        assert_eq!(v["locking"], false);
        let m = &v["modes"][0];
        let problems = m["collisions"].as_u64().unwrap()
            + m["order_breaks"].as_u64().unwrap()
            + m["count_errors"].as_u64().unwrap();
        assert!(problems > 0, "{v}");
        assert!(m["first_problem"].is_string(), "{v}");
    }
    let out = run(&[
        "race",
        "-k",
        "3",
        "-n",
        "4",
        "-r",
        "500",
        "--unsafe-skip-locking",
    ]);
    assert_eq!(code(&out), 1);
    assert!(stdout(&out).contains("FAILED"), "{}", stdout(&out));
}

#[test]
fn the_hidden_flag_stays_hidden_and_bad_plans_are_refused() {
    let help = stdout(&run(&["race", "--help"]));
    assert!(
        help.contains("--tracks") && !help.contains("skip-locking"),
        "{help}"
    );
    let out = run(&["race", "-k", "5", "-n", "5"]);
    assert_eq!(code(&out), 64);
    assert!(stderr(&out).contains("fewer racers than tracks"));
    assert_eq!(code(&run(&["race", "-r", "0"])), 64);
    assert_eq!(code(&run(&["race", "--mode", "fast"])), 64);
}

#[test]
fn mode_choices_pick_the_rows() {
    for (mode, want) in [
        ("ofd", &["ofd"][..]),
        ("process", &["process"]),
        ("shm", &["shm"]),
        ("both", &["ofd", "process"]),
        ("all", &["ofd", "process", "shm"]),
    ] {
        let (rc, v) = race_json(&["-k", "2", "-n", "4", "-r", "20", "--mode", mode]);
        assert_eq!(rc, 0, "{v}");
        let names: Vec<&str> = v["modes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mode"].as_str().unwrap())
            .collect();
        assert_eq!(names, want, "--mode {mode}");
    }
}
