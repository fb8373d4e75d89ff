//! TLS to the server with libpq's settings: clusters of the tests' own
//! with `ssl = on` and a CA, server and client certificates made here with
//! `openssl`, and one without TLS.

mod pg;

use std::error::Error as _;
use std::io;
use std::path::PathBuf;
use std::process::Command;

use locksfile::{Error, LockFile, TlsError};
use pg::cluster::Cluster;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A CA, a second CA that signed nothing of the server's, a server
/// certificate for `localhost` only (not 127.0.0.1) and a client
/// certificate for the role `certuser`, in a folder the server can read.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `None` (the test is skipped) where no server is available.
    fn new() -> Option<Pki> {
        pg::server()?;
        let dir = tempfile::Builder::new()
            .prefix("locksfile-tls.")
            .tempdir_in("/tmp")
            .expect("make the certificates' folder");
        let d = dir.path();
        let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(d).args(args));
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [("ca", "locksfile test CA"), ("other", "some other CA")] {
            let (key, crt, subj) = (
                format!("{name}.key"),
                format!("{name}.crt"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subj];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &crt]);
            openssl(&args);
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(
            d.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for (name, cn) in [("server", "localhost"), ("client", "certuser")] {
            let (key, csr, crt, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={cn}");
            let mut args = vec!["req", "-subj", &subj];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr]);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ]);
        }
        // The server (the `postgres` user when we are root) reads its key,
        // which only it may read, and the certificates.
        run(Command::new("chmod").args(["755", d.to_str().unwrap()]));
        for f in ["ca.crt", "server.crt", "client.crt", "other.crt"] {
            run(Command::new("chmod").arg("644").arg(d.join(f)));
        }
        for f in ["server.key", "client.key"] {
            run(Command::new("chmod").arg("600").arg(d.join(f)));
        }
        if is_root() {
            run(Command::new("chown")
                .arg("postgres")
                .arg(d.join("server.key")));
        }
        Some(Pki { dir })
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn p(&self, f: &str) -> String {
        self.path(f).to_str().unwrap().to_string()
    }

    /// A cluster with TLS on and these certificates.
    fn cluster(&self) -> Option<Cluster> {
        let settings = [
            "ssl = on".to_string(),
            format!("ssl_cert_file = '{}'", self.p("server.crt")),
            format!("ssl_key_file = '{}'", self.p("server.key")),
            format!("ssl_ca_file = '{}'", self.p("ca.crt")),
        ];
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        Cluster::start(&settings)
    }
}

/// A target for `cluster` over TCP to `host`, with `query` and a namespace
/// and an application name of its own (to find its session).
fn url(cluster: &Cluster, host: &str, user: &str, query: &str, app: &str) -> String {
    format!(
        "postgresql://{user}@{host}:{}/postgres?{query}&application_name={app}&name=tls-{}",
        cluster.port(),
        std::process::id()
    )
}

fn connect(target: &str) -> Result<LockFile, Error> {
    LockFile::options().connect(target)
}

/// Whether the session named `app` is encrypted, as the server sees it
/// (`pg_stat_ssl`).
fn encrypted(cluster: &Cluster, app: &str) -> bool {
    let v = cluster.psql(&format!(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = '{app}'"
    ));
    match v.as_str() {
        "t" => true,
        "f" => false,
        other => panic!("no session {app} on the server: {other:?}"),
    }
}

/// Connect, take a lock (the session works), and say whether the server
/// sees it encrypted.
fn works(cluster: &Cluster, target: &str, app: &str) -> bool {
    let lf = connect(target).unwrap_or_else(|e| panic!("connect {target}: {e}"));
    drop(lf.write(7).expect("a lock over the session"));
    let enc = encrypted(cluster, app);
    drop(lf);
    enc
}

