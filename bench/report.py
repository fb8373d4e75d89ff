"""Writes BENCHMARKS.md and its plot from the figures scripts/bench collected.

    report.py --criterion DIR --baselines run1,run2,... --race race.json
              --python python.json --out BENCHMARKS.md --plot bench/plot.png

    report.py --criterion DIR --capacity-baselines base --capacity-only
              (prints the "shm table at scale" section of one capacity run)

Criterion figures: the median estimate of each baseline (one per run of
the criterion benches), then the median of those. Race and Python figures:
the medians their harnesses computed over interleaved runs.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

# The race's wait histograms (bench/race_waits.py), beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import race_waits  # noqa: E402

PAIR_ROWS = [
    ("locksfile_ofd_guard", "locksfile, OFD mode, guard (`lf.write(5)` dropped)"),
    ("locksfile_ofd_explicit", "locksfile, OFD mode, `acquire` + `release`"),
    ("locksfile_process_guard", "locksfile, process mode, guard"),
    ("locksfile_process_explicit", "locksfile, process mode, `acquire` + `release`"),
    ("locksfile_shm_guard", "locksfile, shm mode, guard"),
    ("locksfile_shm_explicit", "locksfile, shm mode, `acquire` + `release`"),
    ("fcntl_ofd", "raw `fcntl(F_OFD_SETLK)` (baseline)"),
    ("fcntl_posix", "raw `fcntl(F_SETLK)`"),
    ("flock", "`flock(2)` (whole file)"),
    ("file_guard", "file-guard (byte range, `F_SETLK`)"),
    ("fd_lock", "fd-lock (whole file, `flock`)"),
    ("pthread_rwlock_pshared", "process-shared `pthread_rwlock_t` in shared memory"),
    ("std_rwlock", "`std::sync::RwLock` (in-process only)"),
    ("parking_lot_rwlock", "`parking_lot::RwLock` (in-process only)"),
]

RING_ROWS = [
    ("locksfile_ofd", "locksfile, OFD mode"),
    ("locksfile_process", "locksfile, process mode"),
    ("locksfile_shm", "locksfile, shm mode"),
    ("fcntl_ofd", "raw `F_OFD_SETLKW` (baseline)"),
    ("fcntl_posix", "raw `F_SETLKW`"),
    ("sem_open", "POSIX named semaphores, one per track"),
    ("pthread_rwlock_pshared", "process-shared `pthread_rwlock_t`, one per track"),
]

PY_ORDER = [
    "ours_seed_api",
    "ours_seed_api_shm",
    "ours_modern_api",
    "ours_modern_api_shm",
    "ours_modern_with_shm",
    "seed_0.0.6",
    "lockf",
    "mp_lock",
    "manager_lock",
    "filelock",
    "fasteners",
    "portalocker",
]


# Colours say whose lock a mark is, the same in every panel, and the
# figure's title names them (named colours, so the title can say them).
OURS, BASELINE, OTHERS = "tab:blue", "tab:orange", "tab:gray"
ROLES = ((OURS, "ours"), (BASELINE, "baseline"), (OTHERS, "others"))


def role_color(key):
    if key.startswith("locksfile") or key.startswith("ours"):
        return OURS
    if key in ("fcntl_ofd", "seed_0.0.6"):
        return BASELINE
    return OTHERS


def color_key():
    """The figure title's key to the colours: "blue: ours, ..."."""
    return ", ".join("%s: %s" % (c.split(":")[-1], role) for c, role in ROLES)


# The held-locks panel. locksfile OFD costs what the raw pair costs, so its
# line lies on the raw one: the raw line goes under, wide and dashed with
# big square markers, and ours over it, thin with small round ones, so both
# show where they coincide.
HELD_LINES = (
    ("fcntl_ofd", "raw F_OFD_SETLK", dict(linestyle="--", linewidth=4, marker="s", markersize=10, zorder=2)),
    ("locksfile_ofd", "locksfile OFD", dict(linestyle="-", linewidth=1.5, marker="o", markersize=4, zorder=3)),
    ("locksfile_shm", "locksfile shm", dict(linestyle=":", linewidth=1.5, marker="^", markersize=6, zorder=3)),
)

# The Rust race panel: a bar's colour is whose lock it is, as everywhere;
# its hatching is the race's shape.
SHAPE_HATCHES = ("", "///", "...", "xxx")


def crit_all(dirpath, group, bench, baselines):
    """Criterion's median estimate (ns) in each run (baseline) that has one."""
    xs = []
    for b in baselines:
        p = os.path.join(dirpath, group, *bench.split("/"), b, "estimates.json")
        if os.path.exists(p):
            with open(p) as f:
                xs.append(json.load(f)["median"]["point_estimate"])
    return xs


def crit(dirpath, group, bench, baselines):
    xs = crit_all(dirpath, group, bench, baselines)
    return statistics.median(xs) if xs else None


# The capacity bench (benches/capacity.rs): its groups, what N counts in
# each, and the id of its pair rows ("shm guard pair/<N>").
CAPACITY_GROUPS = (
    ("held", "capacity_held", "locks held by another owner"),
    ("owners", "capacity_owners", "other owners of the table"),
)
CAPACITY_PAIR = "shm guard pair"
CAPACITY_FLOOR = "pthread_rwlock_pshared"


