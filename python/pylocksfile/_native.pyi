"""Type stubs of the native half of pylocksfile (``pylocksfile._native``)."""

from os import PathLike
from types import TracebackType
from typing import Any, Callable, Coroutine, Dict, Generic, List, Literal, NoReturn, Optional, Tuple, Type, TypeVar, Union, final, overload

from typing_extensions import disjoint_base

from ._async import GuardRequest

__all__ = ["__version__", "INDEX_END", "pylocksfile", "LocksFile", "Guard", "Holder", "_shm_table", "_cap_shm_for_tests"]

__version__: str
INDEX_END: int
"""One past the last lock index (2**63 - 1); spans to the end end here."""

_LockN = Union[int, Tuple[int, int], List[int]]
"""The original's ``lock_n``: an index, or ``(start, count)``."""

_Span = Union[int, range, slice, Tuple[int, int], List[int]]
"""An index, a ``range`` (step 1), a ``slice`` (step 1; open stop: to the end), or ``(start, count)``."""

_KindName = Literal["shared", "exclusive", "read", "write"]

_Mode = Literal["ofd", "process", "flock", "shm"]
"""``LocksFile``'s lock modes."""

_SeedMode = Literal["process", "ofd", "shm"]
"""``pylocksfile``'s lock modes (the numbered ones)."""

_S = TypeVar("_S", bound="pylocksfile")
_L = TypeVar("_L", bound="LocksFile")
_G = TypeVar("_G", bound="Guard")

@disjoint_base
class pylocksfile:
    """Many numbered reader/writer locks in one file; a drop-in for pylocksfile 0.0.6.

    Process-associated locks by default, as in the original (which they
    exclude); ``mode="shm"`` (a shared-memory lock table, sidecar
    ``<locksfile_path>-shm``) or ``mode="ofd"`` make each object its own
    owner and exclude only processes using the same mode. Without a path a
    fresh private lock file is created in ``tempfile.gettempdir()``. An
    existing file is never truncated. ``l_id`` defaults to the pid (as a
    string). Bad arguments raise ``IllegalArgumentError``.
    """

    def __init__(
        self,
        locksfile_path: Union[str, "PathLike[str]", None] = None,
        verbose: bool = False,
        l_id: object = None,
        *,
        mode: _SeedMode = "process",
    ) -> None: ...
    @property
    def mode(self) -> _SeedMode:
        """The lock mode."""
    @property
    def locksfile_path(self) -> str:
        """The lock file's path made absolute as opened (``..`` kept; the kernel resolves it)."""
    @property
    def l_id(self) -> object:
        """The id printed before verbose messages."""
    @property
    def verbose(self) -> bool:
        """Whether to print what is locked, converted and released."""
    @verbose.setter
    def verbose(self, value: bool) -> None: ...
    def acquire(self, writeLock: bool = False, lock_n: _LockN = 0, blocking: bool = True) -> bool:
        """Lock ``lock_n`` shared, or exclusive with ``writeLock=True``; held locks convert in place.

        True when held; False when ``blocking=False`` and busy, or when a
        deadlock is detected (nothing acquired then).
        """
    def release(self, lock_n: Optional[_LockN] = None) -> None:
        """Release ``lock_n``, or everything when None. Harmless on what is not held."""
    def __call__(self: _S, writeLock: bool = False, lock_n: _LockN = 0) -> "_WithStatement[_S]":
        """The context manager of ``with lf(writeLock=..., lock_n=...):``.

        Its ``__enter__``/``__exit__`` call this object's (looked up on the
        type, so a subclass's run); ``as`` binds this object. A call never
        entered leaves nothing behind.
        """
    def __reduce__(self) -> Tuple[Any, ...]:
        """Pickled as its path and arguments, never its locks."""
    def __setstate__(self, state: Tuple[Dict[str, Any], Optional[Dict[str, Any]]]) -> None:
        """Unpickling: opens what ``__reduce__`` recorded."""
    def __enter__(self: _S) -> _S:
        """Acquire the span of the ``with lf(...)`` being entered (blocking);
        ``IllegalWithStatement`` for a bare ``with lf:``, even after a call
        that no ``with`` entered."""
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Literal[False]:
        """Release the span this ``with`` acquired."""

