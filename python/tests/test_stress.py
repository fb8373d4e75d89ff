"""A random multi-process stress test, checked by an oracle that does not
trust the package's bookkeeping.

Several processes (forked and spawned) run several threads each; every
thread takes and drops guards, converts them, and changes its object's
explicit layer over random spans of a small index range, so that changes
often span pieces of mixed kinds and are refused part-way by other owners.
Every owner marks what it claims in a table in a shared ``mmap`` (marked
after a lock is had, cleared before it goes), and two checks judge the run:

* a *violation* is an exclusive claim of one owner overlapping any claim of
  another owner: two owners believed they held conflicting locks;
* a *mismatch* is the engine's own list of an owner's locks (the ``lock:``
  lines of ``/proc/self/fdinfo``; in shm mode the table's list, read from
  outside; on PostgreSQL ``pg_locks``, read through another session)
  differing from that owner's claims, wherever one thread alone acts for the
  owner, so the claims are exact. Such a thread compares after every step,
  so after every wait that ended without the lock (timed out, refused, a
  cancelled asyncio task): a failed wait holds nothing new.

Every way of waiting is used: non-blocking tries, short timeouts (so that
many time out), asyncio waits (``await lf.read_async/write_async(span,
timeout=...)`` and ``acquire_async``) on an event loop of the worker thread,
their task cancelled at a random moment now and then (nothing is held after
``CancelledError``), and, where that cannot deadlock (OFD locks have no
deadlock detection), waits without a deadline: by an owner that holds
nothing (see ``Gate``), or by the one owner at a time that holds the token
file while everyone else waits with a deadline or holds nothing. The summary
counts, for each kind of wait, how its waits ended.

Besides: every worker must finish in time (a stuck one is killed and counted
as hung), and no lock may be left in the engine at the end.

Owners: in ``"ofd"``, ``"shm"``, ``"flock"`` and ``"postgres"`` mode each
``LocksFile`` object (threads 0 and 1 of a process share one, thread 2 has
its own); in ``"process"`` mode, and with the seed API class
``pylocksfile``, each process; with ``pylocksfile(path, mode="shm")``
(``"seed-shm"``) each object, one a thread. In ``"flock"`` mode every lock
is the whole file (the oracle claims every column), and a conversion is not
atomic (flock(2) drops the old lock first), so the owner's shared claims are
withdrawn for the time of a call that may convert, and a conversion that
lost the lock leaves the owner nothing. ``"postgres"`` runs on the server of
``LOCKSFILE_TEST_PG`` (spans within 0..16, none to the end).
``LOCKSFILE_STRESS_SECS`` sets the run time per mode (default 3 s),
``LOCKSFILE_STRESS_SEED`` the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import multiprocessing
import os
import random
import sys
import threading
import time
import traceback

import pytest

from pylocksfile import DeadlockError, LocksfileError, LocksFile, LockTimeout, WouldBlockError
from pylocksfile import pylocksfile as Seed

import support

PROCS = 3
THREADS = 3
# Indices 0..16 get one column each; column 16 stands for 16 and all beyond,
# which only spans to the end reach.
COLS = 17
LAST = 16
MAX_GUARDS = 4
S, X = "S", "X"
REFUSALS = (WouldBlockError, LockTimeout, DeadlockError, asyncio.CancelledError)

# The kinds of wait, and how a wait ended, counted per pair.
KINDS = ("non-blocking", "timed", "asyncio", "cancelled asyncio", "untimed")
OUTCOMES = ("granted", "busy", "timed out", "deadlock", "cancelled", "conversion lost")


def outcome_of(e) -> str:
    if e is None:
        return "granted"
    if isinstance(e, WouldBlockError):
        return "busy"
    if isinstance(e, LockTimeout):
        return "timed out"
    if isinstance(e, DeadlockError):
        return "deadlock"
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    return "conversion lost"


def conversion_lost(e) -> bool:
    """Flock mode: a conversion that lost the lock (the core's
    ``Error::ConversionLost``, a plain ``LocksfileError`` here)."""
    return type(e) is LocksfileError and "to convert it" in str(e)


# Counters, one row per process (each process writes only its own row).
COUNTERS = (
    "ops",
    "violations",
    "mismatches",
    "leftover",
    "errors",
    "refused",
    "refused_over_own",
    "blocking",
    "blocking_holding",
    "done",
    *(f"{k}: {o}" for k in KINDS for o in OUTCOMES),
)
C = {name: i for i, name in enumerate(COUNTERS)}


def owners_of(mode: str) -> int:
    if mode == "seed-shm":
        return THREADS * PROCS
    return 2 * PROCS if mode in ("ofd", "shm", "flock", "postgres") else PROCS


def table_size(mode: str) -> int:
    return (owners_of(mode) * COLS * 2 + PROCS * len(COUNTERS)) * 8


class Table:
    """The claims of every owner, and the counters, in a shared ``mmap``.

    A process changes only its own owners' rows and its own counters, under
    one lock of its own, and reads the other rows without any: aligned
    8-byte loads and stores. A claim is cleared before the lock goes and
    made after it comes, and taking or dropping a lock is a system call
    between the two, so a claim seen set is really held: no false alarm.
    """

    def __init__(self, path, mode: str, p: int):
        self.file = open(path, "r+b")  # noqa: SIM115 - lives as long as the table
        self.mm = mmap.mmap(self.file.fileno(), 0)
        self.v = memoryview(self.mm).cast("q")
        self.owners = owners_of(mode)
        self.p = p
        self.lock = threading.Lock()

    def close(self):
        self.v.release()
        self.mm.close()
        self.file.close()

    def _claim(self, owner: int, col: int, kind: str) -> int:
        return (owner * COLS + col) * 2 + (kind == X)

    def _counter(self, p: int, name: str) -> int:
        return self.owners * COLS * 2 + p * len(COUNTERS) + C[name]

    def count(self, name: str, n: int = 1) -> int:
        with self.lock:
            i = self._counter(self.p, name)
            was = self.v[i]
            self.v[i] = was + n
            return was

    def total(self, name: str) -> int:
        return sum(self.v[self._counter(p, name)] for p in range(PROCS))

    def get(self, p: int, name: str) -> int:
        return self.v[self._counter(p, name)]

    def mark(self, owner: int, cols: range, kind: str):
        """Claim ``kind`` on ``cols`` (the lock is held), then look for conflicts."""
        with self.lock:
            for c in cols:
                self.v[self._claim(owner, c, kind)] += 1
        self.check(owner, cols, kind, "after marking")

    def unmark(self, owner: int, cols: range, kind: str):
        """Look for conflicts once more, then give up the claim (before the lock goes)."""
        self.check(owner, cols, kind, "before clearing")
        with self.lock:
            for c in cols:
                i = self._claim(owner, c, kind)
                assert self.v[i] > 0, f"test bug: owner {owner} clears {kind} on {c} it never claimed"
                self.v[i] -= 1

    def withdraw(self, owner: int, kind: str) -> list:
        """Withdraw every ``kind`` claim of ``owner`` (one thread acts alone
        for it); what :meth:`restore` puts back."""
        with self.lock:
            saved = []
            for c in range(COLS):
                i = self._claim(owner, c, kind)
                saved.append(self.v[i])
                self.v[i] = 0
        return saved

    def restore(self, owner: int, kind: str, saved: list):
        """Put withdrawn claims back (the locks are held again), then look for conflicts."""
        with self.lock:
            for c in range(COLS):
                self.v[self._claim(owner, c, kind)] += saved[c]
        for c in range(COLS):
            if saved[c]:
                self.check(owner, range(c, c + 1), kind, "after restoring")

    def waits(self) -> str:
        """How each kind of wait ended, for the summary."""
        parts = []
        for k in KINDS:
            ends = [f"{n} {o}" for o in OUTCOMES if (n := self.total(f"{k}: {o}"))]
            if ends:
                parts.append(f"{k}: {', '.join(ends)}")
        return "; ".join(parts)

    def check(self, owner: int, cols: range, kind: str, when: str):
        """Every column where another owner claims something in conflict with ``kind``."""
        for c in cols:
            for other in range(self.owners):
                if other == owner:
                    continue
                x = self.v[self._claim(other, c, X)]
                s = self.v[self._claim(other, c, S)] if kind == X else 0
                if x + s:
                    if self.count("violations") < 5:
                        print(
                            f"violation {when}: owner {owner} claims {kind} on {c}, "
                            f"owner {other} claims {s} shared and {x} exclusive there",
                            file=sys.stderr,
                            flush=True,
                        )

    def row(self, owner: int) -> list:
        out = []
        for c in range(COLS):
            if self.v[self._claim(owner, c, X)]:
                out.append(X)
            elif self.v[self._claim(owner, c, S)]:
                out.append(S)
            else:
                out.append(None)
        return out


def kernel_row(fd: int):
    """The kernel's list of the locks held through ``fd`` as table columns, or
    the line of a lock the table cannot express (past 16 but not to the end)."""
    row = [None] * COLS
    with open(f"/proc/self/fdinfo/{fd}") as f:
        lines = [ln.split(None, 1)[1] for ln in f if ln.startswith("lock:")]
    for line in lines:
        # N: FAMILY ADVISORY READ|WRITE PID DEV:INO START END|EOF
        f = line.split()
        kind = X if f[3] == "WRITE" else S
        start = int(f[6])
        last = None if f[7] == "EOF" else int(f[7])
        if start > LAST or (last is not None and last >= LAST):
            return line
        for c in range(COLS):
            if c >= start and (last is None or c <= last):
                row[c] = kind
    return row


def table_row(path, owner_id: int):
    """As :func:`kernel_row`, from the shm table's list of the locks of the
    owner with this id."""
    from pylocksfile import INDEX_END, _native

    row = [None] * COLS
    for _pid, owner, start, stop, kind in _native._shm_table(path)["holders"]:
        if owner != owner_id:
            continue
        if start > LAST or (stop != INDEX_END and stop - 1 >= LAST):
            return f"{start}..{stop} {kind}"
        for c in range(start, COLS if stop == INDEX_END else stop):
            row[c] = X if kind == "exclusive" else S
    return row


def server_row(probe, backend: int):
    """As :func:`kernel_row`, from the server's list of the locks the session
    with backend pid ``backend`` holds, read through ``probe`` (a session of
    its own)."""
    row = [None] * COLS
    for index, kind, pid, granted in probe._server_locks():
        if not granted or pid != backend:
            continue
        if index >= LAST:
            return f"{index} {kind}"
        if row[index] != X:
            row[index] = X if kind == "exclusive" else S
    return row


def show(row) -> str:
    return "".join(k or "." for k in row)


class Sp:
    """A span over the table; ``end is None`` runs to the end of the index space."""

    __slots__ = ("start", "end")

    def __init__(self, start, end):
        self.start, self.end = start, end

    @staticmethod
    def random(rng, to_end=True):
        start = rng.randrange(LAST)
        if to_end and rng.randrange(8) == 0:
            return Sp(start, None)
        return Sp(start, min(start + 1 + rng.randrange(6), LAST))

    def api(self):
        return slice(self.start, None) if self.end is None else range(self.start, self.end)

    def seed_api(self):
        return (self.start, self.end - self.start)

    def cols(self) -> range:
        return range(self.start, COLS if self.end is None else self.end)

    def __repr__(self):
        return f"{self.start}..{'' if self.end is None else self.end}"


class Gate:
    """Shared by a thread for as long as it holds guards; exclusive for a
    thread that acts alone for its owner (the explicit layers are emptied
    first), which is when the claims are exact and when a wait without a
    deadline cannot deadlock: the owner holds nothing, so no one waits for
    it, and whoever it waits for waits with a deadline or is the one owner
    holding the token file, whose own wait ends by the same argument."""

    def __init__(self):
        self.cv = threading.Condition()
        self.readers = 0
        self.writer = False
        self.waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self.cv:
            self.cv.wait_for(lambda: not self.writer and not self.waiting)
            self.readers += 1
        try:
            yield
        finally:
            with self.cv:
                self.readers -= 1
                self.cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self.cv:
            self.waiting += 1
            self.cv.wait_for(lambda: not self.writer and not self.readers)
            self.waiting -= 1
            self.writer = True
        try:
            yield
        finally:
            with self.cv:
                self.writer = False
                self.cv.notify_all()


class Handle:
    """A lock object and the test's copy of its explicit layer (last call
    wins); the lock is held across each explicit call, so both agree."""

    def __init__(self, obj, fd, path=None, probe=None, backend=None):
        self.obj = obj
        self.fd = fd
        # Shm mode: the table is read by path, the owner found by its id.
        self.path = path
        self.owner_id = obj._table_owner if path is not None else None
        # PostgreSQL: the server's list, read through another session, of
        # the locks of this object's session.
        self.probe = probe
        self.backend = backend
        self.layer = [None] * COLS
        self.lock = threading.Lock()

    def engine_row(self):
        """What the engine holds for this handle's owner."""
        if self.probe is not None:
            return server_row(self.probe, self.backend)
        if self.path is not None:
            return table_row(self.path, self.owner_id)
        return kernel_row(self.fd)


