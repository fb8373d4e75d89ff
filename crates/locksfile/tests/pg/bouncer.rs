//! PgBouncer 1.18 (`scripts/setup` installs it) in front of the test
//! server's Unix socket (`LOCKSFILE_TEST_PG_DIR`), on a free loopback port,
//! trust authentication, in the pool mode a test gives: `transaction` (a
//! pooler that hands one client's server session to another) or `session`.
//! Stopped when dropped. Shared by path with the CLI's tests.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// PgBouncer in front of the test's cluster, on a free loopback port.
pub struct Bouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Bouncer {
    /// PgBouncer in `mode`, or `None` (the test is skipped) without a
    /// test server or pgbouncer.
    pub fn start(mode: &str) -> Option<Bouncer> {
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

    /// A target through the pooler for namespace `name`.
    pub fn target(&self, name: &str) -> String {
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
