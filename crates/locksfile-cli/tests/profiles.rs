//! The workspace's build profiles: what people install carries no debug
//! info (the binary was 24 MB with it), while the builds that are profiled
//! (benchmarks, `--profile profiling`) keep their line tables.

use std::collections::HashMap;
use std::path::Path;

/// `[profile.NAME]` tables of the workspace manifest: key to raw value
/// (quotes kept, comments dropped). Enough TOML for flat profile tables.
fn profiles() -> HashMap<String, HashMap<String, String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let text = std::fs::read_to_string(&path).expect("the workspace manifest");
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            current = line
                .trim_matches(|c| c == '[' || c == ']')
                .strip_prefix("profile.")
                .map(str::to_owned);
            if let Some(name) = &current {
                out.entry(name.clone()).or_default();
            }
        } else if let (Some(name), Some((k, v))) = (&current, line.split_once('=')) {
            out.get_mut(name)
                .expect("entered above")
                .insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

/// A key's value in `profile`, following `inherits` (bench inherits
/// release, as cargo has it), or `None` when no profile on the way sets it.
fn effective(
    all: &HashMap<String, HashMap<String, String>>,
    profile: &str,
    key: &str,
) -> Option<String> {
    let mut name = profile.to_owned();
    for _ in 0..8 {
        let table = all.get(&name)?;
        if let Some(v) = table.get(key) {
            return Some(v.clone());
        }
        name = match (table.get("inherits"), name.as_str()) {
            (Some(parent), _) => parent.trim_matches('"').to_owned(),
            (None, "bench") => "release".to_owned(),
            _ => return None,
        };
    }
    panic!("profile {profile}: inherits loops");
}

fn no_debug_info(debug: Option<&str>) -> bool {
    matches!(debug, None | Some("false" | "0" | "\"none\""))
}

fn unstripped(strip: Option<&str>) -> bool {
    matches!(strip, None | Some("false" | "\"none\""))
}

#[test]
fn release_builds_carry_no_debug_info() {
    let all = profiles();
    let debug = effective(&all, "release", "debug");
    assert!(
        no_debug_info(debug.as_deref()),
        "[profile.release] keeps debug info (debug = {debug:?}): `cargo install` and the wheels ship it"
    );
    let strip = effective(&all, "release", "strip");
    assert!(
        !matches!(strip.as_deref(), Some("false" | "\"none\"")),
        "[profile.release] strip = {strip:?} keeps the standard library's debug info"
    );
}

#[test]
fn profiled_builds_keep_line_tables() {
    let all = profiles();
    for profile in ["bench", "profiling"] {
        assert!(
            all.contains_key(profile),
            "no [profile.{profile}] in the workspace manifest"
        );
        let debug = effective(&all, profile, "debug");
        assert!(
            !no_debug_info(debug.as_deref()),
            "[profile.{profile}] has no debug info (debug = {debug:?}): profilers cannot attribute time"
        );
        // A strip inherited from release would throw the line tables away again.
        let strip = effective(&all, profile, "strip");
        assert!(
            unstripped(strip.as_deref()),
            "[profile.{profile}] strips its debug info (strip = {strip:?}, set here or inherited)"
        );
    }
    assert_eq!(
        effective(&all, "profiling", "inherits").as_deref(),
        Some("\"release\""),
        "[profile.profiling] is a release build with line tables"
    );
}
