"""Threads: blocking waits release the GIL, many threads wait at once, and
separate LocksFile objects (OFD and shm mode) exclude each other between
threads of one process. The locks in the way are held by a worker process."""

import os
import sys
import threading
import time

import pytest

import support
from pylocksfile import LocksFile, pylocksfile

JOIN = 10.0


class Runner(threading.Thread):
    """A thread that runs ``fn`` and keeps its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.error = None
        self.tid = None

    def run(self):
        self.tid = threading.get_native_id()
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def outcome(self):
        self.join(JOIN)
        assert not self.is_alive(), "thread still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def own_waiters(path, mode=""):
    if mode == "shm":
        return sum(1 for lk in support.table_locks(path) if lk.waiting and lk.pid == os.getpid())
    return sum(1 for lk in support.kernel_locks(path) if lk.waiting and lk.pid in (os.getpid(), -1))


def assert_python_keeps_running(blocked_thread, n=2000):
    """Another Python thread makes progress while ``blocked_thread`` waits."""
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        support.wait_until(lambda: counter[0] >= n, what="another thread to run while one waits for a lock")
        assert blocked_thread.is_alive()
    finally:
        stop.set()
        spinner.join(JOIN)


@pytest.mark.parametrize(
    "make, call",
    [
        ("pylocksfile(path)", "lambda lf: lf.acquire(writeLock=True, lock_n=(0, 2))"),
        ("LocksFile(path, mode='process')", "lambda lf: lf.write(1)"),
        ("LocksFile(path)", "lambda lf: lf.read((0, 3))"),
        ("LocksFile(path)", "lambda lf: lf.write(1, timeout=20.0)"),
        ("pylocksfile(path, mode='shm')", "lambda lf: lf.acquire(writeLock=True, lock_n=(0, 2))"),
        ("LocksFile(path, mode='shm')", "lambda lf: lf.read((0, 3))"),
        ("LocksFile(path, mode='shm')", "lambda lf: lf.write(1, timeout=20.0)"),
    ],
)
def test_blocking_wait_releases_the_gil(spawn_worker, lock_path, make, call):
    mode = "shm" if "shm" in make else ""
    holder = spawn_worker()
    holder.exec(f"h = pylocksfile(path{', mode=' + repr(mode) if mode else ''}); h.acquire(writeLock=True, lock_n=1)")
    lf = eval(make, {"pylocksfile": pylocksfile, "LocksFile": LocksFile, "path": str(lock_path)})
    fn = eval(call)
    t = Runner(lambda: fn(lf))
    t.start()
    # Timed or not, a wait is a request queued in the kernel (or the table).
    support.wait_until(lambda: own_waiters(lock_path, mode) >= 1, what="the thread's request to queue")
    assert_python_keeps_running(t)
    holder.exec("h.release()")
    assert t.outcome() not in (False, None)


@pytest.mark.parametrize("mode", ["ofd", "shm"])
def test_many_threads_wait_at_once(spawn_worker, lock_path, mode):
    n = 8
    holder = spawn_worker()
    seed_mode = "shm" if mode == "shm" else "process"
    holder.exec(f"h = pylocksfile(path, mode={seed_mode!r}); h.acquire(writeLock=True, lock_n=(0, {n}))")
    objs = [LocksFile(lock_path, mode=mode) for _ in range(n)]
    threads = [Runner(lambda lf=lf, i=i: lf.write(i)) for i, lf in enumerate(objs)]
    for t in threads:
        t.start()
    support.wait_until(lambda: own_waiters(lock_path, mode) == n, what=f"{n} requests to queue")
    assert_python_keeps_running(threads[0])
    holder.exec("h.release()")
    guards = [t.outcome() for t in threads]
    assert support.held_map(lock_path, -1, mode=mode) == "W" * n + ".."
    for g in guards:
        g.release()
    assert support.held_map(lock_path, -1, mode=mode) == ".........."


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_many_threads_on_one_seed_object(spawn_worker, lock_path, mode):
    """Threads sharing one object each wait on their own index; a release by
    one thread never waits for another thread's wait."""
    n = 6
    holder = spawn_worker()
    holder.exec(f"h = pylocksfile(path, mode={mode!r}); h.acquire(writeLock=True, lock_n=(0, {n}))")
    lf = pylocksfile(str(lock_path), mode=mode)
    threads = [Runner(lambda i=i: lf.acquire(writeLock=True, lock_n=i)) for i in range(n)]
    for t in threads:
        t.start()
    support.wait_until(lambda: own_waiters(lock_path, mode) == n, what=f"{n} requests to queue")
    # Meanwhile this thread takes and drops other indices of the same object.
    assert lf.acquire(writeLock=True, lock_n=8, blocking=False) is True
    lf.release(8)
    holder.exec("h.release()")
    assert [t.outcome() for t in threads] == [True] * n
    assert support.held_map(lock_path, os.getpid(), mode=mode) == "W" * n + "...."
    lf.release()
    assert support.held_map(lock_path, os.getpid(), mode=mode) == ".........."