def load_capacity(dirpath, baselines):
    """The capacity bench's figures, or None when it was not run (older runs):
    {"held": {"pair": {N: ns}, "floor": ns}, "owners": {...}}."""
    cap = {}
    for key, group, _ in CAPACITY_GROUPS:
        base = os.path.join(dirpath, group, CAPACITY_PAIR)
        try:
            names = os.listdir(base)
        except OSError:
            continue
        pair = {}
        for name in names:
            if name.isdigit():
                x = crit(dirpath, group, "%s/%s" % (CAPACITY_PAIR, name), baselines)
                if x is not None:
                    pair[int(name)] = x
        if pair:
            cap[key] = {"pair": dict(sorted(pair.items())), "floor": crit(dirpath, group, CAPACITY_FLOOR, baselines)}
    return cap or None


def capacity_section(w, cap):
    """BENCHMARKS.md's "shm table at scale": the shm pair against held locks
    and against other owners, each N beside its figure at the smallest N and
    beside the process-shared rwlock measured in the same run."""
    w("## shm table at scale")
    w("")
    w(
        "The uncontended shm guard pair (`lf.try_write(5)` dropped) of one owner while the table around it "
        "grows (`benches/capacity.rs`, which `scripts/bench` runs once). Held locks: another owner of the same "
        "table holds N single-index locks on even indices 0, 2, 4, … (none merge), added as N grows, so the "
        "table is filled once. Owners: N other owners of the table open at once, each holding one lock on an index of its own, "
        "spread over forked processes (a handle takes a descriptor). Each row also gives the pair against its "
        "figure at the smallest N of the same run (target: within 2×) and against the process-shared "
        "`pthread_rwlock_t` write pair measured in the same run, the floor for a lock between processes."
    )
    w("")
    for key, _, what in CAPACITY_GROUPS:
        c = cap.get(key)
        if not c:
            continue
        pair, floor = c["pair"], c["floor"]
        n1 = min(pair)
        w(
            "| %s | shm guard pair | × at %s | × `pthread_rwlock_pshared` (%s) |"
            % (what, format(n1, ","), fmt_time(floor))
        )
        w("|---:|---:|---:|---:|")
        for n, x in pair.items():
            w("| %s | %s | %s | %s |" % (format(n, ","), fmt_time(x), fmt_ratio(x, pair[n1]), fmt_ratio(x, floor)))
        w("")
    verdict = []
    for key, _, what in CAPACITY_GROUPS:
        c = cap.get(key)
        if not c:
            continue
        pair = c["pair"]
        n1, top = min(pair), max(pair)
        worst = max(pair, key=lambda n: pair[n])
        verdict.append(
            "with %s %s, %s (%s its figure at %s; the slowest row, N = %s, %s: %s)"
            % (
                format(top, ","),
                what,
                fmt_time(pair[top]),
                fmt_ratio(pair[top], pair[n1]),
                format(n1, ","),
                format(worst, ","),
                fmt_ratio(pair[worst], pair[n1]),
                "within 2×" if pair[worst] <= 2 * pair[n1] else "**beyond 2×**",
            )
        )
    if verdict:
        w(
            "An uncontended pair is a few atomic instructions on its index's lane word; it walks neither the "
            "table's records nor its owners: %s." % "; ".join(verdict)
        )
        w("")


def crit_spread(runs, kind, key):
    """(slowest - fastest) / median of one bench over the runs."""
    xs = runs.get((kind, key)) or []
    if len(xs) < 2:
        return 0.0
    return (max(xs) - min(xs)) / statistics.median(xs)


def fmt_time(ns):
    if ns is None:
        return "n/a"
    if ns < 1e3:
        return "%.1f ns" % ns
    if ns < 1e6:
        return "%.2f µs" % (ns / 1e3)
    if ns < 1e9:
        return "%.2f ms" % (ns / 1e6)
    return "%.2f s" % (ns / 1e9)


def fmt_span(lo, hi, like):
    """`lo–hi` in the unit `fmt_time` picks for `like`."""
    for scale, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "µs"), (1, "ns")):
        if like >= scale:
            break
    return "%.3g–%.3g %s" % (lo / scale, hi / scale, unit)


def fmt_ratio(x, base):
    if x is None or base is None:
        return "n/a"
    r = x / base
    return ("%.0f×" % r) if r >= 100 else ("%.3g×" % r)