/// The TLS failure an attempt ended with, the whole error checked for what
/// it must never say.
fn tls_failure(target: &str, secrets: &[&str]) -> (TlsError, io::ErrorKind) {
    let e = match connect(target) {
        Ok(_) => panic!("{target}: connected"),
        Err(e) => e,
    };
    let (shown, debug) = (e.to_string(), format!("{e:?}"));
    for s in secrets {
        assert!(!shown.contains(s), "{s:?} in {shown}");
        assert!(!debug.contains(s), "{s:?} in {debug}");
    }
    let Error::Connect { source, .. } = &e else {
        panic!("{target}: not a connect error: {e}");
    };
    let tls = source
        .get_ref()
        .and_then(|s| s.downcast_ref::<TlsError>())
        .unwrap_or_else(|| panic!("{target}: not a TLS failure: {e}"))
        .clone();
    assert!(e.source().is_some());
    (tls, source.kind())
}

#[test]
fn verify_full_checks_the_chain_and_the_host_name() {
    let Some(pki) = Pki::new() else { return };
    let c = pki.cluster().expect("a server");
    let ca = pki.p("ca.crt");
    // The right CA and the certificate's host name: encrypted.
    let t = url(
        &c,
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
        "vf",
    );
    assert!(works(&c, &t, "vf"));
    // The key=value form.
    let kv = format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full \
         sslrootcert='{ca}' application_name=kv name=tls-kv-{}",
        c.port(),
        std::process::id()
    );
    assert!(works(&c, &kv, "kv"));
    // A CA that did not sign the server's certificate.
    let t = url(
        &c,
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={}", pki.p("other.crt")),
        "x",
    );
    let (e, kind) = tls_failure(&t, &[]);
    assert!(matches!(e, TlsError::NotTrusted(_)), "{e}");
    assert_eq!(kind, io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("not trusted"), "{e}");
    // The right CA, the wrong name: the certificate is for localhost only.
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
        "x",
    );
    let (e, kind) = tls_failure(&t, &[]);
    assert_eq!(e, TlsError::NameMismatch("127.0.0.1".into()));
    assert_eq!(kind, io::ErrorKind::InvalidData);
    // verify-ca checks the chain only.
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
        "vca",
    );
    assert!(works(&c, &t, "vca"));
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={}", pki.p("other.crt")),
        "x",
    );
    assert!(matches!(tls_failure(&t, &[]).0, TlsError::NotTrusted(_)));
    // The mode stays visible in what is shown of the target.
    let e = connect(&t).err().unwrap().to_string();
    assert!(e.contains("sslmode=verify-ca"), "{e}");
}

#[test]
fn require_encrypts_and_checks_the_chain_only_with_a_root_file() {
    let Some(pki) = Pki::new() else { return };
    let c = pki.cluster().expect("a server");
    // No root file (one that does not exist, whatever ~/.postgresql
    // holds): encrypted, nothing verified.
    let none = format!("sslrootcert={}", pki.p("missing.crt"));
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=require&{none}"),
        "req",
    );
    assert!(works(&c, &t, "req"));
    // prefer (the default) encrypts when the server offers TLS.
    let t = url(&c, "127.0.0.1", "postgres", &none, "pref");
    assert!(works(&c, &t, "pref"));
    // disable does not.
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=disable&{none}"),
        "dis",
    );
    assert!(!works(&c, &t, "dis"));
    // With a root file require acts as verify-ca, as libpq's does.
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=require&sslrootcert={}", pki.p("other.crt")),
        "x",
    );
    assert!(matches!(tls_failure(&t, &[]).0, TlsError::NotTrusted(_)));
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=require&sslrootcert={}", pki.p("ca.crt")),
        "req-ca",
    );
    assert!(works(&c, &t, "req-ca"));
    // prefer, like libpq's, goes on in the clear after a failed handshake.
    let bad_roots = format!("sslrootcert={}", pki.p("other.crt"));
    let t = url(&c, "127.0.0.1", "postgres", &bad_roots, "pref-bad");
    assert!(!works(&c, &t, "pref-bad"));
    // verify-full with no root file: refused before the handshake.
    let t = url(
        &c,
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&{none}"),
        "x",
    );
    let (e, kind) = tls_failure(&t, &[]);
    assert!(matches!(e, TlsError::Files(_)), "{e}");
    assert_eq!(kind, io::ErrorKind::InvalidInput);
    // Over the Unix socket sslmode is ignored, as by libpq.
    let sock = format!(
        "{}?sslmode=verify-full&{none}&application_name=sock&name=tls-{}",
        c.socket_url(),
        std::process::id()
    );
    assert!(!works(&c, &sock, "sock"));
}

