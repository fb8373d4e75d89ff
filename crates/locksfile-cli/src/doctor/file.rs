//! The checks of a lock file: where it lives, how it is mounted, who
//! locks it and how, and whether its name still means the file locked.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::mounts::{self, Reach};
use super::{Finding, Status};
use crate::procfs::{self, Class, FileId};

/// Every check of the lock file at `path` (which exists and is a regular
/// file), in a fixed order.
pub fn examine(path: &Path, meta: &fs::Metadata) -> Vec<Finding> {
    let real = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let id = FileId::of(meta);
    let mut out = Vec::new();
    let table = Path::new(&format!("{}-shm", real.display())).exists();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mount = mounts::mount_of(&mountinfo, id.major, id.minor, &real.to_string_lossy());
    out.push(file_system(mount.as_ref(), table));
    out.push(mount_options(mount.as_ref()));
    let lines = procfs::lines_on(id).unwrap_or_default();
    let held = procfs::locks_on(id).unwrap_or_default();
    out.push(lock_kinds(&held));
    out.push(table_and_kernel(&lines, &held, table));
    out.push(names(meta));
    out.push(replaced(&real, meta));
    out
}

fn file_system(mount: Option<&mounts::Mount>, table: bool) -> Finding {
    let Some(m) = mount else {
        return Finding::new(
            "file-system",
            Status::Notice,
            "the file's mount is not in /proc/self/mountinfo; its file system is unknown",
        );
    };
    let (reach, why) = mounts::reach(&m.fs_type);
    let what = format!("{} ({} on {})", m.fs_type, m.source, m.mount_point);
    match reach {
        Reach::Local => Finding::new("file-system", Status::Ok, format!("{what}: {why}")),
        Reach::Network if table => Finding::new(
            "file-system",
            Status::Hazard,
            format!(
                "{what}: a shared-memory lock table (`-shm`) sits beside the file on a \
                 network file system, where each machine would map its own copy; use a \
                 kernel mode (ofd, process, flock) or the PostgreSQL engine across machines"
            ),
        ),
        Reach::Network => Finding::new("file-system", Status::Notice, format!("{what}: {why}")),
        Reach::LocalLocksOnly => {
            Finding::new("file-system", Status::Hazard, format!("{what}: {why}"))
        }
    }
}

fn mount_options(mount: Option<&mounts::Mount>) -> Finding {
    let Some(m) = mount else {
        return Finding::new("mount-options", Status::Notice, "no mount options known");
    };
    let local = mounts::local_lock_options(m);
    if local.is_empty() {
        return Finding::new(
            "mount-options",
            Status::Ok,
            format!(
                "{} mount options keep no locks local to this machine",
                m.fs_type
            ),
        );
    }
    let said: Vec<String> = local
        .iter()
        .map(|(opt, which)| format!("{opt} keeps {which} on this client"))
        .collect();
    Finding::new(
        "mount-options",
        Status::Hazard,
        format!(
            "{} is mounted so that {}: processes on other machines are not kept out",
            m.mount_point,
            said.join("; ")
        ),
    )
}

/// The processes behind a lock, or a name for "someone unknown".
fn who(f: &procfs::Found) -> Vec<String> {
    if f.procs.is_empty() {
        vec![format!("unknown holder of lock {}", f.line.id)]
    } else {
        f.procs.iter().map(|p| p.pid.to_string()).collect()
    }
}