@final
class _WithStatement(Generic[_S]):
    """What ``pylocksfile.__call__`` returns: one ``with`` statement's arguments.

    Other attributes are the ``pylocksfile``'s, as when the call returned it.
    """

    def __getattr__(self, name: str) -> Any: ...

    def __reduce__(self) -> NoReturn:
        """``TypeError``: pass the ``pylocksfile`` object and ``lock_n`` instead."""
    def __enter__(self) -> _S:
        """Acquire through the ``pylocksfile``'s ``__enter__``; returns that object."""
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Literal[False]:
        """Release through the ``pylocksfile``'s ``__exit__``."""

@final
class Holder:
    """A lock another owner holds, as the kernel reported it (a snapshot)."""

    def __new__(cls, span: _Span, kind: _KindName, pid: Optional[int] = None) -> "Holder": ...
    @property
    def span(self) -> range:
        """The indices it covers."""
    @property
    def kind(self) -> Literal["shared", "exclusive"]:
        """Its kind."""
    @property
    def pid(self) -> Optional[int]:
        """The holding process for a process-associated lock or a shm lock, else None."""
    @property
    def backend_pid(self) -> Optional[int]:
        """A PostgreSQL lock's holding session's server process, else None."""
    @property
    def client_addr(self) -> Optional[str]:
        """A PostgreSQL lock's holding client address (None over a Unix socket or for files)."""
    @property
    def application_name(self) -> Optional[str]:
        """A PostgreSQL lock's holding session's application_name, else None."""

@final
class Guard:
    """A lock on a span held until ``release()``, the end of its ``with`` block, or collection.

    Collected while still held and never entered by ``with`` (a bare
    ``lf.write(5)`` statement), it emits a ``ResourceWarning``.

    ``with g:`` blocks of one guard may nest: the outermost block's end
    releases it. A released guard cannot be entered (``RuntimeError``, or
    ``ValueError`` once its ``LocksFile`` is closed): its block would run
    without the lock.

    Inherited through ``fork``, every method raises ``ForkedError`` in the
    child and never touches the parent's lock.
    """

    @property
    def span(self) -> range:
        """The indices held."""
    @property
    def kind(self) -> Optional[Literal["shared", "exclusive"]]:
        """The kind held; None once released or lost (see ``held``)."""
    @property
    def held(self) -> bool:
        """Whether the lock is still held: False once released, and once it
        was taken away (its PostgreSQL session lost, see ``LocksFile.lost()``,
        or a flock conversion of its owner lost)."""
    def release(self) -> None:
        """Release now; harmless when already released.

        Released while another thread upgrades it, the guard stays released:
        that upgrade's wait ends at once, unlocks what it holds and raises
        ``RuntimeError``.
        """
    def upgrade(self: _G, *, blocking: bool = True, timeout: Optional[float] = None) -> _G:
        """Convert shared to exclusive in place; on a conflict, timeout or
        deadlock the shared lock stays. ``blocking=False`` does not wait
        (``timeout`` is ignored): ``WouldBlockError`` on a conflict.

        If another thread releases the guard (``RuntimeError``) or closes its
        ``LocksFile`` (``ValueError``) meanwhile, the wait ends at once, timed
        or not: this call unlocks everything the guard held and raises.

        Deadlocks
        ---------
        Two owners that both hold a shared lock on the same span and both
        upgrade it wait for each other. In process mode the kernel sees that
        and one of them gets ``DeadlockError``; in shm mode the lock table
        sees it between any owners, and the upgrade closing the cycle gets
        ``DeadlockError`` (keeping its shared lock). In OFD (the default) and
        flock mode nothing detects deadlocks: both wait forever. Give such
        upgrades a ``timeout`` (both then raise ``LockTimeout`` and keep
        their shared lock) or use ``blocking=False``, or take the exclusive
        lock at once.
        """
    def downgrade(self: _G) -> _G:
        """Convert exclusive to shared in place; never blocks."""
    def __reduce__(self) -> NoReturn:
        """``TypeError``: pass the ``LocksFile`` and the span instead."""
    def __enter__(self: _G) -> _G: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]] = None,
        exc: Optional[BaseException] = None,
        tb: Optional[TracebackType] = None,
    ) -> Literal[False]: ...

