"""pylocksfile against its targets: the seed's race and the uncontended pair,
measured side by side in one run.

    .venv/bin/python bench/python/bench.py [--runs N] [--shape P/T/R]
                                           [--pair-seconds S] [--json OUT]
                                           [--seed-venv DIR | --no-seed]

Race: the seed's testRace without its result queue. P processes (fork) each
take track 0 with a write lock, then for every later step take the next
track of a ring of T tracks before releasing the previous one, R times
round. The clock runs from the moment the first process leaves a barrier
that all reach after their set-up until the last one has released its last
track (each process stamps both with the system-wide monotonic clock). "us/step" is that wall time
divided by all the steps of all the processes (P * T * R). Peers: this
repository's pylocksfile through the seed's API, in its default process
mode and with ``mode="shm"`` (and, for reference, its LocksFile guards),
pylocksfile 0.0.6 from PyPI, a list of
multiprocessing.Manager().Lock(), raw fcntl.lockf on one file, and a list
of multiprocessing.Lock.

Pair: one uncontended ``acquire(writeLock=True, lock_n=5)`` + ``release(5)``
in one process, against a raw ``fcntl.lockf(fd, LOCK_EX | LOCK_NB, 1, 5)`` +
``fcntl.lockf(fd, LOCK_UN, 1, 5)``. Each measurement times a loop long
enough to last ``--pair-seconds``.

pylocksfile 0.0.6 has the same import name as ours, so it runs in its own
virtual environment (created on first use with ``pip install
pylocksfile==0.0.6``): this file is started there as a subprocess, one
measurement per call. Every run measures every peer once, in an order that
rotates from run to run; the figures are medians over the runs.

Targets: race at least 8x faster than 0.0.6 and at least 30x faster than
the Manager locks; pair at most 1.15x the raw lockf pair. In shm mode: race
at least 8x faster than 0.0.6 and at most 2x multiprocessing.Lock's time;
pair at most 0.30x the raw lockf pair, within 2x multiprocessing.Lock's
acquire() + release(), and a ``with LocksFile(p, mode="shm").write(5):``
block within 1.5x the seed API's shm pair. Those two are measured as
peers.py measures its pairs for BENCHMARKS.md (through a peer's lock/unlock
calls, or one call holding the with block), in this run; the same ratios
in bare loops are printed for reference.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED_VERSION = "0.0.6"
PAIR_INDEX = 5

# Figures the issue reports for this kind of machine, measured before any of
# this package existed (us per race step, us per pair). Printed beside ours
# for orientation only: they come from another run.
ISSUE_BASELINE = {
    "race_us_per_step": {"seed_0.0.6": 14.8, "manager_lock": 72.0, "lockf": 1.8, "mp_lock": 0.22},
    "pair_us": {"seed_0.0.6": 8.8, "lockf": 0.98},
}

TARGETS = {
    "race_vs_seed_0.0.6": (">=", 8.0),
    "race_vs_manager_lock": (">=", 30.0),
    "pair_vs_lockf": ("<=", 1.15),
    "shm_race_vs_seed_0.0.6": (">=", 8.0),
    "shm_race_over_mp_lock": ("<=", 2.0),
    "shm_pair_vs_lockf": ("<=", 0.30),
    "shm_pair_over_mp_lock_pair": ("<=", 2.0),
    "shm_with_write_over_shm_pair": ("<=", 1.5),
}


# --------------------------------------------------------------------------
# Peers: make(dir, tracks) runs in the parent before the racers fork and
# returns join(); join() runs in each racer (or once for the pair) and
# returns (lock, unlock), two callables taking a track number.
# --------------------------------------------------------------------------


def _ring(d):
    path = os.path.join(d, "ring.lock")
    open(path, "a").close()
    return path


def ours_seed_api(d, tracks, mode=None):
    path = _ring(d)

    def join():
        from pylocksfile import pylocksfile

        # No keyword unless asked: 0.0.6 (run through this same function)
        # has no `mode`.
        lf = pylocksfile(path, verbose=False) if mode is None else pylocksfile(path, verbose=False, mode=mode)
        acquire, release = lf.acquire, lf.release
        return (lambda t: acquire(writeLock=True, lock_n=t)), release

    return join


def ours_seed_api_shm(d, tracks):
    return ours_seed_api(d, tracks, mode="shm")


def ours_locksfile(d, tracks):
    path = _ring(d)

    def join():
        from pylocksfile import LocksFile

        lf = LocksFile(path)
        guards = {}

        def lock(t):
            guards[t] = lf.write(t)

        def unlock(t):
            guards.pop(t).release()

        return lock, unlock

    return join


# pylocksfile 0.0.6 has the same API and import name: the same join, only
# ever called inside the seed's virtual environment.
seed_006 = ours_seed_api


def raw_lockf(d, tracks):
    path = _ring(d)

    def join():
        fd = os.open(path, os.O_RDWR)
        lockf, ex, un = fcntl.lockf, fcntl.LOCK_EX, fcntl.LOCK_UN
        return (lambda t: lockf(fd, ex, 1, t)), (lambda t: lockf(fd, un, 1, t))

    return join


def mp_locks(d, tracks):
    locks = [mp.get_context("fork").Lock() for _ in range(tracks)]

    def join():
        return (lambda t: locks[t].acquire()), (lambda t: locks[t].release())

    return join


class _ManagerJoin:
    def __init__(self, tracks):
        self.manager = mp.get_context("fork").Manager()
        self.locks = [self.manager.Lock() for _ in range(tracks)]

    def __call__(self):
        locks = self.locks
        # One connection per process to the manager; open it before the clock.
        locks[0]._connect()
        return (lambda t: locks[t].acquire()), (lambda t: locks[t].release())

    def close(self):
        self.manager.shutdown()


def manager_locks(d, tracks):
    return _ManagerJoin(tracks)


RACE_PEERS = {
    "ours_seed_api": ("pylocksfile (ours, seed API)", ours_seed_api),
    "ours_seed_api_shm": ("pylocksfile (ours, seed API, mode=\"shm\")", ours_seed_api_shm),
    "ours_locksfile": ("pylocksfile (ours, LocksFile guards)", ours_locksfile),
    "seed_0.0.6": (f"pylocksfile {SEED_VERSION} (PyPI)", seed_006),
    "manager_lock": ("list of Manager().Lock()", manager_locks),
    "lockf": ("raw fcntl.lockf", raw_lockf),
    "mp_lock": ("list of multiprocessing.Lock", mp_locks),
}
EXTERNAL = {"seed_0.0.6"}


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def _racer(join, barrier, times, i, tracks, rounds):
    code = 0
    try:
        lock, unlock = join()
        barrier.wait()
        times[2 * i] = time.perf_counter()
        total = tracks * rounds
        lock(0)
        for step in range(1, total):
            lock(step % tracks)
            unlock((step - 1) % tracks)
        unlock((total - 1) % tracks)
        times[2 * i + 1] = time.perf_counter()
    except BaseException as e:  # noqa: BLE001 - reported through the exit code
        print(f"racer failed: {e!r}", file=sys.stderr)
        code = 1
    sys.stderr.flush()
    os._exit(code)


def race_once(key, procs, tracks, rounds):
    """Seconds from the first racer leaving the start barrier until the last
    one has released its last track (perf_counter is CLOCK_MONOTONIC, one
    clock for all processes; process start-up and exit are not counted)."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="bench-race-") as d:
        join = RACE_PEERS[key][1](d, tracks)
        try:
            barrier = ctx.Barrier(procs)
            times = ctx.Array("d", 2 * procs, lock=False)
            ps = [ctx.Process(target=_racer, args=(join, barrier, times, i, tracks, rounds)) for i in range(procs)]
            for p in ps:
                p.start()
            for p in ps:
                p.join()
        finally:
            if hasattr(join, "close"):
                join.close()
    if any(p.exitcode != 0 for p in ps):
        raise RuntimeError(f"{key}: racer exit codes {[p.exitcode for p in ps]}")
    return max(times[1::2]) - min(times[0::2])