class Owner:
    def __init__(self, row, handles, threads):
        self.row = row
        self.handles = handles
        self.threads = threads
        self.gate = Gate()


class Worker:
    def __init__(self, t: Table, owner: Owner, handle: Handle, mode: str, rng, token: str):
        self.t = t
        self.token = token
        self.owner = owner
        self.handle = handle
        self.seed_api = mode in ("seed", "seed-shm")
        # Flock mode: every lock is the whole file (see ``converting``).
        self.whole = mode == "flock"
        # PostgreSQL: at most 4096 keys a span, so none to the end.
        self.server = mode == "postgres"
        self.to_end = not self.seed_api and not self.server
        self.rng = rng
        self.guards = []  # [guard, Sp, kind]
        # This thread acts alone for its owner right now.
        self.alone = False
        # A conversion lost the owner's lock (flock mode): every holder of
        # the owner must let go.
        self.lost = False
        # The event loop of this thread's asyncio waits.
        self.loop = asyncio.new_event_loop()

    # -- helpers --------------------------------------------------------

    def op(self):
        self.t.count("ops")

    def refused(self, sp):
        self.t.count("refused")
        row = self.t.row(self.owner.row)
        if any(row[c] for c in sp.cols()):
            self.t.count("refused_over_own")

    def waited(self, kind: str, e=None):
        """Count how a wait of ``kind`` ended (``e``: the refusal, if any)."""
        self.t.count(f"{kind}: {outcome_of(e)}")

    def hold(self):
        """Keep a lock a moment, so that others run into it."""
        if self.rng.randrange(4) == 0:
            time.sleep(0)

    def random_span(self):
        if self.whole:
            return Sp(0, None)
        return Sp.random(self.rng, self.to_end)

    def pick_kind(self):
        """A kind to ask for. In flock mode a thread that shares its owner asks
        for shared locks only: an exclusive one would convert the shared lock
        its siblings' claims stand on, which flock(2) drops for a moment (see
        :meth:`converting`)."""
        kind = self.rng.choice((S, X))
        return S if self.whole and not self.alone else kind

    def wait_args(self):
        """A short wait, or none at all: keyword arguments for the modern API."""
        r = self.rng.randrange(3)
        if r == 0:
            return {"blocking": False}
        return {"timeout": self.rng.random() * 0.003}

    @staticmethod
    def wait_kind(w) -> str:
        if w.get("blocking", True) is False:
            return "non-blocking"
        return "untimed" if w.get("timeout") is None else "timed"

    def over_own(self):
        """A span over what the owner holds, reaching past it on both sides:
        the change then raises pieces of mixed kinds at once."""
        if self.whole:
            return Sp(0, None)
        row = self.t.row(self.owner.row)
        held = [c for c in range(LAST) if row[c]]
        if not held:
            return self.random_span()
        a, b = self.rng.choice(held), self.rng.choice(held)
        start = max(0, min(a, b) - self.rng.randrange(3))
        if self.to_end and self.rng.randrange(4) == 0:
            return Sp(start, None)
        return Sp(start, min(max(a, b) + 1 + self.rng.randrange(4), LAST))

    def pick_span(self):
        if self.rng.randrange(2):
            return self.over_own()
        return self.random_span()

    def mirror(self, what):
        want = self.t.row(self.owner.row)
        got = self.handle.engine_row()
        if got != want:
            if self.t.count("mismatches") < 5:
                got = show(got) if isinstance(got, list) else got
                print(
                    f"engine differs from the claims of owner {self.owner.row} after {what}: "
                    f"claims {show(want)} engine {got}",
                    file=sys.stderr,
                    flush=True,
                )

    # -- flock conversions ----------------------------------------------

    def converting(self, kind):
        """Whether asking for ``kind`` over everything may convert the owner's
        shared lock in flock mode: flock(2) drops the old lock before it asks
        for the new one, so a refused upgrade holds nothing for a moment (and
        loses the lock if another owner got in). The owner's shared claims
        are withdrawn for the call then: only a thread acting alone for its
        owner converts (see :meth:`pick_kind`), so they are all its own."""
        if not self.whole or kind != X:
            return None
        assert self.alone, "test bug: a conversion in flock mode among siblings"
        if self.t.row(self.owner.row)[0] != S:
            return None
        return self.t.withdraw(self.owner.row, S)

    def converted(self, saved, e):
        """After a call that may have converted: the shared claims come back,
        unless the conversion lost the lock."""
        if saved is None:
            return
        if conversion_lost(e):
            self.lost = True
        else:
            self.t.restore(self.owner.row, S, saved)

    def abandon(self):
        """After a lost conversion the owner holds nothing, whatever its
        holders say (their claims are withdrawn already): every holder lets
        go, without clearing claims."""
        if not self.lost:
            return
        self.lost = False
        for g, _sp, _kind in self.guards:
            g.release()
        self.guards = []
        h = self.handle
        with h.lock:
            h.layer = [None] * COLS
            h.obj.release()
        self.mirror("a lost conversion")

    def attempt(self, kind, sp, wait_kind, call):
        """Make a call that waits as ``wait_kind`` says; count how it ended.
        Returns what it returned, or None when refused (nothing changed, or,
        after a lost conversion, nothing held at all)."""
        saved = self.converting(kind)
        try:
            got = call()
        except REFUSALS as e:
            self.converted(saved, e)
            self.waited(wait_kind, e)
            self.refused(sp)
            return None
        except LocksfileError as e:
            if not (saved is not None and conversion_lost(e)):
                raise
            self.converted(saved, e)
            self.waited(wait_kind, e)
            self.refused(sp)
            return None
        self.converted(saved, None)
        if got is None:  # try_read / try_write
            self.waited(wait_kind, WouldBlockError())
            self.refused(sp)
            return None
        self.waited(wait_kind)
        return got

    def run_async(self, make, cancel_after=None):
        """Run ``await make()`` on this thread's event loop; the task is
        cancelled after ``cancel_after`` seconds if still waiting."""

        async def go():
            task = asyncio.ensure_future(make())
            timer = None if cancel_after is None else self.loop.call_later(cancel_after, task.cancel)
            try:
                return await task
            finally:
                if timer is not None:
                    timer.cancel()

        return self.loop.run_until_complete(go())

    def async_args(self, kind):
        """A short asyncio wait: its timeout, and when its task is cancelled
        (None: not). A conversion in flock mode must say how it ended, which a
        cancelled task cannot, so it gets a timeout instead."""
        timeout = self.rng.random() * 0.003 if self.rng.randrange(2) else None
        cancel_after = self.rng.random() * 0.003 if timeout is None or self.rng.randrange(2) else None
        if self.whole and kind == X and self.t.row(self.owner.row)[0] == S and cancel_after is not None:
            timeout, cancel_after = (cancel_after if timeout is None else min(timeout, cancel_after)), None
        return timeout, cancel_after

    # -- steps ----------------------------------------------------------

    def new_guard(self, kind=None, sp=None, how=None) -> bool:
        sp = sp or self.pick_span()
        kind = kind or self.pick_kind()
        lf = self.handle.obj
        how = self.rng.randrange(5) if how is None else how
        self.op()
        if how == 0:
            g = self.attempt(kind, sp, "non-blocking", lambda: (lf.try_read if kind == S else lf.try_write)(sp.api()))
        elif how == 1:
            t = self.rng.random() * 0.003
            g = self.attempt(kind, sp, "timed", lambda: (lf.read_for if kind == S else lf.write_for)(sp.api(), t))
        elif how == 2:
            t = self.rng.random() * 0.003
            g = self.attempt(kind, sp, "timed", lambda: (lf.read if kind == S else lf.write)(sp.api(), timeout=t))
        else:
            g = self.async_guard(kind, sp, *self.async_args(kind))
        if g is None:
            self.abandon()
            return False
        self.t.mark(self.owner.row, sp.cols(), kind)
        self.guards.append([g, sp, kind])
        self.hold()
        return True

    def async_guard(self, kind, sp, timeout, cancel_after):
        """``await lf.read_async/write_async(span, timeout=...)`` on this
        thread's event loop, the task cancelled after ``cancel_after``: after
        ``CancelledError`` nothing is held."""
        lf = self.handle.obj
        wait_kind = "asyncio" if cancel_after is None else "cancelled asyncio"
        if timeout is None and cancel_after is None:
            wait_kind = "untimed"

        async def take():
            return await (lf.read_async if kind == S else lf.write_async)(sp.api(), timeout=timeout)

        return self.attempt(kind, sp, wait_kind, lambda: self.run_async(take, cancel_after))

    def part_way(self):
        """The case that once broke: a shared piece, a gap and an exclusive
        piece held, then one exclusive change from before the shared piece
        to past the exclusive one, which other owners often refuse beyond
        the exclusive piece, after the pieces before it were raised. A
        refused change must leave every piece as it was."""
        if self.whole:
            return
        p = self.rng.randrange(LAST - 4)
        q = p + 2 + self.rng.randrange(2)
        shared, exclusive = Sp(p, p + 1), Sp(q, q + 1)
        start = max(0, p - self.rng.randrange(3))
        if self.to_end and self.rng.randrange(4) == 0:
            wide = Sp(start, None)
        else:
            wide = Sp(start, min(LAST, q + 2 + self.rng.randrange(4)))
        if self.seed_api or self.rng.randrange(2):
            held = self.acquire(S, shared) and self.acquire(X, exclusive)
        else:
            held = self.new_guard(S, shared, 0) and self.new_guard(X, exclusive, 0)
        if not held:
            return
        if self.seed_api or self.rng.randrange(2):
            w = {"blocking": False} if self.seed_api else self.wait_args()
            self.acquire(X, wide, **w)
        else:
            self.new_guard(X, wide)

    def drop_guard(self, i):
        g, sp, kind = self.guards.pop(i)
        self.t.unmark(self.owner.row, sp.cols(), kind)
        self.op()
        g.release()

    def upgrade(self, i, w=None):
        g, sp, kind = self.guards[i]
        if kind != S or (self.whole and not self.alone):
            return
        w = self.wait_args() if w is None else w
        self.op()
        if self.attempt(X, sp, self.wait_kind(w), lambda: g.upgrade(**w)) is None:
            if self.lost:
                self.guards.pop(i)  # its claim went with the others (see abandon)
                self.abandon()
            return
        # The shared lock was kept throughout, then became exclusive.
        self.t.mark(self.owner.row, sp.cols(), X)
        self.t.unmark(self.owner.row, sp.cols(), S)
        self.guards[i][2] = X
        self.hold()

    def downgrade(self, i):
        g, sp, kind = self.guards[i]
        if kind != X:
            return
        # Claim the weaker kind first, drop the stronger claim before the lock weakens.
        self.t.mark(self.owner.row, sp.cols(), S)
        self.t.unmark(self.owner.row, sp.cols(), X)
        self.guards[i][2] = S
        self.op()
        g.downgrade()

    def acquire(self, kind, sp, blocking=False, timeout=None, call=None, asyncio_wait=None) -> bool:
        """An explicit acquire: the last call wins on every index of ``sp``.
        ``call`` makes it another way (the seed API's ``with``);
        ``asyncio_wait``, ``(timeout, cancel_after)``, through ``acquire_async``."""
        h = self.handle
        owner = self.owner.row
        with h.lock:
            # Indices going from exclusive to shared lose their exclusive
            # claim before the call; a refused call changes nothing, so it
            # comes back.
            lowered = [c for c in sp.cols() if kind == S and h.layer[c] == X]
            for c in lowered:
                self.t.unmark(owner, range(c, c + 1), X)
            self.op()
            name = "exclusive" if kind == X else "shared"
            if call is not None:
                wait_kind = "untimed"

                def do():
                    call()
                    return True
            elif self.seed_api:
                wait_kind = "untimed" if blocking else "non-blocking"

                def do():
                    got = h.obj.acquire(writeLock=kind == X, lock_n=sp.seed_api(), blocking=blocking)
                    return True if got else None
            elif asyncio_wait is not None:
                t, cancel_after = asyncio_wait
                wait_kind = "asyncio" if cancel_after is None else "cancelled asyncio"

                def do():
                    async def take():
                        await h.obj.acquire_async(name, sp.api(), timeout=t)

                    self.run_async(take, cancel_after)
                    return True
            else:
                wait = {"blocking": blocking} if timeout is None else {"timeout": timeout}
                wait_kind = self.wait_kind(wait)

                def do():
                    h.obj.acquire(name, sp.api(), **wait)
                    return True

            ok = self.attempt(kind, sp, wait_kind, do) is not None
            if ok:
                for c in sp.cols():
                    old = h.layer[c]
                    if old == kind and c not in lowered:
                        continue
                    self.t.mark(owner, range(c, c + 1), kind)
                    if old == S:
                        self.t.unmark(owner, range(c, c + 1), S)
                    h.layer[c] = kind
                return True
            if not self.lost:
                for c in lowered:
                    self.t.mark(owner, range(c, c + 1), X)
        self.abandon()
        return False

    def release(self, h: Handle, sp=None, call=None):
        """An explicit release of ``sp``, or of everything; ``call`` makes it
        another way (the end of the seed API's ``with``)."""
        with h.lock:
            cols = range(COLS) if sp is None else sp.cols()
            for c in cols:
                if h.layer[c] is not None:
                    self.t.unmark(self.owner.row, range(c, c + 1), h.layer[c])
                    h.layer[c] = None
            self.op()
            if call is not None:
                call()
            elif sp is None:
                h.obj.release()
            elif self.seed_api:
                h.obj.release(sp.seed_api())
            else:
                h.obj.release(sp.api())

    def step(self):
        r = self.rng.randrange(100)
        n = len(self.guards)
        if self.seed_api:
            # The seed API has no guards but its ``with``: explicit calls only.
            r = 60 + r * 40 // 100
        if self.rng.randrange(8) == 0:
            self.part_way()
            what = "a change over mixed pieces"
        elif r < 25 and n < MAX_GUARDS:
            self.new_guard()
            what = "a guard"
        elif 25 <= r < 40 and n:
            self.drop_guard(self.rng.randrange(n))
            what = "dropping a guard"
        elif 40 <= r < 52 and n:
            self.upgrade(self.rng.randrange(n))
            what = "an upgrade"
        elif 52 <= r < 60 and n:
            self.downgrade(self.rng.randrange(n))
            what = "a downgrade"
        elif 60 <= r < 85:
            kind = self.pick_kind()
            sp = self.pick_span()
            if self.seed_api:
                w = {"blocking": False}
            elif self.rng.randrange(4) == 0:
                w = {"asyncio_wait": self.async_args(kind)}
            else:
                w = self.wait_args()
            if self.acquire(kind, sp, **w):
                self.hold()
            what = "an explicit acquire"
        elif 85 <= r < 95:
            self.release(self.handle, self.random_span())
            what = "an explicit release"
        elif 95 <= r < 98:
            self.release(self.handle)
            what = "release()"
        else:
            self.hold()
            what = "holding"
        if self.alone:
            self.mirror(what)

    def drop_guards(self):
        while self.guards:
            self.drop_guard(len(self.guards) - 1)

    def session(self):
        """Some steps among the other threads of the owner."""
        with self.owner.gate.shared():
            self.alone = self.owner.threads == 1
            try:
                for _ in range(1 + self.rng.randrange(12)):
                    self.step()
                self.drop_guards()
                if self.alone:
                    self.mirror("dropping the guards")
            finally:
                self.alone = False

    def alone_steps(self):
        """Steps with the owner to this thread: the engine must agree with the
        claims after every step. Starts from nothing held, which is when a
        wait without a deadline is safe."""
        with self.owner.gate.exclusive():
            self.alone = True
            try:
                for h in self.owner.handles:
                    self.release(h)
                self.mirror("emptying the owner")
                if self.rng.randrange(2):
                    self.t.count("blocking")
                    self.blocking_wait()
                for _ in range(self.rng.randrange(16)):
                    self.step()
                # One owner at a time, across all processes, may also wait
                # without a deadline while it holds locks: whoever it waits for
                # then either waits with a deadline or holds nothing, so is
                # bound to let go. The token is a file created exclusively.
                if self.rng.randrange(2) and self.take_token():
                    try:
                        self.wait_while_holding()
                    finally:
                        os.unlink(self.token)
                self.drop_guards()
                self.mirror("dropping the guards")
            finally:
                self.alone = False

    def seed_with(self, kind, sp):
        """The original's ``with lf(writeLock=..., lock_n=...):``: an explicit
        acquire without a deadline on entry, an explicit release of the whole
        span on exit (whatever the span held before), as in 0.0.6."""
        lf = self.handle.obj
        if not self.acquire(kind, sp, call=lambda: lf(writeLock=kind == X, lock_n=sp.seed_api()).__enter__()):
            return
        self.mirror("entering a with")
        self.hold()
        self.release(self.handle, sp, call=lambda: lf.__exit__(None, None, None))

    def take_token(self) -> bool:
        try:
            os.close(os.open(self.token, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def wait_while_holding(self):
        """An untimed upgrade, or an untimed change over what the owner holds
        (several raises, made and waited for one after the other)."""
        self.t.count("blocking_holding")
        reads = [i for i, g in enumerate(self.guards) if g[2] == S]
        r = self.rng.randrange(4)
        sp = self.over_own()
        kind = self.rng.choice((S, X))
        if self.seed_api and r == 0:
            self.seed_with(kind, sp)
        elif not self.seed_api and r == 0 and reads:
            self.upgrade(self.rng.choice(reads), {})
        elif not self.seed_api and r == 1:
            self.new_guard(X, sp, 2 if self.rng.randrange(2) else 3) if False else self.untimed_guard(X, sp)
        elif not self.seed_api and r == 2:
            self.acquire(kind, sp, asyncio_wait=(None, None))
        else:
            self.acquire(kind, sp, blocking=True)
        self.mirror("a wait without a deadline while holding")
        self.hold()

    def untimed_guard(self, kind, sp):
        """A guard by ``read``/``write`` or by ``read_async``/``write_async``,
        without a deadline."""
        lf = self.handle.obj
        self.op()
        if self.rng.randrange(2):
            g = self.attempt(kind, sp, "untimed", lambda: (lf.read if kind == S else lf.write)(sp.api()))
        else:
            g = self.async_guard(kind, sp, None, None)
        if g is None:
            self.abandon()
            return
        self.t.mark(self.owner.row, sp.cols(), kind)
        self.guards.append([g, sp, kind])

    def blocking_wait(self):
        sp = self.random_span()
        kind = self.rng.choice((S, X))
        if self.seed_api:
            if self.rng.randrange(2):
                assert self.acquire(kind, sp, blocking=True)
                self.mirror("a blocking acquire")
                return
            self.seed_with(kind, sp)
            return
        r = self.rng.randrange(4)
        # On a server a wait over several locks takes them one by one in
        # ascending order, holding the first while it waits for the next,
        # so an owner that held nothing can still close a cycle and be the
        # one the server refuses (DeadlockError, counted as a refusal).
        may_deadlock = self.server
        if r == 2:
            assert self.acquire(kind, sp, blocking=True) or may_deadlock
        elif r == 3:
            assert self.acquire(kind, sp, asyncio_wait=(None, None)) or may_deadlock
        else:
            self.untimed_guard(kind, sp)
        self.mirror("a blocking wait")
        self.hold()

    def run(self, until):
        try:
            while time.monotonic() < until:
                if self.rng.randrange(5) == 0:
                    self.alone_steps()
                else:
                    self.session()
            # An explicit lock must not outlive the thread that may release it:
            # a wait without a deadline in another process could be waiting for
            # it while this process waits for that one to end.
            self.release(self.handle)
        finally:
            self.loop.close()


def backend_pid(obj, probe, index: int) -> int:
    """PostgreSQL: the backend pid of ``obj``'s session, found by a lock of its
    own at ``index`` (past the table) that ``probe`` sees."""
    obj.acquire("exclusive", index, blocking=False)
    holder = probe.conflicts(index)
    obj.release(index)
    assert holder is not None and holder.backend_pid, holder
    return holder.backend_pid


def worker(table_path, path, mode, p, seed, until):
    """One worker process: THREADS threads over its owners (``path`` is the
    server target in ``"postgres"`` mode)."""
    t = Table(table_path, mode, p)
    shm = path if mode in ("shm", "seed-shm") else None
    probes = []
    if mode in ("ofd", "shm", "flock", "postgres"):
        # Threads 0 and 1 share one object (one owner of two threads,
        # which share its locks: the oracle judges owners), thread 2 has
        # its own.
        if mode == "postgres":
            objs = [LocksFile(path, threads="share") for _ in range(2)]
            probes = [LocksFile(path)]
            handles = [
                Handle(o, None, probe=probes[0], backend=backend_pid(o, probes[0], 1000 + 2 * p + i))
                for i, o in enumerate(objs)
            ]
        else:
            objs = [LocksFile(path, mode=mode, threads="share") for _ in range(2)]
            handles = [Handle(o, o.fileno(), shm) for o in objs]
        owners = [Owner(2 * p, [handles[0]], 2), Owner(2 * p + 1, [handles[1]], 1)]
        plan = [(owners[0], handles[0]), (owners[0], handles[0]), (owners[1], handles[1])]
    elif mode == "seed-shm":
        # Each object is an owner of its own, used by one thread.
        objs = [Seed(path, mode="shm") for _ in range(THREADS)]
        handles = [Handle(o, None, shm) for o in objs]
        owners = [Owner(THREADS * p + i, [h], 1) for i, h in enumerate(handles)]
        plan = [(o, o.handles[0]) for o in owners]
    else:
        # One owner per process; every thread has an object of its own
        # (they compose). A process-mode object opened first lends its
        # descriptor, through which the owner's locks are all taken, to
        # read the kernel's list from.
        probe = LocksFile(path, mode="process")
        fd = probe.fileno()
        if mode == "process":
            objs = [LocksFile(path, mode="process", threads="share") for _ in range(THREADS)]
        else:
            objs = [Seed(path) for _ in range(THREADS)]
        handles = [Handle(o, fd) for o in objs]
        owners = [Owner(p, handles, THREADS)]
        plan = [(owners[0], h) for h in handles]

    def thread_main(th, owner, handle):
        try:
            rng = random.Random(seed * 1000 + p * THREADS + th)
            w = Worker(t, owner, handle, mode, rng, table_path + ".token")
            w.run(until)
            w.drop_guards()
        except BaseException:  # noqa: BLE001 - counted and shown
            t.count("errors")
            print(f"worker {p}.{th} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        finally:
            t.count("done")

    threads = [threading.Thread(target=thread_main, args=(th, o, h)) for th, (o, h) in enumerate(plan)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    # Every thread is done: empty the explicit layers; the kernel must then
    # hold nothing for any owner of this process.
    for o in owners:
        for h in o.handles:
            with h.lock:
                for c in range(COLS):
                    if h.layer[c] is not None:
                        t.unmark(o.row, range(c, c + 1), h.layer[c])
                        h.layer[c] = None
                h.obj.release()
        left = o.handles[0].engine_row()
        if left != [None] * COLS:
            print(f"owner {o.row} holds after releasing all: {left}", file=sys.stderr, flush=True)
            t.count("leftover")
    for obj in objs + probes:
        if isinstance(obj, LocksFile):
            obj.close()
    t.close()


STRESS_MODES = ["ofd", "process", "seed", "shm", "seed-shm", "flock", "postgres"]


SERVER = os.environ.get("LOCKSFILE_TEST_PG")


def left_over(mode, path, engine) -> int:
    """What is left in the engine once every owner is gone, seen from a fresh
    object (and ``/proc/locks`` for a file)."""
    if mode == "postgres":
        with contextlib.closing(LocksFile(path)) as fresh:
            locks = fresh._server_locks()
        for lk in locks:
            print(f"left on the server: {lk}")
        return len(locks)
    n = len(support.mode_locks(path, engine))
    with contextlib.closing(LocksFile(path, mode=engine)) as fresh:
        holder = fresh.conflicts("exclusive", slice(0, None))
        if holder is not None:
            print(f"left in the kernel: {holder.span} {holder.kind} pid {holder.pid}")
            n += 1
    return n


@pytest.mark.parametrize("mode", STRESS_MODES)
def test_stress(tmp_path, mode):
    secs = float(os.environ.get("LOCKSFILE_STRESS_SECS", "3"))
    seed = int(os.environ.get("LOCKSFILE_STRESS_SEED", "24301")) + STRESS_MODES.index(mode)
    engine = {"shm": "shm", "seed-shm": "shm", "flock": "flock", "postgres": "postgres"}.get(mode, "ofd")
    if mode == "postgres":
        if not SERVER:
            if os.environ.get("LOCKSFILE_REQUIRE_PG"):
                raise RuntimeError("LOCKSFILE_TEST_PG is not set but LOCKSFILE_REQUIRE_PG is")
            pytest.skip("no PostgreSQL server (set LOCKSFILE_TEST_PG)")
        path = f"{SERVER}?name=py-stress-{os.getpid()}"
    else:
        path = tmp_path / "stress.lock"
        LocksFile(path, mode=engine).close()  # create the file before anyone races to
    table_path = tmp_path / "claims"
    table_path.write_bytes(b"\0" * table_size(mode))
    t = Table(table_path, mode, 0)

    # Every worker stops at ``until`` (CLOCK_MONOTONIC is system-wide), so
    # the spawned one, slower to start, just runs a little less.
    until = time.monotonic() + secs
    procs = []
    for p in range(PROCS):
        ctx = multiprocessing.get_context("spawn" if p == PROCS - 1 else "fork")
        pr = ctx.Process(target=worker, args=(os.fspath(table_path), os.fspath(path), mode, p, seed, until))
        pr.start()
        procs.append(pr)

    hangs = 0
    errors = 0
    limit = until + secs + 10.0
    for p, pr in enumerate(procs):
        pr.join(max(0.0, limit - time.monotonic()))
        if pr.is_alive():
            if engine == "shm":
                from pylocksfile import _native

                print(f"worker {p} (pid {pr.pid}) stuck; the table: {_native._shm_table(os.fspath(path))}")
            elif engine == "postgres":
                with contextlib.closing(LocksFile(path)) as fresh:
                    print(f"worker {p} (pid {pr.pid}) stuck; locks on the server: {fresh._server_locks()}")
            else:
                print(f"worker {p} stuck; locks on the file: {support.kernel_locks(path)}")
            pr.kill()
            pr.join(support.DEFAULT_TIMEOUT)
            hangs += max(1, THREADS - t.get(p, "done"))
        elif pr.exitcode != 0:
            errors += 1

    # All owners are gone: a fresh one must find everything free.
    leftover = t.total("leftover") + left_over(mode, path, engine)

    ops, violations, mismatches = t.total("ops"), t.total("violations"), t.total("mismatches")
    errors += t.total("errors")
    summary = (
        f"stress {mode}: {ops} operations, {violations} violations, {mismatches} mismatches, "
        f"{hangs} hangs, {leftover} leftover, {errors} errors "
        f"({t.total('refused')} refused, {t.total('refused_over_own')} of them over own locks, "
        f"untimed waits: {t.total('blocking')} holding nothing, {t.total('blocking_holding')} holding locks; "
        f"waits: {t.waits()}; {secs} s, seed {seed})"
    )
    print(summary)
    # Shown at the end of every run (see conftest.py), captured or not.
    support.SUMMARIES.append(summary)
    refused_over_own = t.total("refused_over_own")
    granted = {k: t.total(f"{k}: granted") for k in KINDS}
    t.close()
    assert violations == 0, "owners held conflicting locks"
    assert mismatches == 0, "the engine disagreed with an owner's claims"
    assert hangs == 0, "workers stuck"
    assert leftover == 0, "locks left in the engine"
    assert errors == 0, "workers failed"
    # The run must have done its job: operations, changes refused part-way
    # over locks the owner held, and waits of every kind (the seed API has
    # but two).
    assert ops > 1000, f"only {ops} operations"
    assert refused_over_own > 0, "no change refused over own locks"
    kinds = ("non-blocking", "untimed") if mode.startswith("seed") else KINDS
    for k in kinds:
        assert granted[k] > 0, f"no {k} wait was granted"
