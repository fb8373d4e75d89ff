//! Naming a lock namespace on a server: the URL and key=value forms, the
//! libpq defaults and environment (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGDATABASE`, `PGPASSWORD`, `PGPASSFILE` / `~/.pgpass`), and a form of
//! the target that is safe to print (never the password). libpq's TLS
//! settings (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) are taken out
//! here, as the client library knows only some of them: see `tls.rs`; so
//! are libpq's keepalive words, which the engine sets on its socket itself
//! (`keepalive.rs`).

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use tokio_postgres::config::{Config, Host};

use super::keepalive::Words;
use super::tls::{Given, Tls};
use crate::error::Error;

/// Where a namespace lives and what it is called there.
pub(crate) struct Target {
    pub config: Config,
    /// The namespace's name (`name=`).
    pub name: String,
    /// `postgresql://user@host:port/dbname?name=NAME`, without a password
    /// (with `&sslmode=` when one was given).
    pub shown: String,
    /// TLS: libpq's settings, defaults filled in.
    pub tls: Tls,
    /// TCP keepalive and `TCP_USER_TIMEOUT`: libpq's words as given.
    pub keepalive: Words,
}

/// Whether `s` names a lock namespace on a server rather than a file: a
/// `postgresql://` or `postgres://` URL, or a libpq key=value string whose
/// first word is `key=value` and which has a `name=` word. A file whose
/// name looks like that is opened as `./host=...`.
pub(crate) fn is_target(s: &str) -> bool {
    if s.starts_with("postgresql://") || s.starts_with("postgres://") {
        return true;
    }
    let Some(first) = words(s).into_iter().next() else {
        return false;
    };
    let is_key = |w: &str| {
        w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
    };
    is_key(&first) && words(s).iter().any(|w| w.starts_with("name="))
}

/// The words of a key=value string, with libpq's single quotes and
/// backslash escapes kept as written (the parser reads them).
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn bad(target: &str, why: impl Into<String>) -> Error {
    Error::Connect {
        target: redact(target),
        source: io::Error::new(io::ErrorKind::InvalidInput, why.into()),
    }
}