#[test]
fn passwords_and_keys_never_appear_in_errors() {
    let Some(pki) = Pki::new() else { return };
    let c = pki.cluster().expect("a server");
    c.psql("CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD 'pa55-w0rd-s3cret'");
    let hba = c.dir().join("data/pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl all pwuser 127.0.0.1/32 scram-sha-256\n{text}"),
    )
    .unwrap();
    c.psql("SELECT pg_reload_conf()");
    let secret = "pa55-w0rd-s3cret";
    let key_text = std::fs::read_to_string(pki.path("client.key")).unwrap();
    let key_line = key_text.lines().nth(1).unwrap();
    let user = format!("pwuser:{secret}");
    // The right password over TLS (SCRAM over the encrypted stream).
    let ok = url(
        &c,
        "localhost",
        &user,
        &format!("sslmode=verify-full&sslrootcert={}", pki.p("ca.crt")),
        "pw",
    );
    assert!(works(&c, &ok, "pw"));
    // A wrong CA, with the password and a client key in the target.
    let q = format!(
        "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        pki.p("other.crt"),
        pki.p("client.crt"),
        pki.p("client.key")
    );
    let t = url(&c, "localhost", &user, &q, "x");
    let (e, _) = tls_failure(&t, &[secret, key_line]);
    assert!(matches!(e, TlsError::NotTrusted(_)), "{e}");
    // The password as a parameter, a key file that is not a key.
    let bad_key = pki.path("bad.key");
    std::fs::write(&bad_key, format!("not a key {secret}\n{key_line}\n")).unwrap();
    run(Command::new("chmod").arg("600").arg(&bad_key));
    let q = format!(
        "sslmode=require&password={secret}&sslcert={}&sslkey={}",
        pki.p("client.crt"),
        bad_key.display()
    );
    let t = url(&c, "localhost", "pwuser", &q, "x");
    let (e, kind) = tls_failure(&t, &[secret, key_line]);
    assert!(matches!(e, TlsError::Files(_)), "{e}");
    assert_eq!(kind, io::ErrorKind::InvalidInput);
    // A key others may read is refused, as by libpq.
    run(Command::new("chmod").arg("644").arg(pki.path("client.key")));
    let q = format!(
        "sslmode=require&sslcert={}&sslkey={}",
        pki.p("client.crt"),
        pki.p("client.key")
    );
    let t = url(&c, "localhost", "postgres", &q, "x");
    let (e, _) = tls_failure(&t, &[key_line]);
    assert!(e.to_string().contains("group or world access"), "{e}");
}

