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

#[test]
fn every_step_s_lock_wait_is_in_the_histogram() {
    // Four racers on five tracks: most steps wait for the racer ahead.
    let (rc, v) = race_json(&["-k", "4", "-n", "5", "-r", "40"]);
    assert_eq!(rc, 0, "{v}");
    for m in v["modes"].as_array().unwrap() {
        let h = &m["wait_us_histogram"];
        assert_eq!(h["unit"], "us", "{m}");
        let buckets: Vec<u64> = h["buckets"]
            .as_array()
            .unwrap_or_else(|| panic!("no wait histogram: {m}"))
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(buckets.len(), 32, "{m}");
        let steps = m["steps"].as_u64().unwrap();
        assert_eq!(steps, 4 * 5 * 40);
        assert_eq!(buckets.iter().sum::<u64>(), steps, "{m}");
        assert_eq!(h["count"].as_u64(), Some(steps), "{m}");
        let (p50, p99, max) = (
            h["p50_us"].as_u64().unwrap(),
            h["p99_us"].as_u64().unwrap(),
            h["max_us"].as_u64().unwrap(),
        );
        assert!(p50 <= p99 && p99 <= max, "{m}");
        // A wait for another process's release is never under 4 us.
        assert!(max >= 4, "{m}");
        // The longest wait lies in the last bucket used.
        let last = buckets.iter().rposition(|&n| n > 0).unwrap();
        assert!(max >> last == 1 || (last == 0 && max <= 1), "{m}");
    }

    let out = run(&["race", "-k", "2", "-n", "4", "-r", "5", "--mode", "ofd"]);
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    let waits = text
        .lines()
        .find(|l| l.trim_start().starts_with("lock waits: p50 <= "))
        .unwrap_or_else(|| panic!("no wait line:\n{text}"));
    assert!(waits.contains(" us, max "), "{text}");
}
