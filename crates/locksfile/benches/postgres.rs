//! Uncontended lock + unlock pairs on a PostgreSQL server over a Unix
//! socket: the engine (a guard: `pg_try_advisory_lock(ns, k)` then
//! `pg_advisory_unlock(ns, k)`, prepared) against the raw pair `SELECT
//! pg_advisory_lock(k)` / `SELECT pg_advisory_unlock(k)` with the same
//! client (tokio-postgres on a current-thread runtime, prepared statements)
//! in the same run; then both again with 10,000 other locks held by the
//! same session. Rounds alternate between the two so drift hits both.
//!
//! Needs a server: `scripts/bench-pg` starts a throwaway one, or set
//! `LOCKSFILE_TEST_PG` to a URL. Settings: `PG_BENCH_PAIRS` (20000 per
//! round), `PG_BENCH_ROUNDS` (7).

use std::time::Instant;

use locksfile::LockFile;
use tokio_postgres::NoTls;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Raw {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
}

impl Raw {
    fn connect(url: &str) -> Raw {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let config: tokio_postgres::Config = url.parse().unwrap();
        let tokio_postgres::config::Host::Unix(dir) = &config.get_hosts()[0] else {
            panic!("the benchmark wants a Unix-socket URL")
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let path = dir.join(format!(".s.PGSQL.{port}"));
        let (client, lock, unlock) = rt.block_on(async {
            let s = tokio::net::UnixStream::connect(path).await.unwrap();
            let (client, conn) = config.connect_raw(s, NoTls).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let lock = client.prepare("SELECT pg_advisory_lock($1)").await.unwrap();
            let unlock = client
                .prepare("SELECT pg_advisory_unlock($1)")
                .await
                .unwrap();
            (client, lock, unlock)
        });
        Raw {
            rt,
            client,
            lock,
            unlock,
        }
    }

    fn pair(&self, k: i64) {
        self.rt.block_on(async {
            self.client.query_one(&self.lock, &[&k]).await.unwrap();
            self.client.query_one(&self.unlock, &[&k]).await.unwrap();
        });
    }
}

/// Median microseconds per pair over `rounds` rounds of `n` pairs.
fn measure(rounds: usize, n: usize, mut raw: impl FnMut(), mut ours: impl FnMut()) -> (f64, f64) {
    let mut r = Vec::new();
    let mut o = Vec::new();
    for _ in 0..n / 10 {
        raw();
        ours();
    }
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            raw();
        }
        r.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        let t = Instant::now();
        for _ in 0..n {
            ours();
        }
        o.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    (median(&mut r), median(&mut o))
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--list` asks for nothing.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Ok(url) = std::env::var("LOCKSFILE_TEST_PG") else {
        eprintln!("postgres bench: skipped, no server (scripts/bench-pg starts one)");
        return;
    };
    let n = env_or("PG_BENCH_PAIRS", 20_000);
    let rounds = env_or("PG_BENCH_ROUNDS", 7);
    let raw = Raw::connect(&url);
    let lf = LockFile::connect(&format!("{url}?name=bench-{}", std::process::id())).unwrap();

    println!("uncontended lock + unlock pair over a Unix socket, median of {rounds} rounds of {n}");
    println!(
        "{:<34} {:>10} {:>10} {:>7}",
        "", "raw us", "ours us", "ratio"
    );
    let (r0, o0) = measure(
        rounds,
        n,
        || raw.pair(5),
        || drop(lf.try_write(5u64).unwrap()),
    );
    println!(
        "{:<34} {:>10.2} {:>10.2} {:>7.2}",
        "no other locks held",
        r0,
        o0,
        o0 / r0
    );

    // 10,000 other locks held by other sessions: the lock table is
    // shared, so this is what "other locks held" costs a pair.
    let target = format!("{url}?name=bench-{}", std::process::id());
    let others = LockFile::connect(&target).unwrap();
    let raw_other = Raw::connect(&url);
    hold_10k_raw(&raw_other);
    let mut held = hold_10k(&others);
    let (r1, o1) = measure(
        rounds,
        n,
        || raw.pair(5),
        || drop(lf.try_write(5u64).unwrap()),
    );
    row("10,000 held by other sessions", r1, o1);
    held.clear();
    drop(raw_other);

    // 10,000 held by the measured sessions themselves: the server scans a
    // session's own lock table at the end of every statement, lock or not,
    // so every statement of such a session slows down, raw or ours.
    hold_10k_raw(&raw);
    held = hold_10k(&lf);
    let (r2, o2) = measure(
        rounds,
        n,
        || raw.pair(5),
        || drop(lf.try_write(5u64).unwrap()),
    );
    row("10,000 held by the same session", r2, o2);
    println!(
        "flatness against none held: other sessions raw {:.2}, ours {:.2}; same session raw {:.2}, ours {:.2}",
        r1 / r0,
        o1 / o0,
        r2 / r0,
        o2 / o0
    );
    drop(held);
}

fn row(what: &str, raw: f64, ours: f64) {
    println!("{what:<34} {raw:>10.2} {ours:>10.2} {:>7.2}", ours / raw);
}

fn hold_10k_raw(raw: &Raw) {
    raw.rt.block_on(async {
        raw.client
            .simple_query(
                "SELECT count(*) FROM (SELECT pg_advisory_lock(k) \
                 FROM generate_series(100000, 109999) k) s",
            )
            .await
            .unwrap();
    });
}

fn hold_10k(lf: &LockFile) -> Vec<locksfile::WriteGuard<&LockFile>> {
    (1000..11_000u64)
        .step_by(4000)
        .map(|start| lf.write(start..(start + 4000).min(11_000)).unwrap())
        .collect()
}
