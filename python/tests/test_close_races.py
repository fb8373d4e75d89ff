"""Release and close from one thread while another thread waits in the same
object: the release or close stands, the waiter ends with a clear error,
and nothing stays held.

The second owner is a worker process holding the lock, so the waits really
block (a blocked request in /proc/locks, or a queued one in the shm table)
before the test releases or closes; nothing here synchronises with sleeps."""

import asyncio
import threading

import pytest

import support
from pylocksfile import LocksFile

MODES = support.MODES


async def until_done(request):
    return await request


def kernel_waiting(path):
    return any(lk.waiting for lk in support.kernel_locks(path))


def waiting(path, tid, mode):
    """A wait, timed or not, sleeps in F_SETLKW (a blocked request in
    /proc/locks); in shm mode it is a queued request in the table."""
    if mode == "shm":
        return any(lk.waiting for lk in support.table_locks(path))
    return kernel_waiting(path)


class Waiter(threading.Thread):
    """Runs ``call`` in a thread and keeps its result or exception."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call = call
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.call()
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.error = e

    def start_and_block(self, path, mode):
        self.start()
        support.wait_until(lambda: waiting(path, self.native_id, mode) or not self.is_alive(), what="the waiter to block")
        assert self.is_alive(), f"the call was expected to wait but ended: {self.result!r} / {self.error!r}"

    def finish(self):
        self.join(support.DEFAULT_TIMEOUT)
        assert not self.is_alive(), "the waiter did not end"


@pytest.fixture
def holder(spawn_worker):
    """Another process holding lock 0 shared (``holder.exec("g.release()")`` frees it)."""

    def start(kind, mode):
        # A kernel-mode test's holder is an OFD owner; shm mode meets shm only.
        w = spawn_worker()
        w.exec(f"lf = LocksFile(path, mode={'shm' if mode == 'shm' else 'ofd'!r})\ng = lf.{kind}(0)")
        return w

    return start


@pytest.mark.parametrize("mode", MODES)
def test_release_during_upgrade_stands(lock_path, holder, mode):
    other = holder("read", mode)
    lf = LocksFile(lock_path, mode=mode)
    g = lf.read(0)
    t = Waiter(g.upgrade)
    t.start_and_block(lock_path, mode)
    g.release()
    assert not g.held and g.kind is None
    other.exec("g.release()")
    t.finish()
    assert isinstance(t.error, RuntimeError) and "released" in str(t.error), (t.result, t.error)
    assert not g.held and g.kind is None, "the upgrade brought the released guard back"
    assert lf.held() == []
    assert support.mode_locks(lock_path, mode) == []
    assert LocksFile(lock_path, mode=mode).try_write(0) is not None


@pytest.mark.parametrize("mode", MODES)
def test_close_during_upgrade_stands(lock_path, holder, mode):
    other = holder("read", mode)
    lf = LocksFile(lock_path, mode=mode)
    g = lf.read(0)
    t = Waiter(lambda: g.upgrade(timeout=60))
    t.start_and_block(lock_path, mode)
    lf.close()
    assert lf.closed and not g.held
    other.exec("g.release()")
    t.finish()
    assert isinstance(t.error, ValueError) and "closed" in str(t.error), (t.result, t.error)
    assert not g.held and g.kind is None
    assert support.mode_locks(lock_path, mode) == []
    assert LocksFile(lock_path, mode=mode).try_write(0) is not None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "call",
    [
        "lf.acquire('exclusive', 0)",
        "lf.acquire('shared', range(0, 3), timeout=60)",
        "lf.write(0)",
        "lf.read(range(0, 3), timeout=60)",
    ],
)
def test_close_while_another_thread_waits(lock_path, holder, mode, call):
    other = holder("write", mode)
    lf = LocksFile(lock_path, mode=mode)
    t = Waiter(lambda: eval(call, {"lf": lf}))
    t.start_and_block(lock_path, mode)
    lf.close()
    other.exec("g.release()")
    t.finish()
    assert isinstance(t.error, ValueError) and "closed" in str(t.error), (t.result, t.error)
    assert support.mode_locks(lock_path, mode) == [], "the waiter's lock outlived close()"
    assert LocksFile(lock_path, mode=mode).try_write(range(0, 3)) is not None
    # A closed object stays closed for every call.
    with pytest.raises(ValueError, match="closed"):
        lf.acquire("shared", 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "call",
    [
        "lf.acquire('exclusive', 0, timeout=60)",
        "lf.write(range(0, 2), timeout=60)",
        "lf.read_for(0, 60)",
        "lf.acquire('exclusive', 0)",
        "lf.write(range(0, 2))",
        "lf.read(0)",
        "asyncio.run(until_done(lf.write_async(0)))",
        "asyncio.run(until_done(lf.acquire_async('shared', 0, timeout=60)))",
    ],
)
def test_waits_end_at_close_while_the_holder_keeps_its_lock(lock_path, holder, mode, call):
    """close() ends the waits in progress at once, timed or not, sync or
    asyncio, long before any timeout, even though the other owner never
    lets go (an untimed wait would sleep in the engine forever)."""
    other = holder("write", mode)
    lf = LocksFile(lock_path, mode=mode)
    t = Waiter(lambda: eval(call, {"lf": lf, "asyncio": asyncio, "until_done": until_done}))
    t.start_and_block(lock_path, mode)
    lf.close()
    t.finish()  # well within the call's own 60 s
    assert isinstance(t.error, ValueError) and "closed" in str(t.error), (t.result, t.error)
    assert [lk.pid for lk in support.mode_locks(lock_path, mode)] == [-1], "only the holder's lock is left"
    assert not [th for th in threading.enumerate() if th.name == "pylocksfile-wait"], "a wait thread is left"
    other.exec("g.release()")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("end", ["g.release()", "lf.close()"])
def test_timed_upgrade_ends_at_release_while_the_other_reader_stays(lock_path, holder, mode, end):
    other = holder("read", mode)
    lf = LocksFile(lock_path, mode=mode)
    g = lf.read(0)
    t = Waiter(lambda: g.upgrade(timeout=60))
    t.start_and_block(lock_path, mode)
    exec(end, {"g": g, "lf": lf})
    t.finish()
    assert isinstance(t.error, (RuntimeError, ValueError)) and "nothing is held" in str(t.error), (t.result, t.error)
    assert not g.held
    assert [(lk.pid, lk.kind) for lk in support.mode_locks(lock_path, mode)] == [(-1, "R")]
    other.exec("g.release()")
    assert support.mode_locks(lock_path, mode) == []