/// flock(2) users and fcntl users of one local file never meet: a
/// process that uses only one kind while another uses only the other is
/// a pair that does not exclude. One process taking both (as `locksfile
/// run` without an index does) is no hazard.
fn lock_kinds(held: &[procfs::Found]) -> Finding {
    let mut flock = BTreeSet::new();
    let mut fcntl = BTreeSet::new();
    for f in held.iter().filter(|f| !f.line.waiting) {
        let set = match f.line.class {
            Class::Flock => &mut flock,
            Class::Posix | Class::Ofd => &mut fcntl,
            Class::Shm => continue,
        };
        set.extend(who(f));
    }
    let only_flock: Vec<&String> = flock.difference(&fcntl).collect();
    let only_fcntl: Vec<&String> = fcntl.difference(&flock).collect();
    if !only_flock.is_empty() && !only_fcntl.is_empty() {
        return Finding::new(
            "lock-kinds",
            Status::Hazard,
            format!(
                "flock(2) locks (pid {}) and fcntl record locks (pid {}) are both held on \
                 the file: on a local file system the two kinds never conflict, so these \
                 processes do not keep each other out (use one kind: `--mode flock` or \
                 flock(1) everywhere, or byte ranges everywhere)",
                join(&only_flock),
                join(&only_fcntl)
            ),
        );
    }
    let kinds = match (flock.is_empty(), fcntl.is_empty()) {
        (true, true) => "no kernel locks held",
        (false, true) => "only flock(2) locks held",
        (true, false) => "only fcntl record locks held",
        (false, false) => "flock(2) and fcntl locks held by the same processes",
    };
    Finding::new("lock-kinds", Status::Ok, kinds)
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// A shm table in use (its users hold the in-use marker) beside kernel
/// locks on the same file: the two never see each other.
fn table_and_kernel(lines: &[procfs::LockLine], held: &[procfs::Found], table: bool) -> Finding {
    let markers = lines.iter().filter(|l| procfs::is_shm_marker(l)).count();
    let kernel: Vec<&procfs::Found> = held.iter().filter(|f| f.line.class != Class::Shm).collect();
    if markers > 0 && !kernel.is_empty() {
        let pids: BTreeSet<String> = kernel.iter().flat_map(|f| who(f)).collect();
        let pids: Vec<&String> = pids.iter().collect();
        return Finding::new(
            "table-and-kernel",
            Status::Hazard,
            format!(
                "{markers} handle(s) use the shared-memory table while kernel locks are held \
                 on the file too (pid {}): table users and kernel-lock users never see each \
                 other's locks",
                join(&pids)
            ),
        );
    }
    let said = match (markers > 0, table) {
        (true, _) => format!("the shared-memory table is in use by {markers} handle(s), alone"),
        (false, true) => "a shared-memory table file exists, not in use".to_string(),
        (false, false) => "no shared-memory table".to_string(),
    };
    Finding::new("table-and-kernel", Status::Ok, said)
}

/// A file with several hard links: kernel locks follow the file, but the
/// shm mode keeps a table per name, and whoever replaces one name leaves
/// the others' users on the old file.
fn names(meta: &fs::Metadata) -> Finding {
    let n = meta.nlink();
    if n > 1 {
        return Finding::new(
            "names",
            Status::Hazard,
            format!(
                "the file has {n} names (hard links): shm-mode users of different names \
                 keep different tables and do not keep each other out, and a name replaced \
                 later leaves its users on another file than the others"
            ),
        );
    }
    Finding::new("names", Status::Ok, "the file has one name")
}

/// Processes holding the file's name open on another file than the one
/// the name means now: the file was replaced (renamed over, or deleted
/// and made again) while in use, and those processes lock a file nobody
/// else will open.
fn replaced(real: &Path, meta: &fs::Metadata) -> Finding {
    let name = real.to_string_lossy().into_owned();
    let deleted = format!("{name} (deleted)");
    let mut pids = BTreeSet::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Finding::new("replaced", Status::Notice, "cannot read /proc");
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if link != name && link != deleted {
                continue;
            }
            // The open file itself, through the descriptor.
            if let Ok(open) = fs::metadata(fd.path()) {
                if (open.dev(), open.ino()) != (meta.dev(), meta.ino()) {
                    pids.insert(pid);
                }
            }
        }
    }
    if pids.is_empty() {
        return Finding::new(
            "replaced",
            Status::Ok,
            "every process with the name open has the file it names now",
        );
    }
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    Finding::new(
        "replaced",
        Status::Hazard,
        format!(
            "pid {} hold(s) the name open on an older file than the one it names now: the \
             lock file was replaced while in use, and their locks keep out nobody who opens \
             it now (never delete or rename over a lock file in use)",
            list.join(", ")
        ),
    )
}
