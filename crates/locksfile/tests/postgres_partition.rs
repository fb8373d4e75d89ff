//! A holder cut off from the server while it holds a lock: a packet filter
//! (nftables) drops every packet of its one TCP connection on the loopback
//! interface, both ways, so neither end hears from the other and nothing
//! is closed. The server (a cluster of the test's own, so the filter never
//! touches another test's server) runs with short TCP keepalives. Measured
//! from the cut: when the server frees the lock, when a second client is
//! granted it, when the cut-off holder is told (`on_lost`), when a call it
//! made after the cut fails. A resource that checks fencing tokens shows
//! that no write of the old holder is accepted after the new holder's
//! first fenced write, although the old holder went on writing for as long
//! as it believed it held the lock.
//!
//! A second run puts the two bounds in the safe order, the client's given
//! by keepalive words in its target: the server's (6 s) longer than the
//! client's (3 s), so the cut-off holder is told before anyone else is
//! granted its lock.
//!
//! Needs root and `nft` (`scripts/setup` installs it); without them the
//! test is skipped, unless `LOCKSFILE_REQUIRE_PG` is set (as in
//! `scripts/test`), when it fails. Only addresses of 127.0.0.0/8 are used.

mod pg;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use locksfile::Error;
use pg::cluster::Cluster;

/// The server's side: keepalive probes after 1 s of silence, every 1 s, and
/// the connection dropped once 2 go unanswered, or once sent data has gone
/// unacknowledged for 3 s (`tcp_user_timeout`: without it a reply the
/// holder never acknowledged would be retransmitted for about 15 minutes).
/// A session ends, and its locks are freed, at most about
/// `idle + interval × count` = 3 s after the holder's last packet.
const SERVER_SETTINGS: [&str; 4] = [
    "tcp_keepalives_idle = 1",
    "tcp_keepalives_interval = 1",
    "tcp_keepalives_count = 2",
    "tcp_user_timeout = 3000",
];
/// The bound those settings give on the server freeing the lock.
const SERVER_BOUND: Duration = Duration::from_secs(3);
/// The client's side, the engine's default on a TCP session whose target
/// says nothing (10 s idle, then 4 probes 5 s apart, and
/// `TCP_USER_TIMEOUT` of 30 s): a silent partition is noticed about 30 s
/// after the last packet.
const CLIENT_BOUND: Duration = Duration::from_secs(30);
/// What the machine may add to a bound (a loaded CI machine, polling).
const SLACK: Duration = Duration::from_secs(10);

const IDX: u64 = 7;
/// The nftables table of each test, deleted when the cut ends.
const TABLE: &str = "locksfile_partition";
const SAFE_TABLE: &str = "locksfile_partition_safe";

/// The safe order: the server's bound, 2 + 1 × 4 = 6 s, and
/// `tcp_user_timeout` the same...
const SAFE_SERVER_SETTINGS: [&str; 4] = [
    "tcp_keepalives_idle = 2",
    "tcp_keepalives_interval = 1",
    "tcp_keepalives_count = 4",
    "tcp_user_timeout = 6000",
];
const SAFE_SERVER_BOUND: Duration = Duration::from_secs(6);
/// ... longer than the client's, 1 + 1 × 2 = 3 s, from its target's words.
const SAFE_CLIENT_WORDS: &str =
    "keepalives_idle=1&keepalives_interval=1&keepalives_count=2&tcp_user_timeout=3000";
const SAFE_CLIENT_BOUND: Duration = Duration::from_secs(3);

