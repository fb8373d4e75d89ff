//! The README's promises about itself: a "which mode?" table on its first
//! screen, with a row per mode whose cells agree with what the modes do,
//! and install sections that say the packages are not published yet.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use locksfile::{Error, LockFile, Mode};

/// How far the first screen goes.
const FIRST_SCREEN: usize = 50;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every mode. The match makes a new mode a compile error here until its
/// row is in the table.
fn all_modes() -> Vec<Mode> {
    let modes = vec![
        Mode::Ofd,
        Mode::Process,
        Mode::Flock,
        Mode::Shm,
        Mode::Postgres,
    ];
    for m in &modes {
        match m {
            Mode::Ofd | Mode::Process | Mode::Flock | Mode::Shm | Mode::Postgres => {}
        }
    }
    modes
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim().trim_start_matches('|').trim_end_matches('|');
    line.split('|').map(|c| c.trim().to_owned()).collect()
}

/// The first table after the "Which mode?" heading, which must end on the
/// first screen: its header cells and its rows.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn column(&self, words: &str) -> usize {
        self.header
            .iter()
            .position(|h| h.to_lowercase().contains(words))
            .unwrap_or_else(|| {
                panic!(
                    "the which-mode table has no column for {words:?}: {:?}",
                    self.header
                )
            })
    }

    fn row(&self, mode: Mode) -> &[String] {
        let name = format!("`{mode}`");
        self.rows
            .iter()
            .find(|r| r[0].starts_with(&name))
            .unwrap_or_else(|| panic!("the which-mode table has no row for {name}"))
    }

    /// Whether `mode`'s cell in the column says yes (or a release, for
    /// the crash column): the cell's first word.
    fn says_yes(&self, mode: Mode, column: usize) -> bool {
        let cell = &self.row(mode)[column];
        let first = cell.split([' ', ',', ':']).next().unwrap_or("");
        match first {
            "yes" | "freed" => true,
            "no" | "no³" | "never" => false,
            _ => panic!("`{mode}`: cell {cell:?} says neither yes nor no"),
        }
    }
}

fn which_mode_table() -> Table {
    let readme = read("README.md");
    let lines: Vec<&str> = readme.lines().collect();
    let heading = lines
        .iter()
        .position(|l| l.starts_with("## ") && l.to_lowercase().contains("which mode"))
        .expect("README.md has no \"Which mode?\" section");
    assert!(
        heading < FIRST_SCREEN,
        "the \"Which mode?\" section starts on line {}",
        heading + 1
    );
    let start = heading
        + lines[heading..]
            .iter()
            .position(|l| l.starts_with('|'))
            .expect("no table under \"Which mode?\"");
    let end = start
        + lines[start..]
            .iter()
            .take_while(|l| l.starts_with('|'))
            .count();
    assert!(
        end <= FIRST_SCREEN,
        "the which-mode table ends on line {end}, past the first screen ({FIRST_SCREEN} lines)"
    );
    // The trap comes first: before the table, under the heading.
    let before = lines[heading..start].join("\n");
    assert!(
        before.contains("flock(1)") && before.contains("locksfile run"),
        "the flock(1) trap (and what `locksfile run` does about it) must come before the table"
    );
    Table {
        header: cells(lines[start]),
        rows: lines[start + 2..end].iter().map(|l| cells(l)).collect(),
    }
}

#[test]
fn which_mode_table_has_a_row_per_mode_and_every_column() {
    let t = which_mode_table();
    let modes = all_modes();
    assert_eq!(
        t.rows.len(),
        modes.len(),
        "one row per mode, no other: {:?}",
        t.rows
    );
    for m in modes {
        assert_eq!(
            t.row(m).len(),
            t.header.len(),
            "`{m}`: row and header differ in width"
        );
    }
    for words in [
        "flock(1)",
        "fcntl",
        "locksfile modes",
        "lock + unlock",
        "deadlock",
        "fair",
        "crash",
        "machines",
    ] {
        t.column(words);
    }
    let across = t.column("machines");
    for m in all_modes() {
        assert_eq!(
            t.says_yes(m, across),
            m == Mode::Postgres,
            "`{m}`: only the server mode spans machines"
        );
    }
}

