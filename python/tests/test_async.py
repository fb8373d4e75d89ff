"""asyncio: ``read_async``/``write_async``/``acquire_async`` wait without
blocking the event loop, and a cancelled wait ends with nothing held and no
thread left behind. The locks in the way are held by a worker process (in
process mode, so that its locks and ours are told apart in /proc/locks).

Every test runs in OFD mode and in shm mode (``LocksFile`` below opens in
the test's mode; the holder is then a shm owner, told apart by its pid in
the table)."""

import asyncio
import functools
import os
import threading
import time

import pytest

import support
import pylocksfile
from pylocksfile import LockTimeout

OFD = -1
LocksFile = pylocksfile.LocksFile


@pytest.fixture(autouse=True, params=["ofd", "shm"])
def mode(request, monkeypatch):
    if request.param == "shm":
        monkeypatch.setattr(support, "DEFAULT_MODE", "shm")
        monkeypatch.setitem(globals(), "LocksFile", functools.partial(pylocksfile.LocksFile, mode="shm"))
    return request.param


def ofd_held(path, width=10):
    """What this process holds (OFD locks show pid -1; the table names us)."""
    return support.held_map(path, os.getpid() if support.DEFAULT_MODE == "shm" else OFD, width)


def wait_threads():
    return [t for t in threading.enumerate() if t.name == "pylocksfile-wait"]


