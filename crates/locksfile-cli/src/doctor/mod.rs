//! `locksfile doctor FILE|URL`: the hazards that silently break exclusion
//! are in the environment (how the file system is mounted, who else locks
//! the file and how, a pooler in front of the server), so each is checked
//! and explained. Exit 0 when nothing is a hazard, 1 when something is.

mod file;
mod mounts;
mod server;

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use crate::exit;

#[derive(Args, Debug)]
#[command(after_long_help = "\
Checks of a lock file: its file system (network and user-space file systems \
whose locks stay on this machine), NFS/SMB mount options that keep locks local \
(nolock, local_lock=, nobrl), flock(2) and fcntl locks both held on it by \
different processes (they never meet), a shared-memory table in use beside \
kernel locks, more than one name for the file (hard links), and processes \
holding the name open on a file since replaced.

Checks of a PostgreSQL target: a pooler in transaction or statement mode (the \
server process changes between statements), room in the server's lock table \
(max_locks_per_transaction), deadlock_timeout, client_connection_check_interval, \
and whether the connection is encrypted.

Each check says ok, notice or HAZARD. Exit status: 0 when no check found a \
hazard, 1 when one did, and the usual codes when FILE or the server cannot be \
examined.")]
pub struct DoctorArgs {
    /// The lock file, or a PostgreSQL target (postgresql://...?name=NAME).
    #[arg(value_name = "FILE|URL")]
    pub target: PathBuf,
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Worth knowing; not a hazard to exclusion.
    Notice,
    /// Something that lets processes the user expects to be kept out in.
    Hazard,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Notice => "notice",
            Status::Hazard => "hazard",
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub said: String,
}

impl Finding {
    pub fn new(check: &'static str, status: Status, said: impl Into<String>) -> Finding {
        Finding {
            check,
            status,
            said: said.into(),
        }
    }
}

fn report(target: &str, findings: &[Finding], as_json: bool) -> i32 {
    let hazards = findings
        .iter()
        .filter(|f| f.status == Status::Hazard)
        .count();
    if as_json {
        let list: Vec<Value> = findings
            .iter()
            .map(|f| json!({"check": f.check, "status": f.status.name(), "message": f.said}))
            .collect();
        println!(
            "{}",
            json!({"target": target, "healthy": hazards == 0, "hazards": hazards, "findings": list})
        );
    } else {
        println!("{target}");
        for f in findings {
            let status = match f.status {
                Status::Hazard => "HAZARD",
                s => s.name(),
            };
            println!("  {status:<7} {:<17} {}", f.check, f.said);
        }
        match hazards {
            0 => println!("no hazard found"),
            1 => println!("1 hazard found"),
            n => println!("{n} hazards found"),
        }
    }
    if hazards == 0 {
        0
    } else {
        exit::CONFLICT
    }
}

pub fn main(args: DoctorArgs) -> i32 {
    if let Some(target) = args
        .target
        .to_str()
        .filter(|t| locksfile::LockFile::is_server_target(t))
    {
        // Two sessions at once: a pooler in transaction mode that reuses
        // its last server session gives both the same one, which one
        // session alone could never tell; the engine itself refuses the
        // second (or a first whose statements wander), which is the same
        // finding.
        let connect = || locksfile::LockFile::options().write(false).connect(target);
        let lf = match connect() {
            Ok(lf) => lf,
            Err(e) if server::is_pooled(&e) => {
                let shown = match &e {
                    locksfile::Error::Connect { target, .. } => target.clone(),
                    _ => String::new(),
                };
                return report(&shown, &[server::refused(&e)], args.json);
            }
            Err(e) => {
                eprintln!("locksfile: {e}");
                return exit::for_lock_error(&e);
            }
        };
        let second = connect().and_then(|two| two.server_facts());
        let findings = match (lf.server_facts(), second) {
            (Ok(one), Ok(two)) => server::examine(&one, &two),
            (Ok(one), Err(e)) if server::is_pooled(&e) => {
                let mut f = server::examine(&one, &one);
                f[0] = server::refused(&e);
                f
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("locksfile: {e}");
                return exit::for_lock_error(&e);
            }
        };
        return report(&lf.path().display().to_string(), &findings, args.json);
    }
    let path = &args.target;
    let meta = match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_file() => m,
        Ok(_) => {
            eprintln!("locksfile: {} is not a regular lock file", path.display());
            return exit::NOINPUT;
        }
        Err(e) => {
            eprintln!("locksfile: cannot look at {}: {e}", path.display());
            return exit::NOINPUT;
        }
    };
    let shown = std::path::absolute(path).unwrap_or(path.clone());
    report(
        &shown.display().to_string(),
        &file::examine(path, &meta),
        args.json,
    )
}
