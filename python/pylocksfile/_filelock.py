"""``filelock``'s classes over ``flock(2)``: ``FileLock``, ``ReadWriteLock``, ``Timeout``.

Moving from ``filelock`` is one import: ``from pylocksfile import FileLock,
Timeout``. The lock is the one ``filelock.FileLock`` (``UnixFileLock``),
``flock(1)``, ``portalocker`` and ``fcntl.flock`` take, on the whole file,
so a fleet running both packages stays mutually excluded. Waits sleep in
the kernel (``LocksFile``'s flock mode) instead of polling, the lock file's
content and mode are never changed, and it is never removed.

``ReadWriteLock`` keeps ``filelock``'s method names and rules, but takes
shared and exclusive ``flock(2)`` locks on the file where ``filelock``'s
own ``ReadWriteLock`` holds a SQLite transaction on a database at that
path: the two never exclude each other, so move every process at once.
"""

import contextlib
import errno
import math
import os
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Dict, Literal, Optional

from ._errors import LockTimeout, WouldBlockError
from ._native import LocksFile

__all__ = ["AcquireReturnProxy", "FileLock", "ReadWriteLock", "Timeout"]

#: flock(2) has one span: the whole file.
_WHOLE = slice(None)

#: filelock's "no mode given": the file is created 0o666 less the umask.
_UNSET_MODE = -1


class Timeout(LockTimeout):
    """``filelock.Timeout``: the lock was not had within the timeout (or at
    once, for a non-blocking call). A :class:`LockTimeout`, so also a
    ``TimeoutError`` and an ``OSError`` (``errno`` ``ETIMEDOUT``,
    ``filename`` the lock file); ``lock_file`` is the path, as there."""

    def __init__(self, lock_file: str, holder: Optional[str] = None) -> None:
        super().__init__(errno.ETIMEDOUT, f"The file lock '{lock_file}' could not be acquired.", lock_file)
        self._lock_file = lock_file
        self._holder = holder

    @property
    def lock_file(self) -> str:
        """The path of the lock file."""
        return self._lock_file

    def __str__(self) -> str:
        return f"The file lock '{self._lock_file}' could not be acquired."

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._lock_file!r})"

    def __reduce__(self) -> Any:
        return type(self), (self._lock_file, self._holder)


