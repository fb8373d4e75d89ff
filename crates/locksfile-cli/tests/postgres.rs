//! `run`, `status` and `race` on a lock namespace on a real PostgreSQL
//! server (`LOCKSFILE_TEST_PG`, set by scripts/test; without it these
//! tests skip, or fail when `LOCKSFILE_REQUIRE_PG` is set).

mod common;

use std::path::Path;

use common::{code, psql, run, server, stderr, stdout, Holder};

fn target(srv: &str, test: &str) -> String {
    format!("{srv}?name=cli-{test}-{}", std::process::id())
}

#[test]
fn run_excludes_across_sessions_and_status_names_the_holder() {
    let Some(srv) = server() else { return };
    let t = target(&srv, "run");
    let holder = Holder::start(Path::new(&t), &["-x", "--span", "3..5"]);
    let out = run(&["run", "-n", "--span", "4", &t, "--", "true"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = run(&["run", "-n", "--span", "5", &t, "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&["run", "-v", "-n", "-s", "--span", "3", &t, "--", "true"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("backend pid"), "{}", stderr(&out));

    let out = run(&["status", "--json", &t]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let locks = v["locks"].as_array().unwrap();
    let indices: Vec<u64> = locks.iter().map(|l| l["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, vec![3, 4]);
    assert!(
        locks
            .iter()
            .all(|l| l["state"] == "held" && l["kind"] == "exclusive"),
        "{v}"
    );
    // The holder is the `locksfile run` process (the command runs under it).
    let app = format!("locksfile pid {}", holder.pid());
    assert!(
        locks.iter().all(|l| l["application_name"] == app.as_str()),
        "{v}"
    );
    let table = stdout(&run(&["status", &t]));
    assert!(
        table.contains("exclusive") && table.contains(&app),
        "{table}"
    );

    assert_eq!(holder.release(), 0);
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["status", "--json", &t]))).unwrap();
    assert!(v["locks"].as_array().unwrap().is_empty());
}

#[test]
fn bad_targets_are_usage_or_unavailable_errors_without_the_password() {
    let Some(srv) = server() else { return };
    let out = run(&[
        "run",
        "postgresql://u:hunter2@h:notaport/db?name=x",
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"));
    let dir = tempfile::tempdir().unwrap();
    let down = format!(
        "postgresql://u:hunter2@{}/db?name=x",
        dir.path().display().to_string().replace('/', "%2F")
    );
    let out = run(&["status", &down]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"));
    let out = run(&[
        "run",
        "--mode",
        "flock",
        &target(&srv, "mode"),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 64);
}

#[test]
fn race_over_the_server_is_verified() {
    let Some(srv) = server() else { return };
    let out = run(&[
        "race",
        "-k",
        "3",
        "-n",
        "12",
        "-r",
        "10",
        &target(&srv, "race"),
    ]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("postgres"));
    assert!(stdout(&out).contains("verified"), "{}", stdout(&out));
    // The same race without locks is caught, so the check means something.
    let out = run(&[
        "race",
        "-k",
        "3",
        "-n",
        "12",
        "-r",
        "10",
        "--unsafe-skip-locking",
        &target(&srv, "race-unlocked"),
    ]);
    assert_ne!(code(&out), 0);
}

/// `srv` (postgresql://USER@HOST/DB) as `user` on database `db`.
fn as_user_on(srv: &str, user: &str, db: &str) -> String {
    let (scheme, rest) = srv.split_once("://").expect("a URL");
    let host_db = rest.split_once('@').map_or(rest, |(_, h)| h);
    let host = host_db.split('/').next().unwrap();
    format!("{scheme}://{user}@{host}/{db}")
}

/// A role without CREATE cannot use a fresh database until `locksfile pg
/// setup --role` has run there; then it takes locks and fencing tokens
/// with nothing more, and the setup run again changes nothing.
#[test]
fn pg_setup_lets_a_least_privileged_role_take_locks() {
    let Some(srv) = server() else { return };
    let pid = std::process::id();
    let (db, role) = (format!("lf_setup_{pid}"), format!("lf_app_{pid}"));
    psql(&srv, &format!("CREATE DATABASE {db}"));
    psql(&srv, &format!("CREATE ROLE {role} LOGIN"));
    let admin = as_user_on(&srv, "postgres", &db);
    let app = format!("{}?name=jobs", as_user_on(&srv, &role, &db));
    let result = std::panic::catch_unwind(|| {
        // PostgreSQL 15+: nobody but the owner creates in `public`.
        let e = locksfile::LockFile::connect(&app).unwrap_err();
        assert!(
            matches!(&e, locksfile::Error::Server { code, .. } if code == "42501"),
            "{e}"
        );
        let printed = stdout(&run(&["pg", "setup", "--print", "--role", &role]));
        assert!(printed.contains(&format!(
            "GRANT SELECT, INSERT ON locksfile_namespaces TO \"{role}\""
        )));
        for _ in 0..2 {
            let out = run(&["pg", "setup", &admin, "--role", &role]);
            assert_eq!(code(&out), 0, "{}", stderr(&out));
        }
        let lf = locksfile::LockFile::connect(&app).expect("the role connects after setup");
        let g = lf.write(3).unwrap();
        assert_eq!(lf.fence(3).unwrap() + 1, lf.fence(3).unwrap());
        drop(g);
        // Least privilege: the role may not create, nor drop the tables.
        let other = format!("{}?name=other", as_user_on(&srv, &role, &db));
        drop(locksfile::LockFile::connect(&other).expect("a new namespace is a row"));
        let out = std::process::Command::new("psql")
            .args([
                &as_user_on(&srv, &role, &db),
                "-XAtqc",
                "DROP TABLE locksfile_fences",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "the role dropped a lock table");
        // A role that does not exist: refused, a usage-free server error.
        let out = run(&["pg", "setup", &admin, "--role", "no_such_role_here"]);
        assert_ne!(code(&out), 0);
        assert!(
            stderr(&out).contains("no_such_role_here"),
            "{}",
            stderr(&out)
        );
    });
    // Sessions of the test are closed by now; the database goes.
    psql(&srv, &format!("DROP DATABASE {db} WITH (FORCE)"));
    psql(&srv, &format!("DROP ROLE {role}"));
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