/// `s` with any password taken out, for messages about a target that did
/// not parse.
pub(crate) fn redact(s: &str) -> String {
    if let Some(rest) = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
    {
        let scheme = &s[..s.len() - rest.len()];
        let (auth, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let auth = match auth.rsplit_once('@') {
            Some((user, host)) => {
                let user = user.split(':').next().unwrap_or("");
                format!("{user}@{host}")
            }
            None => auth.to_string(),
        };
        // A password given as a query parameter.
        let tail = match tail.split_once('?') {
            Some((path, q)) => {
                let q: Vec<&str> = q
                    .split('&')
                    .filter(|p| !p.starts_with("password="))
                    .collect();
                format!("{path}?{}", q.join("&"))
            }
            None => tail.to_string(),
        };
        return format!("{scheme}{auth}{tail}");
    }
    words(s)
        .into_iter()
        .filter(|w| !w.starts_with("password="))
        .collect::<Vec<_>>()
        .join(" ")
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Take `name=`, the TLS settings and the keepalive words out of `s` (the
/// client library would refuse or misread them), returning the rest, the
/// name and the settings.
fn split_name(s: &str) -> Result<(String, String, Given, Words), Error> {
    let mut tls = Given::default();
    let mut keepalive = Words::default();
    if let Some(at) = s.find('?').filter(|_| s.contains("://")) {
        let (base, query) = (&s[..at], &s[at + 1..]);
        let mut name = None;
        let mut rest = Vec::new();
        for p in query.split('&').filter(|p| !p.is_empty()) {
            if let Some(v) = p.strip_prefix("name=") {
                name = Some(percent_decode(v).ok_or_else(|| bad(s, "bad %-escape in name"))?);
            } else if let Some((k, v)) = p.split_once('=').filter(|(k, _)| k.starts_with("ssl")) {
                let v = percent_decode(v).ok_or_else(|| bad(s, format!("bad %-escape in {k}")))?;
                if !tls.take(k, v) {
                    rest.push(p);
                }
            } else if let Some((k, v)) = p.split_once('=').filter(|(k, _)| Words::is_word(k)) {
                let v = percent_decode(v).ok_or_else(|| bad(s, format!("bad %-escape in {k}")))?;
                keepalive.take(k, &v).map_err(|why| bad(s, why))?;
            } else {
                rest.push(p);
            }
        }
        let name = name.ok_or_else(|| bad(s, "no `name=` parameter: the lock namespace"))?;
        let joined = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        return Ok((joined, name, tls, keepalive));
    }
    if s.contains("://") {
        return Err(bad(s, "no `name=` parameter: the lock namespace"));
    }
    let mut name = None;
    let mut rest = Vec::new();
    for w in words(s) {
        if let Some(v) = w.strip_prefix("name=") {
            name = Some(unquote(v));
        } else if let Some((k, v)) = w.split_once('=').filter(|(k, _)| k.starts_with("ssl")) {
            if !tls.take(k, unquote(v)) {
                rest.push(w);
            }
        } else if let Some((k, v)) = w.split_once('=').filter(|(k, _)| Words::is_word(k)) {
            keepalive.take(k, &unquote(v)).map_err(|why| bad(s, why))?;
        } else {
            rest.push(w);
        }
    }
    let name = name.ok_or_else(|| bad(s, "no `name=` word: the lock namespace"))?;
    Ok((rest.join(" "), name, tls, keepalive))
}

fn unquote(v: &str) -> String {
    let v = v
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(v);
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Target {
    /// Parse `s` and fill in what libpq would take from the environment.
    pub fn parse(s: &str) -> Result<Target, Error> {
        let (rest, name, given, keepalive) = split_name(s)?;
        if name.is_empty() {
            return Err(bad(s, "the namespace name is empty"));
        }
        // An empty key=value string is a valid libpq one (all defaults).
        let mut config = if rest.trim().is_empty() {
            Config::new()
        } else {
            Config::from_str(&rest).map_err(|e| bad(s, format!("malformed target: {e}")))?
        };
        if config.get_hosts().is_empty() {
            let host = std::env::var("PGHOST").unwrap_or_else(|_| "/var/run/postgresql".into());
            for h in host.split(',') {
                config.host(h);
            }
        }
        if config.get_ports().is_empty() {
            let port = match std::env::var("PGPORT") {
                Ok(p) => p
                    .parse()
                    .map_err(|_| bad(s, "PGPORT is not a port number"))?,
                Err(_) => 5432,
            };
            config.port(port);
        }
        if config.get_user().is_none() {
            let user = match std::env::var("PGUSER") {
                Ok(u) => u,
                Err(_) => os_user().ok_or_else(|| bad(s, "no user given and none known"))?,
            };
            config.user(user);
        }
        if config.get_dbname().is_none() {
            let db = std::env::var("PGDATABASE")
                .unwrap_or_else(|_| config.get_user().unwrap_or_default().to_string());
            config.dbname(db);
        }
        if config.get_application_name().is_none() {
            // Names the holder in `conflicts()` and pg_stat_activity.
            config.application_name(format!("locksfile pid {}", std::process::id()));
        }
        if config.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            } else if let Some(p) = pgpass(&config) {
                config.password(p);
            }
        }
        let tls = Tls::resolve(given).map_err(|why| bad(s, why))?;
        // The engine asks for TLS itself (`connect.rs`) and hands the
        // client library a stream that is already what it will be; its
        // cancel requests then go in the clear, as libpq's `PQcancel`.
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let mut shown = shown(&config, &name);
        if tls.mode_given {
            shown.push_str("&sslmode=");
            shown.push_str(tls.mode.as_str());
        }
        Ok(Target {
            config,
            name,
            shown,
            tls,
            keepalive,
        })
    }
}

fn os_user() -> Option<String> {
    std::env::var("USER")
        .ok()
        .or_else(|| std::env::var("LOGNAME").ok())
}

fn host_text(h: &Host) -> String {
    match h {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    }
}

fn shown(config: &Config, name: &str) -> String {
    let user = config.get_user().unwrap_or_default();
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match h {
                Host::Tcp(h) if h.contains(':') => format!("[{h}]:{port}"),
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(p) => format!("{}:{port}", p.display().to_string().replace('/', "%2F")),
            }
        })
        .collect();
    format!(
        "postgresql://{user}@{}/{}?name={name}",
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

/// The password for the first host from the password file, as libpq reads
/// it: `PGPASSFILE` or `~/.pgpass`, ignored unless only its owner can read
/// it, lines `host:port:database:user:password` with `*` wildcards and `\`
/// escapes; a Unix-socket host matches `localhost`.
fn pgpass(config: &Config) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = match std::env::var_os("PGPASSFILE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".pgpass"),
    };
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = match config.get_hosts().first()? {
        Host::Unix(_) => "localhost".to_string(),
        h => host_text(h),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let want = [
        host.as_str(),
        port.as_str(),
        config.get_dbname().unwrap_or_default(),
        config.get_user().unwrap_or_default(),
    ];
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = pgpass_fields(line);
        if fields.len() < 5 {
            continue;
        }
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn pgpass_fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("one field at least").push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().expect("one field at least").push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_urls_and_key_value_strings() {
        assert!(is_target("postgresql://h/db?name=x"));
        assert!(is_target("postgres://h/db?name=x"));
        assert!(is_target("host=/tmp dbname=x name=jobs"));
        assert!(!is_target("host=/tmp dbname=x")); // no name=
        assert!(!is_target("./host=/tmp name=x"));
        assert!(!is_target("/var/lock/app.lock"));
        assert!(!is_target("data name=x.lock"));
    }

    #[test]
    fn passwords_are_never_shown() {
        std::env::remove_var("PGPASSWORD");
        let t = Target::parse("postgresql://u:s3cret@db.example:6543/app?name=jobs").unwrap();
        assert_eq!(t.shown, "postgresql://u@db.example:6543/app?name=jobs");
        assert_eq!(t.config.get_password(), Some(&b"s3cret"[..]));
        let t = Target::parse("host=h user=u password='s 3' dbname=d name=n").unwrap();
        assert!(!t.shown.contains("s 3"));
        assert_eq!(t.name, "n");
        assert!(!redact("postgresql://u:s3cret@h/d?name=x&password=p2").contains("s3cret"));
        assert!(!redact("postgresql://u:s3cret@h/d?name=x&password=p2").contains("p2"));
        assert!(!redact("host=h password=s3cret name=x").contains("s3cret"));
    }

    #[test]
    fn tls_settings_are_taken_out_in_both_forms() {
        use std::path::Path;
        let t = Target::parse(
            "postgresql://u@h/d?sslmode=verify-full&sslrootcert=%2Fr%20r.crt&sslcert=/c&sslkey=/k&name=x",
        )
        .unwrap();
        assert_eq!(t.tls.mode, super::super::tls::SslMode::VerifyFull);
        assert_eq!(t.tls.rootcert.as_deref(), Some(Path::new("/r r.crt")));
        assert_eq!(t.tls.cert.as_deref(), Some(Path::new("/c")));
        assert_eq!(t.tls.key.as_deref(), Some(Path::new("/k")));
        assert_eq!(
            t.shown,
            "postgresql://u@h:5432/d?name=x&sslmode=verify-full"
        );
        let t = Target::parse(
            "host=h user=u dbname=d sslmode=verify-ca sslrootcert='/r r.crt' sslkey=/k name=x",
        )
        .unwrap();
        assert_eq!(t.tls.mode, super::super::tls::SslMode::VerifyCa);
        assert_eq!(t.tls.rootcert.as_deref(), Some(Path::new("/r r.crt")));
        assert_eq!(t.tls.key.as_deref(), Some(Path::new("/k")));
        for s in [
            "postgresql://u@h/d?sslmode=verify&name=x",
            "host=h user=u sslmode=sometimes name=x",
            "postgresql://u@h/d?sslmode=require&sslrootcert=system&name=x",
        ] {
            match Target::parse(s) {
                Err(Error::Connect { source, .. }) => {
                    assert_eq!(source.kind(), io::ErrorKind::InvalidInput, "{s}")
                }
                other => panic!("{s}: {:?}", other.map(|t| t.shown)),
            }
        }
    }

    #[test]
    fn keepalive_words_are_taken_out_in_both_forms() {
        let mut want = Words::default();
        for (k, v) in [
            ("keepalives_idle", "7"),
            ("keepalives_interval", "3"),
            ("keepalives_count", "2"),
            ("tcp_user_timeout", "12000"),
        ] {
            want.take(k, v).unwrap();
        }
        let t = Target::parse(
            "postgresql://u@h/d?keepalives_idle=7&keepalives_interval=3&keepalives_count=2&tcp_user_timeout=12000&name=x",
        )
        .unwrap();
        assert_eq!(t.keepalive, want);
        assert_eq!(t.shown, "postgresql://u@h:5432/d?name=x");
        let t = Target::parse(
            "host=h user=u keepalives_idle=7 keepalives_interval='3' keepalives_count=2 \
             tcp_user_timeout=12000 name=x",
        )
        .unwrap();
        assert_eq!(t.keepalive, want);
        let t = Target::parse("host=h user=u keepalives=0 name=x").unwrap();
        let mut off = Words::default();
        off.take("keepalives", "0").unwrap();
        assert_eq!(t.keepalive, off);
        for s in [
            "postgresql://u@h/d?keepalives_idle=soon&name=x",
            "host=h user=u tcp_user_timeout=1.5 name=x",
        ] {
            match Target::parse(s) {
                Err(Error::Connect { source, .. }) => {
                    assert_eq!(source.kind(), io::ErrorKind::InvalidInput, "{s}")
                }
                other => panic!("{s}: {:?}", other.map(|t| t.shown)),
            }
        }
    }

    #[test]
    fn unix_socket_forms() {
        let t = Target::parse("postgresql://u@%2Ftmp%2Fpg/db?name=a%20b").unwrap();
        assert_eq!(t.name, "a b");
        assert!(matches!(t.config.get_hosts()[0], Host::Unix(_)));
        let t = Target::parse("postgresql:///db?host=/tmp/pg&user=u&name=a").unwrap();
        assert!(matches!(t.config.get_hosts()[0], Host::Unix(_)));
        assert_eq!(t.config.get_dbname(), Some("db"));
    }

    #[test]
    fn malformed_targets_are_typed_errors() {
        for s in [
            "postgresql://h/db",
            "postgresql://h:notaport/db?name=x",
            "host=h nosuchoption=1 name=x",
            "postgresql://h/db?name=",
        ] {
            match Target::parse(s) {
                Err(Error::Connect { source, .. }) => {
                    assert_eq!(source.kind(), io::ErrorKind::InvalidInput, "{s}")
                }
                other => panic!("{s}: {:?}", other.map(|t| t.shown)),
            }
        }
    }

    #[test]
    fn pgpass_lines_with_escapes() {
        assert_eq!(
            pgpass_fields(r"h:5432:*:u:pa\:ss:word"),
            vec!["h", "5432", "*", "u", "pa:ss:word"]
        );
    }
}