def _pair_ours(path, mode=None):
    from pylocksfile import pylocksfile

    lf = pylocksfile(path) if mode is None else pylocksfile(path, mode=mode)
    acquire, release = lf.acquire, lf.release

    def loop(n):
        for _ in range(n):
            acquire(writeLock=True, lock_n=PAIR_INDEX)
            release(PAIR_INDEX)

    return loop, lf


def _pair_ours_shm(path):
    return _pair_ours(path, mode="shm")


def _pair_seed(path):
    return _pair_ours(path)  # the same calls, under the seed's interpreter


def _pair_locksfile(path):
    from pylocksfile import LocksFile

    lf = LocksFile(path)
    acquire, release = lf.acquire, lf.release

    def loop(n):
        for _ in range(n):
            acquire("exclusive", PAIR_INDEX, blocking=False)
            release(PAIR_INDEX)

    return loop, lf


def _pair_lockf(path):
    fd = os.open(path, os.O_RDWR)
    lockf, ex, un = fcntl.lockf, fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN

    def loop(n):
        for _ in range(n):
            lockf(fd, ex, 1, PAIR_INDEX)
            lockf(fd, un, 1, PAIR_INDEX)

    return loop, fd


def _pair_with_shm(path):
    from pylocksfile import LocksFile

    lf = LocksFile(path, mode="shm")
    write = lf.write

    def loop(n):
        for _ in range(n):
            with write(PAIR_INDEX):
                pass

    return loop, lf