@pytest.mark.parametrize("mode", ["ofd", "shm"])
def test_separate_objects_exclude_each_other_between_threads(lock_path, mode):
    a, b = LocksFile(lock_path, mode=mode), LocksFile(lock_path, mode=mode)
    ga = a.write(0)
    assert b.try_write(0) is None
    assert b.try_read(0) is None
    gb1 = b.try_write(1)
    assert gb1 is not None
    t = Runner(lambda: b.read((0, 1)))
    t.start()
    support.wait_until(lambda: own_waiters(lock_path, mode) == 1, what="b's request to queue")
    assert t.is_alive()
    ga.downgrade()
    gb = t.outcome()
    assert gb.kind == "shared"
    assert a.try_write(0) is None
    assert a.try_write(1) is None
    gb.release()
    gb1.release()
    assert a.try_write(1) is not None


@pytest.mark.parametrize("mode", ["ofd", "shm"])
def test_separate_objects_give_mutual_exclusion_between_threads(lock_path, mode):
    n_threads, rounds = 4, 150
    shared = {"value": 0, "inside": 0, "overlaps": 0}
    start = threading.Barrier(n_threads)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)

    def work():
        lf = LocksFile(lock_path, mode=mode)
        start.wait()
        for _ in range(rounds):
            with lf.write(3):
                shared["inside"] += 1
                if shared["inside"] != 1:
                    shared["overlaps"] += 1
                v = shared["value"]
                time.sleep(0)  # let another thread run inside the critical section
                shared["value"] = v + 1
                shared["inside"] -= 1
        lf.close()

    try:
        threads = [Runner(work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.outcome()
    finally:
        sys.setswitchinterval(old)
    assert shared["overlaps"] == 0
    assert shared["value"] == n_threads * rounds
    assert support.mode_locks(lock_path, mode) == []


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_release_all_while_another_thread_waits(spawn_worker, lock_path, mode):
    """``release()`` from one thread never waits for another thread's pending
    acquire of the same object, and that acquire, once granted, is held."""
    holder = spawn_worker()
    holder.exec(f"h = pylocksfile(path, mode={mode!r}); h.acquire(writeLock=True, lock_n=2)")
    lf = pylocksfile(str(lock_path), mode=mode)
    assert lf.acquire(writeLock=False, lock_n=(6, 2)) is True
    t = Runner(lambda: lf.acquire(writeLock=True, lock_n=(0, 4)))
    t.start()
    support.wait_until(lambda: own_waiters(lock_path, mode) == 1, what="the thread's request to queue")
    lf.release()
    assert support.held_map(lock_path, os.getpid(), mode=mode)[6:8] == "..", "release() did not release 6 and 7"
    assert t.is_alive()
    holder.exec("h.release()")
    assert t.outcome() is True
    assert support.held_map(lock_path, os.getpid(), mode=mode) == "WWWW......"
    lf.release()
    assert support.held_map(lock_path, os.getpid(), mode=mode) == ".........."


def test_ofd_two_readers_upgrading_wait_for_each_other(lock_path):
    """The Deadlocks section of `Guard.upgrade`: in OFD mode the kernel
    detects no deadlock, so two owners of one shared span that both upgrade
    wait for each other. A timeout ends both waits, each keeping its shared lock."""
    from pylocksfile import LockTimeout

    a, b = LocksFile(lock_path), LocksFile(lock_path)
    ga, gb = a.read(0), b.read(0)
    start = threading.Barrier(2)
    errors = {}

    def upgrade(name, g):
        start.wait()
        try:
            g.upgrade(timeout=0.3)
        except BaseException as e:  # noqa: BLE001 - checked below
            errors[name] = e

    threads = [threading.Thread(target=upgrade, args=(n, g)) for n, g in (("a", ga), ("b", gb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(support.DEFAULT_TIMEOUT)
        assert not t.is_alive()
    assert sorted(errors) == ["a", "b"], errors
    assert all(isinstance(e, LockTimeout) for e in errors.values()), errors
    assert ga.kind == gb.kind == "shared"
    assert a.held() == b.held() == [(range(0, 1), "shared")]
    shared = [lk for lk in support.kernel_locks(lock_path) if not lk.waiting]
    assert [(lk.pid, lk.kind, lk.start) for lk in shared] == [(-1, "R", 0), (-1, "R", 0)]
    assert not support.can_lock(lock_path, 0, write=True)
    assert support.can_lock(lock_path, 0, write=False)
