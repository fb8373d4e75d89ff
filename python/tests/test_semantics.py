"""Locking behaviour of the original's API between real processes: conversion
in place, sub-range release, ``with`` blocks, deletion, a killed holder and
the kernel's deadlock detection. Each worker is a separate process; what it
holds is read from the kernel's lock table, and contention is checked with
independent ``fcntl`` probes.

Every test runs twice: in process mode (the API's default) and with
``pylocksfile(path, mode="shm")``, where the table is read and probed
instead of the kernel's list."""

import os
import signal

import pytest

import support

EMPTY = ".........."


@pytest.fixture(params=["process", "shm"])
def seed_mode(request, monkeypatch):
    monkeypatch.setattr(support, "DEFAULT_MODE", "shm" if request.param == "shm" else "")
    return request.param


@pytest.fixture
def spawn_worker(spawn_worker, seed_mode):
    """Workers whose ``pylocksfile(...)`` opens in the test's mode."""

    def start(ctx="fork", path=None):
        w = spawn_worker(ctx, path)
        if seed_mode == "shm":
            w.exec(
                "import functools\n"
                "pylocksfile = functools.partial(pkg.pylocksfile, mode='shm')\n"
                "support.DEFAULT_MODE = 'shm'\n"
            )
        return w

    return start


def test_write_converts_to_read_in_place(spawn_worker, lock_path, seed_mode):
    holder, writer, reader = spawn_worker(), spawn_worker(), spawn_worker()
    holder.exec("lf = pylocksfile(path)")
    assert holder.eval("lf.acquire(writeLock=True, lock_n=(0, 3))") is True
    # A writer waits for index 1 while it is held exclusively.
    writer.exec("lf = pylocksfile(path)")
    writer.send_eval("lf.acquire(writeLock=True, lock_n=1)")
    writer.wait_blocked()
    # Converting 1 to shared never frees it: the waiting writer stays asleep.
    assert holder.eval("lf.acquire(writeLock=False, lock_n=1)") is True
    assert holder.held() == "WRW......."
    writer.wait_blocked()
    assert writer.held() == EMPTY
    # ...while a reader now gets in next to the holder, but not on 0 or 2;
    # in shm mode not on 1 either: the writer queued there first (fair).
    reader.exec("lf = pylocksfile(path)")
    fair = seed_mode == "shm"
    assert reader.eval("lf.acquire(writeLock=False, lock_n=1, blocking=False)") is (not fair)
    assert reader.eval("lf.acquire(writeLock=False, lock_n=0, blocking=False)") is False
    assert reader.eval("lf.acquire(writeLock=False, lock_n=(2, 1), blocking=False)") is False
    assert reader.held() == (EMPTY if fair else ".R........")
    reader.exec("lf.release()")
    # Converting back to exclusive and releasing lets the writer in.
    assert holder.eval("lf.acquire(writeLock=True, lock_n=1)") is True
    assert holder.held() == "WWW......."
    holder.exec("lf.release(1)")
    assert writer.result() is True
    assert writer.held() == ".W........"
    assert holder.held() == "W.W......."


def test_read_converts_to_write_in_place(spawn_worker, lock_path):
    holder = spawn_worker()
    holder.exec("lf = pylocksfile(path)")
    assert holder.eval("lf.acquire(writeLock=False, lock_n=(0, 4))") is True
    assert support.can_lock(lock_path, 0, 4, write=False)
    assert holder.eval("lf.acquire(writeLock=True, lock_n=(1, 2))") is True
    assert holder.held() == "RWWR......"
    assert support.can_lock(lock_path, 0, write=False)
    assert not support.can_lock(lock_path, 1, write=False)
    assert not support.can_lock(lock_path, 3, write=True)


def test_upgrade_waits_for_other_readers(spawn_worker, lock_path):
    a, b = spawn_worker(), spawn_worker()
    for w in (a, b):
        w.exec("lf = pylocksfile(path)")
        assert w.eval("lf.acquire(writeLock=False, lock_n=(0, 3))") is True
    a.send_eval("lf.acquire(writeLock=True, lock_n=1)")
    a.wait_blocked()
    assert a.held() == "RRR......."
    assert b.eval("lf.acquire(writeLock=False, lock_n=(1, 1), blocking=False)") is True
    b.exec("lf.release((1, 1))")
    assert a.result() is True
    assert a.held() == "RWR......."
    assert b.held() == "R.R......."