def _pair_mp_lock(path):
    lock = mp.get_context("fork").Lock()
    acquire, release = lock.acquire, lock.release

    def loop(n):
        for _ in range(n):
            acquire()
            release()

    return loop, lock


def _via_peers(key):
    """The pair of peers.py's peer `key`, measured as peers.py (and so
    BENCHMARKS.md) measures it: through its join object, lock(5) then
    unlock(5), or pair(5) for the with block."""

    def make(path):
        import peers  # bench/python/peers.py, next to this file

        peer = peers.PEERS[key](os.path.dirname(path), peers.PAIR_LOCK + 1)
        j = peer.join()
        return peers.pair_loop(j), (peer, j)

    return make


PAIR_PEERS = {
    "ours_seed_api": ("pylocksfile (ours): acquire(writeLock=True, lock_n=5) + release(5)", _pair_ours),
    "ours_seed_api_shm": ("pylocksfile (ours, mode=\"shm\"): acquire(writeLock=True, lock_n=5) + release(5)",
                          _pair_ours_shm),
    "ours_locksfile": ("pylocksfile (ours): LocksFile.acquire('exclusive', 5, blocking=False) + release(5)",
                       _pair_locksfile),
    "seed_0.0.6": (f"pylocksfile {SEED_VERSION}: acquire(writeLock=True, lock_n=5) + release(5)", _pair_seed),
    "lockf": ("raw fcntl.lockf(fd, LOCK_EX|LOCK_NB, 1, 5) + lockf(fd, LOCK_UN, 1, 5)", _pair_lockf),
    "ours_with_shm": ("pylocksfile (ours): with LocksFile(path, mode=\"shm\").write(5): pass", _pair_with_shm),
    "mp_lock": ("multiprocessing.Lock: acquire() + release()", _pair_mp_lock),
    # As peers.py measures them (BENCHMARKS.md's figures): the targets below.
    "peers_seed_shm": ("peers.py's pair: seed API, mode=\"shm\"", _via_peers("ours_seed_api_shm")),
    "peers_mp_lock": ("peers.py's pair: multiprocessing.Lock", _via_peers("mp_lock")),
    "peers_with_shm": ("peers.py's pair: with lf.write(i), mode=\"shm\"", _via_peers("ours_modern_with_shm")),
}


def pair_once(key, seconds):
    """Seconds per lock + unlock pair, from a loop lasting about ``seconds``."""
    with tempfile.TemporaryDirectory(prefix="bench-pair-") as d:
        path = _ring(d)
        loop, keep = PAIR_PEERS[key][1](path)
        loop(1000)  # warm up
        n = 1000
        while True:
            t0 = time.perf_counter()
            loop(n)
            el = time.perf_counter() - t0
            if el >= seconds:
                return el / n
            n = n * 4 if el < seconds / 8 else int(n * seconds / el * 1.05) + 1