def quartiles(xs):
    """First and third quartiles (inclusive method) of some run times."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def and_join(xs):
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def runs_text(counts):
    """"7 runs" or, when the slow peers got fewer races, "21 runs (7 for ...)"."""
    if not counts:
        return "no runs"
    if len(counts) == 1:
        return "%d runs" % counts[0]
    text = "%d runs (%s for the peers whose race takes over a second)" % (
        counts[-1],
        "/".join(str(c) for c in counts[:-1]),
    )
    return text


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = "%.0f GiB" % (int(line.split()[1]) / 2**20)
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory": mem,
        "rustc": rustc,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--criterion", required=True)
    ap.add_argument("--baselines")
    ap.add_argument("--race")
    ap.add_argument("--python")
    ap.add_argument(
        "--capacity-baselines",
        default="capacity",
        help="the criterion baseline(s) of the capacity bench; its section is left out when absent",
    )
    ap.add_argument(
        "--capacity-only",
        action="store_true",
        help="print the capacity section of the criterion results alone, and nothing else",
    )
    ap.add_argument("--tmpfs", default="")
    ap.add_argument("--load", default="", help="1-minute load averages at the start and the end")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    ap.add_argument("--race-waits", help="locksfile race --json output, one run a line: the lock waits")
    a = ap.parse_args()
    cdir = a.criterion
    cap = load_capacity(cdir, a.capacity_baselines.split(","))
    if a.capacity_only:
        if not cap:
            sys.exit("no capacity results in %s (baselines %s)" % (cdir, a.capacity_baselines))
        L = []
        capacity_section(L.append, cap)
        print("\n".join(L))
        return
    missing = [o for o in ("baselines", "race", "python", "out", "plot") if not getattr(a, o)]
    if missing:
        ap.error("the full report needs %s" % ", ".join("--" + o for o in missing))
    baselines = a.baselines.split(",")

    with open(a.race) as f:
        race = json.load(f)["races"]
    with open(a.python) as f:
        py = json.load(f)
    m = machine()
    waits = race_waits.load(a.race_waits) if a.race_waits else None

    pair = {}
    pair_runs = {}
    for kind in ("exclusive", "shared"):
        for key, _ in PAIR_ROWS:
            pair[kind, key] = crit(cdir, "pair_" + kind, key, baselines)
            pair_runs[kind, key] = crit_all(cdir, "pair_" + kind, key, baselines)
    held_ns = [1, 10, 100, 1000, 10000]
    held_libs = ("locksfile_ofd", "fcntl_ofd", "locksfile_shm")
    held = {(lib, n): crit(cdir, "held", "%s/%d" % (lib, n), baselines) for lib in held_libs for n in held_ns}
    held_runs = {
        (lib, n): crit_all(cdir, "held", "%s/%d" % (lib, n), baselines)
        for lib in held_libs
        for n in held_ns
    }

    def held_cell(lib, n):
        x, xs = held[lib, n], held_runs[lib, n]
        if x is None:
            return "n/a"
        return "%s (%s)" % (fmt_time(x), fmt_span(min(xs), max(xs), x)) if len(xs) > 1 else fmt_time(x)
    shapes = []
    for r in race:
        s = (r["procs"], r["tracks"], r["rounds"])
        if s not in shapes:
            shapes.append(s)
    ring = {((r["procs"], r["tracks"], r["rounds"]), r["ring"]): r["median"] for r in race}
    ring_q = {((r["procs"], r["tracks"], r["rounds"]), r["ring"]): quartiles(r["runs"]) for r in race}
    race_runs = len(race[0]["runs"]) if race else 0
    peers = py["peers"]
    pyshape = py["shape"]

    L = []
    w = L.append
    w("# Benchmarks")
    w("")
    w(
        "**Machine:** %s, %s cores, Linux %s, %s RAM; %s; Python %s."
        % (m["cpu"], m["cores"], m["kernel"], m["memory"], m["rustc"], py["versions"].get("python", "?"))
    )
    if a.tmpfs:
        w("Lock files live in the system temp directory (%s)." % a.tmpfs)
    if a.load:
        start, end = a.load.split(",")
        w(
            "One-minute load average %s when the run started and %s when it ended: other work on the machine "
            "during a run shows up as spread between runs." % (start, end)
        )
    w("")
    w(
        "Every figure is a median of several runs, every comparison ran side by side in one run of "
        "`scripts/bench` on this machine, and ratios are times relative to a stated baseline "
        "(below 1× is faster than the baseline). Rerun everything, installing the peers it needs, with:"
    )
    w("")
    w("```sh")
    w("scripts/bench")
    w("```")
    w("")
    w(
        "It builds the bench crate `crates/locksfile-bench` (peers pinned in `Cargo.lock`), runs its criterion "
        "benches %d time%s (`--save-baseline run1..`; each figure is the median over the runs of criterion's "
        "median)%s, its race harness (%d interleaved runs per ring), creates `.bench-venv` (pinned peers from "
        "`bench/requirements.txt` and this repository's package from `./python`) and `.bench-venv-seed` "
        "(pylocksfile 0.0.6, which has the same import name), runs `bench/python/peers.py`, and writes this "
        "file and `bench/plot.png` with `bench/report.py`."
        % (
            len(baselines),
            "" if len(baselines) == 1 else "s",
            " and its capacity bench once (`--save-baseline capacity`)" if cap else "",
            race_runs,
        )
    )
    w("")
    w("![Race cost per library and pair cost against held locks](bench/plot.png)")
    w("")

    # --- Rust pairs
    w("## Rust: uncontended lock + unlock")
    w("")
    w(
        "One lock taken and released at once, no other owner: lock 5 (byte 5) where the peer has byte ranges, "
        "the whole file where it has not. Non-blocking calls where the API has them. Baseline: raw "
        "`fcntl(F_OFD_SETLK)` lock + `F_UNLCK`."
    )
    w("")
    w("| | exclusive | × baseline | shared | × baseline |")
    w("|---|---:|---:|---:|---:|")
    for key, label in PAIR_ROWS:
        ex, sh = pair["exclusive", key], pair["shared", key]
        w(
            "| %s | %s | %s | %s | %s |"
            % (
                label,
                fmt_time(ex),
                fmt_ratio(ex, pair["exclusive", "fcntl_ofd"]),
                fmt_time(sh),
                fmt_ratio(sh, pair["shared", "fcntl_ofd"]),
            )
        )
    w("")

    # --- held
    w("## Rust: pair cost against locks held by other owners")
    w("")
    w(
        "The same exclusive pair on byte 5 while a second open file description of the same file (another "
        "OFD owner) holds N locks on even bytes 0, 2, 4, … (never adjacent, so the kernel cannot merge them). "
        "Each cell: the median over the runs, then the fastest and slowest run. The shm table is measured "
        "the same way on a file of its own, the N locks held by a second shm owner (a table never shares a "
        "file with kernel locks); its last column compares each figure with its own at one lock held."
    )
    w("")
    w(
        "| other locks held | locksfile OFD `acquire` + `release` | raw `F_OFD_SETLK` pair | × baseline "
        "| locksfile shm `acquire` + `release` | × baseline | × shm at 1 held |"
    )
    w("|---:|---:|---:|---:|---:|---:|---:|")
    for n in held_ns:
        a_, b_, c_ = held["locksfile_ofd", n], held["fcntl_ofd", n], held["locksfile_shm", n]
        w(
            "| %s | %s | %s | %s | %s | %s | %s |"
            % (
                format(n, ","),
                held_cell("locksfile_ofd", n),
                held_cell("fcntl_ofd", n),
                fmt_ratio(a_, b_),
                held_cell("locksfile_shm", n),
                fmt_ratio(c_, b_),
                fmt_ratio(c_, held["locksfile_shm", 1]),
            )
        )
    w("")

    if cap:
        capacity_section(w, cap)

    # --- Rust races
    w("## Rust: hand-over-hand races between processes")
    w("")
    w(
        "P forked processes each take track 0, then for every later step take the next track of a ring of T "
        "exclusive locks before releasing the previous one, R times round (the seed's race). Each race is "
        "timed whole: every process stamps the monotonic clock when all are set up and released at once, and "
        "again after its last release; a race lasts from the first start to the last finish. "
        "Baseline: raw `F_OFD_SETLKW`. Each cell: the median, then the interquartile range of the runs."
    )
    w("")
    head = "| ring |" + "".join(" %d/%d/%d | × baseline |" % s for s in shapes)
    w(head + "")
    w("|---|" + "---:|---:|" * len(shapes))
    for key, label in RING_ROWS:
        cells = []
        for s in shapes:
            x = ring.get((s, key))
            q = ring_q.get((s, key))
            spread = " (%s)" % fmt_span(q[0] * 1e9, q[1] * 1e9, x * 1e9) if q and x else ""
            cells.append(
                "%s%s | %s" % (fmt_time(x * 1e9 if x is not None else None), spread, fmt_ratio(x, ring.get((s, "fcntl_ofd"))))
            )
        w("| %s | %s |" % (label, " | ".join(cells)))
    w("")
    w("Shapes are procs/tracks/rounds; %d processes is more than this machine's %s cores." % (max(s[0] for s in shapes), m["cores"]))
    w("")

    if waits:
        race_waits.section(w, waits)

    # --- Python
    def pv(k, what):
        r = peers.get(k)
        return r and r.get(what + "_median")

    base_seed = pv("seed_0.0.6", "race")
    base_mgr = pv("manager_lock", "race")
    base_mp = pv("mp_lock", "race")
    w("## Python: uncontended pair and the seed's race")
    w("")
    w(
        "The race is the seed's `testRace` (%s procs/tracks/rounds, write locks, hand-over-hand) without its "
        "result queue, for every peer, timed as the Rust races are; the pair is one exclusive lock + unlock in one process. Peers without "
        "byte ranges (marked †) get one lock object or one lock file per track. Pairs: medians of %s; races: medians of %s. "
        "Versions: %s."
        % (
            pyshape,
            runs_text(sorted({len(r["pair"]) for r in peers.values()})),
            runs_text(sorted({len(r["race"]) for r in peers.values()})),
            ", ".join("%s %s" % kv for kv in py["versions"].items()),
        )
    )
    w("")
    w(
        "| library | pair | × 0.0.6 | × `fcntl.lockf` | race %s | fastest–slowest run | × 0.0.6 | × Manager "
        "| × multiprocessing.Lock |" % pyshape
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_pair = pv("seed_0.0.6", "pair")
    base_lockf_pair = pv("lockf", "pair")
    for k in PY_ORDER:
        if k not in peers:
            continue
        r = peers[k]
        p_, rc = r["pair_median"], r["race_median"]
        w(
            "| %s%s | %s | %s | %s | %s | %s | %s | %s | %s |"
            % (
                r["name"],
                "" if r["ranges"] else " †",
                fmt_time(p_ * 1e9),
                fmt_ratio(p_, base_pair),
                fmt_ratio(p_, base_lockf_pair),
                fmt_time(rc * 1e9),
                fmt_span(min(r["race"]) * 1e9, max(r["race"]) * 1e9, rc * 1e9),
                fmt_ratio(rc, base_seed),
                fmt_ratio(rc, base_mgr),
                fmt_ratio(rc, base_mp),
            )
        )
    missing = [k for k in PY_ORDER if k not in peers]
    if missing:
        w("")
        w("Not measured in this run (not importable): %s." % ", ".join(missing))
    w("")
    w(
        "Notes on the peers: filelock and fasteners wait by polling (a failed non-blocking try, then a sleep "
        "of up to 50 ms and 10–100 ms respectively), so a contended ring mostly measures their sleeps; filelock "
        "also opens and closes the lock file on every acquire. portalocker is used through `lock`/`unlock` on "
        "files opened once (blocking `flock`). multiprocessing.Lock is a semaphore in shared memory inherited "
        "by fork: it cannot be shared by unrelated processes and has no ranges or shared mode. A Manager lock "
        "is a round trip to the manager process per call."
    )
    w("")

    reading(w, pair, pair_runs, held, held_runs, ring, ring_q, shapes, peers, pv)

    # The PostgreSQL engine's section comes from scripts/bench-pg (it needs a
    # server), not from this run: kept as it was.
    kept = kept_section(a.out, "## Across machines (PostgreSQL)")
    with open(a.out, "w") as f:
        f.write("\n".join(L) + "\n")
        if kept:
            f.write("\n" + kept)

    plot(a.plot, pair, held, held_runs, held_ns, ring, ring_q, shapes, peers, pyshape, m, waits, cap)


def kept_section(path, heading):
    """The section of an existing file that starts at ``heading``, up to the
    next section of the same level, or ``""``."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start = text.find("\n" + heading + "\n")
    if start < 0:
        return ""
    rest = text[start + 1 :]
    end = rest.find("\n## ", len(heading))
    return rest if end < 0 else rest[: end + 1]


