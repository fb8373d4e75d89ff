"""Threads and asyncio tasks sharing one ``LocksFile`` exclude each other
by default, in every mode and whatever their patience, while a thread's
(or a task's) own takes compose; ``threads="share"`` keeps the object's
locks every thread's, and the seed API keeps the original's model."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import uuid

import pytest

from pylocksfile import DeadlockError, LocksFile, WouldBlockError, pylocksfile

SERVER = os.environ.get("LOCKSFILE_TEST_PG")
MODES = ["ofd", "process", "flock", "shm", "postgres"]


class Target:
    def __init__(self, mode, lock_path):
        self.mode = mode
        if mode == "postgres":
            self.where = f"{SERVER}?name=py-threads-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        else:
            self.where = os.fspath(lock_path)
        # flock(2) has only the whole file.
        self.span = slice(None) if mode == "flock" else range(3, 5)

    def open(self, **kw):
        if self.mode == "postgres":
            return LocksFile(self.where, **kw)
        return LocksFile(self.where, mode=self.mode, **kw)


@pytest.fixture(params=MODES)
def target(request, lock_path):
    if request.param == "postgres" and not SERVER:
        if os.environ.get("LOCKSFILE_REQUIRE_PG"):
            pytest.fail("LOCKSFILE_TEST_PG is not set but LOCKSFILE_REQUIRE_PG is")
        pytest.skip("no PostgreSQL server (set LOCKSFILE_TEST_PG)")
    return Target(request.param, lock_path)


def counter_run(lf, span, take, threads=4, iters=100):
    """Threads bump a counter under ``take``: (most inside at once, count)."""
    state = {"inside": 0, "most": 0, "count": 0}
    mutex = threading.Lock()
    start = threading.Barrier(threads)
    errors = []

    def work():
        try:
            start.wait()
            for _ in range(iters):
                with take(lf, span):
                    with mutex:
                        state["inside"] += 1
                        state["most"] = max(state["most"], state["inside"])
                    c = state["count"]
                    os.sched_yield()
                    state["count"] = c + 1
                    with mutex:
                        state["inside"] -= 1
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    return state["most"], state["count"]


PATIENCES = {
    "untimed": lambda lf, span: lf.write(span),
    "timed": lambda lf, span: lf.write(span, timeout=20),
}


@pytest.mark.parametrize("patience", sorted(PATIENCES))
def test_threads_sharing_an_object_exclude_each_other(target, patience):
    iters = 20 if target.mode == "postgres" else 100
    with target.open() as lf:
        most, count = counter_run(lf, target.span, PATIENCES[patience], iters=iters)
        assert most == 1
        assert count == 4 * iters
        assert lf.held() == []


def test_threads_share_is_the_old_model(target):
    """With ``threads="share"`` another thread composes with the first's
    lock and may release its explicit locks."""
    with target.open(threads="share") as lf:
        g = lf.write(target.span)
        got = []
        t = threading.Thread(target=lambda: got.append(lf.try_write(target.span)))
        t.start()
        t.join()
        assert got[0] is not None
        got[0].release()
        lf.acquire("exclusive", target.span)
        t = threading.Thread(target=lambda: lf.release(target.span))
        t.start()
        t.join()
        assert lf.held_explicitly() == []
        g.release()
        assert "threads='share'" in repr(lf)
        copy = pickle.loads(pickle.dumps(lf))
        assert "threads='share'" in repr(copy)
        copy.close()


def test_one_threads_takes_compose_and_keep_the_others_out(target):
    with target.open() as lf:
        outer = lf.write(target.span)
        inner = lf.try_read(target.span)
        assert inner is not None, "a read inside one's own write"
        seen = {}

        def other():
            seen["try"] = lf.try_read(target.span)
            try:
                lf.write(target.span, blocking=False)
            except WouldBlockError as e:
                seen["error"] = e

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen["try"] is None
        assert str(os.getpid()) in str(seen["error"])
        inner.release()
        outer.release()
        t = threading.Thread(target=lambda: seen.update(after=lf.try_write(target.span)))
        t.start()
        t.join()
        assert seen["after"] is not None
        seen["after"].release()


def test_explicit_locks_are_the_calling_threads(target):
    with target.open() as lf:
        lf.acquire("exclusive", target.span)
        seen = {}

        def other():
            seen["refused"] = pytest.raises(
                WouldBlockError, lf.acquire, "shared", target.span, blocking=False
            )
            lf.release(target.span)  # nothing of this thread's
            seen["mine"] = lf.held_explicitly()

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen["mine"] == []
        assert lf.held_explicitly() != []
        lf.release(target.span)
        assert lf.held() == []


def test_two_threads_upgrading_one_span_is_a_deadlock(target):
    with target.open() as lf:
        both = threading.Barrier(2)
        outcomes = []

        def run():
            g = lf.read(target.span)
            both.wait()
            try:
                g.upgrade(timeout=20)
                outcomes.append("granted")
            except DeadlockError:
                outcomes.append("deadlock")
            g.release()

        ts = [threading.Thread(target=run) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(outcomes) == ["deadlock", "granted"]


def test_asyncio_tasks_sharing_an_object_exclude_each_other(target):
    """Tasks of one loop (one thread) exclude each other, awaited or
    blocking, while one task's takes compose."""
    iters = 10 if target.mode == "postgres" else 40

    async def main(lf):
        state = {"inside": 0, "most": 0}

        async def task():
            for _ in range(iters):
                async with lf.write_async(target.span, timeout=20):
                    # The task's own blocking take composes.
                    inner = lf.try_read(target.span)
                    assert inner is not None
                    inner.release()
                    state["inside"] += 1
                    state["most"] = max(state["most"], state["inside"])
                    await asyncio.sleep(0)
                    state["inside"] -= 1

        await asyncio.gather(*(task() for _ in range(4)))
        return state["most"]

    with target.open() as lf:
        assert asyncio.run(main(lf)) == 1
        assert lf.held() == []


