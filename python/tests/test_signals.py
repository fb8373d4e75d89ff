"""Ctrl-C during a wait: a child process blocked in acquire gets SIGINT and
must raise KeyboardInterrupt within 100 ms, holding exactly what it held
before the call. The parent signals only once the child is asleep in the
kernel (its request shows in /proc/locks, timed or not, or queued in the
shm table); the child timestamps the KeyboardInterrupt with the same
monotonic clock the parent read just before sending the signal."""

import fcntl
import os
import signal
import time

import pytest

import support
from pylocksfile import LocksFile

LATENCY_LIMIT = 0.100

CHILD_CODE = """
def attempt(call):
    try:
        value = eval(call)
    except KeyboardInterrupt:
        return ("interrupted", time.monotonic())
    return ("returned", value)
"""


@pytest.fixture
def blocker(lock_path):
    """This process holds POSIX write locks on indices 2 and 6, taken with
    raw fcntl so the package is not involved on this side."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 2)
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 6)
    yield fd
    os.close(fd)


def interrupt_and_measure(w, call, ofd=False, mode=""):
    """``ofd``: the child waits for an OFD lock, whose request carries no pid
    in /proc/locks (any waiter on the file is the child's)."""
    w.send_eval(f"attempt({call!r})")
    if ofd:
        support.wait_until(lambda: support.waiting_pids(w.path) or w.replied(), what="the OFD request to queue")
        assert not w.replied()
    else:
        w.wait_blocked(mode=mode)
    sent = time.monotonic()
    os.kill(w.pid, signal.SIGINT)
    outcome, when = w.result()
    assert outcome == "interrupted", f"acquire returned {when!r} instead of raising KeyboardInterrupt"
    latency = when - sent
    assert latency < LATENCY_LIMIT, f"KeyboardInterrupt came {latency * 1000:.1f} ms after SIGINT"
    if mode == "shm":
        assert not [lk for lk in support.table_locks(w.path) if lk.waiting], "a request is still queued in the table"
    elif ofd:
        assert support.waiting_pids(w.path) == set(), "a request is still queued in the kernel"
    else:
        assert not support.is_waiting(w.path, w.pid), "a request is still queued in the kernel"
    return latency


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_ctrl_c_interrupts_a_blocked_seed_acquire(spawn_worker, lock_path, blocker, ctx):
    w = spawn_worker(ctx)
    w.exec(CHILD_CODE + "lf = pylocksfile(path)")
    interrupt_and_measure(w, "lf.acquire(writeLock=True, lock_n=2)")
    assert w.held() == ".........."
    # Still usable, and the lock is taken once it is free.
    assert w.eval("lf.acquire(writeLock=True, lock_n=2, blocking=False)") is False
    fcntl.lockf(blocker, fcntl.LOCK_UN, 1, 2)
    assert w.eval("lf.acquire(writeLock=True, lock_n=2)") is True
    assert w.held() == "..W......."


def test_ctrl_c_leaves_nothing_half_held(spawn_worker, lock_path, blocker):
    """A range request whose free part could be taken first, over a lock the
    child already holds: after Ctrl-C the child holds exactly what it held."""
    w = spawn_worker()
    w.exec(CHILD_CODE + "lf = pylocksfile(path)")
    assert w.eval("lf.acquire(writeLock=False, lock_n=4)") is True
    assert w.eval("lf.acquire(writeLock=True, lock_n=8)") is True
    assert w.held() == "....R...W."
    # 0..9 exclusively: 2 and 6 are held by the parent.
    interrupt_and_measure(w, "lf.acquire(writeLock=True, lock_n=(0, 10))")
    assert w.held() == "....R...W."
    interrupt_and_measure(w, "lf.acquire(writeLock=False, lock_n=(1, 8))")
    assert w.held() == "....R...W."
    # Its later calls behave normally.
    w.exec("lf.release(4)")
    assert w.held() == "........W."


def test_ctrl_c_interrupts_a_with_statement(spawn_worker, lock_path, blocker):
    w = spawn_worker()
    w.exec(CHILD_CODE + "lf = pylocksfile(path)\ndef enter():\n    with lf(writeLock=False, lock_n=(5, 3)):\n        pass\n")
    interrupt_and_measure(w, "enter()")
    assert w.held() == ".........."
    fcntl.lockf(blocker, fcntl.LOCK_UN, 1, 6)
    w.exec("enter()")
    assert w.held() == ".........."


@pytest.mark.parametrize(
    "call",
    [
        "lf.write(2)",
        "lf.read(range(0, 4))",
        "lf.acquire('exclusive', (1, 9))",
    ],
)
def test_ctrl_c_interrupts_a_modern_blocking_wait(spawn_worker, lock_path, blocker, call):
    w = spawn_worker()
    w.exec(CHILD_CODE + "lf = LocksFile(path, mode='process')")
    interrupt_and_measure(w, call)
    assert w.held() == ".........."
    assert w.eval("lf.held()") == []


@pytest.mark.parametrize("call", ["lf.write(6, timeout=30.0)", "lf.acquire('shared', 6, timeout=30.0)"])
def test_ctrl_c_interrupts_a_timed_wait(spawn_worker, lock_path, blocker, call):
    w = spawn_worker()
    w.exec(CHILD_CODE + "lf = LocksFile(path)")
    interrupt_and_measure(w, call, ofd=True)
    assert w.eval("lf.held()") == []
    assert support.held_map(lock_path, -1) == ".........."


def test_ctrl_c_interrupts_an_ofd_blocking_wait(spawn_worker, lock_path, blocker):
    w = spawn_worker()
    w.exec(CHILD_CODE + "lf = LocksFile(path)")
    w.send_eval("attempt('lf.write((0, 8))')")
    # OFD waiters carry no pid in /proc/locks: wait for any waiter.
    support.wait_until(lambda: support.waiting_pids(lock_path) or w.replied(), what="the OFD request to queue")
    assert not w.replied()
    sent = time.monotonic()
    os.kill(w.pid, signal.SIGINT)
    outcome, when = w.result()
    assert outcome == "interrupted"
    assert when - sent < LATENCY_LIMIT
    assert support.waiting_pids(lock_path) == set()
    assert support.held_map(lock_path, -1) == ".........."
    assert w.eval("lf.held()") == []


def test_other_signals_run_their_handler_and_the_wait_goes_on(spawn_worker, lock_path, blocker, tmp_path):
    """A handler that does not raise must not end the wait: it runs promptly,
    the request goes back to sleep, and the lock is taken once free."""
    mark = tmp_path / "handled"
    w = spawn_worker()
    w.exec(
        "lf = pylocksfile(path)\n"
        "handled = []\n"
        "def on_usr1(*_):\n"
        "    handled.append(time.monotonic())\n"
        f"    open({str(mark)!r}, 'a').close()\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\n"
    )
    w.send_eval("lf.acquire(writeLock=True, lock_n=(1, 2))")
    w.wait_blocked()
    os.kill(w.pid, signal.SIGUSR1)
    support.wait_until(lambda: mark.exists() or w.replied(), what="the handler to run during the wait")
    # Back in the kernel after the handler ran, not returned.
    w.wait_blocked()
    fcntl.lockf(blocker, fcntl.LOCK_UN, 1, 2)
    assert w.result() is True
    assert w.held() == ".WW......."
    assert len(w.eval("handled")) == 1


@pytest.mark.parametrize(
    "make, call",
    [
        ("pylocksfile(path)", "lf.acquire(writeLock=True, lock_n=(1, 2))"),
        ("LocksFile(path)", "lf.write((1, 2))"),
        ("LocksFile(path, mode='process')", "lf.read(2)"),
    ],
)
def test_ctrl_c_interrupts_a_wait_behind_another_thread_of_the_same_owner(
    spawn_worker, lock_path, blocker, make, call
):
    """A background thread of the child already sleeps in the kernel on the
    same indices through the same object; the main thread's acquire queues
    behind it inside the process. Ctrl-C must still end the main thread's
    wait within 100 ms, and the background thread's wait goes on."""
    w = spawn_worker()
    w.exec(
        CHILD_CODE
        + "import threading\n"
        + f"lf = {make}\n"
        + f"bg = threading.Thread(target=lambda: {call}, daemon=True)\n"
        + "bg.start()\n"
    )
    support.wait_until(lambda: support.waiting_pids(lock_path), what="the background thread to sleep in the kernel")
    w.send_eval(f"attempt({call!r})")
    support.wait_until(
        lambda: support.current_syscall(w.pid) == support.SYS_FUTEX or w.replied(),
        what="the main thread to wait behind the background thread",
    )
    assert not w.replied()
    sent = time.monotonic()
    os.kill(w.pid, signal.SIGINT)
    outcome, when = w.result(timeout=2.0)
    assert outcome == "interrupted"
    assert when - sent < LATENCY_LIMIT
    assert w.eval("bg.is_alive()") is True
    fcntl.lockf(blocker, fcntl.LOCK_UN, 1, 2)
    w.exec("bg.join(10)")
    assert w.eval("bg.is_alive()") is False


@pytest.mark.parametrize("mode", ["ofd", "process"])
def test_ctrl_c_during_an_upgrade_keeps_the_shared_lock(spawn_worker, lock_path, blocker, mode):
    fcntl.lockf(blocker, fcntl.LOCK_SH, 1, 8)  # a reader in the way of the upgrade
    w = spawn_worker()
    w.exec(CHILD_CODE + f"lf = LocksFile(path, mode={mode!r})\ng = lf.read((7, 3))")
    owner = w.pid if mode == "process" else -1
    assert support.held_map(lock_path, owner) == ".......RRR"
    w.send_eval("attempt('g.upgrade()')")
    support.wait_until(lambda: support.waiting_pids(lock_path) or w.replied(), what="the upgrade to wait")
    assert not w.replied()
    sent = time.monotonic()
    os.kill(w.pid, signal.SIGINT)
    outcome, when = w.result()
    assert outcome == "interrupted"
    assert when - sent < LATENCY_LIMIT
    assert w.eval("g.kind") == "shared"
    assert support.held_map(lock_path, owner) == ".......RRR"
    assert support.waiting_pids(lock_path) == set()


# --------------------------------------------------------------------------
# Shm mode: waits sleep on a futex of the table, and Ctrl-C ends them too
# --------------------------------------------------------------------------


@pytest.fixture
def shm_blocker(lock_path):
    """This process holds shm write locks on indices 2 and 6
    (``shm_blocker[2].release()`` frees one)."""
    lf = LocksFile(lock_path, mode="shm")
    guards = {i: lf.write(i) for i in (2, 6)}
    yield guards
    lf.close()


@pytest.mark.parametrize(
    "make, call",
    [
        ("pylocksfile(path, mode='shm')", "lf.acquire(writeLock=True, lock_n=2)"),
        ("pylocksfile(path, mode='shm')", "lf.acquire(writeLock=True, lock_n=(0, 10))"),
        ("LocksFile(path, mode='shm')", "lf.write(2)"),
        ("LocksFile(path, mode='shm')", "lf.read(range(0, 4))"),
        ("LocksFile(path, mode='shm')", "lf.acquire('exclusive', (1, 9))"),
        ("LocksFile(path, mode='shm')", "lf.write(6, timeout=30.0)"),
        ("LocksFile(path, mode='shm')", "lf.acquire('shared', 6, timeout=30.0)"),
    ],
)
def test_ctrl_c_interrupts_a_shm_wait(spawn_worker, lock_path, shm_blocker, make, call):
    w = spawn_worker()
    w.exec(CHILD_CODE + f"lf = {make}\nheld_before = lf.acquire(False, 4) if hasattr(lf, 'l_id') else lf.read(4)")
    interrupt_and_measure(w, call, mode="shm")
    # Exactly what it held before: its shared lock on 4.
    assert support.held_map(lock_path, w.pid, mode="shm") == "....R....."
    shm_blocker[2].release()
    shm_blocker[6].release()
    w.exec(f"r = {call}")
    assert support.held_map(lock_path, w.pid, mode="shm") != "....R.....", "the lock was not taken once free"


def test_ctrl_c_during_a_shm_upgrade_keeps_the_shared_lock(spawn_worker, lock_path):
    reader = LocksFile(lock_path, mode="shm")
    in_the_way = reader.read(8)  # a reader in the way of the upgrade
    w = spawn_worker()
    w.exec(CHILD_CODE + "lf = LocksFile(path, mode='shm')\ng = lf.read((7, 3))")
    assert support.held_map(lock_path, w.pid, mode="shm") == ".......RRR"
    interrupt_and_measure(w, "g.upgrade()", mode="shm")
    assert w.eval("g.kind") == "shared"
    assert support.held_map(lock_path, w.pid, mode="shm") == ".......RRR"
    in_the_way.release()
    assert w.eval("g.upgrade().kind") == "exclusive"
    assert support.held_map(lock_path, w.pid, mode="shm") == ".......WWW"


def test_other_signals_do_not_end_a_shm_wait(spawn_worker, lock_path, shm_blocker, tmp_path):
    mark = tmp_path / "handled"
    w = spawn_worker()
    w.exec(
        "lf = pylocksfile(path, mode='shm')\n"
        "handled = []\n"
        "def on_usr1(*_):\n"
        "    handled.append(time.monotonic())\n"
        f"    open({str(mark)!r}, 'a').close()\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\n"
    )
    w.send_eval("lf.acquire(writeLock=True, lock_n=(1, 2))")
    w.wait_blocked(mode="shm")
    os.kill(w.pid, signal.SIGUSR1)
    support.wait_until(lambda: mark.exists() or w.replied(), what="the handler to run during the wait")
    w.wait_blocked(mode="shm")
    shm_blocker[2].release()
    assert w.result() is True
    assert support.held_map(lock_path, w.pid, mode="shm") == ".WW......."
    assert len(w.eval("handled")) == 1
