//! What `top` keeps across refreshes and how a frame is laid out.
//!
//! The statistics panel ("hottest locks") and the wait histogram are drawn
//! from a [`StatsSource`]: today [`Observed`], which counts what the
//! refreshes saw. A source that reads counters kept by the locks
//! themselves (acquisitions, contended acquisitions, wait quantiles per
//! index) plugs in by implementing the same trait.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One holder or waiter, whatever it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub waiting: bool,
    pub exclusive: bool,
    /// OFD, POSIX, FLOCK, SHM or PG.
    pub mode: String,
    pub start: u64,
    /// One past the last index; `None`: to the end.
    pub end: Option<u64>,
    /// The processes behind it, comma-separated (`?` when unknown).
    pub pids: String,
    pub command: String,
    /// A shm lock's owner (handle) number.
    pub owner: Option<u64>,
    /// A kernel waiter: the id of the lock it waits behind.
    pub behind: Option<u64>,
}

impl Row {
    fn span(&self) -> String {
        match self.end {
            None => format!("{}..", self.start),
            Some(e) if e == self.start + 1 => self.start.to_string(),
            Some(e) => format!("{}..{e}", self.start),
        }
    }

    /// The indices counted for the hottest-locks panel: a long range
    /// counts its first indices only, so one `0..` lock cannot flood it.
    fn indices(&self) -> std::ops::Range<u64> {
        const MAX: u64 = 64;
        let end = self.end.unwrap_or(self.start + 1);
        self.start..end.min(self.start.saturating_add(MAX))
    }
}

/// Per-index figures for the statistics panel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IndexStats {
    pub index: u64,
    /// Times the lock was acquired (observed: refreshes that saw it held).
    pub acquired: u64,
    /// Acquisitions that had to wait (observed: refreshes that saw a waiter).
    pub contended: u64,
    pub wait_p50: Option<Duration>,
    pub wait_p99: Option<Duration>,
    pub wait_max: Option<Duration>,
}

/// Wait times in the log2 buckets of microseconds that `locksfile race
/// --json` uses too.
pub use crate::race::WAIT_BUCKETS;

pub fn bucket_of(wait: Duration) -> usize {
    crate::race::wait_bucket(u64::try_from(wait.as_micros()).unwrap_or(u64::MAX))
}

/// What the statistics panel and the histogram are drawn from.
pub trait StatsSource {
    /// The panel's heading: what the numbers are.
    fn heading(&self) -> String;
    /// Column names for `acquired` and `contended`.
    fn columns(&self) -> (&'static str, &'static str);
    /// Figures for every index known.
    fn per_index(&self) -> Vec<IndexStats>;
    /// Wait times counted in [`WAIT_BUCKETS`] log2 buckets.
    fn wait_histogram(&self) -> [u64; WAIT_BUCKETS];
    /// The histogram's heading: which waits it counts.
    fn histogram_heading(&self) -> String;
}

/// What the refreshes saw, kept across them.
#[derive(Default)]
pub struct Observed {
    pub refreshes: u64,
    /// Waiters now waiting, by who and what, with the first and the last
    /// refresh that showed them.
    waits: HashMap<WaitKey, (Instant, Instant)>,
    held_seen: HashMap<u64, u64>,
    contended_seen: HashMap<u64, u64>,
    /// Waits that ended, by the first index they waited for (the last
    /// few thousand of each), and all of them in buckets.
    ended: HashMap<u64, Vec<Duration>>,
    ended_buckets: [u64; WAIT_BUCKETS],
}

/// A waiting process (or `?`), its shm owner, span, kind and mode.
type WaitKey = (String, Option<u64>, u64, Option<u64>, bool, String);

/// One key per process behind a waiter: when two processes wait for the
/// same range, the kernel's waiter lines cannot always be told apart and
/// a line may be shown with both for a while; each process's wait goes on.
fn keys_of(r: &Row) -> impl Iterator<Item = WaitKey> + '_ {
    r.pids.split(',').map(move |pid| {
        (
            pid.to_string(),
            r.owner,
            r.start,
            r.end,
            r.exclusive,
            r.mode.clone(),
        )
    })
}

