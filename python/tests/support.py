"""Helpers shared by the test modules: an independent view of what the kernel
holds (``/proc/locks`` and ``fcntl`` probes that never go through the package)
and worker processes driven step by step over a pipe.

Everything here must stay importable by ``spawn`` and ``forkserver`` children,
so it has no pytest imports at module level.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

DEFAULT_TIMEOUT = 10.0

# One-line figures that tests want shown at the end of the run, whatever
# pytest captured (conftest.py prints them).
SUMMARIES: list[str] = []


# --------------------------------------------------------------------------
# The kernel's view: /proc/locks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelLock:
    """One line of ``/proc/locks`` that concerns a given file."""

    family: str  # "POSIX", "OFDLCK" or "FLOCK"
    kind: str  # "R" or "W"
    pid: int  # -1 for OFD locks
    start: int
    end: int | None  # inclusive; None for "to the end of the file"
    waiting: bool  # a blocked request rather than a granted lock

    def covers(self, index: int) -> bool:
        return self.start <= index and (self.end is None or index <= self.end)


def _file_id(path) -> tuple[int, int, int]:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def kernel_locks(path) -> list[KernelLock]:
    """Every granted lock and blocked request on ``path``, read from /proc/locks."""
    major, minor, ino = _file_id(path)
    # The kernel rebuilds /proc/locks while it is read, so a lock taken or
    # dropped elsewhere meanwhile can make a line repeat or vanish: read it
    # whole, again and again, until three readings in a row agree about this
    # file (two agreeing on a repeated line were seen on a busy machine).
    readings = []
    for _ in range(200):
        readings.append(_locks_of(major, minor, ino))
        if len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]:
            break
    return readings[-1]


def _locks_of(major, minor, ino) -> list[KernelLock]:
    out = []
    with open("/proc/locks", "rb", buffering=0) as f:
        data = b""
        while chunk := f.read(1 << 20):
            data += chunk
    for line in data.decode().splitlines():
        parts = line.split()
        waiting = parts[1] == "->"
        if waiting:
            del parts[1]
        # N: FAMILY ADVISORY|MANDATORY READ|WRITE PID MAJ:MIN:INO START END
        dev = parts[5].split(":")
        if (int(dev[0], 16), int(dev[1], 16), int(dev[2])) != (major, minor, ino):
            continue
        end = None if parts[7] == "EOF" else int(parts[7])
        out.append(
            KernelLock(
                family=parts[1],
                kind="W" if parts[3] == "WRITE" else "R",
                pid=int(parts[4]),
                start=int(parts[6]),
                end=end,
                waiting=waiting,
            )
        )
    return out


# --------------------------------------------------------------------------
# The shm lock table's view, read from outside (as /proc/locks is for the
# kernel's locks)
# --------------------------------------------------------------------------

MODES = ["ofd", "process", "shm"]
"""The modes with numbered locks, which the mode-parametrised suites run in."""

DEFAULT_MODE = ""
"""The mode :func:`held_map` and :func:`can_lock` look at when not told:
``""`` for the kernel's locks, ``"shm"`` for the table. A suite written for
the kernel sets it (in the test process and its workers) to run in shm mode."""


def table_locks(path) -> list[KernelLock]:
    """Every lock and queued request in the shm table of ``path``, in the
    shape of :func:`kernel_locks` (family ``"SHM"``, each with its real pid)."""
    from pylocksfile import INDEX_END, _native

    table = _native._shm_table(os.fspath(path))
    out = []
    for rows, waiting in ((table["holders"], False), (table["waiters"], True)):
        for pid, _owner, start, stop, kind in rows:
            out.append(
                KernelLock(
                    family="SHM",
                    kind="W" if kind == "exclusive" else "R",
                    pid=pid,
                    start=start,
                    end=None if stop == INDEX_END else stop - 1,
                    waiting=waiting,
                )
            )
    return out


def mode_locks(path, mode: str) -> list[KernelLock]:
    """What the engine of ``mode`` holds and queues on ``path``: the table in
    shm mode, /proc/locks otherwise. Shm locks belong to a handle, like OFD
    locks, and show pid -1 like them, so one expectation fits both; use
    :func:`table_locks` for their pids."""
    if mode != "shm":
        return kernel_locks(path)
    return [KernelLock("SHM", lk.kind, -1, lk.start, lk.end, lk.waiting) for lk in table_locks(path)]


def owner_pid(mode: str, pid: int) -> int:
    """The pid :func:`mode_locks` shows for a lock of process ``pid``."""
    return pid if mode == "process" else -1


def held_map(path, pid: int, width: int = 10, mode: str | None = None) -> str:
    """What ``pid`` holds on indices ``0..width`` as a string: '.', 'R' or 'W'
    per index. OFD locks have pid -1. A lock reaching past ``width`` shows as a
    trailing '+'. With ``mode="shm"`` the shm table is read instead, and
    ``pid`` is its real pid (-1: every holder)."""
    mode = DEFAULT_MODE if mode is None else mode
    cells = ["."] * width
    beyond = False
    for lk in table_locks(path) if mode == "shm" else kernel_locks(path):
        if lk.waiting or (lk.pid != pid and not (mode == "shm" and pid == -1)):
            continue
        for i in range(width):
            if lk.covers(i):
                assert cells[i] == ".", f"two granted locks of one owner overlap: {lk}"
                cells[i] = lk.kind
        if lk.end is None or lk.end >= width:
            beyond = True
    return "".join(cells) + ("+" if beyond else "")


def waiting_pids(path) -> set[int]:
    return {lk.pid for lk in kernel_locks(path) if lk.waiting}


def is_waiting(path, pid: int) -> bool:
    return pid in waiting_pids(path)


def wait_until(predicate, timeout: float = DEFAULT_TIMEOUT, what: str = "condition"):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.0002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


# --------------------------------------------------------------------------
# The kernel's view: fcntl probes (F_GETLK and non-blocking F_SETLK)
# --------------------------------------------------------------------------

_FLOCK = "hhqqi"  # l_type, l_whence, l_start, l_len, l_pid (x86-64 / aarch64 layout)


def getlk(fd: int, index: int, count: int = 1, write: bool = True):
    """F_GETLK from this process: the first lock of another process in the
    way of a lock on ``index..index+count``, as (kind, pid), or None."""
    ltype = fcntl.F_WRLCK if write else fcntl.F_RDLCK
    raw = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, ltype, 0, index, count, 0))
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, raw)
    if l_type == fcntl.F_UNLCK:
        return None
    return ("W" if l_type == fcntl.F_WRLCK else "R", l_pid)


def can_lock(path, index: int, count: int = 1, write: bool = True, mode: str | None = None) -> bool:
    """Whether a fresh process could take a POSIX lock on the span now.

    Runs ``fcntl.lockf(LOCK_NB)`` in a separate interpreter, so it holds
    nothing of the caller's and sees every other owner's locks. With
    ``mode="shm"`` it tries a fresh shm owner there instead (the kernel's
    locks never meet the table)."""
    mode = DEFAULT_MODE if mode is None else mode
    if mode == "shm":
        code = (
            "import sys\n"
            "from pylocksfile import LocksFile\n"
            "lf = LocksFile(sys.argv[1], mode='shm', create=False)\n"
            "try_ = lf.try_write if sys.argv[4] == 'W' else lf.try_read\n"
            "sys.exit(0 if try_((int(sys.argv[2]), int(sys.argv[3]))) is not None else 3)\n"
        )
    else:
        code = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "op = (fcntl.LOCK_EX if sys.argv[4] == 'W' else fcntl.LOCK_SH) | fcntl.LOCK_NB\n"
            "try:\n"
            "    fcntl.lockf(fd, op, int(sys.argv[3]), int(sys.argv[2]))\n"
            "except OSError:\n"
            "    sys.exit(3)\n"
            "sys.exit(0)\n"
        )
    rc = subprocess.run(
        [sys.executable, "-c", code, os.fspath(path), str(index), str(count), "W" if write else "R"],
        timeout=DEFAULT_TIMEOUT,
    ).returncode
    assert rc in (0, 3), f"probe failed with {rc}"
    return rc == 0


# --------------------------------------------------------------------------
# Workers: child processes driven over a pipe
# --------------------------------------------------------------------------


class RemoteError(Exception):
    """An exception raised in a worker, carried back by name."""

    def __init__(self, names, message, tb):
        super().__init__(f"{names[0]}: {message}\n--- worker traceback ---\n{tb}")
        self.names = names  # the exception's class and its bases, by name
        self.message = message

    def isa(self, name: str) -> bool:
        return name in self.names


def _worker_namespace(path):
    import gc
    import signal

    ns = {
        "os": os,
        "gc": gc,
        "time": time,
        "fcntl": fcntl,
        "signal": signal,
        "sys": sys,
        "path": path,
        "support": sys.modules[__name__],
    }
    import pylocksfile as pkg

    ns["pkg"] = pkg
    for name in dir(pkg):
        if not name.startswith("_"):
            ns[name] = getattr(pkg, name)
    ns["pylocksfile"] = pkg.pylocksfile
    return ns


def worker_main(conn, path):
    """Child side: run statements / evaluate expressions sent by the parent."""
    try:
        ns = _worker_namespace(path)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("err", [type(e).__name__], str(e), traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            op, src = conn.recv()
        except EOFError:
            return
        if op == "exit":
            conn.send(("ok", None))
            return
        try:
            if op == "exec":
                exec(src, ns)  # noqa: S102 - test driver
                value = None
            else:
                value = eval(src, ns)  # noqa: S307 - test driver
            try:
                conn.send(("ok", value))
            except Exception:  # unpicklable result
                conn.send(("ok", repr(value)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            names = [c.__name__ for c in type(e).__mro__]
            conn.send(("err", names, str(e), traceback.format_exc()))


class Worker:
    """A child process that runs code sent by the test, one request at a time.

    ``w.exec("lf = pylocksfile(path)")`` runs statements, ``w.eval("lf.acquire(True, 0)")``
    returns a value; ``w.send(...)`` + ``w.result()`` split a call that is
    expected to block. Exceptions come back as :class:`RemoteError`.
    """

    def __init__(self, ctx, path):
        import multiprocessing

        ctx = multiprocessing.get_context(ctx) if isinstance(ctx, str) or ctx is None else ctx
        self.path = path
        self.pending = 0
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, os.fspath(path)), daemon=True)
        self.proc.start()
        child.close()
        status = self._recv(30.0)
        if status[0] != "ready":
            raise RemoteError(status[1], status[2], status[3])
        self.pid = status[1]

    def _recv(self, timeout):
        if not self.conn.poll(timeout):
            raise AssertionError(f"worker {self.pid if hasattr(self, 'pid') else '?'} did not answer within {timeout}s")
        return self.conn.recv()

    def send(self, op, src):
        self.conn.send((op, src))
        self.pending += 1

    def send_eval(self, src):
        self.send("eval", src)

    def replied(self) -> bool:
        return self.conn.poll(0)

    def result(self, timeout: float = DEFAULT_TIMEOUT):
        msg = self._recv(timeout)
        self.pending -= 1
        if msg[0] == "err":
            raise RemoteError(msg[1], msg[2], msg[3])
        return msg[1]

    def exec(self, src, timeout: float = DEFAULT_TIMEOUT):
        self.send("exec", src)
        return self.result(timeout)

    def eval(self, src, timeout: float = DEFAULT_TIMEOUT):
        self.send("eval", src)
        return self.result(timeout)

    def held(self, width: int = 10, mode: str | None = None) -> str:
        return held_map(self.path, self.pid, width, mode=mode)

    def wait_blocked(self, timeout: float = DEFAULT_TIMEOUT, mode: str | None = None):
        """Wait until this worker sleeps in the kernel on a lock of ``path``
        (a blocked request of its pid in /proc/locks; with ``mode="shm"``, a
        queued request of its pid in the table). Fails early if the pending
        request returns instead."""
        mode = DEFAULT_MODE if mode is None else mode
        if mode == "shm":
            blocked = lambda: self.pid in {lk.pid for lk in table_locks(self.path) if lk.waiting}  # noqa: E731
        else:
            blocked = lambda: is_waiting(self.path, self.pid)  # noqa: E731
        wait_until(
            lambda: blocked() or self.replied(),
            timeout,
            f"worker {self.pid} to block",
        )
        if mode == "shm":
            self.wait_asleep(timeout)
        assert not self.replied(), f"worker {self.pid} was expected to block but answered: {self.result()!r}"

    def wait_asleep(self, timeout: float = DEFAULT_TIMEOUT):
        """Wait until this worker's main thread sleeps in a system call (a
        wait's sleep). A table shows a request queued a moment before its
        thread sleeps, and a signal sent in between finds no call to end,
        as for any wait that a signal ends by interrupting a call."""

        def asleep():
            stat = open(f"/proc/{self.pid}/task/{self.pid}/stat").read()
            call = open(f"/proc/{self.pid}/task/{self.pid}/syscall").read()
            return stat.rsplit(")", 1)[1].split()[0] == "S" and not call.startswith("running")

        wait_until(lambda: asleep() or self.replied(), timeout, f"worker {self.pid} to sleep")

    def kill(self, sig=9):
        os.kill(self.pid, sig)
        self.proc.join(DEFAULT_TIMEOUT)

    def close(self):
        if self.proc.is_alive() and not self.pending:
            try:
                self.conn.send(("exit", None))
                self.proc.join(2.0)
            except (BrokenPipeError, OSError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(DEFAULT_TIMEOUT)
        self.conn.close()


# --------------------------------------------------------------------------
# The hand-over-hand race (the original's testRace), checked
# --------------------------------------------------------------------------


def race_runner(path, api, idx, n_tracks, n_rounds, barrier, occupant, visits, log_who, log_step, errors):
    """One racer: walk the cyclic list of tracks ``n_rounds`` times, taking the
    next track's write lock before letting go of the current one. Under each
    lock it checks the track is empty, and appends (racer, step) to the
    track's log with a plain read-modify-write that a second holder would
    corrupt."""
    import pylocksfile as pkg

    per_track = len(log_who) // n_tracks
    if api in ("seed", "seed-shm"):
        lf = pkg.pylocksfile(path, verbose=False, mode="shm" if api == "seed-shm" else "process")

        def lock(t):
            if lf.acquire(writeLock=True, lock_n=t) is not True:
                errors[idx] += 1
            return t

        def unlock(t, _token):
            lf.release(t)
    elif api == "none":  # no locking at all: only for checking the checks

        def lock(t):
            return t

        def unlock(_t, _token):
            pass
    else:
        lf = pkg.LocksFile(path, mode="shm" if api == "modern-shm" else "ofd")

        def lock(t):
            return lf.write(t)

        def unlock(_t, guard):
            guard.release()

    def enter(t, step):
        if occupant[t] != -1:
            errors[idx] += 1000
        occupant[t] = idx
        k = visits[t]
        # Give the other racers the processor inside the critical section,
        # so a second holder, if the lock let one in, would be caught.
        os.sched_yield()
        log_who[t * per_track + k] = idx
        log_step[t * per_track + k] = step
        visits[t] = k + 1

    def leave(t):
        os.sched_yield()
        if occupant[t] != idx:
            errors[idx] += 1000
        occupant[t] = -1

    barrier.wait()
    total = n_tracks * n_rounds
    held = lock(0)
    enter(0, 0)
    for step in range(1, total):
        t = step % n_tracks
        nxt = lock(t)
        enter(t, step)
        prev = (step - 1) % n_tracks
        leave(prev)
        unlock(prev, held)
        held = nxt
    last = (total - 1) % n_tracks
    leave(last)
    unlock(last, held)


def check_race(n_racers, n_tracks, n_rounds, visits, log_who, log_step):
    """Mutual exclusion left every log whole; every racer visited its steps in
    order; and no racer is both ahead of and behind another: for each pair,
    the same one reached every step first."""
    per_track = n_racers * n_rounds
    # pos[racer][step] = index of that visit in its track's log
    pos = [[None] * (n_tracks * n_rounds) for _ in range(n_racers)]
    for t in range(n_tracks):
        assert visits[t] == per_track, f"track {t}: {visits[t]} visits logged, expected {per_track}"
        for k in range(per_track):
            who, step = log_who[t * per_track + k], log_step[t * per_track + k]
            assert 0 <= who < n_racers and step % n_tracks == t, f"track {t} log entry {k} corrupt"
            assert pos[who][step] is None, f"racer {who} logged step {step} twice"
            pos[who][step] = k
    for p in range(n_racers):
        for q in range(p + 1, n_racers):
            firsts = {pos[p][s] < pos[q][s] for s in range(n_tracks * n_rounds)}
            assert len(firsts) == 1, f"racers {p} and {q} overtook each other"


# --------------------------------------------------------------------------
# What a process is doing right now
# --------------------------------------------------------------------------

SYS_FCNTL = 72  # x86-64
SYS_FUTEX = 202
SLEEP_SYSCALLS = {35, 230}  # nanosleep, clock_nanosleep (x86-64)
if os.uname().machine == "aarch64":
    SYS_FCNTL = 25
    SYS_FUTEX = 98
    SLEEP_SYSCALLS = {101, 115}


def current_syscall(tid: int) -> int | None:
    """The system call a thread (or a process's main thread) is in, if any."""
    try:
        with open(f"/proc/{tid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.lstrip("-").isdigit() else None


def free(other, i) -> bool:
    """Whether ``other`` (a ``LocksFile``) can write-lock ``i`` now (let go at once)."""
    g = other.try_write(i)
    if g is None:
        return False
    g.release()
    return True


def shared_free(other, i) -> bool:
    """Whether ``other`` can read-lock ``i`` now (let go at once)."""
    g = other.try_read(i)
    if g is None:
        return False
    g.release()
    return True
