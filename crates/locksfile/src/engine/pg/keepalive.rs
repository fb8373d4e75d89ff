//! The session socket's TCP keepalive and `TCP_USER_TIMEOUT`, from libpq's
//! words in the target (`keepalives`, `keepalives_idle`,
//! `keepalives_interval`, `keepalives_count`, `tcp_user_timeout`), with
//! libpq's meanings: `keepalives=0` turns keepalive off, the others are
//! seconds (a count for `keepalives_count`, milliseconds for
//! `tcp_user_timeout`), and 0 leaves the system's default.
//!
//! Where libpq leaves the system's defaults (keepalive after two hours of
//! silence, unacknowledged data retried for about fifteen minutes), the
//! engine has defaults of its own: a holder cut off from the server must
//! learn it lost its locks, as the server frees them, within a bound it
//! knows: keepalive after 10 s of silence, every 5 s, 4 probes, and a
//! `TCP_USER_TIMEOUT` of `keepalives_idle + keepalives_interval ×
//! keepalives_count` (30 s) unless the target gives one.

use std::io;
use std::os::fd::BorrowedFd;

use crate::sys::{self, Keepalive};

/// The engine's `keepalives_idle`, in seconds.
pub(super) const IDLE: u32 = 10;
/// The engine's `keepalives_interval`, in seconds.
pub(super) const INTERVAL: u32 = 5;
/// The engine's `keepalives_count`.
pub(super) const COUNT: u32 = 4;

/// The words the target gave; `None` where it said nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Words {
    keepalives: Option<bool>,
    idle: Option<u32>,
    interval: Option<u32>,
    count: Option<u32>,
    user_timeout_ms: Option<u32>,
}

/// libpq's integer: optional blanks around an optional sign and digits;
/// a negative value is 0, as libpq takes it.
fn int(k: &str, v: &str) -> Result<u32, String> {
    let t = v.trim();
    let n: i64 = t
        .parse()
        .map_err(|_| format!("invalid integer value \"{v}\" for connection option \"{k}\""))?;
    Ok(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

impl Words {
    /// Take `k=v` when it is one of the words: `Ok(true)`; `Ok(false)` for
    /// another word; an error for a value libpq would refuse.
    pub fn take(&mut self, k: &str, v: &str) -> Result<bool, String> {
        match k {
            "keepalives" => self.keepalives = Some(int(k, v)? != 0),
            "keepalives_idle" => self.idle = Some(int(k, v)?),
            "keepalives_interval" => self.interval = Some(int(k, v)?),
            "keepalives_count" => self.count = Some(int(k, v)?),
            "tcp_user_timeout" => self.user_timeout_ms = Some(int(k, v)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether `k` is one of the words.
    pub fn is_word(k: &str) -> bool {
        matches!(
            k,
            "keepalives"
                | "keepalives_idle"
                | "keepalives_interval"
                | "keepalives_count"
                | "tcp_user_timeout"
        )
    }

    /// Set the words (the engine's defaults where the target said nothing)
    /// on a TCP socket. Without `tcp_user_timeout`, sent data may stay
    /// unacknowledged for keepalive's bound: idle + interval × count, each
    /// as it is on the socket (the system's where the target said 0).
    pub fn apply(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut k = Keepalive {
            on: self.keepalives.unwrap_or(true),
            idle: self.idle.unwrap_or(IDLE),
            interval: self.interval.unwrap_or(INTERVAL),
            count: self.count.unwrap_or(COUNT),
            user_timeout_ms: self.user_timeout_ms.unwrap_or(0),
        };
        if self.user_timeout_ms.is_none() {
            // The system's values where the target said 0.
            let now = sys::keepalive_of(fd)?;
            let or_now = |v: u32, sys: u32| if v == 0 { sys } else { v };
            let bound = u64::from(or_now(k.idle, now.idle))
                + u64::from(or_now(k.interval, now.interval))
                    * u64::from(or_now(k.count, now.count));
            k.user_timeout_ms = u32::try_from(bound * 1000).unwrap_or(u32::MAX);
        }
        sys::set_keepalive(fd, &k)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    use super::*;

    /// A connected loopback socket with `words` applied, read back.
    fn applied(words: &[(&str, &str)]) -> Keepalive {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut w = Words::default();
        for (k, v) in words {
            assert!(w.take(k, v).unwrap(), "{k}");
        }
        w.apply(s.as_fd()).unwrap();
        sys::keepalive_of(s.as_fd()).unwrap()
    }

    fn system() -> Keepalive {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        sys::keepalive_of(s.as_fd()).unwrap()
    }

    #[test]
    fn the_engine_defaults_bound_a_partition_at_30_s() {
        let k = applied(&[]);
        assert_eq!(
            k,
            Keepalive {
                on: true,
                idle: 10,
                interval: 5,
                count: 4,
                user_timeout_ms: 30_000
            }
        );
    }

    #[test]
    fn the_targets_words_are_set_as_libpq_means_them() {
        let k = applied(&[
            ("keepalives_idle", "7"),
            ("keepalives_interval", "3"),
            ("keepalives_count", "2"),
            ("tcp_user_timeout", "12000"),
        ]);
        assert_eq!(
            k,
            Keepalive {
                on: true,
                idle: 7,
                interval: 3,
                count: 2,
                user_timeout_ms: 12_000
            }
        );
        // Without tcp_user_timeout: keepalive's own bound, 7 + 3 × 2 s.
        let k = applied(&[
            ("keepalives_idle", "7"),
            ("keepalives_interval", "3"),
            ("keepalives_count", "2"),
        ]);
        assert_eq!(k.user_timeout_ms, 13_000);
        // One word alone: the engine's defaults for the others.
        let k = applied(&[("keepalives_idle", "20")]);
        assert_eq!((k.idle, k.interval, k.count), (20, 5, 4));
        assert_eq!(k.user_timeout_ms, 40_000);
    }

    #[test]
    fn keepalives_0_turns_keepalive_off() {
        let k = applied(&[("keepalives", "0")]);
        assert!(!k.on);
        // Sent data is still bounded, by the engine's default.
        assert_eq!(k.user_timeout_ms, 30_000);
        assert!(applied(&[("keepalives", "1")]).on);
    }

    #[test]
    fn zero_leaves_the_systems_default() {
        let sys = system();
        let k = applied(&[
            ("keepalives_idle", "0"),
            ("keepalives_interval", "0"),
            ("keepalives_count", "0"),
            ("tcp_user_timeout", "0"),
        ]);
        assert!(k.on);
        assert_eq!(
            (k.idle, k.interval, k.count, k.user_timeout_ms),
            (sys.idle, sys.interval, sys.count, sys.user_timeout_ms)
        );
        // The system's keepalive bound when only the timeout is unsaid.
        let k = applied(&[("keepalives_idle", "0")]);
        assert_eq!(k.idle, sys.idle);
        assert_eq!(k.user_timeout_ms, (sys.idle + 5 * 4) * 1000);
    }

    #[test]
    fn values_libpq_refuses_are_refused() {
        let mut w = Words::default();
        assert!(w.take("keepalives_idle", "ten").is_err());
        assert!(w.take("tcp_user_timeout", "1.5").is_err());
        assert!(!w.take("connect_timeout", "3").unwrap());
        // Negative: 0, as libpq takes it.
        assert!(w.take("keepalives_count", "-1").unwrap());
        assert_eq!(w.count, Some(0));
    }
}
