"""A refused raise leaves exactly what was held, in the bookkeeping and in
the kernel.

The call under test raises several pieces of different kinds at once: none
to exclusive, shared to exclusive, and (lock 5) exclusive already. Another
owner's shared lock on 7 refuses it part-way, so the raises already made
are rolled back, each piece to its own kind. The kernel's view comes from
``/proc/locks`` and from probes in other processes, never from the package
(in shm mode the table, read from outside, and probes by other owners).
"""

import os

import pytest

import support
from pylocksfile import LocksFile, WouldBlockError, pylocksfile

BEFORE = [(range(3, 4), "shared"), (range(5, 6), "exclusive")]
BEFORE_WITH_0 = [(range(0, 1), "shared")] + BEFORE


def mine(path, pid, mode="ofd"):
    """This owner's granted locks as (start, end, kind), in order (the shm
    table's, shown as pid -1 like OFD locks, in shm mode)."""
    locks = support.mode_locks(path, mode)
    return sorted((lk.start, lk.end, lk.kind) for lk in locks if lk.pid == pid and not lk.waiting)


def assert_probes_see(path, shared, exclusive, mode="ofd"):
    """From another process: which indices 0..9 can be locked shared / exclusive."""
    for i in range(10):
        assert support.can_lock(path, i, write=False, mode=mode) == (i not in shared), f"shared probe on {i}"
        assert support.can_lock(path, i, write=True, mode=mode) == (i not in shared | exclusive), f"exclusive probe on {i}"


# --------------------------------------------------------------------------
# OFD and shm mode: three objects of this process are three owners
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ofd", "shm"])
def test_ofd_refused_raise_keeps_each_piece_at_its_own_kind(lock_path, mode):
    a, b, c = (LocksFile(lock_path, mode=mode) for _ in range(3))
    gs = a.read(3)
    gx = a.write(5)
    b.acquire("shared", 7)
    assert a.held() == BEFORE
    with pytest.raises(WouldBlockError):
        a.acquire("exclusive", range(0, 10), blocking=False)
    assert a.held() == BEFORE
    assert a.held_explicitly() == []
    assert c.try_write(3) is None, "a's shared lock on 3 must still be there"
    assert c.try_read(5) is None, "a's exclusive lock on 5 must still be there"
    for i in (0, 1, 2, 4, 6, 8, 9):
        g = c.try_write(i)
        assert g is not None, f"a must hold nothing on {i}"
        g.release()
    # The kernel: a's two locks and b's, nothing else (OFD locks show pid -1).
    assert mine(lock_path, -1, mode) == [(3, 3, "R"), (5, 5, "W"), (7, 7, "R")]
    assert_probes_see(lock_path, shared={5}, exclusive={3, 7}, mode=mode)
    gs.release()
    gx.release()
    b.release()
    assert support.mode_locks(lock_path, mode) == []


@pytest.mark.parametrize("mode", ["ofd", "shm"])
def test_ofd_refused_raise_leaks_nothing(lock_path, mode):
    a, b, c = (LocksFile(lock_path, mode=mode) for _ in range(3))
    g0 = a.read(0)
    gs = a.read(3)
    gx = a.write(5)
    b.acquire("shared", 7)
    with pytest.raises(WouldBlockError):
        a.acquire("exclusive", range(0, 10), blocking=False)
    assert a.held() == BEFORE_WITH_0
    assert mine(lock_path, -1, mode) == [(0, 0, "R"), (3, 3, "R"), (5, 5, "W"), (7, 7, "R")]
    assert c.try_write(0) is None and c.try_write(3) is None
    for g in (g0, gs, gx):
        g.release()
    assert a.held() == []
    b.release()
    assert support.mode_locks(lock_path, mode) == [], "a lock of a stayed in the kernel"
    g = c.try_write(range(0, 10))
    assert g is not None
    assert mine(lock_path, -1, mode) == [(0, 9, "W")]
    g.release()


# --------------------------------------------------------------------------
# Process mode: a is this process, b and c other processes
# --------------------------------------------------------------------------


def start_others(spawn_worker, make):
    b, c = spawn_worker(), spawn_worker()
    b.exec(f"lf = {make}")
    c.exec(f"lf = {make}")
    return b, c