async def until(predicate, what, timeout=support.DEFAULT_TIMEOUT):
    """Poll ``predicate`` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


@pytest.fixture
def holder(spawn_worker, mode):
    """A process holding a write lock on 2 (and on nothing else)."""
    w = spawn_worker()
    w.exec(f"h = LocksFile(path, mode={'shm' if mode == 'shm' else 'process'!r}); h.acquire('exclusive', 2)")
    return w


def test_free_locks_are_had_at_once_and_released(lock_path):
    lf = LocksFile(lock_path)

    async def main():
        async with lf.write_async((0, 3)) as g:
            assert g.kind == "exclusive" and ofd_held(lock_path) == "WWW......."
            assert wait_threads() == []  # no thread for a lock that was free
        assert not g.held and ofd_held(lock_path) == ".........."
        g = await lf.read_async(5)
        assert g.kind == "shared" and ofd_held(lock_path) == ".....R...."
        g.release()
        await lf.acquire_async("exclusive", 7)
        assert lf.held_explicitly() == [(range(7, 8), "exclusive")]

    asyncio.run(main())


def test_the_loop_keeps_running_while_a_task_waits(lock_path, holder):
    lf = LocksFile(lock_path)
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    async def main():
        t = asyncio.create_task(ticker())
        waiter = asyncio.create_task(lf.write_async(2).__aenter__())
        await until(lambda: len(wait_threads()) == 1, "the wait's thread")
        n = len(ticks)
        await until(lambda: len(ticks) >= n + 20, "the ticker to run while the task waits")
        gaps = [b - a for a, b in zip(ticks[n:], ticks[n + 1:])]
        assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.3f}s"
        assert not waiter.done()
        holder.exec("h.release()")
        g = await waiter
        t.cancel()
        assert g.kind == "exclusive" and ofd_held(lock_path) == "..W......."
        assert wait_threads() == []
        g.release()

    asyncio.run(main())


def test_cancelling_ends_the_wait_with_nothing_held(lock_path, holder):
    lf = LocksFile(lock_path)
    threads_before = threading.active_count()

    async def main():
        task = asyncio.create_task(lf.write_async((1, 3)).__aenter__())
        await until(lambda: len(wait_threads()) == 1, "the wait's thread")
        assert threading.active_count() == threads_before + 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The thread is gone when the cancellation arrives, not later.
        assert wait_threads() == [] and threading.active_count() <= threads_before

    asyncio.run(main())
    assert lf.held() == [] and ofd_held(lock_path) == ".........."
    assert support.waiting_pids(lock_path) == set()
    assert not [lk for lk in support.table_locks(lock_path) if lk.waiting]
    holder.exec("h.release()")
    assert support.can_lock(lock_path, 1, 3), "a leftover wait took the lock after all"


def test_wait_for_cancels_cleanly(lock_path, holder):
    lf = LocksFile(lock_path)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lf.acquire_async("shared", 2), 0.1)
        assert wait_threads() == []

    asyncio.run(main())
    assert lf.held() == [] and ofd_held(lock_path) == ".........."


def test_a_grant_that_the_cancellation_overtook_is_given_back(lock_path, holder):
    """The thread gets the lock, then the task is cancelled before it runs
    again: the guard is released and the explicit layer put back."""
    lf = LocksFile(lock_path, threads="share")  # one explicit layer for the loop and its tasks
    lf.acquire("shared", 3)

    async def main(start):
        task = asyncio.create_task(start())
        await until(lambda: len(wait_threads()) == 1, "the wait's thread")
        # Blocking the loop on purpose: the thread's hand-over cannot run.
        holder.exec("h.release()")
        support.wait_until(lambda: "W" in ofd_held(lock_path)[:3], what="the thread to get the lock")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        holder.exec("h.acquire('exclusive', 2)")

    async def write():
        return await lf.write_async(2)

    asyncio.run(main(write))
    assert lf.held() == [(range(3, 4), "shared")] and ofd_held(lock_path) == "...R......"
    asyncio.run(main(lambda: lf.acquire_async("exclusive", (2, 2))))
    assert lf.held_explicitly() == [(range(3, 4), "shared")]
    assert ofd_held(lock_path) == "...R......"


def test_a_cancelled_acquire_async_never_lowers_what_was_held(lock_path, holder):
    """An ``acquire_async`` that would lower an exclusive lock to shared is
    granted in its thread, another owner then asks for that lock shared,
    and the task is cancelled before it runs again: the explicit layer is
    as it was before the call, the lock still exclusive, the other owner
    refused."""
    lf = LocksFile(lock_path, threads="share")  # one explicit layer for the loop and its tasks
    lf.acquire("exclusive", 5)
    got = []

    async def main():
        task = asyncio.create_task(lf.acquire_async("shared", (2, 4)))
        await until(lambda: len(wait_threads()) == 1, "the wait's thread")
        # Blocking the loop on purpose: the thread's hand-over cannot run.
        holder.exec("h.release()")
        support.wait_until(lambda: ofd_held(lock_path)[2] == "R", what="the thread to get the lock")
        # The grant raced the cancellation: another owner asks for 5 shared
        # now, before the task sees either.
        holder.exec("g5 = h.try_read(5)")
        got.append(holder.eval("g5 is not None"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert wait_threads() == []

    asyncio.run(main())
    assert got == [False], "another owner took shared a lock held exclusively"
    assert lf.held_explicitly() == [(range(5, 6), "exclusive")]
    assert lf.held() == [(range(5, 6), "exclusive")]
    assert ofd_held(lock_path) == ".....W...."
    assert holder.eval("h.try_read(5) is None")

    # Not cancelled, the call is wholly applied once its wait ends: 2..5
    # shared, and the thread's guard gone.
    holder.exec("h.acquire('exclusive', 2)")

    async def waited():
        task = asyncio.create_task(lf.acquire_async("shared", (2, 4)))
        await until(lambda: len(wait_threads()) == 1, "the wait's thread")
        holder.exec("h.release()")
        await task
        assert wait_threads() == []

    asyncio.run(waited())
    assert lf.held_explicitly() == [(range(2, 6), "shared")]
    assert lf.held() == [(range(2, 6), "shared")]
    assert ofd_held(lock_path) == "..RRRR...."
    assert holder.eval("h.try_read(5) is not None")


def test_timeout_raises_lock_timeout(lock_path, holder):
    lf = LocksFile(lock_path)

    async def main():
        t0 = time.monotonic()
        with pytest.raises(LockTimeout):
            await lf.write_async(2, timeout=0.15)
        took = time.monotonic() - t0
        assert 0.15 <= took < 0.5
        with pytest.raises(LockTimeout):
            async with lf.read_async((1, 2), timeout=0):
                pass
        with pytest.raises(LockTimeout):
            await lf.acquire_async("exclusive", 2, timeout=0.05)
        assert wait_threads() == []

    asyncio.run(main())
    assert lf.held() == [] and ofd_held(lock_path) == ".........."


def test_bad_arguments_raise_at_the_call(lock_path):
    lf = LocksFile(lock_path)
    with pytest.raises(ValueError):
        lf.write_async(-1)
    with pytest.raises(ValueError):
        lf.read_async(1, timeout=-1.0)
    with pytest.raises(ValueError):
        lf.acquire_async("sideways", 1)
    request = lf.write_async(1)

    async def twice():
        (await request).release()
        with pytest.raises(RuntimeError, match="awaited already"):
            await request

    asyncio.run(twice())
    lf.close()
    with pytest.raises(ValueError):
        lf.write_async(1)


def test_thread_local_waits_for_the_loop_threads_owner(lock_path, holder):
    """The wait runs in another thread, but the lock is the calling
    thread's: it is still held once that thread has ended."""
    lf = LocksFile(lock_path, thread_local=True)

    async def main():
        async with lf.write_async(2) as g:
            assert lf.held() == [(range(2, 3), "exclusive")] and g.held
            assert ofd_held(lock_path) == "..W......."

    async def release_later():
        await until(lambda: len(wait_threads()) == 1, "the wait's thread")
        holder.exec("h.release()")

    async def both():
        await asyncio.gather(main(), release_later())

    asyncio.run(both())
    assert ofd_held(lock_path) == ".........."
