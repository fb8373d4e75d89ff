"""Python peers side by side: an uncontended lock + unlock pair and the
seed's hand-over-hand race, for pylocksfile (this repository's package, both
APIs, in process/OFD mode and in shm mode), pylocksfile 0.0.6, raw fcntl.lockf, multiprocessing.Lock,
multiprocessing.Manager().Lock(), filelock, fasteners and portalocker.

    peers.py [--runs N] [--shape P/T/R] [--seed-python PY] [--only a,b] [--json OUT]

Each run measures every peer once (order rotated run by run, so whatever
else the machine does falls on all alike); the figures are medians of the
runs. pylocksfile 0.0.6 has the same import name as our package, so it is
measured by this same file running under another interpreter
(--seed-python, a virtual environment of its own), one measurement per call.

The race is the seed's testRace without its result queue: P processes each
take track 0, then for every later step take the next track of the ring
(write lock) before releasing the previous one, T tracks, R times round.
Every process
stamps the system-wide monotonic clock when it leaves a start barrier (all
set up) and after its last release; a race lasts from the first start to the
last finish (process start-up and exit are left out). Peers without byte ranges (multiprocessing, Manager,
filelock, fasteners, portalocker) get one lock object or lock file per track.
"""

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

PAIR_LOCK = 5


# --- the peers -------------------------------------------------------------
#
# A peer is a class: `__init__(dir, tracks)` runs in the parent before any
# process forks (shared objects are made here and inherited); `join()` runs in
# each racing process (or once for the pair) after the fork and returns an
# object with `lock(t)` and `unlock(t)`.


class Peer:
    ranges = True  # False: one lock object or file per track

    def __init__(self, dir, tracks):
        self.dir = dir
        self.tracks = tracks
        self.path = os.path.join(dir, "ring.lock")
        open(self.path, "a").close()

    def track_path(self, t):
        return os.path.join(self.dir, "track-%d.lock" % t)

    def close(self):
        pass


class OursSeedApi(Peer):
    name = "pylocksfile (seed API)"
    mode = "process"  # the seed API's default

    def join(self):
        from pylocksfile import pylocksfile

        lf = pylocksfile(self.path, mode=self.mode)

        class J:
            def lock(self, t):
                lf.acquire(writeLock=True, lock_n=t)

            def unlock(self, t):
                lf.release(t)

        return J()


class OursSeedApiShm(OursSeedApi):
    name = "pylocksfile (seed API, mode=\"shm\")"
    mode = "shm"


class OursModernApi(Peer):
    name = "pylocksfile (LocksFile guards)"
    mode = "ofd"

    def join(self):
        from pylocksfile import LocksFile

        lf = self._lf = LocksFile(self.path, mode=self.mode)
        guards = {}

        class J:
            def lock(self, t):
                guards[t] = lf.write(t)

            def unlock(self, t):
                guards.pop(t).release()

        return J()


class OursModernApiShm(OursModernApi):
    name = "pylocksfile (LocksFile guards, mode=\"shm\")"
    mode = "shm"


class OursModernWithShm(OursModernApiShm):
    """`with lf.write(i): pass` as the pair (one call of `pair` per pair, where
    the other peers make two: `lock` and `unlock`); the race is the guards'."""

    name = "pylocksfile (with lf.write(i), mode=\"shm\")"

    def join(self):
        j = super().join()
        write = self._lf.write

        def pair(t):
            with write(t):
                pass

        j.pair = pair
        return j


class Seed006(Peer):
    """pylocksfile 0.0.6 from PyPI; importable only under --seed-python."""

    name = "pylocksfile 0.0.6"
    external = True

    def join(self):
        from pylocksfile import pylocksfile

        lf = pylocksfile(self.path, verbose=False)

        class J:
            def lock(self, t):
                lf.acquire(writeLock=True, lock_n=t)

            def unlock(self, t):
                lf.release(t)

        return J()


class RawLockf(Peer):
    name = "fcntl.lockf (raw)"

    def join(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

        class J:
            def lock(self, t):
                fcntl.lockf(fd, fcntl.LOCK_EX, 1, t)

            def unlock(self, t):
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, t)

        return J()


class MpLock(Peer):
    name = "multiprocessing.Lock"
    ranges = False

    def __init__(self, dir, tracks):
        super().__init__(dir, tracks)
        self.locks = [mp.Lock() for _ in range(max(tracks, PAIR_LOCK + 1))]

    def join(self):
        locks = self.locks

        class J:
            def lock(self, t):
                locks[t].acquire()

            def unlock(self, t):
                locks[t].release()

        return J()