@disjoint_base
class LocksFile:
    """Many numbered reader/writer locks in one file, for new code (OFD locks by default).

    ``mode="shm"`` keeps the locks in a shared-memory table (sidecar file
    ``<path>-shm``): cheaper calls, deadlock detection, fair grants; it
    refuses files in use with kernel locks (``MixedModesError``).
    Threads sharing one object are one owner and do not exclude each other;
    with ``thread_local=True`` (any mode but process) each thread gets its own
    owner, closed when the thread ends. Without a path a private file is
    created, and removed again by ``close()`` or collection.

    Every call but ``close()`` on a closed object raises ``ValueError``; on
    an object inherited through ``fork``, ``ForkedError``.
    """

    def __new__(
        cls: Type[_L],
        path: Union[str, "PathLike[str]", None] = None,
        mode: _Mode = "ofd",
        *,
        create: bool = True,
        permissions: int = 0o644,
        follow_symlinks: bool = False,
        thread_local: bool = False,
        threads: Literal["exclude", "share"] = "exclude",
        on_lost: Optional[Callable[[], object]] = None,
        stats: Optional[bool] = None,
    ) -> _L: ...
    @property
    def path(self) -> str:
        """The lock file's path made absolute as opened (``..`` kept; the kernel resolves it)."""
    @property
    def mode(self) -> Literal["ofd", "process", "flock", "shm", "postgres"]:
        """The lock mode ("postgres" for a server target)."""
    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
    @property
    def writable(self) -> bool:
        """Whether the file could be opened for writing (exclusive locks need it)."""
    def read(self, span: _Span, *, blocking: bool = True, timeout: Optional[float] = None) -> Guard:
        """Wait for a shared lock; ``LockTimeout`` when ``timeout`` seconds pass.
        ``blocking=False`` does not wait (``timeout`` is ignored) and raises
        ``WouldBlockError`` when another owner is in the way."""
    def write(self, span: _Span, *, blocking: bool = True, timeout: Optional[float] = None) -> Guard:
        """Wait for an exclusive lock; ``LockTimeout`` when ``timeout`` seconds pass.
        ``blocking=False`` does not wait (``timeout`` is ignored) and raises
        ``WouldBlockError`` when another owner is in the way."""
    def try_read(self, span: _Span) -> Optional[Guard]:
        """A shared lock if no other owner is in the way, else None."""
    def try_write(self, span: _Span) -> Optional[Guard]:
        """An exclusive lock if no other owner is in the way, else None."""
    def read_for(self, span: _Span, timeout: float) -> Guard:
        """A shared lock, waiting at most ``timeout`` seconds."""
    def write_for(self, span: _Span, timeout: float) -> Guard:
        """An exclusive lock, waiting at most ``timeout`` seconds."""
    def acquire(
        self,
        kind: _KindName,
        span: _Span,
        *,
        blocking: bool = True,
        timeout: Optional[float] = None,
    ) -> None:
        """Lock ``span`` in the explicit layer (last call wins).

        Raises ``WouldBlockError`` (``blocking=False``, which ignores
        ``timeout``), ``LockTimeout``, or ``DeadlockError`` (process and shm
        mode); nothing changes on error.
        """
    def read_async(
        self, span: _Span, *, blocking: bool = True, timeout: Optional[float] = None
    ) -> GuardRequest:
        """A shared lock without blocking the event loop: ``await`` it for a
        ``Guard``, or ``async with lf.read_async(span) as g:``.

        On contention the wait runs in a thread of its own, as one wait for
        the lock (fair queueing and deadlock detection hold for it);
        cancelling the task ends it at once with nothing held and the thread
        gone. ``blocking=False`` tries once, on the loop's thread, and
        raises ``WouldBlockError`` on contention (``timeout`` is ignored).
        """
    def write_async(
        self, span: _Span, *, blocking: bool = True, timeout: Optional[float] = None
    ) -> GuardRequest:
        """As ``read_async``, for an exclusive lock."""
    def acquire_async(
        self, kind: _KindName, span: _Span, *, blocking: bool = True, timeout: Optional[float] = None
    ) -> Coroutine[Any, Any, None]:
        """``acquire`` without blocking the event loop; a cancelled call leaves
        the explicit locks as they were."""
    def release(self, span: Optional[_Span] = None) -> None:
        """Drop explicit locks on ``span`` (all when None); guards keep theirs."""
    def held(self) -> List[Tuple[range, Literal["shared", "exclusive"]]]:
        """What this owner holds, guards and explicit locks together
        (the calling thread's owner with ``thread_local=True``)."""
    def held_explicitly(self) -> List[Tuple[range, Literal["shared", "exclusive"]]]:
        """This object's explicit locks only (the calling thread's with ``thread_local=True``)."""
    def lost(self) -> bool:
        """Whether the server session is lost, and every lock with it (always False for a file)."""
    def fence(self, index: int) -> int:
        """A fencing token for ``index``, held exclusively (server targets): grows with every call."""
    def stats(self) -> Dict[str, Any]:
        """Lock statistics, recorded with ``stats=True`` (or ``LOCKSFILE_STATS=1``):
        ``{"scope": "table" | "handle", "locks": [{"index", "acquired", "contended",
        "timeouts", "deadlocks", "wait_ms": {"p50", "p99", "max", "count", "sum"},
        "hold_ms": {...}}], "owners": [{"pid", "command", ...}]}``. Table-wide for
        ``mode="shm"``, else this object's own; ``index`` None for "other indices".
        """
    @overload
    def conflicts(self, kind_: _KindName, span_: _Span, /) -> Optional[Holder]:
        """The first other owner's lock in the way of ``kind`` (default
        exclusive) on ``span``: ``conflicts(kind, span)`` as ``acquire``
        orders them, ``conflicts(span)``, or by keyword (``span=``,
        ``kind=``). A ``str`` argument is the kind, so the former
        ``conflicts(span, kind)`` still works."""
    @overload
    def conflicts(self, span_: _Span, kind_: Optional[_KindName] = None, /) -> Optional[Holder]: ...
    @overload
    def conflicts(self, kind_: _KindName, /, *, span: _Span) -> Optional[Holder]: ...
    @overload
    def conflicts(self, span_: _Span, /, *, kind: Optional[_KindName] = None) -> Optional[Holder]: ...
    @overload
    def conflicts(self, *, span: _Span, kind: Optional[_KindName] = None) -> Optional[Holder]: ...
    def fileno(self) -> int:
        """The descriptor locks go through (the calling thread's with
        ``thread_local=True``; in shm mode the lock file's, the locks being
        in the table); never close it."""
    def close(self) -> None:
        """Release everything, guards included, and close.

        Calls waiting in other threads (and asyncio waits) end at once with
        ``ValueError`` and hold nothing, timed or not. In a forked child it
        releases nothing.
        """
    def __reduce__(self) -> Tuple[Any, ...]:
        """Pickled as its target, mode and the options given, never its locks."""
    def __enter__(self: _L) -> _L:
        """Takes no lock: ``with LocksFile(p) as lf:`` closes ``lf`` at its end
        (blocks of one ``LocksFile`` may nest, in one thread or several: the
        end of the last one open closes it)."""
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Literal[False]:
        """``close()``. A block that took no lock through the handle (none
        held at its start, none taken, nor the handle pickled, while it
        ran) and did not raise emits ``pylocksfile.NoLockWarning`` at the
        ``with`` line, naming the fix."""

# Not exported by the module: `LocksFile.*_async` make it and hand it to
# `pylocksfile._async`, whose annotations need its name.
@final
class _Wait:
    """One asyncio wait, driven by ``pylocksfile._async``."""

    @property
    def span(self) -> range: ...
    def try_now(self) -> Any: ...
    def wait(self) -> Any: ...
    def cancel(self) -> None: ...
    def commit(self, guard: Guard) -> None: ...

def _shm_table(
    path: Union[str, "PathLike[str]"],
) -> Dict[str, List[Tuple[int, int, int, int, Literal["shared", "exclusive"]]]]:
    """The shm lock table of ``path`` read from outside (not public API):
    ``"holders"`` and ``"waiters"`` as ``(pid, owner, start, stop, kind)``."""

def _cap_shm_for_tests(records: int, owners: int) -> None:
    """Let this process use at most ``records`` lock records and ``owners``
    owner slots of any shm table, so that a test sees a table fill without
    filling gigabytes (not public API)."""