def test_non_blocking_conflict_returns_false_and_takes_nothing(spawn_worker, lock_path):
    a, b = spawn_worker(), spawn_worker()
    a.exec("lf = pylocksfile(path)")
    b.exec("lf = pylocksfile(path)")
    assert a.eval("lf.acquire(writeLock=True, lock_n=4)") is True
    # 2..6 overlaps a's 4 only; nothing of it may be taken.
    assert b.eval("lf.acquire(writeLock=True, lock_n=(2, 5), blocking=False)") is False
    assert b.eval("lf.acquire(writeLock=False, lock_n=(2, 5), blocking=False)") is False
    assert b.held() == EMPTY
    assert b.eval("lf.acquire(writeLock=False, lock_n=(0, 4), blocking=False)") is True
    assert b.held() == "RRRR......"


def test_sub_range_release(spawn_worker, lock_path):
    w = spawn_worker()
    w.exec("lf = pylocksfile(path)")
    assert w.eval("lf.acquire(writeLock=True, lock_n=(0, 6))") is True
    w.exec("lf.release((2, 2))")
    assert w.held() == "WW..WW...."
    assert support.can_lock(lock_path, 2, 2)
    assert not support.can_lock(lock_path, 1)
    assert not support.can_lock(lock_path, 4)
    w.exec("lf.release(0)")
    assert w.held() == ".W..WW...."
    w.exec("lf.release((5, 100))")
    assert w.held() == ".W..W....."
    w.exec("lf.release()")
    assert w.held() == EMPTY
    assert support.can_lock(lock_path, 0, 10)


def test_mixed_kinds_released_by_one_interval(spawn_worker, lock_path):
    w = spawn_worker()
    w.exec("lf = pylocksfile(path)")
    w.exec("lf.acquire(writeLock=True, lock_n=(0, 3)); lf.acquire(writeLock=False, lock_n=(3, 3))")
    assert w.held() == "WWWRRR...."
    w.exec("lf.release((2, 2))")
    assert w.held() == "WW..RR...."


def test_with_acquires_on_entry_and_releases_that_span_on_exit(spawn_worker, lock_path):
    w = spawn_worker()
    w.exec(
        "lf = pylocksfile(path)\n"
        "seen = []\n"
        "def look():\n"
        "    seen.append(support.held_map(path, os.getpid()))\n"
        "lf.acquire(writeLock=True, lock_n=(0, 3))\n"
        "with lf(writeLock=False, lock_n=(2, 1)):\n"
        "    look()\n"
        "    with lf(writeLock=True, lock_n=5):\n"
        "        look()\n"
        "        with lf(writeLock=False, lock_n=(7, 2)):\n"
        "            look()\n"
        "        look()\n"
        "    look()\n"
        "look()\n"
    )
    assert w.eval("seen") == [
        "WWR.......",
        "WWR..W....",
        "WWR..W.RR.",
        "WWR..W....",
        "WWR.......",
        "WW........",
    ]


def test_with_releases_when_the_body_raises(spawn_worker, lock_path):
    w = spawn_worker()
    w.exec("lf = pylocksfile(path)")
    with pytest.raises(support.RemoteError) as info:
        w.exec(
            "with lf(writeLock=True, lock_n=(1, 2)):\n"
            "    inside = support.held_map(path, os.getpid())\n"
            "    raise KeyError('boom')\n"
        )
    assert info.value.isa("KeyError")
    assert w.eval("inside") == ".WW......."
    assert w.held() == EMPTY


def test_with_blocks_until_free(spawn_worker, lock_path):
    holder, w = spawn_worker(), spawn_worker()
    holder.exec("lf = pylocksfile(path)")
    assert holder.eval("lf.acquire(writeLock=True, lock_n=3)") is True
    w.exec("lf = pylocksfile(path)")
    w.send("exec", "with lf(writeLock=False, lock_n=(2, 3)):\n    inside = support.held_map(path, os.getpid())\n")
    w.wait_blocked()
    holder.exec("lf.release()")
    w.result()
    assert w.eval("inside") == "..RRR....."
    assert w.held() == EMPTY