#[test]
fn client_certificates() {
    let Some(pki) = Pki::new() else { return };
    let c = pki.cluster().expect("a server");
    c.psql("CREATE ROLE certuser LOGIN SUPERUSER");
    let hba = c.dir().join("data/pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl all certuser 127.0.0.1/32 cert\n{text}"),
    )
    .unwrap();
    c.psql("SELECT pg_reload_conf()");
    let verify = format!("sslmode=verify-full&sslrootcert={}", pki.p("ca.crt"));
    let q = format!(
        "{verify}&sslcert={}&sslkey={}",
        pki.p("client.crt"),
        pki.p("client.key")
    );
    assert!(works(
        &c,
        &url(&c, "localhost", "certuser", &q, "cert"),
        "cert"
    ));
    // Without one (a certificate file that does not exist: libpq goes on
    // without), the server refuses the role.
    let q = format!("{verify}&sslcert={}", pki.p("missing.crt"));
    match connect(&url(&c, "localhost", "certuser", &q, "x")) {
        Err(Error::Connect { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::PermissionDenied, "{source}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn a_server_without_tls() {
    let Some(c) = Cluster::start(&["ssl = off"]) else {
        return;
    };
    let none = "sslrootcert=/nonexistent/root.crt";
    let pki = Pki::new().expect("a server");
    let ca = format!("sslrootcert={}", pki.p("ca.crt"));
    for (mode, roots) in [("require", none), ("verify-ca", &ca), ("verify-full", &ca)] {
        let t = url(
            &c,
            "localhost",
            "postgres",
            &format!("sslmode={mode}&{roots}"),
            "x",
        );
        let (e, kind) = tls_failure(&t, &[]);
        assert_eq!(e, TlsError::NotOffered, "{mode}");
        assert_eq!(kind, io::ErrorKind::Unsupported);
    }
    // prefer goes on in the clear, allow starts there.
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=prefer&{none}"),
        "pref",
    );
    assert!(!works(&c, &t, "pref"));
    let t = url(
        &c,
        "127.0.0.1",
        "postgres",
        &format!("sslmode=allow&{none}"),
        "allow",
    );
    assert!(!works(&c, &t, "allow"));
}

#[test]
fn settings_are_checked() {
    match connect("postgresql://postgres@127.0.0.1:1/postgres?sslmode=verify-fool&name=x") {
        Err(Error::Connect { source, .. }) => {
            assert_eq!(source.kind(), io::ErrorKind::InvalidInput);
            assert!(source.to_string().contains("sslmode"), "{source}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Every libpq form of the four keys parses.
    for t in [
        "postgresql://postgres@127.0.0.1:1/postgres?sslmode=require&sslrootcert=%2Ftmp%2Fr.crt&sslcert=/c&sslkey=/k&name=x",
        "host=127.0.0.1 port=1 user=postgres sslmode=verify-full sslrootcert='/tmp/r r.crt' sslcert=/c sslkey=/k name=x",
    ] {
        match connect(t) {
            Err(Error::Connect { source, .. }) => {
                assert_ne!(source.kind(), io::ErrorKind::InvalidInput, "{t}: {source}")
            }
            other => panic!("{t}: {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn a_wait_over_tls_is_cancelled() {
    use locksfile::{Cancel, Kind, Wait};
    use std::time::{Duration, Instant};
    let Some(pki) = Pki::new() else { return };
    let c = pki.cluster().expect("a server");
    let q = format!("sslmode=verify-full&sslrootcert={}", pki.p("ca.crt"));
    let a = connect(&url(&c, "localhost", "postgres", &q, "holder")).unwrap();
    let b = connect(&url(&c, "localhost", "postgres", &q, "waiter")).unwrap();
    assert!(encrypted(&c, "waiter"));
    a.acquire(Kind::Exclusive, 3, Wait::NonBlocking).unwrap();
    let cancel = Cancel::new();
    let started = Instant::now();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| b.acquire_cancellable(Kind::Exclusive, 3, Wait::Blocking, &cancel));
        pg::until("the waiter to wait on the server", || {
            c.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                != "0"
        });
        // The server hears the cancel request (sent in the clear, as
        // libpq's PQcancel) and ends the waiting statement.
        cancel.cancel();
        let r = waiter.join().unwrap();
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    // The session goes on, still encrypted.
    drop(a);
    b.acquire(Kind::Exclusive, 3, Wait::Timeout(Duration::from_secs(10)))
        .unwrap();
    assert!(encrypted(&c, "waiter"));
}
