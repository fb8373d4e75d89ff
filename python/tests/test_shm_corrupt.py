"""An shm sidecar written over while in use: every call answers (a lock, a
refusal or a typed ``LocksfileError``, ``LockTableError`` for a table found
corrupt), never a ``PanicException``, and the holder is not aborted.
``crates/locksfile/tests/shm_corrupt.rs`` covers every region and fill."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest

from pylocksfile import LocksfileError, LocksFile

# Offsets from crates/locksfile/src/engine/shm/layout.rs: the start of each
# region, where a small table's entries lie (bucket heads: the first 65,536).
REGIONS = {
    "header counters": (40, 56),
    "slots": (0x81000, 1024 * 64),
    "waiters": (0x881000, 1024 * 56),
    "bucket heads": (0xF81000, 65536 * 4),
    "records": (0x4F81000, 4096 * 40),
}

FILLS = {
    "random": lambda n: random.Random(19).randbytes(n),
    "zeros": lambda n: bytes(n),
    "ones": lambda n: b"\xff" * n,
}

HOLDER = textwrap.dedent(
    """
    import sys
    from pylocksfile import LocksfileError, LocksFile

    lf = LocksFile(sys.argv[1], mode="shm")
    a = lf.write(5)
    b = lf.read(range(10, 20))
    c = lf.write(range(40, 44))
    print("ready", flush=True)
    sys.stdin.readline()
    for step in (a.release, b.release, c.release, lf.close):
        try:
            step()
        except LocksfileError as e:
            print("typed", type(e).__name__, flush=True)
    """
)


def session(path) -> list[LocksfileError]:
    """Open, take and release locks; collect the typed errors."""
    errors: list[LocksfileError] = []
    try:
        lf = LocksFile(path, mode="shm")
    except LocksfileError as e:
        return [e]
    steps = [
        lambda: lf.write_for(3, 0.05).release(),
        lambda: lf.read_for(range(10, 20), 0.05).release(),
        lambda: lf.write_for(range(100, 200), 0.05).release(),
        lambda: lf.try_write(41),
        lf.close,
    ]
    for step in steps:
        try:
            step()
        except LocksfileError as e:
            errors.append(e)
    return errors


@pytest.mark.parametrize("fill", sorted(FILLS))
@pytest.mark.parametrize("region", sorted(REGIONS))
def test_written_over_in_use(lock_path, region, fill):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, os.fspath(lock_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        at, length = REGIONS[region]
        with open(os.fspath(lock_path) + "-shm", "r+b") as f:
            os.pwrite(f.fileno(), FILLS[fill](length), at)
        # A PanicException is no LocksfileError: it would fail the test here.
        session(lock_path)
        out, err = holder.communicate("go\n", timeout=20)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 0, f"holder ended with {holder.returncode}: {err}"
    assert "PanicException" not in err and "panicked" not in err, err
    for line in out.splitlines():
        assert line.startswith("typed "), line
    # Once every user has gone, the next opener starts the table afresh.
    assert session(lock_path) == []
