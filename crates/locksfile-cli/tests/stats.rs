//! `locksfile stats`: a holder keeps index 3 of a shm table for 250 ms
//! while another `locksfile run` waits for it; the table's statistics
//! then show two acquisitions, one contended, and a wait and a hold of
//! about 250 ms, as JSON, as the Prometheus text format and as a table.
//! Kernel-mode files are refused with a message.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// `locksfile run OPTS FILE -- sh -c 'echo ready; read x'`, recording
/// statistics or not; returns once it holds its lock.
fn hold(file: &Path, opts: &[&str], record: bool) -> Child {
    let mut cmd = locksfile();
    cmd.arg("run")
        .args(opts)
        .arg(file)
        .args(["--", "sh", "-c", "echo ready; read x; exit 0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    with_stats(&mut cmd, record);
    let mut child = cmd.spawn().expect("spawn holder");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n", "holder did not get its lock");
    child
}

fn with_stats(cmd: &mut Command, record: bool) {
    if record {
        cmd.env("LOCKSFILE_STATS", "1");
    } else {
        cmd.env_remove("LOCKSFILE_STATS");
    }
}

fn release(mut child: Child) {
    child.stdin.take().unwrap().write_all(b"done\n").unwrap();
    let st = wait_bounded(&mut child, Duration::from_secs(20)).expect("holder ends");
    assert!(st.success());
}

/// The scenario: returns the file (with its table kept in use by a third
/// process that records nothing) and that keeper.
fn contended_250ms(dir: &Path) -> (std::path::PathBuf, Child) {
    let f = dir.join("data.lock");
    std::fs::write(&f, b"").unwrap();
    let keeper = hold(&f, &["--mode", "shm", "-i", "100"], false);
    let holder = hold(&f, &["--mode", "shm", "-i", "3"], true);
    let mut waiter = locksfile();
    waiter
        .args(["run", "--mode", "shm", "-i", "3"])
        .arg(&f)
        .args(["--", "true"])
        .stdin(Stdio::null());
    with_stats(&mut waiter, true);
    let mut waiter = waiter.spawn().unwrap();
    await_lock(&f, |l| l["state"] == "waiting" && l["start"] == 3);
    std::thread::sleep(Duration::from_millis(250));
    release(holder);
    let st = wait_bounded(&mut waiter, Duration::from_secs(20)).expect("waiter ends");
    assert!(st.success());
    (f, keeper)
}

fn stats(f: &Path, how: &[&str]) -> String {
    let mut args = vec!["stats"];
    args.extend_from_slice(how);
    args.push(f.to_str().unwrap());
    let out = run(&args);
    assert_eq!(code(&out), 0, "stats failed: {}", stderr(&out));
    stdout(&out)
}

#[test]
fn a_250ms_wait_shows_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let (f, keeper) = contended_250ms(dir.path());

    let v: serde_json::Value = serde_json::from_str(&stats(&f, &["--json"])).unwrap();
    assert_eq!(v["scope"], "table");
    let locks = v["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 1, "only the recording runs count: {v}");
    let l = &locks[0];
    assert_eq!(l["index"], 3);
    assert_eq!(l["acquired"], 2, "{l}");
    assert_eq!(l["contended"], 1, "{l}");
    assert_eq!(l["timeouts"], 0, "{l}");
    for what in ["wait_ms", "hold_ms"] {
        let max = l[what]["max"].as_f64().unwrap();
        assert!((200.0..1000.0).contains(&max), "{what} max {max}: {l}");
        for q in ["p50", "p99"] {
            assert!(l[what][q].as_f64().unwrap() <= max, "{what} {q}: {l}");
        }
    }
    assert_eq!(l["wait_ms"]["count"], 1);
    assert_eq!(l["hold_ms"]["count"], 2);
    let owners = v["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 2, "{v}");
    assert!(owners.iter().all(|o| o["pid"].as_u64().unwrap() > 0));
    assert_eq!(
        owners
            .iter()
            .map(|o| o["contended"].as_u64().unwrap())
            .sum::<u64>(),
        1
    );

    let prom = stats(&f, &["--prometheus"]);
    check_exposition(&prom);
    assert!(prom.contains("# TYPE locksfile_wait_seconds histogram"));
    assert!(
        prom.contains("locksfile_acquired_total{index=\"3\"} 2\n"),
        "{prom}"
    );
    assert!(
        prom.contains("locksfile_contended_total{index=\"3\"} 1\n"),
        "{prom}"
    );
    assert!(
        prom.contains("locksfile_wait_seconds_count{index=\"3\"} 1\n"),
        "{prom}"
    );
    // Every hold ended: as many as were acquired.
    assert!(
        prom.contains("locksfile_hold_seconds_count{index=\"3\"} 2\n"),
        "{prom}"
    );
    let wait_sum: f64 = value_of(&prom, "locksfile_wait_seconds_sum{index=\"3\"}");
    assert!((0.2..1.0).contains(&wait_sum), "{wait_sum}");

    let text = stats(&f, &[]);
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("3"))
        .unwrap_or_else(|| panic!("no row for index 3:\n{text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..3], ["2", "1"], "{text}");
    release(keeper);
    // No one uses the table now: nothing to show, and said so.
    let out = run(&["stats", f.to_str().unwrap()]);
    assert_eq!(code(&out), 69, "{}", stdout(&out));
}

fn value_of(prom: &str, series: &str) -> f64 {
    prom.lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series}"))
        .trim()
        .parse()
        .unwrap()
}

/// The exposition parses: comments are HELP or TYPE, every sample is
/// `name{labels} value` of a declared family, histogram buckets are
/// cumulative and end at +Inf equal to `_count`.
fn check_exposition(prom: &str) {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut last_bucket: Option<(String, u64)> = None;
    for line in prom.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let w: Vec<&str> = rest.splitn(3, ' ').collect();
            assert!(w[0] == "HELP" || w[0] == "TYPE", "{line}");
            if w[0] == "TYPE" {
                assert!(["counter", "histogram"].contains(&w[2]), "{line}");
                families.push((w[1].to_string(), w[2].to_string()));
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let (name, labels) = series.split_once('{').expect("labels");
        assert!(
            labels.ends_with('}') && labels.contains("index=\""),
            "{line}"
        );
        let family = families
            .iter()
            .find(|(f, t)| {
                name == f
                    || (t == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(f.as_str())))
            })
            .unwrap_or_else(|| panic!("undeclared {line}"));
        if family.1 == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        let key = format!(
            "{}{}",
            family.0,
            labels.split(",le=").next().unwrap().trim_end_matches('}')
        );
        if name.ends_with("_bucket") {
            let n = v as u64;
            if let Some((k, prev)) = &last_bucket {
                if *k == key {
                    assert!(n >= *prev, "not cumulative: {line}");
                }
            }
            last_bucket = Some((key.clone(), n));
        } else if name.ends_with("_count") {
            let (k, inf) = last_bucket.clone().expect("buckets before _count");
            assert_eq!(key, k, "{line}");
            assert_eq!(v as u64, inf, "_count is the +Inf bucket: {line}");
        }
    }
    assert!(prom.contains("le=\"+Inf\""));
}

#[test]
fn kernel_mode_files_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("k.lock");
    std::fs::write(&f, b"").unwrap();
    let h = hold(&f, &["-i", "3"], true);
    let out = run(&["stats", "--json", f.to_str().unwrap()]);
    assert_eq!(code(&out), 69);
    let err = stderr(&out);
    assert!(
        err.contains("--mode shm") && err.contains("LockFile::stats"),
        "{err}"
    );
    release(h);
    let out = run(&["stats", dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(code(&out), 66);
}

/// `top` draws its statistics panel from the table's own counters where
/// the table has them: the contended take of index 3 and its wait, not
/// only what its refreshes saw.
#[test]
fn top_shows_the_tables_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (f, keeper) = contended_250ms(dir.path());
    let out = run(&["top", "--once", f.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("LOCK STATISTICS"), "{text}");
    assert!(
        text.contains("ACQUIRED") && text.contains("CONTENDED"),
        "{text}"
    );
    let panel = &text[text.find("LOCK STATISTICS").unwrap()..];
    let row: Vec<&str> = panel
        .lines()
        .find(|l| l.split_whitespace().next() == Some("3"))
        .unwrap_or_else(|| panic!("no row for index 3:\n{text}"))
        .split_whitespace()
        .collect();
    // Index, acquired, contended, then the wait's p50, p99 and max.
    assert_eq!(&row[..3], ["3", "2", "1"], "{text}");
    assert!(row[5].ends_with("ms") || row[5].ends_with('s'), "{text}");
    assert!(text.contains("every wait the table recorded"), "{text}");
    release(keeper);
}