def measure(key, what, args):
    if key in EXTERNAL:
        cmd = [seed_python(args), os.path.abspath(__file__), "--worker", key, "--what", what,
               "--shape", args.shape, "--pair-seconds", str(args.pair_seconds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return float(out.stdout.split()[-1])
    if what == "pair":
        return pair_once(key, args.pair_seconds)
    return race_once(key, *shape(args))


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def shape(args):
    procs, tracks, rounds = (int(x) for x in args.shape.split("/"))
    if tracks <= procs:
        raise SystemExit("the ring needs more tracks than processes, or the race deadlocks")
    return procs, tracks, rounds


def seed_python(args):
    return os.path.join(args.seed_venv, "bin", "python")


def ensure_seed_venv(args):
    """Create the seed's virtual environment if needed; return its version."""
    py = seed_python(args)
    if not os.path.exists(py):
        print(f"creating {args.seed_venv} with pylocksfile=={SEED_VERSION}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", args.seed_venv], check=True)
    probe = [py, "-c", "from importlib import metadata; print(metadata.version('pylocksfile'))"]
    got = subprocess.run(probe, capture_output=True, text=True)
    if got.returncode != 0 or got.stdout.strip() != SEED_VERSION:
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"pylocksfile=={SEED_VERSION}"], check=True)
        got = subprocess.run(probe, capture_output=True, text=True, check=True)
    return got.stdout.strip()