/// Deadlock detection, fairness and release on death, as each mode that
/// opens a local file reports them (`LockFile::abilities`).
#[test]
fn which_mode_table_agrees_with_abilities() {
    let t = which_mode_table();
    let (deadlock, fair, crash) = (t.column("deadlock"), t.column("fair"), t.column("crash"));
    let dir = tempfile::tempdir().unwrap();
    for m in all_modes() {
        if m == Mode::Postgres {
            continue; // needs a server; the postgres tests cover its abilities
        }
        let path = dir.path().join(format!("{m}.lock"));
        let a = LockFile::options().mode(m).open(&path).unwrap().abilities();
        assert_eq!(
            t.says_yes(m, deadlock),
            a.detects_deadlocks,
            "`{m}`: deadlock detection"
        );
        assert_eq!(t.says_yes(m, fair), a.fair, "`{m}`: fair to writers");
        assert_eq!(
            t.says_yes(m, crash),
            a.releases_on_death,
            "`{m}`: holder crashes"
        );
    }
}

/// The trap itself: only `flock` mode is kept out by a `flock(2)` lock
/// (as `flock(1)` takes it) on the file.
#[test]
fn which_mode_table_agrees_with_flock_2() {
    let t = which_mode_table();
    let col = t.column("flock(1)");
    let dir = tempfile::tempdir().unwrap();
    for m in [Mode::Ofd, Mode::Process, Mode::Flock] {
        let path = dir.path().join(format!("{m}.lock"));
        let other = File::create(&path).unwrap();
        // SAFETY: a valid descriptor, owned by `other` for the whole call.
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0, "flock(2): {}", std::io::Error::last_os_error());
        let lf = LockFile::options().mode(m).open(&path).unwrap();
        let excluded = match lf.try_write(..) {
            Ok(_) => false,
            Err(Error::WouldBlock { .. }) => true,
            Err(e) => panic!("`{m}`: {e}"),
        };
        assert_eq!(t.says_yes(m, col), excluded, "`{m}`: kept out by flock(2)");
    }
    // shm excludes no flock(2) user: it refuses to open the file instead.
    assert!(!t.says_yes(Mode::Shm, col));
}

/// `name = "..."` of a manifest's first table.
fn package_name(rel: &str) -> String {
    let text = read(rel);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("name ="))
        .unwrap_or_else(|| panic!("{rel}: no name"));
    line.split('"').nth(1).expect("a quoted name").to_owned()
}

/// An `## Install` section: from its heading to the next `## `.
fn install_section(rel: &str) -> Option<String> {
    let text = read(rel);
    let start = text.find("\n## Install\n")? + 1;
    let rest = &text[start + 3..];
    let end = rest.find("\n## ").map_or(text.len(), |e| start + 3 + e);
    Some(text[start..end].to_owned())
}

#[test]
fn install_sections_say_the_packages_are_not_published() {
    let lib = package_name("crates/locksfile/Cargo.toml");
    let cli = package_name("crates/locksfile-cli/Cargo.toml");
    let dist = package_name("python/pyproject.toml");
    let registry = [
        format!("cargo add {lib}"),
        format!("cargo install {cli}"),
        format!("pip install {dist}"),
    ];
    let from_repo = [
        "--path crates/locksfile-cli",
        "pip install ./python",
        "scripts/wheel",
        "path = \"",
    ];
    let top = install_section("README.md").expect("README.md has an Install section");
    for way in from_repo {
        assert!(
            top.contains(way),
            "README.md's Install section lacks {way:?}"
        );
    }
    for cmd in &registry {
        assert!(
            top.contains(cmd.as_str()),
            "README.md keeps {cmd:?} for when it is published"
        );
    }
    for rel in [
        "README.md",
        "python/README.md",
        "crates/locksfile-cli/README.md",
    ] {
        let Some(section) = install_section(rel) else {
            continue;
        };
        let Some(first) = registry
            .iter()
            .filter_map(|c| section.find(c.as_str()))
            .min()
        else {
            continue;
        };
        let said = ["Not yet published", "not yet published"]
            .iter()
            .filter_map(|s| section.find(s))
            .min();
        assert!(
            said.is_some_and(|s| s < first),
            "{rel}: the Install section offers a registry command before saying the packages are not yet published"
        );
        let way = from_repo.iter().filter_map(|w| section.find(w)).min();
        assert!(
            way.is_some_and(|w| w < first),
            "{rel}: the Install section offers a registry command before a way to install today"
        );
    }
}
