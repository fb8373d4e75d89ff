//! A test's own throwaway PostgreSQL cluster, listening on 127.0.0.1 on a
//! free port as well as on its Unix socket, with settings of the test's
//! choosing (TLS, keepalives): `scripts/pg start-tcp`. Stopped and removed
//! when dropped, whatever the test did.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster of the test's own.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg")
}

impl Cluster {
    /// Starts a cluster with each of `settings` (`name = value`) added to
    /// its configuration, or `None` (the test is skipped) where no server
    /// is available, as [`super::server`] decides.
    pub fn start(settings: &[&str]) -> Option<Cluster> {
        super::server()?;
        let dir = tempfile::Builder::new()
            .prefix("locksfile-pg-own.")
            .tempdir_in("/tmp")
            .expect("make the cluster's directory")
            .keep();
        // A port the kernel has just handed out and taken back: free unless
        // someone takes it in the moment before the server binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let cluster = Cluster { dir, port };
        let out = Command::new("bash")
            .arg(script())
            .args([
                "start-tcp",
                cluster.dir.to_str().unwrap(),
                &port.to_string(),
            ])
            .args(settings)
            .output()
            .expect("run scripts/pg");
        assert!(
            out.status.success(),
            "scripts/pg start-tcp failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(cluster)
    }

    /// The cluster's folder (its data folder is `data` inside it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The TCP port it listens on at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL reaching it over TCP as the superuser, `query` (`k=v&...`)
    /// added when not empty.
    pub fn tcp_url(&self, query: &str) -> String {
        let sep = if query.is_empty() { "" } else { "?" };
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres{sep}{query}",
            self.port
        )
    }

    /// A URL reaching it over its Unix socket as the superuser.
    pub fn socket_url(&self) -> String {
        let dir = self.dir.to_str().unwrap().replace('/', "%2F");
        format!("postgresql://postgres@{dir}:{}/postgres", self.port)
    }

    /// One value from `psql` as the superuser, over the socket.
    pub fn psql(&self, sql: &str) -> String {
        super::psql(&self.socket_url(), sql)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", self.dir.to_str().unwrap()])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