def test_an_acquire_async_is_the_tasks_to_release(target):
    async def main(lf):
        await lf.acquire_async("exclusive", target.span)
        other = asyncio.create_task(_try_in_task(lf, target.span))
        assert await other is None, "another task is kept out"
        lf.release(target.span)  # the task's own blocking call
        assert lf.held_explicitly() == []

    with target.open() as lf:
        asyncio.run(main(lf))
        assert lf.held() == []


async def _try_in_task(lf, span):
    return lf.try_write(span)


def test_the_seed_api_keeps_the_originals_model(lock_path):
    """The drop-in ``pylocksfile``: threads share the object's locks, and
    any thread may release them, as the original's README says."""
    lf = pylocksfile(locksfile_path=os.fspath(lock_path))
    lf.acquire(writeLock=True, lock_n=0, blocking=True)
    got = []

    def other():
        got.append(lf.acquire(writeLock=True, lock_n=0, blocking=False))
        lf.release(lock_n=(0, 1))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert got[0] is not False
    probe = LocksFile(lock_path)
    assert probe.try_write(0) is not None, "released by the other thread"
    probe.close()
    lf.release()


def test_tasks_exclude_each_other_when_asyncio_comes_after_the_first_take(lock_path):
    """A take made before ``asyncio`` is imported skips the task lookup (no
    loop can run yet); once it is imported, tasks exclude each other."""
    import subprocess
    import sys

    code = f"""
import sys
from pylocksfile import LocksFile
lf = LocksFile({os.fspath(lock_path)!r}, mode="shm")
with lf.write(3):
    pass
assert "asyncio" not in sys.modules, "the take imported asyncio"
import asyncio

async def main():
    g = lf.write(3)
    async def other():
        return lf.try_write(3)
    assert await asyncio.create_task(other()) is None, "another task is kept out"
    g.release()
    g2 = await asyncio.create_task(other())
    assert g2 is not None
    g2.release()

asyncio.run(main())
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
