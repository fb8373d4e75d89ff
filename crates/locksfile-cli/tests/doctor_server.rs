//! `locksfile doctor URL` against real servers: the test's throwaway
//! cluster reached directly (healthy), through PgBouncer in transaction
//! mode (a pooler that hands one client's session locks to another: a
//! hazard) and in session mode (fine), and a cluster of the test's own
//! with a small lock table filled by another session.

mod common;

// The core's test clusters, shared by path: test crates share no module.
#[allow(dead_code)]
#[path = "../../locksfile/tests/pg/cluster.rs"]
mod cluster;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{code, run, stderr};
use serde_json::Value;

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

/// One value from `psql` as the server's superuser (`cluster.rs` calls it).
#[allow(dead_code)]
fn psql(srv: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([srv, "-XAtqc", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn doctor(target: &str) -> (i32, Value) {
    let out = run(&["doctor", "--json", target]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("doctor printed no JSON: {}", stderr(&out)));
    (code(&out), v)
}

fn finding<'a>(v: &'a Value, check: &str) -> (&'a str, &'a str) {
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {v}"));
    (
        f["status"].as_str().unwrap(),
        f["message"].as_str().unwrap(),
    )
}

#[test]
fn a_direct_connection_is_healthy() {
    let Some(srv) = server() else { return };
    let (c, v) = doctor(&format!("{srv}?name=doctor-direct"));
    assert_eq!(c, 0, "{v}");
    assert_eq!(finding(&v, "pooler").0, "ok");
    assert_eq!(finding(&v, "connection-check").0, "ok");
    let (s, said) = finding(&v, "encryption");
    assert_eq!(s, "ok");
    assert!(said.contains("Unix socket"), "{said}");
    assert!(finding(&v, "deadlock-timeout").1.contains("1000 ms"), "{v}");
}

/// PgBouncer in front of the test's cluster, on a free loopback port.
struct Bouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Bouncer {
    fn start(mode: &str) -> Option<Bouncer> {
        let socket_dir = std::env::var("LOCKSFILE_TEST_PG_DIR").ok()?;
        let Ok(exe) = which("pgbouncer") else {
            assert!(
                std::env::var_os("LOCKSFILE_REQUIRE_PG").is_none(),
                "pgbouncer is not installed (scripts/setup installs it)"
            );
            eprintln!("skipped: no pgbouncer");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host={socket_dir} port=5432 dbname=postgres user=postgres\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {d}/users.txt\npool_mode = {mode}\n\
                 default_pool_size = 4\nmax_client_conn = 50\nlogfile = {d}/pgbouncer.log\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(exe);
        if is_root() {
            // PgBouncer will not run as root: it runs as the cluster's
            // owner, itself the child (so that killing it ends it).
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            let (uid, gid) = postgres_ids();
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .arg("--quiet")
            .arg(dir.path().join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "pgbouncer never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Bouncer {
            child,
            port,
            _dir: dir,
        })
    }

    fn target(&self, name: &str) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable&name={name}",
            self.port
        )
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `postgres` user's uid and gid.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a postgres user")
    };
    (id("-u"), id("-g"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(())
}

#[test]
fn a_transaction_pooler_is_a_hazard_and_a_session_pooler_is_not() {
    if server().is_none() {
        return;
    }
    let Some(tx) = Bouncer::start("transaction") else {
        return;
    };
    let (c, v) = doctor(&tx.target("doctor-tx"));
    assert_eq!(c, 1, "{v}");
    let (s, said) = finding(&v, "pooler");
    assert_eq!(s, "hazard", "{said}");
    assert!(said.contains("transaction"), "{said}");
    drop(tx);
    let Some(session) = Bouncer::start("session") else {
        return;
    };
    let (c, v) = doctor(&session.target("doctor-session"));
    assert_eq!(finding(&v, "pooler").0, "ok", "{v}");
    // Loopback TCP without TLS is a notice, not a hazard.
    assert_eq!(finding(&v, "encryption").0, "notice", "{v}");
    assert_eq!(c, 0, "{v}");
}

#[test]
fn a_nearly_full_lock_table_is_a_hazard() {
    let Some(own) =
        cluster::Cluster::start(&["max_locks_per_transaction = 10", "max_connections = 10"])
    else {
        return;
    };
    let target = format!("{}?name=doctor-full", own.socket_url());
    let (c, v) = doctor(&target);
    assert_eq!(c, 0, "{v}");
    assert_eq!(
        finding(&v, "lock-table").0,
        "notice",
        "a small table is worth a notice: {v}"
    );
    // Another session holds 90 of the table's 100 entries.
    let mut filler = Command::new("psql")
        .args([&own.socket_url(), "-XAtq"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = filler.stdin.take().unwrap();
    writeln!(
        stdin,
        "SELECT count(pg_advisory_lock(i)) FROM generate_series(1, 90) i;"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(filler.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "90");
    let (c, v) = doctor(&target);
    assert_eq!(c, 1, "{v}");
    let (s, said) = finding(&v, "lock-table");
    assert_eq!(s, "hazard", "{said}");
    assert!(said.contains("max_locks_per_transaction 10"), "{said}");
    drop(stdin);
    filler.wait().unwrap();
}