/// Runs `nft` with `script` on its standard input.
fn nft(script: &str) -> Result<(), String> {
    // Where Debian puts it, which a root shell's PATH may lack.
    let tool = if std::path::Path::new("/usr/sbin/nft").exists() {
        "/usr/sbin/nft"
    } else {
        "nft"
    };
    let mut child = Command::new(tool)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .map_err(|e| format!("write to nft: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A table of ours that drops the loopback packets of one TCP port (both
/// directions: on `lo` each packet passes the input hook once, after the
/// sender's stack has sent it, as a lost packet on a wire). Deleted when
/// dropped, also when the test panics.
struct Cut(&'static str);

impl Cut {
    /// Whether table `table` can be made here at all (root, nftables in the
    /// kernel and the `nft` tool), with nothing dropped.
    fn probe(table: &str) -> Result<(), String> {
        // A table left by a run that was killed outright goes first.
        let _ = nft(&format!("delete table inet {table}\n"));
        nft(&format!("table inet {table} {{\n}}\n"))?;
        nft(&format!("delete table inet {table}\n"))
    }

    /// Start dropping every packet from or to local TCP port `port`, with
    /// table `table`.
    fn start(table: &'static str, port: u16) -> Cut {
        let script = format!(
            "table inet {table} {{\n\
             \tchain cut {{\n\
             \t\ttype filter hook input priority raw; policy accept;\n\
             \t\tiifname \"lo\" tcp sport {port} drop\n\
             \t\tiifname \"lo\" tcp dport {port} drop\n\
             \t}}\n\
             }}\n"
        );
        nft(&script).unwrap_or_else(|e| panic!("cut port {port}: {e}"));
        Cut(table)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let table = self.0;
        if let Err(e) = nft(&format!("delete table inet {table}\n")) {
            eprintln!("could not remove the table inet {table}: {e}");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Old,
    New,
}

/// A resource outside the database that checks fencing tokens: it keeps
/// the highest token it has seen and refuses writes with a lower one. It
/// logs every write, in the order it saw them.
#[derive(Default)]
struct Resource {
    highest: u64,
    log: Vec<(Who, u64, bool, Instant)>,
}

impl Resource {
    fn write(&mut self, who: Who, token: u64) -> bool {
        let accepted = token >= self.highest;
        if accepted {
            self.highest = token;
        }
        self.log.push((who, token, accepted, Instant::now()));
        accepted
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

#[test]
fn a_cut_off_holder_is_fenced_out_before_it_is_told() {
    let Some(cluster) = Cluster::start(&SERVER_SETTINGS) else {
        return;
    };
    if let Err(e) = Cut::probe(TABLE) {
        assert!(
            std::env::var_os("LOCKSFILE_REQUIRE_PG").is_none(),
            "no packet filter to cut a connection with ({e}), but LOCKSFILE_REQUIRE_PG is set: \
             run as root with nftables installed (scripts/setup installs it)"
        );
        eprintln!("skipped: no packet filter to cut a connection with ({e}): needs root and nft");
        return;
    }
    let pid = std::process::id();
    let old_app = format!("locksfile-partition-old-{pid}");
    let url = |app: &str| cluster.tcp_url(&format!("sslmode=disable&application_name={app}"));
    let old = Arc::new(pg::connect(&pg::target(&url(&old_app), "partition")));
    let new = pg::connect(&pg::target(
        &url(&format!("locksfile-partition-new-{pid}")),
        "partition",
    ));
    let resource = Arc::new(Mutex::new(Resource::default()));

    let g = old.write(IDX).unwrap();
    let old_token = old.fence(IDX).unwrap();
    assert!(resource.lock().unwrap().write(Who::Old, old_token));
    let (told_tx, told_rx) = mpsc::channel();
    old.on_lost(move || {
        let _ = told_tx.send(Instant::now());
    })
    .unwrap();
    // The holder's connection: its local port, and its server process.
    let row = cluster.psql(&format!(
        "SELECT client_port || ' ' || pid FROM pg_stat_activity WHERE application_name = '{old_app}'"
    ));
    let (port, backend) = row.split_once(' ').expect("the holder's session");
    let port: u16 = port.parse().unwrap();
    let old_holds = || {
        cluster.psql(&format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = {backend}"
        )) != "0"
    };
    assert!(old_holds());

    let cut = Cut::start(TABLE, port);
    let t_cut = Instant::now();
    // The second client waits for the lock; once granted it takes a token
    // and writes with it at once.
    let (granted_tx, granted_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let second = {
        let resource = resource.clone();
        std::thread::spawn(move || {
            let g = new.write(IDX).unwrap();
            let granted = Instant::now();
            let token = new.fence(IDX).unwrap();
            let accepted = resource.lock().unwrap().write(Who::New, token);
            let written = Instant::now();
            // (The test may have failed meanwhile: then nobody listens.)
            let _ = granted_tx.send((granted, token, accepted, written));
            if done_rx.recv().is_err() {
                return false;
            }
            assert!(g.is_held() && !new.lost(), "the new holder lost its lock");
            drop(g);
            new.held().is_empty()
        })
    };

    // The old holder, cut off, goes on writing for as long as it believes
    // it holds the lock; the server is watched meanwhile. A call the old
    // holder makes after the cut waits for a reply that never comes, until
    // the client's TCP gives up (`TCP_USER_TIMEOUT`).
    let deadline = t_cut + CLIENT_BOUND + SLACK * 2;
    // Not a scoped thread: a failing test must not wait for the call.
    let call = {
        let old = old.clone();
        std::thread::spawn(move || {
            let r = old.try_write(IDX + 1).map(drop);
            (Instant::now(), r)
        })
    };
    let (mut freed, mut granted, mut told) = (None, None, None);
    let mut believed_after_grant = 0;
    while told.is_none() {
        let now = Instant::now();
        assert!(
            now < deadline,
            "stuck: freed {freed:?}, granted {granted:?}, not told after {}",
            ms(now - t_cut)
        );
        if freed.is_none() && !old_holds() {
            freed = Some(now);
        }
        if granted.is_none() {
            granted = granted_rx.try_recv().ok();
        }
        if let Ok(t) = told_rx.try_recv() {
            told = Some(t);
        }
        if !old.lost() && g.is_held() {
            resource.lock().unwrap().write(Who::Old, old_token);
            if granted.is_some() {
                believed_after_grant += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (call_ended, call) = call.join().unwrap();
    let freed = freed.expect("the server freed the lock before the holder was told");
    let (granted, new_token, new_accepted, new_written) =
        granted.expect("the second client was granted before the holder was told");
    let told = told.unwrap();

    let log = resource.lock().unwrap().log.clone();
    let first_new = log
        .iter()
        .position(|&(who, ..)| who == Who::New)
        .expect("the new holder wrote");
    let old_after: Vec<_> = log[first_new + 1..]
        .iter()
        .filter(|(who, ..)| *who == Who::Old)
        .collect();
    let old_accepted_after = old_after.iter().filter(|(_, _, ok, _)| *ok).count();
    // Before the resource has seen the new token it cannot refuse the old.
    let old_accepted_between = log[..first_new]
        .iter()
        .filter(|(who, _, ok, t)| *who == Who::Old && *ok && *t >= granted)
        .count();
    eprintln!(
        "partition windows, from the cut: server freed the lock {}, second client granted {}, \
         its first fenced write {}, cut-off holder told {} (it believed it held the lock {} \
         after the grant); old holder's writes accepted between the grant and the new holder's \
         first write: {}; after it: {} tried, {} accepted (tokens {old_token} then {new_token}); \
         its call made after the cut failed {}: {call:?}",
        ms(freed - t_cut),
        ms(granted - t_cut),
        ms(new_written - t_cut),
        ms(told - t_cut),
        ms(told.saturating_duration_since(granted)),
        old_accepted_between,
        old_after.len(),
        old_accepted_after,
        ms(call_ended - t_cut),
    );

    // The server frees the lock within the bound its keepalive settings
    // give, and the waiting client gets it then.
    assert!(freed - t_cut <= SERVER_BOUND + SLACK);
    assert!(granted - t_cut <= SERVER_BOUND + SLACK);
    // The holder hears nothing for much longer: until its own keepalive
    // gives up, some 30 s after its last packet, long after the grant.
    assert!(told > granted + Duration::from_secs(10), "told too soon");
    assert!(told - t_cut <= CLIENT_BOUND + SLACK);
    assert!(
        matches!(call, Err(Error::ConnectionLost { .. })),
        "{call:?}"
    );
    assert!(call_ended > granted + Duration::from_secs(10));
    assert!(call_ended - t_cut <= CLIENT_BOUND + SLACK);
    assert!(believed_after_grant > 0);
    // Fencing: the new token is higher, its write was accepted, and not one
    // write of the old holder after it was.
    assert!(new_token > old_token && new_accepted);
    assert!(!old_after.is_empty(), "the old holder never tried after");
    assert_eq!(old_accepted_after, 0, "an old holder's write was accepted");

    // Once told: nothing held, every call refused at once.
    assert!(old.lost() && !g.is_held() && old.held().is_empty());
    assert!(matches!(
        old.write(IDX + 1),
        Err(Error::ConnectionLost { .. })
    ));
    drop(cut);
    done_tx.send(()).unwrap();
    assert!(second.join().unwrap(), "the new holder released");
}

/// The safe order: with the server's bound (6 s) longer than the client's
/// (3 s, from the keepalive words of the holder's target), the cut-off
/// holder is told before the second client is granted its lock.
#[test]
fn with_the_servers_bound_longer_the_holder_is_told_first() {
    let Some(cluster) = Cluster::start(&SAFE_SERVER_SETTINGS) else {
        return;
    };
    if let Err(e) = Cut::probe(SAFE_TABLE) {
        assert!(
            std::env::var_os("LOCKSFILE_REQUIRE_PG").is_none(),
            "no packet filter to cut a connection with ({e}), but LOCKSFILE_REQUIRE_PG is set"
        );
        eprintln!("skipped: no packet filter to cut a connection with ({e}): needs root and nft");
        return;
    }
    let pid = std::process::id();
    let old_app = format!("locksfile-partition-safe-old-{pid}");
    let url = |app: &str| {
        cluster.tcp_url(&format!(
            "sslmode=disable&application_name={app}&{SAFE_CLIENT_WORDS}"
        ))
    };
    let old = pg::connect(&pg::target(&url(&old_app), "partition-safe"));
    let new = pg::connect(&pg::target(
        &url(&format!("locksfile-partition-safe-new-{pid}")),
        "partition-safe",
    ));
    let g = old.write(IDX).unwrap();
    let (told_tx, told_rx) = mpsc::channel();
    old.on_lost(move || {
        let _ = told_tx.send(Instant::now());
    })
    .unwrap();
    let port: u16 = cluster
        .psql(&format!(
            "SELECT client_port FROM pg_stat_activity WHERE application_name = '{old_app}'"
        ))
        .parse()
        .expect("the holder's session");

    let cut = Cut::start(SAFE_TABLE, port);
    let t_cut = Instant::now();
    let (granted_tx, granted_rx) = mpsc::channel();
    let second = std::thread::spawn(move || {
        let g = new.write(IDX).unwrap();
        let _ = granted_tx.send(Instant::now());
        drop(g);
    });
    let deadline = t_cut + SAFE_SERVER_BOUND + SLACK * 2;
    let (mut told, mut granted) = (None, None);
    while granted.is_none() {
        let now = Instant::now();
        assert!(
            now < deadline,
            "stuck: told {:?}, not granted after {}",
            told.map(|t: Instant| ms(t - t_cut)),
            ms(now - t_cut)
        );
        if told.is_none() {
            told = told_rx.try_recv().ok();
        }
        granted = granted_rx.try_recv().ok();
        std::thread::sleep(Duration::from_millis(20));
    }
    let granted = granted.unwrap();
    let told = told
        .or_else(|| told_rx.try_recv().ok())
        .expect("the holder was told before the second client was granted");
    eprintln!(
        "partition windows in the safe order, from the cut: cut-off holder told {}, second \
         client granted {}: told {} before",
        ms(told - t_cut),
        ms(granted - t_cut),
        ms(granted.saturating_duration_since(told)),
    );
    assert!(told < granted, "granted before the holder was told");
    assert!(told - t_cut <= SAFE_CLIENT_BOUND + SLACK);
    assert!(granted - t_cut <= SAFE_SERVER_BOUND + SLACK);
    assert!(old.lost() && !g.is_held());
    drop(cut);
    second.join().unwrap();
}