@pytest.mark.parametrize("how", ["del", "cycle", "scope"])
def test_deleting_the_object_releases_everything(spawn_worker, lock_path, how):
    w = spawn_worker()
    w.exec(
        "lf = pylocksfile(path)\n"
        "lf.acquire(writeLock=True, lock_n=(0, 3))\n"
        "lf.acquire(writeLock=False, lock_n=(5, 2))\n"
        "lf.acquire(writeLock=True, lock_n=9)\n"
    )
    assert w.held() == "WWW..RR..W"
    if how == "del":
        w.exec("del lf")
    elif how == "cycle":
        # Only the cyclic garbage collector can free it.
        w.exec("junk = [lf]; junk.append(junk); del lf, junk")
        assert w.held() == "WWW..RR..W"
        w.exec("gc.collect()")
    else:
        w.exec("def scope():\n    lf2 = pylocksfile(path)\n    lf2.acquire(writeLock=True, lock_n=4)\n")
        w.exec("del lf; scope()")
    assert w.held() == EMPTY
    assert support.can_lock(lock_path, 0, 10)


def test_sigkilled_holder_frees_its_locks_for_a_waiter(spawn_worker, lock_path):
    holder, waiter = spawn_worker(), spawn_worker()
    holder.exec("lf = pylocksfile(path)")
    assert holder.eval("lf.acquire(writeLock=True, lock_n=(0, 5))") is True
    waiter.exec("lf = pylocksfile(path)")
    waiter.send_eval("lf.acquire(writeLock=True, lock_n=(2, 4))")
    waiter.wait_blocked()
    holder.kill(signal.SIGKILL)
    assert holder.proc.exitcode == -signal.SIGKILL
    assert waiter.result() is True
    assert waiter.held() == "..WWWW...."
    assert holder.held() == EMPTY


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_kernel_deadlock_returns_false_then_the_other_succeeds(spawn_worker, lock_path, ctx):
    a, b = spawn_worker(ctx), spawn_worker(ctx)
    a.exec("lf = pylocksfile(path)")
    b.exec("lf = pylocksfile(path)")
    assert a.eval("lf.acquire(writeLock=True, lock_n=0)") is True
    assert b.eval("lf.acquire(writeLock=True, lock_n=1)") is True
    a.send_eval("lf.acquire(writeLock=True, lock_n=1)")
    a.wait_blocked()
    # b closing the cycle is refused by the kernel: False, nothing new held.
    assert b.eval("lf.acquire(writeLock=True, lock_n=0)", timeout=10) is False
    assert b.held() == ".W........"
    assert not a.replied()
    b.exec("lf.release(1)")
    assert a.result() is True
    assert a.held() == "WW........"
    assert b.held() == EMPTY


def test_kernel_deadlock_on_a_range_leaves_nothing_half_held(spawn_worker, lock_path):
    a, b = spawn_worker(), spawn_worker()
    a.exec("lf = pylocksfile(path)")
    b.exec("lf = pylocksfile(path)")
    assert a.eval("lf.acquire(writeLock=True, lock_n=0)") is True
    assert b.eval("lf.acquire(writeLock=True, lock_n=5)") is True
    a.send_eval("lf.acquire(writeLock=True, lock_n=5)")
    a.wait_blocked()
    # b asks for 0..3: 1..3 are free, 0 closes the cycle.
    assert b.eval("lf.acquire(writeLock=True, lock_n=(0, 4))") is False
    assert b.held() == ".....W...."
    b.exec("lf.release()")
    assert a.result() is True
    assert a.held() == "W....W...."


def test_two_objects_in_one_process_compose(spawn_worker, lock_path, seed_mode):
    """Process-associated locks belong to the process; each object still
    releases only what it took itself."""
    if seed_mode == "shm":
        pytest.skip("in shm mode each object is an owner (test_compat covers it)")
    w = spawn_worker()
    w.exec("a = pylocksfile(path); b = pylocksfile(path)")
    assert w.eval("a.acquire(writeLock=True, lock_n=(0, 4))") is True
    assert w.eval("b.acquire(writeLock=False, lock_n=(2, 4))") is True
    assert w.held() == "WWWWRR...."
    w.exec("a.release()")
    assert w.held() == "..RRRR...."
    assert w.eval("a.acquire(writeLock=True, lock_n=1)") is True
    w.exec("del b; gc.collect()")
    assert w.held() == ".W........"
    w.exec("del a; gc.collect()")
    assert w.held() == EMPTY


def test_objects_in_different_processes_see_the_same_file_by_path(spawn_worker, tmp_path):
    """Any process may open the file by path at any time; a relative path
    and a symlinked directory reach the same locks."""
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    lock = real / "x.lock"
    a, b = spawn_worker(path=lock), spawn_worker(path=lock)
    a.exec(f"os.chdir({str(real)!r}); lf = pylocksfile('x.lock')")
    b.exec(f"lf = pylocksfile({str(tmp_path / 'link' / 'x.lock')!r})")
    assert a.eval("lf.acquire(writeLock=True, lock_n=2)") is True
    assert b.eval("lf.acquire(writeLock=False, lock_n=2, blocking=False)") is False
    assert b.eval("lf.acquire(writeLock=False, lock_n=3, blocking=False)") is True