def test_process_mode_refused_raise_keeps_each_piece_at_its_own_kind(spawn_worker, lock_path):
    a = LocksFile(lock_path, mode="process")
    b, c = start_others(spawn_worker, "LocksFile(path, mode='process')")
    gs = a.read(3)
    gx = a.write(5)
    b.exec("lf.acquire('shared', 7)")
    with pytest.raises(WouldBlockError):
        a.acquire("exclusive", range(0, 10), blocking=False)
    assert a.held() == BEFORE
    assert c.eval("lf.try_write(3) is None")
    assert c.eval("lf.try_read(5) is None")
    assert c.eval("[lf.try_write(i) is not None for i in (0, 1, 2, 4, 6, 8, 9)]") == [True] * 7
    c.exec("lf.release()")
    assert support.held_map(lock_path, os.getpid()) == "...R.W...."
    assert b.held() == ".......R.."
    assert c.held() == ".........."
    gs.release()
    gx.release()
    assert support.held_map(lock_path, os.getpid()) == ".........."


def test_process_mode_refused_raise_leaks_nothing(spawn_worker, lock_path):
    a = LocksFile(lock_path, mode="process")
    b, c = start_others(spawn_worker, "LocksFile(path, mode='process')")
    guards = [a.read(0), a.read(3), a.write(5)]
    b.exec("lf.acquire('shared', 7)")
    with pytest.raises(WouldBlockError):
        a.acquire("exclusive", range(0, 10), blocking=False)
    assert a.held() == BEFORE_WITH_0
    assert support.held_map(lock_path, os.getpid()) == "R..R.W...."
    for g in guards:
        g.release()
    b.exec("lf.release()")
    assert support.kernel_locks(lock_path) == [], "a lock of a stayed in the kernel"
    assert c.eval("lf.try_write(range(0, 10)) is not None")


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_seed_refused_raise_keeps_each_piece_at_its_own_kind(spawn_worker, lock_path, mode):
    a = pylocksfile(str(lock_path), mode=mode)
    b, c = start_others(spawn_worker, f"pylocksfile(path, mode={mode!r})")
    assert a.acquire(writeLock=False, lock_n=3) is True
    assert a.acquire(writeLock=True, lock_n=5) is True
    assert b.eval("lf.acquire(writeLock=False, lock_n=7)") is True
    assert a.acquire(writeLock=True, lock_n=(0, 10), blocking=False) is False
    assert support.held_map(lock_path, os.getpid(), mode=mode) == "...R.W...."
    assert c.eval("lf.acquire(writeLock=True, lock_n=3, blocking=False)") is False
    assert c.eval("lf.acquire(writeLock=False, lock_n=3, blocking=False)") is True
    assert c.eval("lf.acquire(writeLock=False, lock_n=5, blocking=False)") is False
    assert c.eval("lf.acquire(writeLock=True, lock_n=(0, 3), blocking=False)") is True
    assert c.held(mode=mode) == "WWWR......"
    assert b.held(mode=mode) == ".......R.."
    a.release()
    assert support.held_map(lock_path, os.getpid(), mode=mode) == ".........."


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_seed_refused_raise_leaks_nothing(spawn_worker, lock_path, mode):
    a = pylocksfile(str(lock_path), mode=mode)
    b, c = start_others(spawn_worker, f"pylocksfile(path, mode={mode!r})")
    assert a.acquire(writeLock=False, lock_n=0) is True
    assert a.acquire(writeLock=False, lock_n=3) is True
    assert a.acquire(writeLock=True, lock_n=5) is True
    assert b.eval("lf.acquire(writeLock=False, lock_n=7)") is True
    assert a.acquire(writeLock=True, lock_n=(0, 10), blocking=False) is False
    assert support.held_map(lock_path, os.getpid(), mode=mode) == "R..R.W...."
    a.release()
    b.exec("lf.release()")
    assert support.mode_locks(lock_path, mode) == [], "a lock of a stayed in the kernel"
    assert c.eval("lf.acquire(writeLock=True, lock_n=(0, 10), blocking=False)") is True
    assert c.held(mode=mode) == "WWWWWWWWWW"