class ManagerLock(Peer):
    name = "Manager().Lock()"
    ranges = False

    def __init__(self, dir, tracks):
        super().__init__(dir, tracks)
        self.manager = mp.Manager()
        self.locks = [self.manager.Lock() for _ in range(max(tracks, PAIR_LOCK + 1))]

    def join(self):
        locks = self.locks
        # Connect to the manager now, outside the clock.
        locks[0]._connect()

        class J:
            def lock(self, t):
                locks[t].acquire()

            def unlock(self, t):
                locks[t].release()

        return J()

    def close(self):
        self.manager.shutdown()


class FileLockPeer(Peer):
    name = "filelock"
    ranges = False

    def join(self):
        from filelock import FileLock

        locks = [FileLock(self.track_path(t)) for t in range(max(self.tracks, PAIR_LOCK + 1))]

        class J:
            def lock(self, t):
                locks[t].acquire()

            def unlock(self, t):
                locks[t].release()

        return J()


class FastenersPeer(Peer):
    name = "fasteners (InterProcessReaderWriterLock)"
    ranges = False

    def join(self):
        import fasteners

        locks = [
            fasteners.InterProcessReaderWriterLock(self.track_path(t))
            for t in range(max(self.tracks, PAIR_LOCK + 1))
        ]

        class J:
            def lock(self, t):
                locks[t].acquire_write_lock()

            def unlock(self, t):
                locks[t].release_write_lock()

        return J()


class PortalockerPeer(Peer):
    name = "portalocker"
    ranges = False

    def join(self):
        import portalocker

        files = [open(self.track_path(t), "a") for t in range(max(self.tracks, PAIR_LOCK + 1))]

        class J:
            def lock(self, t):
                portalocker.lock(files[t], portalocker.LOCK_EX)

            def unlock(self, t):
                portalocker.unlock(files[t])

        return J()


PEERS = {
    "ours_seed_api": OursSeedApi,
    "ours_seed_api_shm": OursSeedApiShm,
    "ours_modern_api": OursModernApi,
    "ours_modern_api_shm": OursModernApiShm,
    "ours_modern_with_shm": OursModernWithShm,
    "seed_0.0.6": Seed006,
    "lockf": RawLockf,
    "mp_lock": MpLock,
    "manager_lock": ManagerLock,
    "filelock": FileLockPeer,
    "fasteners": FastenersPeer,
    "portalocker": PortalockerPeer,
}


# --- measurements -----------------------------------------------------------