def test_with_without_arguments_is_an_illegal_with_statement(spawn_worker, lock_path):
    w = spawn_worker()
    w.exec("lf = pylocksfile(path)")
    with pytest.raises(support.RemoteError) as info:
        w.exec("with lf:\n    ran = True\n")
    assert info.value.isa("IllegalWithStatement") and info.value.isa("ValueError")
    assert w.eval("'ran' in globals()") is False
    assert w.held() == EMPTY
    w.exec("with lf(writeLock=True, lock_n=1):\n    inside = support.held_map(path, os.getpid())\n")
    assert w.eval("inside") == ".W........"


def test_with_that_would_deadlock_raises_and_runs_nothing(spawn_worker, lock_path):
    a, b = spawn_worker(), spawn_worker()
    a.exec("lf = pylocksfile(path)")
    b.exec("lf = pylocksfile(path)")
    assert a.eval("lf.acquire(writeLock=True, lock_n=0)") is True
    assert b.eval("lf.acquire(writeLock=True, lock_n=1)") is True
    a.send_eval("lf.acquire(writeLock=True, lock_n=1)")
    a.wait_blocked()
    with pytest.raises(support.RemoteError) as info:
        b.exec("with lf(writeLock=False, lock_n=(0, 1)):\n    ran = True\n")
    assert info.value.isa("Exception")
    assert b.eval("'ran' in globals()") is False
    assert b.held() == ".W........"
    b.exec("lf.release()")
    assert a.result() is True


def test_with_statements_of_two_threads_on_one_object(spawn_worker, lock_path):
    """Each thread's ``with`` releases its own span on exit, whatever the
    other thread's blocks do in between."""
    w = spawn_worker()
    w.exec(
        "import threading\n"
        "lf = pylocksfile(path)\n"
        "steps = [threading.Event() for _ in range(4)]\n"
        "seen = {}\n"
        "def look(tag):\n"
        "    seen[tag] = support.held_map(path, os.getpid())\n"
        "def first():\n"
        "    with lf(writeLock=True, lock_n=1):\n"
        "        steps[0].set(); steps[1].wait(10)\n"
        "        look('both')\n"
        "    steps[2].set()\n"
        "def second():\n"
        "    steps[0].wait(10)\n"
        "    with lf(writeLock=False, lock_n=(4, 2)):\n"
        "        steps[1].set(); steps[2].wait(10)\n"
        "        look('second only')\n"
        "    look('none')\n"
        "ts = [threading.Thread(target=first), threading.Thread(target=second)]\n"
        "[t.start() for t in ts]; [t.join(10) for t in ts]\n"
    )
    assert w.eval("seen") == {"both": ".W..RR....", "second only": "....RR....", "none": EMPTY}


@pytest.mark.parametrize("how", ["same path", "hard link", "modern object"])
def test_closing_one_object_keeps_the_other_objects_locks(spawn_worker, lock_path, how, seed_mode):
    """With process-associated locks, closing any descriptor of a file drops
    every lock the process holds on it; objects going away must not do that
    to the other objects of the same file in the process."""
    if seed_mode == "shm" and how == "modern object":
        pytest.skip("a process-mode object is refused beside a shm table in use")
    if seed_mode == "shm" and how == "hard link":
        # The sidecar is named after the path, so a lock file with a second
        # name is refused in shm mode (shm_hard_links_to_one_lock_file_share_its_locks).
        pytest.skip("shm refuses a lock file with two names")
    w = spawn_worker()
    other = "path"
    if how == "hard link":
        w.exec("open(path, 'a').close(); os.link(path, path + '.link')")
        other = "path + '.link'"
    w.exec("a = pylocksfile(path)")
    assert w.eval("a.acquire(writeLock=True, lock_n=(0, 2))") is True
    if how == "modern object":
        w.exec("b = LocksFile(path, mode='process'); gb = b.read(5)")
        assert w.held() == "WW...R...."
        w.exec("gb.release(); b.close(); del b, gb; gc.collect()")
    else:
        w.exec(f"b = pylocksfile({other}); b.acquire(writeLock=False, lock_n=5)")
        assert w.held() == "WW...R...."
        w.exec("del b; gc.collect()")
    assert w.held() == "WW........"
    assert not support.can_lock(lock_path, 1, write=False)