class AcquireReturnProxy:
    """What ``acquire`` returns: ``with lock.acquire():`` releases one level
    at the end of the block (the lock itself is bound by ``as``)."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def __enter__(self) -> Any:
        return self.lock

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    return float(value)


def _check_blocking(blocking: Any) -> None:
    if not isinstance(blocking, bool):
        raise TypeError(f"blocking must be a bool, not {type(blocking).__name__}")


def _canonical(path: "str | os.PathLike[str]") -> str:
    """The lock path with its directory resolved (the name itself is not:
    a symbolic link there is refused, as by filelock's ``O_NOFOLLOW``)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for
    every thread at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _take(lf: LocksFile, kind: Literal["shared", "exclusive"], path: str, timeout: float, blocking: bool,
          cancel_check: Optional[Callable[[], bool]], poll_interval: float) -> None:
    """``kind`` on the whole file, waiting in the kernel as ``timeout`` and
    ``blocking`` say; ``Timeout`` when refused. With ``cancel_check`` the
    wait is cut in ``poll_interval`` slices, asking it between them."""
    try:
        if not blocking or timeout == 0:
            lf.acquire(kind, _WHOLE, blocking=False)
            return
        deadline = None if timeout < 0 or math.isinf(timeout) else time.monotonic() + timeout
        if cancel_check is None:
            lf.acquire(kind, _WHOLE, timeout=None if deadline is None else timeout)
            return
        while True:
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0 or cancel_check():
                raise Timeout(path)
            try:
                lf.acquire(kind, _WHOLE, timeout=max(min(poll_interval, left), 0.001))
                return
            except LockTimeout:
                pass
    except (WouldBlockError, LockTimeout) as e:
        if isinstance(e, Timeout):
            raise
        raise Timeout(path) from None


#: Per thread: canonical path -> id of the FileLock holding it, so that a
#: second instance's endless wait on a file this thread holds raises
#: instead of hanging, as in filelock.
_THREAD_HOLDS = threading.local()


def _thread_holds() -> Dict[str, int]:
    held = getattr(_THREAD_HOLDS, "held", None)
    if held is None:
        held = _THREAD_HOLDS.held = {}
    return held


class _Hold:
    """One thread's state of a FileLock (all threads' with ``thread_local=False``)."""

    def __init__(self, timeout: float, blocking: bool, poll_interval: float) -> None:
        self.timeout = timeout
        self.blocking = blocking
        self.poll_interval = poll_interval
        self.lf: Optional[LocksFile] = None
        self.counter = 0
        self.key: Optional[str] = None
        self.registry: Optional[Dict[str, int]] = None


class _Singletons(type):
    """``is_singleton=True``: one instance per class and lock path; asking
    again with other settings raises ``ValueError``, as in filelock."""

    def __init__(cls, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls._instances: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
        cls._instances_lock = threading.Lock()

    def __call__(cls, lock_file: Any, *args: Any, **kwargs: Any) -> Any:
        # Building an instance opens nothing, so a candidate is cheap to
        # compare with the cached one.
        made = super().__call__(lock_file, *args, **kwargs)
        if not made.is_singleton:
            return made
        key = _canonical(lock_file)
        with cls._instances_lock:
            cached = cls._instances.get(key)
            if cached is None:
                cls._instances[key] = made
                return made
        if cached._settings() != made._settings():
            raise ValueError(
                "Singleton lock instances cannot be initialized with differing arguments: "
                f"the existing lock has {cached._settings()}, got {made._settings()}"
            )
        return cached


class FileLock(contextlib.ContextDecorator, metaclass=_Singletons):
    """``filelock.FileLock``: an exclusive ``flock(2)`` lock on the whole
    file, reentrant (a counter; the lock goes at the last ``release``),
    usable as ``with lock:``, ``with lock.acquire(timeout=...):`` and as a
    decorator.

    ``FileLock(lock_file, timeout=-1, mode=-1, thread_local=True, *,
    blocking=True, is_singleton=False, poll_interval=0.05, lifetime=None,
    on_acquired=None, ...)``, filelock's arguments:

    * ``timeout``: default wait of ``acquire`` in seconds; negative or
      ``inf`` without limit, ``0`` one try. ``Timeout`` when it passes.
    * ``mode``: permission bits of a file this lock creates (default
      ``0o666`` less the umask, as filelock); an existing file keeps its
      own. The file's content is never touched and it is never removed.
      Missing parent directories are created, as by filelock.
    * ``thread_local=True``: each thread has its own state, opening the file
      itself (an open file description of its own), so threads exclude each
      other and each has its own counter. ``False``: one state for all
      threads, a counter they share, so another thread's ``acquire`` of a
      held lock nests instead of waiting, as in filelock.
    * ``poll_interval``: nothing polls (waits sleep in the kernel and wake
      on the release); it only spaces the calls of ``cancel_check``.
    * ``lifetime``: a kernel lock cannot expire; a value other than None is
      ignored with a warning, as by filelock's native locks.
    * ``on_acquired(fd)``: called once per physical acquisition with the
      descriptor holding the lock; if it raises, the lock is released.
    * ``context_error_policy``, ``close_error_policy``, ``fallback_to_soft``
      and ``preserve_lock_file`` are accepted and have nothing to change:
      errors chain, a close error is the kernel's, ``flock(2)`` always
      exists on Linux, and the file is always kept.

    A lock held when its thread ends (or when the object is collected) is
    released as its file closes.
    """

    def __init__(
        self,
        lock_file: "str | os.PathLike[str]",
        timeout: float = -1,
        mode: int = _UNSET_MODE,
        thread_local: bool = True,
        *,
        blocking: bool = True,
        is_singleton: bool = False,
        poll_interval: float = 0.05,
        lifetime: Optional[float] = None,
        context_error_policy: str = "chain",
        close_error_policy: str = "default",
        fallback_to_soft: bool = True,
        preserve_lock_file: bool = False,
        on_acquired: Optional[Callable[[int], None]] = None,
    ) -> None:
        _check_blocking(blocking)
        timeout = _seconds("timeout", timeout)
        poll_interval = _seconds("poll_interval", poll_interval)
        if poll_interval < 0 or not math.isfinite(poll_interval):
            raise ValueError(f"poll_interval must be finite and non-negative, not {poll_interval!r}")
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise TypeError(f"mode must be an int, not {type(mode).__name__}")
        if mode != _UNSET_MODE and (not 0 <= mode <= 0o777 or mode & 0o600 != 0o600):
            raise ValueError(f"mode must be within 0o000-0o777 and let the owner read and write, got {mode:#o}")
        if lifetime is not None:
            warnings.warn(
                f"lifetime={lifetime!r} ignored: {type(self).__name__} takes a kernel lock, which "
                "cannot be broken safely by file age",
                UserWarning,
                stacklevel=3,
            )
        self._lock_file = os.fspath(lock_file)
        self._mode = mode
        self._thread_local = bool(thread_local)
        self._is_singleton = bool(is_singleton)
        self._on_acquired = on_acquired
        self._defaults = (timeout, blocking, poll_interval)
        if self._thread_local:
            self._local = threading.local()
            self._shared: Optional[_Hold] = None
        else:
            self._shared = _Hold(*self._defaults)
        # One thread at a time changes a shared state (thread_local=False).
        self._mutex = threading.Lock()

    def _settings(self) -> tuple:
        return (self._thread_local, self._mode, *self._defaults, self._on_acquired)

    def _hold(self) -> _Hold:
        if self._shared is not None:
            return self._shared
        hold = getattr(self._local, "hold", None)
        if hold is None:
            hold = self._local.hold = _Hold(*self._defaults)
        return hold

    def acquire(
        self,
        timeout: Optional[float] = None,
        poll_interval: Optional[float] = None,
        *,
        poll_intervall: Optional[float] = None,
        blocking: Optional[bool] = None,
        cancel_check: Optional[Callable[[], bool]] = None,
    ) -> AcquireReturnProxy:
        """Take the lock, or nest one level deeper if this state holds it.

        ``timeout`` (default: the lock's) in seconds, negative for no
        limit; ``blocking=False`` (default: the lock's) tries once. Raises
        ``Timeout`` when refused. ``cancel_check``, asked every
        ``poll_interval`` seconds while waiting, gives up with ``Timeout``
        when it returns True. Returns a proxy for ``with``.
        """
        hold = self._hold()
        if poll_intervall is not None:
            warnings.warn("use poll_interval instead of poll_intervall", DeprecationWarning, stacklevel=2)
            poll_interval = poll_intervall
        timeout = _seconds("timeout", hold.timeout if timeout is None else timeout)
        blocking = hold.blocking if blocking is None else blocking
        _check_blocking(blocking)
        poll_interval = _seconds("poll_interval", hold.poll_interval if poll_interval is None else poll_interval)
        if math.isnan(timeout) and blocking:
            raise ValueError("timeout must be a number of seconds, not nan")
        if self._shared is None:
            self._first_or_nested(hold, timeout, blocking, cancel_check, poll_interval)
            return AcquireReturnProxy(self)
        # A shared state: wait for the thread changing it, within the timeout.
        if not blocking:
            got = self._mutex.acquire(blocking=False)
        else:
            got = self._mutex.acquire(timeout=-1 if timeout < 0 or math.isinf(timeout) else timeout)
        if not got:
            raise Timeout(self._lock_file)
        try:
            self._first_or_nested(hold, timeout, blocking, cancel_check, poll_interval)
        finally:
            self._mutex.release()
        return AcquireReturnProxy(self)

    def _first_or_nested(self, hold: _Hold, timeout: float, blocking: bool,
                         cancel_check: Optional[Callable[[], bool]], poll_interval: float) -> None:
        if hold.lf is not None:
            hold.counter += 1
            return
        key = _canonical(self._lock_file)
        registry = _thread_holds()
        if blocking and (timeout < 0 or math.isinf(timeout)) and registry.get(key, id(self)) != id(self):
            raise RuntimeError(
                f"Deadlock: lock '{self._lock_file}' is already held by a different "
                f"{type(self).__name__} instance in this thread. Use is_singleton=True to enable "
                "reentrant locking across instances."
            )
        lf = self._open()
        try:
            _take(lf, "exclusive", self._lock_file, timeout, blocking, cancel_check, poll_interval)
            if self._on_acquired is not None:
                self._on_acquired(lf.fileno())
        except BaseException:
            lf.close()
            raise
        hold.lf, hold.counter, hold.key, hold.registry = lf, 1, key, registry
        registry[key] = id(self)

    def _open(self) -> LocksFile:
        parent = os.path.dirname(self._lock_file)
        if parent:
            os.makedirs(parent, exist_ok=True)
        mode = 0o666 & ~_umask() if self._mode == _UNSET_MODE else self._mode
        return LocksFile(self._lock_file, "flock", permissions=mode)

    def release(self, force: bool = False) -> None:
        """Leave one level (every level with ``force``); the lock goes when
        none is left. Releasing what is not held does nothing."""
        hold = self._hold()
        if self._shared is None:
            self._leave(hold, force)
            return
        with self._mutex:
            self._leave(hold, force)

    def _leave(self, hold: _Hold, force: bool) -> None:
        if hold.lf is None:
            return
        hold.counter = 0 if force else hold.counter - 1
        if hold.counter > 0:
            return
        lf, hold.lf = hold.lf, None
        if hold.registry is not None and hold.key is not None and hold.registry.get(hold.key) == id(self):
            del hold.registry[hold.key]
        hold.registry = hold.key = None
        lf.close()

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def is_locked(self) -> bool:
        """Whether this state (this thread's, with ``thread_local=True``) holds the lock."""
        return self._hold().lf is not None

    @property
    def lock_counter(self) -> int:
        """How many ``acquire`` calls of this state are not yet released."""
        return self._hold().counter

    @property
    def lock_file(self) -> str:
        """The path of the lock file, as given."""
        return self._lock_file

    @property
    def timeout(self) -> float:
        """The default timeout of ``acquire`` (this thread's, with ``thread_local=True``)."""
        return self._hold().timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._hold().timeout = _seconds("timeout", value)

    @property
    def blocking(self) -> bool:
        """Whether ``acquire`` waits by default."""
        return self._hold().blocking

    @blocking.setter
    def blocking(self, value: bool) -> None:
        _check_blocking(value)
        self._hold().blocking = value

    @property
    def poll_interval(self) -> float:
        """How often a ``cancel_check`` is asked while waiting (nothing polls the lock)."""
        return self._hold().poll_interval

    @poll_interval.setter
    def poll_interval(self, value: float) -> None:
        self._hold().poll_interval = _seconds("poll_interval", value)

    @property
    def mode(self) -> int:
        """The permission bits asked for a created file (``0o644`` when none were, as filelock reports)."""
        return 0o644 if self._mode == _UNSET_MODE else self._mode

    @property
    def has_explicit_mode(self) -> bool:
        """Whether ``mode`` was given."""
        return self._mode != _UNSET_MODE

    @property
    def is_singleton(self) -> bool:
        """Whether this is the one instance for its path (``is_singleton=True``)."""
        return self._is_singleton

    @property
    def lifetime(self) -> None:
        """Always None: a kernel lock does not expire."""
        return None

    def is_thread_local(self) -> bool:
        """Whether each thread has its own state (``thread_local=True``)."""
        return self._thread_local

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._lock_file!r}, locked={self.is_locked})"


