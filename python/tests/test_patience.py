"""One wait whatever the patience: an untimed wait, a timed one
(``timeout=10``), an asyncio one and a timed asyncio one are each one wait
for the engine, so they all keep what the engine gives a waiter: deadlock
detection (process mode's kernel, the shm table, the PostgreSQL server),
their place in a fair queue (shm, PostgreSQL), and a prompt end on Ctrl-C or
on a cancelled task, holding nothing.

Every test runs over the engines (process mode, shm mode, and a PostgreSQL
namespace when ``LOCKSFILE_TEST_PG`` names a server) with real processes;
a peer is known to be queued from what the engine shows (/proc/locks, the
shm table, ``pg_locks``), never from a sleep. Measured figures are printed
(``pytest -s``) and listed at the end of the run."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
import uuid

import pytest

import support
from pylocksfile import LocksFile

SERVER = os.environ.get("LOCKSFILE_TEST_PG")

ENGINES = ["process", "shm", "pg"]
PATIENCES = ["untimed", "timed", "async", "async-timed"]

# Limits on what is measured (the figures themselves are printed).
KERNEL_DEADLOCK_LIMIT = 0.100  # process and shm: from the cycle closing
PG_DEADLOCK_LIMIT = 1.0 + 1.0  # the server's deadlock_timeout (1 s) + 1 s
WRITER_GRANT_LIMIT = 1.0
INTERRUPT_LIMIT = 0.100

# What the workers run: `take` waits for an exclusive lock with the given
# patience, and returns its guard.
HELPERS = """
import asyncio

async def _await(request):
    return await request

def take(lf, i, how):
    if how == "untimed":
        return lf.write(i)
    if how == "timed":
        return lf.write(i, timeout=10)
    if how == "async":
        return asyncio.run(_await(lf.write_async(i)))
    if how == "async-timed":
        return asyncio.run(_await(lf.write_async(i, timeout=10)))
    raise ValueError(how)

def cycle(lf, mine, nxt, how):
    '''Holding `mine`, wait for lock `nxt`: ("deadlock" | "granted",
    when the wait started, when it ended). Releases everything after.'''
    started = time.monotonic()
    try:
        g = take(lf, nxt, how)
    except DeadlockError:
        ended = time.monotonic()
        mine.release()
        return ("deadlock", started, ended)
    ended = time.monotonic()
    g.release()
    mine.release()
    return ("granted", started, ended)

def timed_take(lf, i, how):
    '''How long the wait for lock `i` took; released at once.'''
    started = time.monotonic()
    g = take(lf, i, how)
    took = time.monotonic() - started
    g.release()
    return took

def grant_time(lf, i, how):
    '''When lock `i` was granted; released at once.'''
    g = take(lf, i, how)
    when = time.monotonic()
    g.release()
    return when

def attempt(call):
    try:
        value = call()
    except KeyboardInterrupt:
        return ("interrupted", time.monotonic())
    return ("returned", repr(value))