impl Observed {
    /// Take in one refresh's rows, read at `now`.
    pub fn see(&mut self, rows: &[Row], now: Instant) {
        self.refreshes += 1;
        let mut held = HashSet::new();
        let mut contended = HashSet::new();
        let mut present = HashSet::new();
        for r in rows {
            if r.waiting {
                contended.extend(r.indices());
                for k in keys_of(r) {
                    self.waits
                        .entry(k.clone())
                        .and_modify(|(_, last)| *last = now)
                        .or_insert((now, now));
                    present.insert(k);
                }
            } else {
                held.extend(r.indices());
            }
        }
        for i in held {
            *self.held_seen.entry(i).or_default() += 1;
        }
        for i in contended {
            *self.contended_seen.entry(i).or_default() += 1;
        }
        // A waiter gone since the last refresh got its lock (or gave up):
        // its wait lasted at least from first to last sight.
        let gone: Vec<WaitKey> = self
            .waits
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            let (first, last) = self.waits.remove(&k).expect("a key just listed");
            let d = last - first;
            // Seen once only: nothing is known of its length.
            if d.is_zero() {
                continue;
            }
            self.ended_buckets[bucket_of(d)] += 1;
            let v = self.ended.entry(k.2).or_default();
            if v.len() >= 4096 {
                v.remove(0);
            }
            v.push(d);
        }
    }

    /// How long the waiter of `r` has been seen waiting: from the first
    /// to the last refresh that showed it (zero on its first).
    pub fn waited(&self, r: &Row) -> Duration {
        keys_of(r)
            .filter_map(|k| self.waits.get(&k))
            .map(|(first, last)| *last - *first)
            .max()
            .unwrap_or_default()
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((last as f64) * q).round() as usize])
}

impl StatsSource for Observed {
    fn heading(&self) -> String {
        format!(
            "HOTTEST LOCKS (seen over {} refreshes since top started)",
            self.refreshes
        )
    }

    fn columns(&self) -> (&'static str, &'static str) {
        ("SEEN HELD", "SEEN WAITED")
    }

    fn per_index(&self) -> Vec<IndexStats> {
        let mut waits: HashMap<u64, Vec<Duration>> = self.ended.clone();
        for (k, (first, last)) in &self.waits {
            if last > first {
                waits.entry(k.2).or_default().push(*last - *first);
            }
        }
        let indices: HashSet<u64> = self
            .held_seen
            .keys()
            .chain(self.contended_seen.keys())
            .copied()
            .collect();
        indices
            .into_iter()
            .map(|index| {
                let mut w = waits.remove(&index).unwrap_or_default();
                w.sort();
                IndexStats {
                    index,
                    acquired: self.held_seen.get(&index).copied().unwrap_or(0),
                    contended: self.contended_seen.get(&index).copied().unwrap_or(0),
                    wait_p50: quantile(&w, 0.5),
                    wait_p99: quantile(&w, 0.99),
                    wait_max: w.last().copied(),
                }
            })
            .collect()
    }

    fn histogram_heading(&self) -> String {
        "WAIT TIMES (waiters seen on 2+ refreshes, log2 buckets, lower bounds)".into()
    }

    fn wait_histogram(&self) -> [u64; WAIT_BUCKETS] {
        let mut b = self.ended_buckets;
        for (first, last) in self.waits.values().filter(|(f, l)| l > f) {
            b[bucket_of(*last - *first)] += 1;
        }
        b
    }
}

/// A duration in few characters: 850us, 12ms, 3.4s, 12m.
pub fn short(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        "0s".into()
    } else if us < 1000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{}ms", us / 1000)
    } else if us < 60_000_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m", d.as_secs() / 60)
    }
}

/// Columns padded to their widest cell; the last one is left as is.
fn table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 == widths.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ", w = widths[i]);
            }
        }
        s
    };
    let mut out = vec![line(&mut header.iter().copied())];
    out.extend(rows.iter().map(|r| line(&mut r.iter().map(String::as_str))));
    out
}

/// One section: a heading, then lines that may be cut to fit.
struct Section {
    heading: String,
    /// Lines always shown (a table's header).
    fixed: Vec<String>,
    body: Vec<String>,
}

