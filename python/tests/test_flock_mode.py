"""``LocksFile(path, mode="flock")``: whole-file ``flock(2)`` locks that
exclude, and are excluded by, ``fcntl.flock`` in another process and the
``filelock`` package, which the record-lock modes never see. Any span but
the whole index space raises ``InvalidSpanError`` before anything happens."""

import fcntl
import os
import subprocess
import sys
import threading

import pytest

import support
from pylocksfile import InvalidSpanError, LocksFile, LockTimeout, WouldBlockError

ALL = slice(None)

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX if sys.argv[2] == "x" else fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.read()
"""

TRY = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, (fcntl.LOCK_EX if sys.argv[2] == "x" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
"""


class FlockHolder:
    """Another Python process holding ``fcntl.flock`` on ``path``."""

    def __init__(self, path, kind):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline() == "held\n"

    def release(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0


def other_process_gets(path, kind):
    """Whether a non-blocking ``fcntl.flock`` in another process succeeds."""
    r = subprocess.run([sys.executable, "-c", TRY, str(path), kind], timeout=20)
    return r.returncode == 0


def test_excluded_by_fcntl_flock_in_another_process(lock_path):
    lf = LocksFile(lock_path, mode="flock")
    assert lf.mode == "flock"
    h = FlockHolder(lock_path, "x")
    try:
        assert lf.try_write(ALL) is None
        assert lf.try_read(ALL) is None
        with pytest.raises(WouldBlockError):
            lf.acquire("shared", ALL, blocking=False)
        holder = lf.conflicts("shared", ALL)
        assert (holder.span, holder.kind, holder.pid) == (range(0, 2**63 - 1), "exclusive", h.proc.pid)
        # What the issue reported: OFD mode takes the whole space anyway.
        with LocksFile(lock_path) as ofd:
            assert ofd.try_write(ALL) is not None
    finally:
        h.release()
    with lf.try_write(ALL):
        pass
    lf.close()


def test_excludes_fcntl_flock_in_another_process(lock_path):
    with LocksFile(lock_path, mode="flock") as lf:
        with lf.write(ALL):
            assert not other_process_gets(lock_path, "s")
        with lf.read(ALL):
            assert other_process_gets(lock_path, "s")
            assert not other_process_gets(lock_path, "x")
        assert other_process_gets(lock_path, "x")
        assert [l for l in support.kernel_locks(lock_path) if l.family == "FLOCK"] == []


def test_filelock_both_ways(lock_path):
    import filelock

    lf = LocksFile(lock_path, mode="flock")
    fl = filelock.FileLock(lock_path)
    with lf.write(ALL):
        with pytest.raises(filelock.Timeout):
            fl.acquire(timeout=0)
    with fl:
        assert lf.try_read(ALL) is None
        assert lf.try_write(ALL) is None
    assert lf.try_write(ALL) is not None
    lf.close()


def test_only_the_whole_index_space(lock_path):
    with LocksFile(lock_path, mode="flock") as lf:
        for span in (0, range(0, 10), slice(5, None), (0, 1)):
            with pytest.raises(InvalidSpanError, match="whole file"):
                lf.try_write(span)
            with pytest.raises(InvalidSpanError):
                lf.acquire("shared", span)
            with pytest.raises(InvalidSpanError):
                lf.conflicts(span)
        assert lf.held() == []
        assert support.kernel_locks(lock_path) == []
        for span in (ALL, slice(0, None)):
            with lf.write(span):
                assert lf.held() == [(range(0, 2**63 - 1), "exclusive")]


def test_bad_mode_names_flock(lock_path):
    with pytest.raises(ValueError, match='"flock"'):
        LocksFile(lock_path, mode="bsd")


def test_upgrade_with_another_reader(lock_path):
    """flock(2) converts by unlocking first: a refused or timed-out upgrade
    still holds its shared lock, and a waiting one gets the file once the
    other reader leaves."""
    lf = LocksFile(lock_path, mode="flock")
    h = FlockHolder(lock_path, "s")
    g = lf.read(ALL)
    try:
        with pytest.raises(WouldBlockError):
            g.upgrade(blocking=False)
        with pytest.raises(LockTimeout):
            g.upgrade(timeout=0.05)
        assert g.kind == "shared"
        mine = [l for l in support.kernel_locks(lock_path) if l.pid == os.getpid()]
        assert [(l.family, l.kind) for l in mine] == [("FLOCK", "R")]
        assert not other_process_gets(lock_path, "x")
        done = []
        t = threading.Thread(target=lambda: done.append(g.upgrade()))
        t.start()
    finally:
        h.release()
    t.join(timeout=20)
    assert done and g.kind == "exclusive"
    assert not other_process_gets(lock_path, "s")
    g.release()
    assert other_process_gets(lock_path, "x")
    lf.close()
