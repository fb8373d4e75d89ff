"""Pickling: a ``LocksFile`` (and a seed ``pylocksfile``) pickles as its
target, mode and options, never its locks, so it can be handed to
``multiprocessing`` and ``ProcessPoolExecutor`` workers; a guard refuses."""

import concurrent.futures
import copy
import multiprocessing
import os
import pickle
from contextlib import closing

import pytest

from pylocksfile import Guard, LocksFile, pylocksfile

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
WAIT = 60


class Tagged(LocksFile):
    """A subclass with attributes of its own, pickled with it."""


def hold_in_worker(lf, span, held, done):
    """Take ``span`` for writing, say so, and keep it until ``done``: what the
    worker held at first, and its view of the object."""
    before = lf.held()
    with lf.write(span):
        held.set()
        assert done.wait(WAIT)
    return before, lf.path, lf.mode


def seed_in_worker(lf, held, done):
    before = lf.acquire(writeLock=False, lock_n=3, blocking=False)
    assert lf.acquire(writeLock=True, lock_n=3, blocking=False)
    held.set()
    assert done.wait(WAIT)
    lf.release(3)
    return before, lf.locksfile_path, lf.l_id, lf.mode


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_round_trip_keeps_target_mode_and_options_and_holds_nothing(lock_path, protocol):
    lf = LocksFile(lock_path, "shm", permissions=0o600, follow_symlinks=True)
    with lf, lf.write(range(1, 4)):
        again = pickle.loads(pickle.dumps(lf, protocol=protocol))
        with again:
            assert type(again) is LocksFile
            assert (again.path, again.mode) == (lf.path, "shm")
            assert again.held() == []
            assert again.try_write(2) is None  # a new owner: excluded by the original
            assert again.try_write(7) is not None
        assert lf.held() == [(range(1, 4), "exclusive")]


def test_only_the_options_given_are_passed_again(lock_path):
    with LocksFile(lock_path) as lf:
        assert lf.__reduce__()[1][1:] == ((lf.path,), {})
    with LocksFile(lock_path, mode="process", create=False, permissions=0o640,
                   follow_symlinks=True) as lf:
        assert lf.__reduce__()[1][2] == {
            "mode": "process",
            "create": False,
            "permissions": 0o640,
            "follow_symlinks": True,
        }
    with LocksFile(lock_path, thread_local=True) as lf:
        again = pickle.loads(pickle.dumps(lf))
        assert "thread_local=True" in repr(again)
        again.close()


def test_a_relative_path_pickles_absolute(lock_path, monkeypatch):
    monkeypatch.chdir(lock_path.parent)
    with LocksFile(lock_path.name) as lf:
        monkeypatch.chdir("/")
        with closing(pickle.loads(pickle.dumps(lf))) as again:
            assert again.path == str(lock_path)


def test_create_false_is_kept(lock_path):
    lock_path.touch()
    with LocksFile(lock_path, create=False) as lf:
        data = pickle.dumps(lf)
    os.unlink(lock_path)
    with pytest.raises(FileNotFoundError):
        pickle.loads(data)


def test_a_closed_object_does_not_pickle(lock_path):
    lf = LocksFile(lock_path)
    lf.close()
    with pytest.raises(ValueError):
        pickle.dumps(lf)


def test_a_subclass_pickles_with_its_attributes(lock_path):
    lf = Tagged(lock_path, "ofd")
    lf.tag = "mine"
    with lf, closing(pickle.loads(pickle.dumps(lf))) as again:
        assert type(again) is Tagged
        assert again.tag == "mine"
        assert again.path == lf.path


def test_copy_opens_a_new_owner(lock_path):
    with LocksFile(lock_path) as lf, lf.write(0), closing(copy.copy(lf)) as other:
        assert other.try_read(0) is None


def test_a_guard_does_not_pickle_and_says_what_to_pass(lock_path):
    with LocksFile(lock_path) as lf, lf.write(range(2, 5)) as g:
        assert isinstance(g, Guard)
        for protocol in PROTOCOLS:
            with pytest.raises(TypeError, match=r"LocksFile.*span"):
                pickle.dumps(g, protocol=protocol)
        with pytest.raises(TypeError, match="Guard"):
            copy.copy(g)
        assert g.held


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_seed_object_pickles(lock_path, protocol):
    lf = pylocksfile(str(lock_path), verbose=False, l_id="w1", mode="ofd")
    assert lf.acquire(writeLock=True, lock_n=1)
    again = pickle.loads(pickle.dumps(lf, protocol=protocol))
    assert type(again) is pylocksfile
    assert (again.locksfile_path, again.l_id, again.mode, again.verbose) == (
        lf.locksfile_path, "w1", "ofd", False)
    assert again.acquire(writeLock=False, lock_n=1, blocking=False) is False
    assert again.acquire(writeLock=True, lock_n=2, blocking=False) is True


def test_the_seed_default_l_id_is_the_unpicklers(lock_path):
    lf = pylocksfile(str(lock_path))
    state = lf.__reduce__()[2][0]
    assert state == {"locksfile_path": lf.locksfile_path, "verbose": False}
    assert pickle.loads(pickle.dumps(lf)).mode == "process"


def test_a_seed_with_statement_does_not_pickle(lock_path):
    lf = pylocksfile(str(lock_path))
    with pytest.raises(TypeError, match=r"pylocksfile object.*lock_n"):
        pickle.dumps(lf(writeLock=True, lock_n=4))


def _exclusion_seen_from_parent(lf, run):
    """``run(fn, *args)`` starts ``hold_in_worker`` in another process and
    returns what waits for its result; the parent sees the worker's lock."""
    with multiprocessing.Manager() as manager:
        held, done = manager.Event(), manager.Event()
        result = run(hold_in_worker, lf, range(5, 8), held, done)
        try:
            assert held.wait(WAIT)
            assert lf.try_write(6) is None
            assert lf.conflicts(6) is not None
        finally:
            done.set()
        before, path, mode = result()
    assert before == []
    assert (path, mode) == (lf.path, lf.mode)
    with lf.write(range(5, 8), timeout=WAIT):
        pass


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("mode", ["ofd", "shm"])
def test_a_pool_worker_takes_the_lock(lock_path, method, mode):
    ctx = multiprocessing.get_context(method)
    with LocksFile(lock_path, mode) as lf, ctx.Pool(1) as pool:
        def run(fn, *args):
            pending = pool.apply_async(fn, args)
            return lambda: pending.get(WAIT)

        _exclusion_seen_from_parent(lf, run)


def test_a_process_pool_executor_worker_takes_the_lock(lock_path):
    ctx = multiprocessing.get_context("spawn")
    with LocksFile(lock_path, "process") as lf, \
            concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        def run(fn, *args):
            future = ex.submit(fn, *args)
            return lambda: future.result(WAIT)

        _exclusion_seen_from_parent(lf, run)


def test_a_seed_object_in_a_spawn_worker(lock_path):
    ctx = multiprocessing.get_context("spawn")
    lf = pylocksfile(str(lock_path), l_id="parent")
    with multiprocessing.Manager() as manager, \
            concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        held, done = manager.Event(), manager.Event()
        future = ex.submit(seed_in_worker, lf, held, done)
        try:
            assert held.wait(WAIT)
            assert lf.acquire(writeLock=False, lock_n=3, blocking=False) is False
        finally:
            done.set()
        before, path, l_id, mode = future.result(WAIT)
    assert before is True
    assert (path, l_id, mode) == (lf.locksfile_path, "parent", "process")
    assert lf.acquire(writeLock=True, lock_n=3, blocking=False) is True
