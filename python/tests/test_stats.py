"""``LocksFile.stats()``: a holder process keeps index 3 for 250 ms while
another process waits for it. In shm mode the table-wide figures, read by
a third object, show both; in a kernel mode each process sees its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pylocksfile import LocksFile

from support import kernel_locks, table_locks, wait_until

HOLD = 0.25

# A process that takes index 3 (recording), says "ready", and lets go when
# told ("holder"); or just waits for it and lets go ("waiter"). Either
# prints its own figures afterwards.
SCRIPT = r"""
import json, sys
from pylocksfile import LocksFile
path, mode, role = sys.argv[1:4]
lf = LocksFile(path, mode=mode, stats=True)
# flock(2) locks the whole file only.
g = lf.write(slice(0, None) if mode == "flock" else 3)
if role == "holder":
    print("ready", flush=True)
    sys.stdin.readline()
g.release()
print(json.dumps(lf.stats()), flush=True)
"""


def start(path, mode, role):
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, os.fspath(path), mode, role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "LOCKSFILE_STATS"},
    )


def figures_of(proc):
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def contended(path, mode):
    """The 250 ms scenario; returns the holder's and the waiter's figures."""
    holder = start(path, mode, "holder")
    assert holder.stdout.readline() == "ready\n"
    waiter = start(path, mode, "waiter")
    listed = table_locks if mode == "shm" else kernel_locks
    start_at = 0 if mode == "flock" else 3
    wait_until(
        lambda: any(l.waiting and l.start == start_at for l in listed(path)),
        what="the waiter asleep",
    )
    time.sleep(HOLD)
    holder.stdin.write("go\n")
    holder.stdin.flush()
    return figures_of(holder), figures_of(waiter)


def lock3(stats):
    [entry] = [l for l in stats["locks"] if l["index"] == 3]
    return entry


def near_250ms(h):
    assert 200 <= h["max"] < 1000, h
    assert h["p50"] <= h["max"] and h["p99"] <= h["max"], h


def test_shm_table_wide(lock_path):
    # Keeps the table in use, and records nothing itself.
    reader = LocksFile(lock_path, mode="shm", stats=False)
    holder, waiter = contended(lock_path, "shm")
    stats = reader.stats()
    assert stats["scope"] == "table"
    entry = lock3(stats)
    assert entry["acquired"] == 2, entry
    assert entry["contended"] == 1, entry
    assert entry["timeouts"] == 0 and entry["deadlocks"] == 0
    assert entry["wait_ms"]["count"] == 1
    assert entry["hold_ms"]["count"] == 2
    near_250ms(entry["wait_ms"])
    near_250ms(entry["hold_ms"])
    owners = stats["owners"]
    assert len(owners) == 2, owners
    assert all(o["pid"] > 0 for o in owners)
    assert sorted(o["contended"] for o in owners) == [0, 1]
    # Every process sees the table-wide figures; the waiter, last to
    # print, saw them all.
    assert holder["scope"] == waiter["scope"] == "table"
    assert waiter["locks"] == stats["locks"]
    reader.close()


@pytest.mark.parametrize("mode", ["ofd", "process", "flock"])
def test_kernel_modes_per_handle(lock_path, mode):
    holder, waiter = contended(lock_path, mode)
    for s in (holder, waiter):
        assert s["scope"] == "handle"
        assert len(s["owners"]) == 1
        assert s["owners"][0]["command"]
    key = None if mode == "flock" else 3
    if mode == "flock":
        # flock(2) locks the whole file: "other indices", index None.
        holder_entry = holder["locks"][0]
        waiter_entry = waiter["locks"][0]
        assert holder_entry["index"] is key and waiter_entry["index"] is key
    else:
        holder_entry, waiter_entry = lock3(holder), lock3(waiter)
    assert (holder_entry["acquired"], holder_entry["contended"]) == (1, 0)
    assert (waiter_entry["acquired"], waiter_entry["contended"]) == (1, 1)
    near_250ms(holder_entry["hold_ms"])
    near_250ms(waiter_entry["wait_ms"])
    assert holder_entry["wait_ms"]["count"] == 0


def test_timeouts_count(lock_path):
    holder = start(lock_path, "ofd", "holder")
    assert holder.stdout.readline() == "ready\n"
    lf = LocksFile(lock_path, stats=True)
    with pytest.raises(Exception):
        lf.write(3, timeout=0.05)
    entry = lock3(lf.stats())
    assert (entry["acquired"], entry["contended"], entry["timeouts"]) == (0, 1, 1)
    # The wait runs from the refusal to the deadline, which counts from
    # the call: at most the timeout, give or take the clock.
    assert entry["wait_ms"]["count"] == 1
    assert 0 < entry["wait_ms"]["max"] < 1000
    holder.stdin.write("go\n")
    holder.stdin.flush()
    figures_of(holder)


def test_not_recording_is_an_error(lock_path):
    lf = LocksFile(lock_path, stats=False)
    with lf.write(1):
        pass
    with pytest.raises(Exception, match="statistics"):
        lf.stats()
    # Pickling keeps the switch.
    import pickle

    again = pickle.loads(pickle.dumps(LocksFile(lock_path, stats=True)))
    with again.write(2):
        pass
    assert again.stats()["locks"][0]["index"] == 2