def reading(w, pair, pair_runs, held, held_runs, ring, ring_q, shapes, peers, pv):
    w("## Reading")
    w("")
    ex = pair["exclusive", "locksfile_ofd_guard"]
    exe = pair["exclusive", "locksfile_ofd_explicit"]
    base = pair["exclusive", "fcntl_ofd"]
    floor = pair["exclusive", "pthread_rwlock_pshared"]
    if ex and base and floor:
        spread = crit_spread(pair_runs, "exclusive", "fcntl_ofd")
        extra = min(ex, exe) - base
        if extra <= 0.02 * base:
            why = (
                "no measurable extra (runs of the raw pair alone spread over %.0f%%): both are the same two "
                "`fcntl` system calls, and the hold bookkeeping around them is lost in their cost" % (spread * 100)
            )
        else:
            why = (
                "about %.0f ns more per pair (runs of the raw pair alone spread over %.0f%%): both are the same "
                "two `fcntl` system calls, and the extra is the hold bookkeeping (one mutex and a small span map "
                "per owner) that lets holds compose, convert in place and be released by guards"
                % (extra, spread * 100)
            )
        w(
            "- **Pairs.** An uncontended locksfile pair in OFD mode costs %s (guard) and %s (explicit) of a raw "
            "`F_OFD_SETLK` pair, %s. Every fcntl-based lock, ours included, is about %.0f× the floor set by "
            "a process-shared `pthread_rwlock_t` (%s), which never enters the kernel without contention; the "
            "price of that rwlock is that it is not named by a path, holds one range only, and "
            "is left locked forever if its holder dies, where the kernel drops a dead process's record locks. "
            "`flock(2)` (and fd-lock over it) is cheaper than any record lock because it has no ranges to "
            "merge or split."
            % (fmt_ratio(ex, base), fmt_ratio(exe, base), why, base / floor, fmt_time(floor))
        )
    hb = [(n, held["locksfile_ofd", n], held["fcntl_ofd", n]) for n in (10, 1000, 10000)]
    if all(x and y for _, x, y in hb):
        big = held_runs["fcntl_ofd", 10000] + held_runs["locksfile_ofd", 10000]
        caches = ""
        if max(big) > 1.3 * min(big):
            caches = (
                " With 10,000 locks the walk goes through megabytes of lock records, so it also depends on "
                "what else is using the caches: runs spread from %s to %s (raw) and %s to %s (locksfile), and "
                "the ratio at that size says more about the machine than about either."
                % (
                    fmt_time(min(held_runs["fcntl_ofd", 10000])),
                    fmt_time(max(held_runs["fcntl_ofd", 10000])),
                    fmt_time(min(held_runs["locksfile_ofd", 10000])),
                    fmt_time(max(held_runs["locksfile_ofd", 10000])),
                )
            )
        w(
            "- **Held locks.** The kernel keeps all record locks of a file in one list and every set or unlock "
            "walks it, so a pair grows with the locks other owners hold (about linearly up to 1,000, faster "
            "beyond, as the list outgrows the caches): raw `F_OFD_SETLK` %s with 10 held, %s with 1,000, %s "
            "with 10,000; locksfile follows it (%s, %s, %s), its own bookkeeping being per owner and "
            "independent of other owners' locks.%s Keep busy lock files to hundreds of held locks, or spread "
            "them over several files."
            % (
                fmt_time(hb[0][2]),
                fmt_time(hb[1][2]),
                fmt_time(hb[2][2]),
                fmt_time(hb[0][1]),
                fmt_time(hb[1][1]),
                fmt_time(hb[2][1]),
                caches,
            )
        )
    s0 = shapes[0] if shapes else None
    if s0 and ring.get((s0, "fcntl_ofd")):
        pairs = (("locksfile_ofd", "fcntl_ofd", "OFD"), ("locksfile_process", "fcntl_posix", "process"))
        lead, trail = [], []

        def like(s, ours, raw, label):
            x, y = ring.get((s, ours)), ring.get((s, raw))
            qx, qy = ring_q.get((s, ours)), ring_q.get((s, raw))
            overlap = bool(qx and qy and qx[0] <= qy[1] and qy[0] <= qx[1])
            if x and y and not overlap:
                (lead if x < y else trail).append("%s mode at %d/%d/%d" % (label, *s))
            return "%s%s" % (fmt_ratio(x, y), "\\*" if overlap else "")

        parts = [
            "%d/%d/%d: OFD %s, process %s"
            % (s[0], s[1], s[2], like(s, pairs[0][0], pairs[0][1], "OFD"), like(s, pairs[1][0], pairs[1][1], "process"))
            for s in shapes
        ]
        verdict = []
        if lead:
            verdict.append("It leads, beyond the spread of the runs, in %s: the yields pay." % and_join(lead))
        if trail:
            verdict.append("It trails, beyond the spread of the runs, in %s: the failed retries cost." % and_join(trail))
        verdict.append(
            "Elsewhere the difference is within the spread of the runs." if (lead or trail) else
            "Everywhere the difference is within the spread of the runs."
        )
        w(
            "- **Rust races.** Like for like (locksfile OFD mode against raw `F_OFD_SETLKW`, process mode "
            "against raw `F_SETLKW`), locksfile races take %s of the time (\\* where the interquartile ranges "
            "of the two overlap). Each step is the same `fcntl` calls for both; what differs is the wait. The "
            "raw ring sleeps in `F_SETLKW` at once, while locksfile, when another process holds the track, "
            "gives the CPU away (`sched_yield`) and tries again, twice, before sleeping in the kernel. In a "
            "hand-over-hand ring the holder often lets go during the yield, so a contended step skips the "
            "kernel's sleep and wake-up; when the retries fail they are extra system calls. %s The races are "
            "short and this machine has two cores, so scheduling decides a lot: with few tracks the runs split "
            "in two, either the processes run nearly one after another (a few ms) or they convoy, every step "
            "waiting for a wake-up (tens of ms), and the median follows the mix, not the lock. Semaphores and "
            "the shared-memory rwlock skip the system call when the next track is free and wake waiters with a "
            "futex, so they lead with many tracks; their races are often shorter than a scheduler time slice, "
            "so the processes of a run may barely overlap. What they lack: a name in the file system, byte "
            "ranges, a shared mode (semaphores), and (the rwlock) any cleanup when a holder dies, which the "
            "kernel does for record locks." % ("; ".join(parts), " ".join(verdict))
        )
    ours = pv("ours_seed_api", "race")
    seed = pv("seed_0.0.6", "race")
    mgr = pv("manager_lock", "race")
    mpl = pv("mp_lock", "race")
    lockf = pv("lockf", "race")
    if ours and seed and mgr and mpl:
        w(
            "- **Python race.** Our package (seed API) runs the seed's race in %s of the time of pylocksfile "
            "0.0.6 (%.1f× faster), %s of the Manager locks' time (%.1f× faster) — the seed's own baseline — "
            "and %s of multiprocessing.Lock's. 0.0.6 rebuilds its interval lists in Python on every call; "
            "ours keeps them in Rust, so a step is one call into the extension around the same `fcntl` calls "
            "(with the yields and retries described above when a track is taken): %s of a bare `fcntl.lockf` "
            "loop's race time. multiprocessing.Lock is a futex-backed semaphore that stays in user space "
            "when free, so it leads the race, at the price of working only between a parent and its forked "
            "children, with no ranges, no shared mode and no kernel deadlock detection."
            % (
                fmt_ratio(ours, seed),
                seed / ours,
                fmt_ratio(ours, mgr),
                mgr / ours,
                fmt_ratio(ours, mpl),
                fmt_ratio(ours, lockf) if lockf else "n/a",
            )
        )
    elif seed and mgr:
        w(
            "- **Python race.** Our package was not importable in this run; pylocksfile 0.0.6 took %s of "
            "the Manager locks' time." % fmt_ratio(seed, mgr)
        )
    shm_reading(w, pair, held, ring, ring_q, shapes, pv)
    w("")


