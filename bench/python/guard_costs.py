"""What an uncontended lock + unlock of one index costs through each of
pylocksfile's Python APIs, side by side with multiprocessing.Lock, and what
each part of the guard path adds (the guard object, keyword parsing, the
thread checks, the with-block bookkeeping).

    guard_costs.py [--n 200000] [--repeats 9] [--modes shm,ofd] [--only a,b]
                   [--callgrind N1,N2] [--json OUT]

Every variant runs a loop of N pairs, in a function of its own with the
bound methods in locals; a repeat runs every variant once, in an order
rotated repeat by repeat, so whatever else the machine does falls on all
alike. The figures are medians over the repeats, in ns per pair, the loop
included (an empty loop of N is shown for scale), and the ratios are taken
within this one run.

With --callgrind N1,N2 it counts instructions instead: every variant runs
alone in a fresh interpreter under valgrind's callgrind, N1 pairs then N2
pairs (one hash seed for both), and the difference of the two totals over
N2 - N1 is its instructions per pair, start-up and set-up left out. Besides
the seed pair (positional, keywords, a tuple span) and the guard forms, the
with statement's share is shown by the same calls made by hand, and the
protocol's cost for any C lock by `with threading.Lock()`.
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

I = 5


def variants(d, mode):
    """name -> a function running n pairs, for one lock-file mode."""
    from pylocksfile import LocksFile, pylocksfile

    path = os.path.join(d, "costs-%s.lock" % mode)
    seed = pylocksfile(path, mode="ofd" if mode == "ofd" else mode)
    lf = LocksFile(path, mode=mode)
    share = LocksFile(path, mode=mode, threads="share")
    blk = LocksFile(path, mode=mode)
    # An open `with LocksFile(...)` block: every take counts for NoLockWarning.
    blk.__enter__()
    keep = [seed, lf, share, blk]

    def seed_pair(n):
        acquire, release = seed.acquire, seed.release
        for _ in range(n):
            acquire(True, I, False)
            release(I)

    def seed_pair_kw(n):
        acquire, release = seed.acquire, seed.release
        for _ in range(n):
            acquire(writeLock=True, lock_n=I)
            release(I)

    def seed_pair_tuple(n):
        acquire, release = seed.acquire, seed.release
        span = (I, 1)
        for _ in range(n):
            acquire(True, span, False)
            release(span)

    def with_write(n):
        write = lf.write
        for _ in range(n):
            with write(I):
                pass

    def with_write_kw(n):
        write = lf.write
        for _ in range(n):
            with write(I, timeout=None):
                pass

    def with_write_share(n):
        write = share.write
        for _ in range(n):
            with write(I):
                pass

    def with_write_in_block(n):
        write = blk.write
        for _ in range(n):
            with write(I):
                pass

    def enter_exit(n):
        # The with statement's calls made by hand: what CPython's protocol
        # (looking up and binding __enter__/__exit__) adds is the difference.
        write = lf.write
        for _ in range(n):
            g = write(I)
            g.__enter__()
            g.__exit__(None, None, None)

    def write_release(n):
        write = lf.write
        for _ in range(n):
            write(I).release()

    def try_write_release(n):
        try_write = lf.try_write
        for _ in range(n):
            try_write(I).release()

    def explicit(n):
        acquire, release = lf.acquire, lf.release
        for _ in range(n):
            acquire("exclusive", I)
            release(I)

    def explicit_share(n):
        acquire, release = share.acquire, share.release
        for _ in range(n):
            acquire("exclusive", I)
            release(I)

    out = {
        "seed pair": seed_pair,
        "seed pair, keywords (writeLock=True, lock_n=5)": seed_pair_kw,
        "seed pair, lock_n=(5, 1)": seed_pair_tuple,
        "with lf.write(5)": with_write,
        "with lf.write(5, timeout=None)": with_write_kw,
        "with lf.write(5), threads=share": with_write_share,
        "with lf.write(5), in a with-LocksFile block": with_write_in_block,
        "g = lf.write(5); g.__enter__(); g.__exit__(None, None, None)": enter_exit,
        "lf.write(5).release()": write_release,
        "lf.try_write(5).release()": try_write_release,
        "lf.acquire('exclusive', 5) + release(5)": explicit,
        "lf.acquire/release, threads=share": explicit_share,
    }
    return {"%s %s" % (mode, k): v for k, v in out.items()}, keep


def common():
    import threading

    lock = mp.Lock()
    tlock = threading.Lock()

    def mp_pair(n):
        acquire, release = lock.acquire, lock.release
        for _ in range(n):
            acquire()
            release()

    def with_mp(n):
        for _ in range(n):
            with lock:
                pass

    def with_threading(n):
        # The with protocol around the cheapest C lock there is.
        for _ in range(n):
            with tlock:
                pass

    def empty(n):
        for _ in range(n):
            pass

    return {
        "multiprocessing.Lock": mp_pair,
        "with multiprocessing.Lock": with_mp,
        "with threading.Lock": with_threading,
        "empty loop": empty,
    }, [lock, tlock]


def callgrind(names, lengths, out_dir):
    """Instructions per pair of each variant: the slope of callgrind's total
    between two loop lengths, each run in a fresh interpreter of its own
    (start-up and set-up fall out of the difference)."""
    import re
    import subprocess

    res = {}
    for k in names:
        totals = []
        for n in lengths:
            out = os.path.join(out_dir, "cg.%d" % len(totals))
            subprocess.run(
                ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out,
                 sys.executable, os.path.abspath(__file__), "--one", k, "--n", str(n)],
                check=True, capture_output=True,
                # One hash seed for all: dict layouts (and so the work of
                # every lookup) the same in every run.
                env=dict(os.environ, PYTHONHASHSEED="0"),
            )
            with open(out) as f:
                m = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
            totals.append(int(m.group(1)))
        res[k] = (totals[1] - totals[0]) / (lengths[1] - lengths[0])
        print("%-64s %8.0f instructions/pair" % (k, res[k]), flush=True)
    return res


def all_variants(d, modes):
    fns, keep = common()
    for mode in modes:
        v, k = variants(d, mode)
        fns.update(v)
        keep += k
    return fns, keep


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--modes", default="shm,ofd")
    ap.add_argument("--only", help="comma-separated substrings of variant names")
    ap.add_argument("--callgrind", metavar="N1,N2",
                    help="count instructions per pair under callgrind instead (slope between two loop lengths)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="guard-costs-") as d:
        fns, keep = all_variants(d, a.modes.split(","))
        if a.one:
            fns[a.one](a.n)
            return
        if a.only:
            subs = a.only.split(",")
            fns = {k: f for k, f in fns.items() if k in ("multiprocessing.Lock", "empty loop") or any(s in k for s in subs)}
        names = list(fns)
        if a.callgrind:
            lengths = [int(x) for x in a.callgrind.split(",")]
            res = callgrind(names, lengths, d)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"lengths": lengths, "instructions_per_pair": res}, f, indent=1)
            return
        for f in fns.values():
            f(1000)  # warm up
        times = {k: [] for k in names}
        for r in range(a.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for k in order:
                t0 = time.perf_counter_ns()
                fns[k](a.n)
                times[k].append((time.perf_counter_ns() - t0) / a.n)
        med = {k: statistics.median(v) for k, v in times.items()}
        mpl = med["multiprocessing.Lock"]
        print("%-52s %9s %8s %8s" % ("ns per pair (median of %d)" % a.repeats, "ns", "/mp", "/seed"))
        for k in names:
            mode = k.split()[0]
            seed = med.get("%s seed pair" % mode)
            print(
                "%-52s %9.1f %8.2f %8s"
                % (k, med[k], med[k] / mpl, "%.2f" % (med[k] / seed) if seed else "")
            )
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"n": a.n, "times_ns": times, "median_ns": med}, f, indent=1)


if __name__ == "__main__":
    main()