"""


def record(line):
    """A measured figure: printed (``pytest -s``) and listed at the end."""
    print(line)
    support.SUMMARIES.append(line)


class Engine:
    """Where the locks of a test are: a lock file in process or shm mode, or
    a fresh PostgreSQL namespace."""

    def __init__(self, name, lock_path):
        self.name = name
        self.path = lock_path
        if name == "pg":
            self.target = f"{SERVER}?name=py-patience-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.code = f"LocksFile({self.target!r})"
            # Workers start fresh: no server session of this process is
            # ever copied into them.
            self.ctx = "spawn"
        else:
            self.target = os.fspath(lock_path)
            self.code = f"LocksFile({self.target!r}, mode={name!r})"
            self.ctx = "fork"
        self._monitor = None

    def open(self):
        if self.name == "pg":
            return LocksFile(self.target)
        return LocksFile(self.target, mode=self.name)

    def queued(self) -> int:
        """How many requests wait for a lock now."""
        if self.name == "shm":
            return sum(lk.waiting for lk in support.table_locks(self.path))
        if self.name == "process":
            return sum(lk.waiting for lk in support.kernel_locks(self.path))
        if self._monitor is None:
            # A session of its own that holds nothing: it sees every other.
            self._monitor = self.open()
        return sum(not granted for (_i, _kind, _pid, granted) in self._monitor._server_locks())

    def wait_queued(self, n, workers=()):
        """Until exactly ``n`` requests wait; fails early if one of
        ``workers`` answers instead of waiting."""
        support.wait_until(
            lambda: self.queued() == n or any(w.replied() for w in workers),
            what=f"{n} requests to queue ({self.name})",
        )
        for w in workers:
            assert not w.replied(), f"worker {w.pid} was expected to wait but answered: {w.result()!r}"
            w.wait_asleep()

    def close(self):
        if self._monitor is not None:
            self._monitor.close()


@pytest.fixture(params=ENGINES)
def engine(request, lock_path):
    if request.param == "pg" and not SERVER:
        if os.environ.get("LOCKSFILE_REQUIRE_PG"):
            pytest.fail("LOCKSFILE_TEST_PG is not set but LOCKSFILE_REQUIRE_PG is")
        pytest.skip("no PostgreSQL server (set LOCKSFILE_TEST_PG)")
    e = Engine(request.param, lock_path)
    yield e
    e.close()


def fair_only(engine):
    if engine.name == "process":
        pytest.skip("process-mode fcntl locks are not fair: the kernel lets readers overtake a waiting writer")


def worker(engine, spawn_worker):
    """A worker process with the helpers and ``lf``, its own owner."""
    w = spawn_worker(engine.ctx)
    w.exec(HELPERS + f"lf = {engine.code}")
    return w


# --------------------------------------------------------------------------
# a. Deadlock cycles are detected whatever the patience
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", PATIENCES)
@pytest.mark.parametrize("n", [2, 3])
def test_a_deadlock_cycle_gets_one_deadlock_error(engine, spawn_worker, n, how):
    """Owner i holds lock i and waits for lock i+1 (mod n). Exactly one of
    them gets DeadlockError; it lets its lock go, and the others are
    granted in turn."""
    ws = [worker(engine, spawn_worker) for _ in range(n)]
    for i, w in enumerate(ws):
        w.exec(f"mine = lf.write({i})")
    # All but the last wait, each known to be queued before the next starts;
    # the last one closes the cycle.
    for i, w in enumerate(ws[:-1]):
        w.send_eval(f"cycle(lf, mine, {i + 1}, {how!r})")
        engine.wait_queued(i + 1, ws[: i + 1])
    ws[-1].send_eval(f"cycle(lf, mine, 0, {how!r})")
    results = [w.result(timeout=15) for w in ws]

    outcomes = [r[0] for r in results]
    assert outcomes.count("deadlock") == 1, outcomes
    closed = max(r[1] for r in results)  # when the last waiter started
    victim = next(r for r in results if r[0] == "deadlock")
    latency = victim[2] - closed
    record(
        f"deadlock cycle of {n}, {engine.name}, {how}: DeadlockError {latency * 1000:.1f} ms "
        f"after the cycle closed (owner {outcomes.index('deadlock')} of {n})"
    )
    limit = PG_DEADLOCK_LIMIT if engine.name == "pg" else KERNEL_DEADLOCK_LIMIT
    assert latency < limit, f"DeadlockError came {latency * 1000:.1f} ms after the cycle closed"
    # The others were granted once the victim let go.
    assert all(r[2] >= victim[2] for r in results if r[0] == "granted")
    assert engine.queued() == 0


# --------------------------------------------------------------------------
# b. A writer among busy readers is granted (fair engines)
# --------------------------------------------------------------------------

READERS = 8
READ_HOLD = 0.200
READ_EVERY = 0.025


def reader_loop(target, mode, k, start, stop, reads):
    """Reader ``k``: after the start, waits ``k`` steps of 25 ms, then reads
    lock 0 again and again, holding each read 200 ms, until told to stop.
    With 8 of them a new read starts every 25 ms, so reads always overlap."""
    lf = LocksFile(target) if mode == "pg" else LocksFile(target, mode=mode)
    start.wait()
    time.sleep(k * READ_EVERY)
    while not stop.is_set():
        g = lf.read(0)
        with reads.get_lock():
            reads.value += 1
        time.sleep(READ_HOLD)
        g.release()
    lf.close()


@pytest.mark.parametrize("how", PATIENCES)
def test_b_a_writer_among_busy_readers_is_granted(engine, spawn_worker, how):
    fair_only(engine)
    writer = worker(engine, spawn_worker)
    ctx = multiprocessing.get_context(engine.ctx)
    start = ctx.Barrier(READERS + 1)
    stop = ctx.Event()
    reads = ctx.Value("i", 0)
    readers = [
        ctx.Process(target=reader_loop, args=(engine.target, engine.name, k, start, stop, reads), daemon=True)
        for k in range(READERS)
    ]
    for p in readers:
        p.start()
    try:
        start.wait(timeout=60)
        # Every reader is in its loop: reads overlap from now on.
        support.wait_until(lambda: reads.value >= READERS, what="every reader to read")
        took = writer.eval(f"timed_take(lf, 0, {how!r})", timeout=15)
        record(f"writer among {READERS} busy readers, {engine.name}, {how}: granted after {took * 1000:.1f} ms")
        assert took < WRITER_GRANT_LIMIT, f"the writer waited {took:.3f} s"
        assert reads.value >= READERS
    finally:
        stop.set()
        for p in readers:
            p.join(support.DEFAULT_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in readers), [p.exitcode for p in readers]


# --------------------------------------------------------------------------
# c. Queued writers of mixed patience keep their order (fair engines)
# --------------------------------------------------------------------------


def test_c_writers_of_mixed_patience_keep_their_queue_order(engine, spawn_worker):
    fair_only(engine)
    hows = ["timed", "async", "untimed"]
    ws = [worker(engine, spawn_worker) for _ in hows]
    holder = engine.open()  # after the workers: none of them copies it
    g = holder.write(0)
    for k, (w, how) in enumerate(zip(ws, hows)):
        w.send_eval(f"grant_time(lf, 0, {how!r})")
        engine.wait_queued(k + 1, ws[: k + 1])
    g.release()
    granted = [w.result(timeout=15) for w in ws]
    order = sorted(range(len(ws)), key=lambda k: granted[k])
    record(
        f"queue order, {engine.name}: granted "
        + ", ".join(f"{hows[k]} +{(granted[k] - granted[order[0]]) * 1000:.1f} ms" for k in order)
    )
    assert order == [0, 1, 2], f"granted in the order {[hows[k] for k in order]}"
    holder.close()


# --------------------------------------------------------------------------
# d. Ctrl-C and cancelled tasks end a wait promptly, holding nothing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["timed", "untimed"])
def test_d_ctrl_c_ends_a_wait_holding_nothing(engine, spawn_worker, how):
    holder = worker(engine, spawn_worker)
    holder.exec("g = lf.write(0)")
    w = worker(engine, spawn_worker)
    w.exec("before = lf.write(5)")
    w.send_eval(f"attempt(lambda: take(lf, 0, {how!r}))")
    engine.wait_queued(1, [w])
    sent = time.monotonic()
    os.kill(w.pid, signal.SIGINT)
    outcome, when = w.result()
    assert outcome == "interrupted", f"the wait returned {when!r} instead of raising KeyboardInterrupt"
    latency = when - sent
    record(f"Ctrl-C, {engine.name}, {how}: KeyboardInterrupt {latency * 1000:.1f} ms after SIGINT")
    assert latency < INTERRUPT_LIMIT, f"KeyboardInterrupt came {latency * 1000:.1f} ms after SIGINT"
    # Exactly what it held before; no request left waiting.
    assert w.eval("lf.held()") == [(range(5, 6), "exclusive")]
    assert engine.queued() == 0
    # Still usable: it gets the lock once free.
    holder.exec("g.release()")
    assert w.eval(f"timed_take(lf, 0, {how!r})") < support.DEFAULT_TIMEOUT


def wait_threads():
    return [t for t in threading.enumerate() if t.name == "pylocksfile-wait"]


@pytest.mark.parametrize("how", ["async", "async-timed"])
def test_d_a_cancelled_task_ends_at_once_holding_nothing(engine, spawn_worker, how):
    holder = worker(engine, spawn_worker)
    holder.exec("g = lf.write(0)")
    lf = engine.open()

    async def await_(request):
        return await request

    async def main():
        request = lf.write_async(0) if how == "async" else lf.write_async(0, timeout=10)
        task = asyncio.ensure_future(await_(request))
        deadline = time.monotonic() + support.DEFAULT_TIMEOUT
        while engine.queued() != 1:
            assert not task.done(), task
            assert time.monotonic() < deadline, "the task's request did not queue"
            await asyncio.sleep(0.001)
        sent = time.monotonic()
        task.cancel()
        await asyncio.wait({task}, timeout=support.DEFAULT_TIMEOUT)
        took = time.monotonic() - sent
        assert task.cancelled(), task
        return took

    took = asyncio.run(main())
    record(f"cancelled task, {engine.name}, {how}: done {took * 1000:.1f} ms after task.cancel()")
    assert took < INTERRUPT_LIMIT, f"the cancelled task ended {took * 1000:.1f} ms after task.cancel()"
    assert lf.held() == []
    assert wait_threads() == [], "a pylocksfile-wait thread is left"
    assert engine.queued() == 0
    # The holder's lock is untouched, and once free, ours to take.
    assert lf.try_write(0) is None
    holder.exec("g.release()")
    assert lf.write(0, timeout=support.DEFAULT_TIMEOUT).held
    lf.close()