def shm_reading(w, pair, held, ring, ring_q, shapes, pv):
    """What the shm mode buys against its targets, and what it costs."""
    g, e = pair["exclusive", "locksfile_shm_guard"], pair["exclusive", "locksfile_shm_explicit"]
    base = pair["exclusive", "fcntl_ofd"]
    if g and e and base:
        w(
            "- **shm pairs.** In shm mode a lock on one index that no other owner wants is a few atomic "
            "instructions on a lane word of a table in shared memory (no mutex, no record) instead of two "
            "`fcntl` calls: %s (guard) and %s (explicit), "
            "%s and %s of the raw `F_OFD_SETLK` pair in the same run (targets: at most 150 ns, at most 0.25×)."
            % (fmt_time(g), fmt_time(e), fmt_ratio(g, base), fmt_ratio(e, base))
        )
    floor = {k: pair[k, "pthread_rwlock_pshared"] for k in ("exclusive", "shared")}
    cells = [
        "%s %s %s (%s)" % (k, api, fmt_time(pair[k, "locksfile_shm_" + api]), fmt_ratio(pair[k, "locksfile_shm_" + api], floor[k]))
        for k in ("exclusive", "shared")
        for api in ("guard", "explicit")
        if pair[k, "locksfile_shm_" + api] and floor[k]
    ]
    if cells:
        w(
            "- **shm pairs beside the process-shared rwlock.** Against the `pthread_rwlock_t` pair of the "
            "same run (write lock for exclusive, %s; read lock for shared, %s; target: within 2×): %s. "
            "A pair is the owner's fast path (one claim of a slot of the owner, the lane word's take and "
            "release, no mutex and no bookkeeping) against the rwlock's two atomic instructions."
            % (fmt_time(floor["exclusive"]), fmt_time(floor["shared"]), "; ".join(cells))
        )
    h1, h10k, k10k = held["locksfile_shm", 1], held["locksfile_shm", 10000], held["fcntl_ofd", 10000]
    if h1 and h10k and k10k:
        w(
            "- **shm with held locks.** The table finds an index through a hash, not a list walk: "
            "%s with 1 lock of another owner held, %s with 10,000 (%s its figure at 1; target at most 2×), "
            "where the kernel's pair takes %s (%s the shm pair)."
            % (fmt_time(h1), fmt_time(h10k), fmt_ratio(h10k, h1), fmt_time(k10k), fmt_ratio(k10k, h10k))
        )
    parts = []
    for s in shapes:
        x, sem, raw = ring.get((s, "locksfile_shm")), ring.get((s, "sem_open")), ring.get((s, "fcntl_ofd"))
        if x and sem:
            qx, qs = ring_q.get((s, "locksfile_shm")), ring_q.get((s, "sem_open"))
            overlap = bool(qx and qs and qx[0] <= qs[1] and qs[0] <= qx[1])
            parts.append(
                "%d/%d/%d: %s of the semaphores%s, %s of raw `F_OFD_SETLKW`"
                % (*s, fmt_ratio(x, sem), "\\*" if overlap else "", fmt_ratio(x, raw))
            )
    if parts:
        w(
            "- **shm races.** Against POSIX semaphores in the same run (target: no slower): %s (\\* where the "
            "interquartile ranges overlap). An uncontended step is as cheap as a semaphore's (a few atomic "
            "instructions on the track's lane word); a step that meets the process ahead watches that lock's "
            "word for a moment, gives the CPU away, then sleeps on the word as a semaphore's waiter does, with "
            "no mutex on either side. Short races on this shared 2-core "
            "machine spread widely from run to run: read the ranges as well as the medians." % "; ".join(parts)
        )
    ours, seed, mpl = pv("ours_seed_api_shm", "race"), pv("seed_0.0.6", "race"), pv("mp_lock", "race")
    if ours and seed and mpl:
        w(
            "- **Python, shm mode.** `pylocksfile(path, mode=\"shm\")` runs the seed's race %.1f× faster than "
            "pylocksfile 0.0.6 (target: at least 8×) and in %s of multiprocessing.Lock's time (target: within "
            "2×), with names, ranges, shared locks, deadlock detection and cleanup after a dead holder that "
            "multiprocessing.Lock lacks." % (seed / ours, fmt_ratio(ours, mpl))
        )
    pp, mpp, wp = pv("ours_seed_api_shm", "pair"), pv("mp_lock", "pair"), pv("ours_modern_with_shm", "pair")
    if pp and mpp and wp:
        w(
            "- **Python pairs, shm mode, side by side.** The seed API's pair (`acquire(writeLock=True, "
            "lock_n=5)` + `release(5)`) takes %s, %s of multiprocessing.Lock's acquire + release (%s; target: "
            "within 2×); a `with lf.write(5):` block, the API we recommend, takes %s, %s of the seed API's "
            "pair (target: within 1.5×). Same run, same harness (`bench/python/peers.py`)."
            % (fmt_time(pp * 1e9), fmt_ratio(pp, mpp), fmt_time(mpp * 1e9), fmt_time(wp * 1e9), fmt_ratio(wp, pp))
        )
    lp = pv("lockf", "pair")
    if pp and lp:
        w(
            "- **Python pair, shm mode.** %s per lock + unlock through the seed API, %s of a bare "
            "`fcntl.lockf` pair (target: at most 0.30×): the two system calls are gone, the call into the "
            "extension stays." % (fmt_time(pp * 1e9), fmt_ratio(pp, lp))
        )
    if g or ours:
        w(
            "- **What shm costs.** A holder that dies is found by its waiters at their next liveness check, "
            "every 50 ms (for a lock on the fast lane, after a nap of up to 5 ms on it), so its locks pass on "
            "within about 50 ms rather than at once as the kernel's do; a deadlock through a fast-lane lock is "
            "found up to 5 ms later. The "
            "table is a sidecar file `<lock file>-shm` of 5.2 GiB, mapped once per process; it is sparse, "
            "so only the pages touched take memory (a few hundred KiB for a small table, about 600 MB with 10 "
            "million locks held, given back once they are released), and it holds at most 131,072 owners, "
            "131,072 waiting threads and 134 million lock pieces at once. It excludes only other shm users: "
            "the kernel's lockers (other programs, `flock(1)`, SQLite) never see its locks, which is why a file "
            "in use by one kind is refused to the other, and network file systems are refused."
        )