/// A frame: the lines to show, fitted to `size` (columns, rows) when given.
/// `live` is the refresh interval and the last read's error, on a screen.
pub fn frame(
    title: &str,
    rows: &[Row],
    observed: &Observed,
    stats: &dyn StatsSource,
    hot: usize,
    size: Option<(usize, usize)>,
    live: Option<(Duration, Option<&str>)>,
) -> Vec<String> {
    let mut head = vec![format!("locksfile top: {title}")];
    let (held, waiting): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| !r.waiting);
    let mut status = format!(
        "{} held, {} waiting   {} UTC",
        held.len(),
        waiting.len(),
        clock()
    );
    if let Some((interval, error)) = live {
        let _ = write!(status, "   every {}s   q quits", interval.as_secs_f64());
        if let Some(e) = error {
            let _ = write!(status, "   READ FAILED: {e}");
        }
    }
    head.push(status);

    let kind = |r: &Row| if r.exclusive { "exclusive" } else { "shared" };
    let mut held_rows: Vec<&Row> = held;
    held_rows.sort_by_key(|r| r.start);
    let held_table = table(
        &["INDEX", "KIND", "MODE", "PID", "LOCK", "COMMAND"],
        &held_rows
            .iter()
            .map(|r| {
                vec![
                    r.span(),
                    kind(r).into(),
                    r.mode.clone(),
                    r.pids.clone(),
                    match r.owner {
                        Some(o) => format!("owner {o}"),
                        None => String::new(),
                    },
                    r.command.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let mut waiting_rows: Vec<&Row> = waiting;
    // Longest waits first.
    waiting_rows.sort_by_key(|r| std::cmp::Reverse(observed.waited(r)));
    let waiting_table = table(
        &[
            "INDEX", "KIND", "MODE", "PID", "WAITED", "BEHIND", "COMMAND",
        ],
        &waiting_rows
            .iter()
            .map(|r| {
                vec![
                    r.span(),
                    kind(r).into(),
                    r.mode.clone(),
                    r.pids.clone(),
                    format!(">= {}", short(observed.waited(r))),
                    match (r.behind, r.owner) {
                        (Some(id), _) => format!("#{id}"),
                        (None, Some(o)) => format!("owner {o}"),
                        _ => String::new(),
                    },
                    r.command.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );

    let mut per = stats.per_index();
    per.sort_by_key(|s| (std::cmp::Reverse((s.contended, s.acquired)), s.index));
    per.truncate(hot);
    let (acq, cont) = stats.columns();
    let opt = |d: Option<Duration>| d.map_or("-".to_string(), short);
    let hot_table = table(
        &["INDEX", acq, cont, "WAIT p50", "p99", "max"],
        &per.iter()
            .map(|s| {
                vec![
                    s.index.to_string(),
                    s.acquired.to_string(),
                    s.contended.to_string(),
                    opt(s.wait_p50),
                    opt(s.wait_p99),
                    opt(s.wait_max),
                ]
            })
            .collect::<Vec<_>>(),
    );

    let histogram = histogram_lines(&stats.wait_histogram(), size.map_or(40, |(c, _)| c));

    let split = |t: Vec<String>| {
        let mut it = t.into_iter();
        let fixed: Vec<String> = it.next().into_iter().collect();
        (fixed, it.collect::<Vec<_>>())
    };
    let (hf, hb) = split(held_table);
    let (wf, wb) = split(waiting_table);
    let (tf, tb) = split(hot_table);
    let mut sections = vec![
        Section {
            heading: format!("HOLDERS ({})", hb.len()),
            fixed: if hb.is_empty() { vec![] } else { hf },
            body: if hb.is_empty() {
                vec!["none".into()]
            } else {
                hb
            },
        },
        Section {
            heading: format!("WAITERS ({})", wb.len()),
            fixed: if wb.is_empty() { vec![] } else { wf },
            body: if wb.is_empty() {
                vec!["none".into()]
            } else {
                wb
            },
        },
        Section {
            heading: stats.heading(),
            fixed: if tb.is_empty() { vec![] } else { tf },
            body: if tb.is_empty() {
                vec!["nothing seen yet".into()]
            } else {
                tb
            },
        },
        Section {
            heading: stats.histogram_heading(),
            fixed: vec![],
            body: if histogram.is_empty() {
                vec!["no waits seen yet".into()]
            } else {
                histogram
            },
        },
    ];

    if let Some((_, height)) = size {
        // Headings, table headers and a blank line between sections are
        // always shown; the bodies share what is left, each getting a fair
        // share first and the rest going in order to those that need it.
        let fixed: usize = head.len() + sections.iter().map(|s| 2 + s.fixed.len()).sum::<usize>();
        let mut left = height.saturating_sub(fixed);
        let share = left / sections.len();
        let mut give: Vec<usize> = sections.iter().map(|s| s.body.len().min(share)).collect();
        left -= give.iter().sum::<usize>();
        for (g, s) in give.iter_mut().zip(&sections) {
            let more = (s.body.len() - *g).min(left);
            *g += more;
            left -= more;
        }
        for (s, g) in sections.iter_mut().zip(give) {
            if s.body.len() > g {
                let hidden = s.body.len() - g.saturating_sub(1);
                s.body.truncate(g.saturating_sub(1));
                if g > 0 {
                    s.body.push(format!("... {hidden} more"));
                }
            }
        }
    }

    let mut out = head;
    for s in sections {
        out.push(String::new());
        out.push(s.heading);
        out.extend(s.fixed);
        out.extend(s.body);
    }
    if let Some((cols, rows)) = size {
        out.truncate(rows);
        for l in &mut out {
            if l.chars().count() > cols {
                *l = l.chars().take(cols).collect();
            }
        }
    }
    out
}

/// A bar per bucket from the first to the last one used, scaled to fit.
fn histogram_lines(buckets: &[u64; WAIT_BUCKETS], cols: usize) -> Vec<String> {
    let Some(first) = buckets.iter().position(|&n| n > 0) else {
        return Vec::new();
    };
    let last = buckets.iter().rposition(|&n| n > 0).unwrap_or(first);
    let top = buckets.iter().copied().max().unwrap_or(1).max(1);
    let label = |k: usize| {
        let lo = if k == 0 {
            "0".to_string()
        } else {
            short(Duration::from_micros(1 << k))
        };
        if k == WAIT_BUCKETS - 1 {
            format!(">= {lo}")
        } else {
            format!("{lo}-{}", short(Duration::from_micros(1 << (k + 1))))
        }
    };
    let width = (first..=last).map(|k| label(k).len()).max().unwrap_or(0);
    let bar_room = cols.saturating_sub(width + 12).clamp(1, 50) as u64;
    (first..=last)
        .map(|k| {
            let n = buckets[k];
            let bar = (n * bar_room).div_ceil(top) as usize;
            format!("{:>width$} |{} {n}", label(k), "#".repeat(bar))
        })
        .collect()
}

/// The time of day, UTC, from the system clock.
fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = secs % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(waiting: bool, start: u64, pids: &str) -> Row {
        Row {
            waiting,
            exclusive: true,
            mode: "OFD".into(),
            start,
            end: Some(start + 1),
            pids: pids.into(),
            command: "cmd".into(),
            owner: None,
            behind: waiting.then_some(1),
        }
    }

    #[test]
    fn waits_are_timed_from_first_sight_and_counted_when_they_end() {
        let mut o = Observed::default();
        let t0 = Instant::now();
        let w = row(true, 3, "20");
        o.see(&[row(false, 3, "10"), w.clone()], t0);
        o.see(
            &[row(false, 3, "10"), w.clone()],
            t0 + Duration::from_millis(300),
        );
        assert_eq!(o.waited(&w), Duration::from_millis(300));
        // Shown for a while with another process's pid too: the same wait.
        let both = row(true, 3, "20,30");
        o.see(
            &[row(false, 3, "10"), both.clone()],
            t0 + Duration::from_millis(400),
        );
        assert_eq!(o.waited(&both), Duration::from_millis(400));
        o.see(
            &[row(false, 3, "10"), w.clone()],
            t0 + Duration::from_millis(500),
        );
        assert_eq!(o.waited(&w), Duration::from_millis(500));
        o.see(&[row(false, 3, "20")], t0 + Duration::from_millis(600));
        let per = o.per_index();
        let s = per.iter().find(|s| s.index == 3).unwrap();
        assert_eq!((s.acquired, s.contended), (5, 4));
        // Seen from t0 to t0 + 500ms: at least that long; pid 30's wait
        // was seen once only, and is not counted.
        assert_eq!(s.wait_max, Some(Duration::from_millis(500)));
        let h = o.wait_histogram();
        assert_eq!(h.iter().sum::<u64>(), 1);
        assert_eq!(h[bucket_of(Duration::from_millis(500))], 1);
    }

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_micros(1)), 0);
        assert_eq!(bucket_of(Duration::from_micros(2)), 1);
        assert_eq!(bucket_of(Duration::from_micros(1023)), 9);
        assert_eq!(bucket_of(Duration::from_micros(1024)), 10);
        assert_eq!(bucket_of(Duration::from_secs(100_000)), WAIT_BUCKETS - 1);
    }

    #[test]
    fn a_frame_fits_the_window() {
        let mut o = Observed::default();
        let rows: Vec<Row> = (0..50)
            .map(|i| row(i % 2 == 1, i, &i.to_string()))
            .collect();
        o.see(&rows, Instant::now());
        let f = frame("f", &rows, &o, &o, 8, Some((60, 20)), None);
        assert!(f.len() <= 20, "{f:#?}");
        assert!(f.iter().all(|l| l.chars().count() <= 60), "{f:#?}");
        assert!(f.iter().any(|l| l.starts_with("... ")), "{f:#?}");
        assert!(f.iter().any(|l| l.starts_with("WAITERS (25)")), "{f:#?}");
        let all = frame("f", &rows, &o, &o, 8, None, None);
        assert!(all.len() > 50, "{all:#?}");
    }
}