def check_ours():
    try:
        import pylocksfile
    except ImportError as e:
        raise SystemExit(f"pylocksfile is not importable here ({e}); run with .venv/bin/python") from None
    if not hasattr(pylocksfile, "LocksFile"):
        raise SystemExit(f"{pylocksfile.__file__} is not this repository's package; run with .venv/bin/python")
    return pylocksfile.__version__


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ratio(a, b):
    return a / b if a and b else None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def verdict(name, value):
    op, bound = TARGETS[name]
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def report(res):
    procs, tracks, rounds = res["shape"]
    steps = procs * tracks * rounds
    print(f"\nRace: {procs} processes, {tracks} tracks, {rounds} rounds ({steps} steps in all); "
          f"median of {res['runs']} runs")
    print(f"  {'peer':40} {'median s':>10} {'us/step':>9} {'vs ours':>9} {'issue us/step':>14}")
    ours = res["race"].get("ours_seed_api", {}).get("median_s")
    for key, r in res["race"].items():
        base = ISSUE_BASELINE["race_us_per_step"].get(key)
        print(f"  {r['name']:40} {r['median_s']:10.4f} {r['us_per_step']:9.2f} "
              f"{fmt(ratio(r['median_s'], ours), '8.2f')}x {fmt(base, '14.2f')}")
    print("  (vs ours: how many times longer than ours the race took; issue: the issue's figures, another run)")
    print(f"\nUncontended pair (index {PAIR_INDEX}); median of {res['runs']} runs")
    print(f"  {'peer':88} {'us/pair':>8} {'issue us':>9}")
    for key, r in res["pair"].items():
        base = ISSUE_BASELINE["pair_us"].get(key)
        print(f"  {r['name']:88} {r['median_us']:8.3f} {fmt(base, '9.2f')}")
    print("\nTargets")
    for name, (op, bound) in TARGETS.items():
        v = res["ratios"].get(name)
        ok = res["targets"].get(name)
        state = "n/a" if ok is None else ("met" if ok else "NOT MET")
        shown = "      -  " if v is None else f"{v:8.2f}x"
        print(f"  {name:30} {shown}   target {op} {bound}x   {state}")
    for name in ("direct_shm_pair_over_mp_lock_pair", "direct_with_write_over_shm_pair"):
        v = res["ratios"].get(name)
        if v is not None:
            print(f"  {name:34} {v:8.2f}x   (bare loops, for reference)")
    lo = res["ratios"].get("race_lockf_vs_seed_0.0.6")
    if lo is not None:
        print(f"  (for scale: raw fcntl.lockf runs this race {lo:.2f}x faster than 0.0.6 here)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="runs per peer (default 7)")
    ap.add_argument("--shape", default="4/50/100", help="processes/tracks/rounds of the race (default 4/50/100)")
    ap.add_argument("--pair-seconds", type=float, default=0.3, help="length of one pair measurement (default 0.3)")
    ap.add_argument("--seed-venv", default=os.path.join(REPO, ".bench-venv-seed"),
                    help="virtual environment for pylocksfile 0.0.6 (created if missing)")
    ap.add_argument("--no-seed", action="store_true", help="leave pylocksfile 0.0.6 out")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--what", choices=["pair", "race"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # one measurement, inside the seed's environment
        x = pair_once(args.worker, args.pair_seconds) if args.what == "pair" else race_once(args.worker, *shape(args))
        print(repr(x))
        return

    procs, tracks, rounds = shape(args)
    versions = {"pylocksfile (ours)": check_ours()}
    race_keys = list(RACE_PEERS)
    pair_keys = list(PAIR_PEERS)
    if args.no_seed:
        race_keys.remove("seed_0.0.6")
        pair_keys.remove("seed_0.0.6")
    else:
        versions["pylocksfile (seed venv)"] = ensure_seed_venv(args)

    samples = {("race", k): [] for k in race_keys}
    samples.update({("pair", k): [] for k in pair_keys})
    for run in range(args.runs):
        for what, keys in (("pair", pair_keys), ("race", race_keys)):
            order = keys[run % len(keys):] + keys[: run % len(keys)]
            for k in order:
                x = measure(k, what, args)
                samples[(what, k)].append(x)
                unit = f"{x * 1e6:9.3f} us" if what == "pair" else f"{x:9.4f} s "
                print(f"run {run + 1}/{args.runs} {what} {k:16} {unit}", file=sys.stderr)

    steps = procs * tracks * rounds
    res = {
        "machine": machine(),
        "versions": versions,
        "shape": [procs, tracks, rounds],
        "runs": args.runs,
        "pair_seconds": args.pair_seconds,
        "race": {},
        "pair": {},
    }
    for k in race_keys:
        xs = samples[("race", k)]
        med = statistics.median(xs)
        res["race"][k] = {"name": RACE_PEERS[k][0], "samples_s": xs, "median_s": med,
                          "us_per_step": med / steps * 1e6}
    for k in pair_keys:
        xs = samples[("pair", k)]
        res["pair"][k] = {"name": PAIR_PEERS[k][0], "samples_us": [x * 1e6 for x in xs],
                          "median_us": statistics.median(xs) * 1e6}
    race_med = {k: r["median_s"] for k, r in res["race"].items()}
    pair_med = {k: r["median_us"] for k, r in res["pair"].items()}
    res["ratios"] = {
        "race_vs_seed_0.0.6": ratio(race_med.get("seed_0.0.6"), race_med["ours_seed_api"]),
        "race_vs_manager_lock": ratio(race_med["manager_lock"], race_med["ours_seed_api"]),
        "race_vs_lockf": ratio(race_med["lockf"], race_med["ours_seed_api"]),
        "race_vs_mp_lock": ratio(race_med["mp_lock"], race_med["ours_seed_api"]),
        "pair_vs_lockf": ratio(pair_med["ours_seed_api"], pair_med["lockf"]),
        "pair_seed_0.0.6_vs_ours": ratio(pair_med.get("seed_0.0.6"), pair_med["ours_seed_api"]),
        "race_lockf_vs_seed_0.0.6": ratio(race_med.get("seed_0.0.6"), race_med["lockf"]),
        "shm_race_vs_seed_0.0.6": ratio(race_med.get("seed_0.0.6"), race_med["ours_seed_api_shm"]),
        "shm_race_over_mp_lock": ratio(race_med["ours_seed_api_shm"], race_med["mp_lock"]),
        "shm_pair_vs_lockf": ratio(pair_med["ours_seed_api_shm"], pair_med["lockf"]),
        "shm_pair_over_mp_lock_pair": ratio(pair_med["peers_seed_shm"], pair_med["peers_mp_lock"]),
        "shm_with_write_over_shm_pair": ratio(pair_med["peers_with_shm"], pair_med["peers_seed_shm"]),
        # The same two in bare loops (no target: the loop's own calls left out).
        "direct_shm_pair_over_mp_lock_pair": ratio(pair_med["ours_seed_api_shm"], pair_med["mp_lock"]),
        "direct_with_write_over_shm_pair": ratio(pair_med["ours_with_shm"], pair_med["ours_seed_api_shm"]),
    }
    res["issue_baseline"] = ISSUE_BASELINE
    res["targets"] = {name: verdict(name, res["ratios"].get(name)) for name in TARGETS}
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