def plain(label):
    """A table's row name as a plot label: no Markdown, no asides."""
    label = label.replace("`", "")
    for aside in (" (baseline)", " (in-process only)", " in shared memory", " (`lf.write(5)` dropped)", " (lf.write(5) dropped)"):
        label = label.replace(aside, "")
    return label


# The capacity panel's lines: held locks and owners told apart by style and
# marker as well as by name (both are ours, so both are blue); the floors
# are grey and dotted.
CAPACITY_LINES = {
    "held": ("shm pair, N locks held by another owner", dict(linestyle="-", marker="o", markersize=6)),
    "owners": ("shm pair, N other owners open", dict(linestyle="--", marker="s", markersize=6)),
}


def capacity_panel(ax, cap):
    """The shm pair against the table's size: both curves on a log x axis,
    beside the process-shared rwlock's pair of the same run."""
    floors = []
    for key, _, _ in CAPACITY_GROUPS:
        c = cap.get(key)
        if not c:
            continue
        label, style = CAPACITY_LINES[key]
        xs = list(c["pair"])
        ax.plot(xs, [c["pair"][n] for n in xs], color=OURS, label=label, **style)
        if c["floor"]:
            floors.append(c["floor"])
    if floors:
        ax.axhline(
            statistics.median(floors),
            color=OTHERS,
            linestyle=":",
            linewidth=1.5,
            label="process-shared pthread_rwlock_t pair (same run)",
        )
    top = max(max(c["pair"].values()) for c in cap.values())
    ax.set_ylim(0, top * 2.2)
    ax.set_xscale("log")
    ax.set_xlabel("N: locks held, or other owners of the table (log)")
    ax.set_ylabel("ns per exclusive guard pair")
    ax.set_title("Rust: shm pair against the table's size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def plot(path, pair, held, held_runs, held_ns, ring, ring_q, shapes, peers, pyshape, m, waits=None, capacity=None):
    # Here, not at the top: the rest of the report (and its tests) need no matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # The race's wait histograms, when measured, are a third column; the
    # shm table at scale, when measured, a last column of one tall panel.
    cols = 2 + (1 if waits else 0) + (1 if capacity else 0)
    fig, axs = plt.subplots(2, cols, figsize=(7 * cols, 10))
    pair_names = dict(PAIR_ROWS)
    ring_names = dict(RING_ROWS)
    color = role_color

    # (a) Rust pairs
    ax = axs[0][0]
    rows = [(k, pair["exclusive", k]) for k, _ in PAIR_ROWS if pair["exclusive", k]]
    rows.sort(key=lambda r: r[1])
    ax.barh([plain(pair_names[k]) for k, _ in rows], [v for _, v in rows], color=[color(k) for k, _ in rows])
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ns per exclusive lock + unlock (log)")
    ax.set_title("Rust: uncontended pair")
    for i, (_, v) in enumerate(rows):
        ax.text(v, i, " " + fmt_time(v), va="center", fontsize=8)
    ax.set_xlim(right=max(v for _, v in rows) * 8)

    # (b) held locks
    ax = axs[0][1]
    for lib, lab, style in HELD_LINES:
        xs = [n for n in held_ns if held[lib, n]]
        if not xs:
            continue
        c = color(lib)
        ax.plot(xs, [held[lib, n] / 1e3 for n in xs], color=c, label=lab + " (median)", **style)
        if all(held_runs[lib, n] for n in xs):
            ax.fill_between(
                xs,
                [min(held_runs[lib, n]) / 1e3 for n in xs],
                [max(held_runs[lib, n]) / 1e3 for n in xs],
                color=c,
                alpha=0.15,
                zorder=1,
                label=lab + " (fastest–slowest run)",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("locks held on the file by another owner (log)")
    ax.set_ylabel("µs per exclusive lock + unlock (log)")
    ax.set_title("Rust: pair cost against held locks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    # (c) Rust races
    ax = axs[1][0]
    keys = [k for k, _ in RING_ROWS]
    width = 0.8 / max(1, len(shapes))
    for si, s in enumerate(shapes):
        vals = [(ring.get((s, k)) or 0) * 1e3 for k in keys]
        qs = [ring_q.get((s, k), (0, 0)) for k in keys]
        err = [[max(0.0, v - q[0] * 1e3) for v, q in zip(vals, qs)], [max(0.0, q[1] * 1e3 - v) for v, q in zip(vals, qs)]]
        ax.barh(
            [i + si * width for i in range(len(keys))],
            vals,
            height=width,
            xerr=err,
            capsize=2,
            error_kw={"elinewidth": 0.8},
            color=[color(k) for k in keys],
            hatch=SHAPE_HATCHES[si % len(SHAPE_HATCHES)],
            edgecolor="white",
        )
    ax.set_yticks([i + width * (len(shapes) - 1) / 2 for i in range(len(keys))])
    ax.set_yticklabels([plain(ring_names[k]) for k in keys], fontsize=8)
    for lab, k in zip(ax.get_yticklabels(), keys):
        lab.set_color(color(k) if color(k) != OTHERS else "black")
        if k.startswith("locksfile"):
            lab.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel("ms per race, median and interquartile range")
    ax.set_title("Rust: hand-over-hand race between processes")
    # Below the panel, never over a bar; the shapes by hatching alone.
    ax.legend(
        handles=[
            Patch(
                facecolor="white",
                edgecolor="black",
                hatch=SHAPE_HATCHES[si % len(SHAPE_HATCHES)],
                label="%d/%d/%d" % s,
            )
            for si, s in enumerate(shapes)
        ],
        title="processes/tracks/rounds",
        fontsize=8,
        title_fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        ncol=max(1, len(shapes)),
        frameon=False,
    )

    # (d) Python race
    ax = axs[1][1]
    rows = [(k, peers[k]["race_median"]) for k in PY_ORDER if k in peers and peers[k]["race_median"]]
    rows.sort(key=lambda r: r[1])
    labels = {
        "ours_seed_api": "ours (seed API)",
        "ours_seed_api_shm": "ours (seed API, shm)",
        "ours_modern_api": "ours (LocksFile)",
        "ours_modern_api_shm": "ours (LocksFile, shm)",
        "ours_modern_with_shm": "ours (with lf.write, shm)",
        "seed_0.0.6": "pylocksfile 0.0.6",
        "lockf": "fcntl.lockf",
        "mp_lock": "multiprocessing.Lock",
        "manager_lock": "Manager().Lock()",
        "filelock": "filelock",
        "fasteners": "fasteners",
        "portalocker": "portalocker",
    }
    # † as in the table: no byte ranges, one lock per track instead.
    ax.barh(
        [labels[k] + ("" if peers[k]["ranges"] else " †") for k, _ in rows],
        [v for _, v in rows],
        color=[color(k) for k, _ in rows],
        xerr=[
            [v - min(peers[k]["race"]) for k, v in rows],
            [max(peers[k]["race"]) - v for k, v in rows],
        ],
        capsize=2,
        error_kw={"elinewidth": 0.8},
    )
    ax.set_xscale("log")
    ax.set_xlabel("seconds per race, median and fastest–slowest run (log)")
    ax.set_title("Python: the seed's race, %s (†: one lock per track)" % pyshape)
    for i, (k, v) in enumerate(rows):
        ax.text(max(peers[k]["race"]), i, "  %.3g s" % v, va="center", fontsize=8)
    ax.set_xlim(right=max(v for _, v in rows) * 8)

    if waits:
        race_waits.draw(axs[0][2], axs[1][2], waits, color)

    if capacity:
        # One panel the height of the figure, in place of the column's two.
        grid = axs[0][cols - 1].get_gridspec()
        axs[0][cols - 1].remove()
        axs[1][cols - 1].remove()
        capacity_panel(fig.add_subplot(grid[:, cols - 1]), capacity)

    fig.suptitle(
        "locksfile and its peers — %s, %s cores, Linux %s (%s)"
        % (m["cpu"], m["cores"], m["kernel"], color_key())
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