def _racer(peer, barrier, stamps, i, tracks, rounds):
    code = 0
    try:
        j = peer.join()
        barrier.wait()
        stamps[2 * i] = time.monotonic()
        total = tracks * rounds
        j.lock(0)
        for step in range(1, total):
            j.lock(step % tracks)
            j.unlock((step - 1) % tracks)
        j.unlock((total - 1) % tracks)
        stamps[2 * i + 1] = time.monotonic()
    except BaseException as e:  # report, and fail the run through the exit code
        print("race process failed: %r" % (e,), file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def race_once(cls, procs, tracks, rounds):
    """One race; seconds from the first process's start to the last one's finish."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="peers-race-") as d:
        peer = cls(d, tracks)
        try:
            barrier = ctx.Barrier(procs)
            stamps = ctx.Array("d", 2 * procs, lock=False)
            ps = [
                ctx.Process(target=_racer, args=(peer, barrier, stamps, i, tracks, rounds))
                for i in range(procs)
            ]
            for p in ps:
                p.start()
            for p in ps:
                p.join()
            elapsed = max(stamps[1::2]) - min(stamps[0::2])
        finally:
            peer.close()
        bad = [p.exitcode for p in ps if p.exitcode != 0]
        if bad:
            raise RuntimeError("%s: race process exit codes %s" % (cls.name, bad))
        return elapsed


def pair_loop(j):
    """``loop(n)``: ``n`` uncontended pairs of lock ``PAIR_LOCK`` through
    join object ``j``: ``lock`` then ``unlock``, or ``pair`` where it has
    one (the with block, one call a pair)."""
    lock, unlock, t = j.lock, j.unlock, PAIR_LOCK
    pair = getattr(j, "pair", None)

    def loop(n):
        if pair is None:
            for _ in range(n):
                lock(t)
                unlock(t)
        else:
            for _ in range(n):
                pair(t)

    return loop


def pair_once(cls, min_time=0.2):
    """Seconds per uncontended lock + unlock of one lock, in this process."""
    with tempfile.TemporaryDirectory(prefix="peers-pair-") as d:
        peer = cls(d, PAIR_LOCK + 1)
        try:
            loop = pair_loop(peer.join())
            n = 16
            while True:
                t0 = time.perf_counter()
                loop(n)
                el = time.perf_counter() - t0
                if el >= min_time:
                    return el / n
                n = n * 2 if el < min_time / 8 else int(n * min_time / el * 1.1) + 1
        finally:
            peer.close()


def measure(key, what, shape, seed_python):
    cls = PEERS[key]
    if getattr(cls, "external", False) and seed_python:
        out = subprocess.run(
            [seed_python, os.path.abspath(__file__), "--worker", key, "--what", what, "--shape", shape],
            check=True,
            capture_output=True,
            text=True,
        )
        return float(out.stdout.strip().splitlines()[-1])
    if what == "pair":
        return pair_once(cls)
    procs, tracks, rounds = map(int, shape.split("/"))
    return race_once(cls, procs, tracks, rounds)


def available(key, seed_python):
    cls = PEERS[key]
    if getattr(cls, "external", False):
        return bool(seed_python)
    try:
        with tempfile.TemporaryDirectory() as d:
            p = cls(d, PAIR_LOCK + 1)
            try:
                j = p.join()
                j.lock(0)
                j.unlock(0)
            finally:
                p.close()
        return True
    except Exception as e:
        print("skipping %s: %r" % (cls.name, e), file=sys.stderr)
        return False


def versions(seed_python):
    from importlib import metadata

    v = {"python": sys.version.split()[0]}
    for dist in ("locksfile", "filelock", "fasteners", "portalocker"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if seed_python:
        out = subprocess.run(
            [seed_python, "-c", "from importlib import metadata; print(metadata.version('pylocksfile'))"],
            capture_output=True,
            text=True,
        )
        v["pylocksfile (seed venv)"] = out.stdout.strip()
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--shape", default="4/50/100", help="procs/tracks/rounds of the race")
    ap.add_argument("--race-runs", type=int, default=None, help="runs for the race (default --runs)")
    ap.add_argument(
        "--slow-runs",
        type=int,
        default=None,
        help="races of peers whose first race took over a second stop after this many runs",
    )
    ap.add_argument("--seed-python", help="interpreter with pylocksfile 0.0.6 installed")
    ap.add_argument("--only", help="comma-separated peer keys")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--what", choices=["pair", "race"], help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        print(repr(measure(a.worker, a.what, a.shape, None)))
        return

    keys = [k for k in (a.only.split(",") if a.only else PEERS) if available(k, a.seed_python)]
    results = {"versions": versions(a.seed_python), "shape": a.shape, "peers": {}}
    for k in keys:
        results["peers"][k] = {"name": PEERS[k].name, "ranges": PEERS[k].ranges, "pair": [], "race": []}
    for what, runs in (("pair", a.runs), ("race", a.race_runs or a.runs)):
        for run in range(runs):
            order = keys[run % len(keys):] + keys[: run % len(keys)]
            for k in order:
                done = results["peers"][k][what]
                if what == "race" and a.slow_runs and len(done) >= a.slow_runs and done[0] > 1.0:
                    continue
                x = measure(k, what, a.shape, a.seed_python)
                results["peers"][k][what].append(x)
                print("%s run %d %-42s %12.6f s" % (what, run + 1, PEERS[k].name, x), file=sys.stderr)
    for k in keys:
        r = results["peers"][k]
        r["pair_median"] = statistics.median(r["pair"]) if r["pair"] else None
        r["race_median"] = statistics.median(r["race"]) if r["race"] else None
        print(
            "%-42s pair %9.2f us   race %s %9.3f s"
            % (r["name"], r["pair_median"] * 1e6, a.shape, r["race_median"])
        )
    med = {k: results["peers"][k]["pair_median"] for k in keys}
    results["ratios"] = ratios = {}
    if med.get("ours_seed_api_shm") and med.get("mp_lock"):
        ratios["seed_shm_pair_over_mp_lock_pair"] = med["ours_seed_api_shm"] / med["mp_lock"]
    if med.get("ours_modern_with_shm") and med.get("ours_seed_api_shm"):
        ratios["with_write_shm_over_seed_shm_pair"] = med["ours_modern_with_shm"] / med["ours_seed_api_shm"]
    if ratios:
        print("pair ratios, this run: %s" % ", ".join(
            "%s %.2fx (target %s)" % (k, v, "<= 2" if k.startswith("seed") else "<= 1.5")
            for k, v in ratios.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