#: filelock's name for the Unix lock; the same class here.
UnixFileLock = FileLock


class ReadWriteLock(metaclass=_Singletons):
    """``filelock.ReadWriteLock``'s interface over ``flock(2)``: shared
    (``acquire_read``, ``read_lock()``) or exclusive (``acquire_write``,
    ``write_lock()``) on the whole file, reentrant in the mode held.

    ``ReadWriteLock(lock_file, timeout=-1, *, blocking=True,
    is_singleton=True)``. As in filelock, an instance coordinates
    processes, not threads: threads of one instance share its read levels,
    a write lock belongs to the thread that took it, asking for the other
    mode than the one held raises ``RuntimeError`` (no upgrade or
    downgrade), and threads that must wait for each other each need an
    instance of their own (``is_singleton=False``).

    The lock is ``flock(2)`` on the file itself (any file: its content is
    never touched), which ``FileLock`` and ``flock(1) -s``/``-x`` on it
    meet; filelock's own ``ReadWriteLock`` holds a SQLite transaction on a
    database at the path instead, and the two never exclude each other.
    """

    def __init__(self, lock_file: "str | os.PathLike[str]", timeout: float = -1, *,
                 blocking: bool = True, is_singleton: bool = True) -> None:
        _check_blocking(blocking)
        self.lock_file = os.fspath(lock_file)
        self.timeout = _seconds("timeout", timeout)
        self.blocking = blocking
        self._is_singleton = bool(is_singleton)
        self._lf: Optional[LocksFile] = None
        self._mode: Optional[str] = None
        self._write_thread: Optional[int] = None
        self._read_depths: Dict[int, int] = {}
        self._level = 0
        # Serialises the changes of state (and the kernel wait of the first level).
        self._transition = threading.Lock()
        self._closed = False

    @property
    def is_singleton(self) -> bool:
        """Whether this is the one instance for its path (``is_singleton=True``, the default)."""
        return self._is_singleton

    def _settings(self) -> tuple:
        return (self.timeout, self.blocking)

    @classmethod
    def get_lock(cls, lock_file: "str | os.PathLike[str]", timeout: float = -1, *,
                 blocking: bool = True) -> "ReadWriteLock":
        """The singleton instance for ``lock_file``."""
        return cls(lock_file, timeout, blocking=blocking)

    def acquire_read(self, timeout: Optional[float] = None, *, blocking: Optional[bool] = None) -> AcquireReturnProxy:
        """A shared lock, or one more level of the one held; ``Timeout`` when refused."""
        return self._acquire("read", timeout, blocking)

    def acquire_write(self, timeout: Optional[float] = None, *, blocking: Optional[bool] = None) -> AcquireReturnProxy:
        """An exclusive lock, or one more level of the one this thread holds; ``Timeout`` when refused."""
        return self._acquire("write", timeout, blocking)

    @contextlib.contextmanager
    def read_lock(self, timeout: Optional[float] = None, *, blocking: Optional[bool] = None) -> Any:
        """``with rw.read_lock():``: a shared level for the block."""
        self.acquire_read(timeout, blocking=blocking)
        try:
            yield
        finally:
            self.release()

    @contextlib.contextmanager
    def write_lock(self, timeout: Optional[float] = None, *, blocking: Optional[bool] = None) -> Any:
        """``with rw.write_lock():``: an exclusive level for the block."""
        self.acquire_write(timeout, blocking=blocking)
        try:
            yield
        finally:
            self.release()

    def _acquire(self, mode: str, timeout: Optional[float], blocking: Optional[bool]) -> AcquireReturnProxy:
        timeout = _seconds("timeout", self.timeout if timeout is None else timeout)
        blocking = self.blocking if blocking is None else blocking
        _check_blocking(blocking)
        if math.isnan(timeout) and blocking:
            raise ValueError("timeout must be a number of seconds, not nan")
        forever = timeout < 0 or math.isinf(timeout)
        if self._closed:
            raise RuntimeError(f"ReadWriteLock on {self.lock_file} is closed")
        if not blocking:
            got = self._transition.acquire(blocking=False)
        else:
            got = self._transition.acquire(timeout=-1 if forever else timeout)
        if not got:
            raise Timeout(self.lock_file)
        try:
            me = threading.get_ident()
            if self._level > 0:
                self._nest(mode, me)
                return AcquireReturnProxy(self)
            parent = os.path.dirname(self.lock_file)
            if parent:
                os.makedirs(parent, exist_ok=True)
            lf = LocksFile(self.lock_file, "flock", permissions=0o666 & ~_umask())
            try:
                _take(lf, "shared" if mode == "read" else "exclusive", self.lock_file,
                      timeout, blocking, None, 0.05)
            except BaseException:
                lf.close()
                raise
            self._lf, self._mode, self._level = lf, mode, 1
            if mode == "write":
                self._write_thread = me
            else:
                self._read_depths = {me: 1}
            return AcquireReturnProxy(self)
        finally:
            self._transition.release()

    def _nest(self, mode: str, me: int) -> None:
        if mode != self._mode:
            if me == self._write_thread or me in self._read_depths:
                direction = "downgrade" if mode == "read" else "upgrade"
                reason = f"already holding a {self._mode} lock ({direction} not allowed)"
            else:
                reason = (
                    f"another thread holds a {self._mode} lock on this instance, which coordinates "
                    "processes rather than threads; give each thread its own instance with is_singleton=False"
                )
            raise RuntimeError(f"Cannot acquire {mode} lock on {self.lock_file} (lock id: {id(self)}): {reason}")
        if mode == "write" and me != self._write_thread:
            raise RuntimeError(
                f"Cannot acquire write lock on {self.lock_file} (lock id: {id(self)}) "
                f"from thread {me} while it is held by thread {self._write_thread}"
            )
        if mode == "read":
            self._read_depths[me] = self._read_depths.get(me, 0) + 1
        self._level += 1

    def release(self, *, force: bool = False) -> None:
        """Leave one level (all with ``force``); the file's lock goes with
        the last. ``RuntimeError`` when this thread holds no level."""
        with self._transition:
            me = threading.get_ident()
            if not force:
                if self._level == 0:
                    raise RuntimeError(f"Cannot release a lock on {self.lock_file} (lock id: {id(self)}) that is not held")
                if self._mode == "write" and me != self._write_thread:
                    raise RuntimeError(
                        f"Cannot release write lock on {self.lock_file} (lock id: {id(self)}) "
                        f"from thread {me} while it is held by thread {self._write_thread}"
                    )
                if self._mode == "read" and me not in self._read_depths:
                    raise RuntimeError(
                        f"Cannot release read lock on {self.lock_file} (lock id: {id(self)}) "
                        f"from thread {me}, which does not hold it"
                    )
                if self._level > 1:
                    self._level -= 1
                    if self._mode == "read":
                        depth = self._read_depths.pop(me) - 1
                        if depth:
                            self._read_depths[me] = depth
                    return
            lf, self._lf = self._lf, None
            self._mode, self._write_thread, self._read_depths, self._level = None, None, {}, 0
            if lf is not None:
                lf.close()

    def close(self) -> None:
        """Release every level and make the instance unusable."""
        self.release(force=True)
        self._closed = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.lock_file!r}, {self._mode or 'unlocked'})"
