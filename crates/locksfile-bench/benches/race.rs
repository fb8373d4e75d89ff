//! Hand-over-hand races between forked processes, timed whole.
//!
//! Every ring (locksfile in its ofd, process and shm modes, raw `fcntl`, POSIX semaphores, a
//! process-shared `pthread_rwlock_t`) runs the same race; the runs are
//! interleaved ring by ring, with the order rotated each run, so that
//! whatever else the machine does falls on all of them alike. Reports the
//! median of the runs.
//!
//! Settings (environment): `LOCKSFILE_BENCH_RUNS` (default 7),
//! `LOCKSFILE_BENCH_SHAPES` (default `4/50/100,8/50/100,4/5/100`, as
//! procs/tracks/rounds), `LOCKSFILE_BENCH_JSON` (write the figures there).

use std::fmt::Write as _;

use locksfile_bench::{median, Ring, RingKind, ScratchDir, Shape};

fn shapes() -> Vec<Shape> {
    let spec = std::env::var("LOCKSFILE_BENCH_SHAPES")
        .unwrap_or_else(|_| "4/50/100,8/50/100,4/5/100".to_owned());
    spec.split(',')
        .map(|s| {
            let v: Vec<usize> = s
                .trim()
                .split('/')
                .map(|x| x.parse().expect("shape is procs/tracks/rounds"))
                .collect();
            assert_eq!(v.len(), 3, "shape is procs/tracks/rounds");
            Shape {
                procs: v[0],
                tracks: v[1],
                rounds: v[2],
            }
        })
        .collect()
}

fn main() -> std::io::Result<()> {
    // `cargo bench` passes `--bench`; a name filter picks rings.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rings: Vec<RingKind> = RingKind::ALL
        .into_iter()
        .filter(|k| filter.is_empty() || filter.iter().any(|f| k.name().contains(f.as_str())))
        .collect();
    let runs: usize = std::env::var("LOCKSFILE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let dir = ScratchDir::new("race")?;
    let mut json = String::from("{\"unit\": \"seconds per race\", \"races\": [\n");
    let shapes = shapes();
    for (si, shape) in shapes.iter().enumerate() {
        let prepared: Vec<Ring> = rings
            .iter()
            .map(|&k| Ring::new(k, shape.tracks, &dir))
            .collect::<Result<_, _>>()?;
        // One race each, unmeasured, to warm caches and page in the code.
        for ring in &prepared {
            ring.race(*shape)?;
        }
        let mut times = vec![Vec::with_capacity(runs); rings.len()];
        for run in 0..runs {
            for i in 0..rings.len() {
                let j = (i + run) % rings.len();
                times[j].push(prepared[j].race(*shape)?.as_secs_f64());
            }
        }
        println!(
            "race {}/{}/{} (procs/tracks/rounds), median of {runs}:",
            shape.procs, shape.tracks, shape.rounds
        );
        for (i, k) in rings.iter().enumerate() {
            let m = median(&mut times[i].clone());
            println!("  {:<24} {:>10.3} ms", k.name(), m * 1e3);
            let samples: Vec<String> = times[i].iter().map(|t| format!("{t:.9}")).collect();
            let _ = writeln!(
                json,
                "  {{\"procs\": {}, \"tracks\": {}, \"rounds\": {}, \"ring\": \"{}\", \"median\": {m:.9}, \"runs\": [{}]}}{}",
                shape.procs,
                shape.tracks,
                shape.rounds,
                k.name(),
                samples.join(", "),
                if si + 1 == shapes.len() && i + 1 == rings.len() { "" } else { "," }
            );
        }
    }
    json.push_str("]}\n");
    if let Ok(path) = std::env::var("LOCKSFILE_BENCH_JSON") {
        std::fs::write(path, json)?;
    }
    Ok(())
}
