"""Named, file-backed, byte-range reader/writer locks for processes on Linux.

Lock ``n`` is byte ``n`` of a lock file, locked with ``fcntl`` record locks;
the file's content is never touched. Two APIs share one native core:

* :class:`pylocksfile`, a drop-in for the original ``pylocksfile`` 0.0.6
  package (process-associated locks, ``acquire``/``release`` returning
  booleans, ``with lf(writeLock=..., lock_n=...):``);
* :class:`LocksFile`, for new code: OFD locks by default (threads with
  separate objects exclude each other), guards, timeouts, typed errors;
* :class:`FileLock`, :class:`ReadWriteLock` and :class:`Timeout`, the
  ``filelock`` package's, over ``flock(2)`` (a one-line import change).

>>> from pylocksfile import LocksFile
>>> with LocksFile() as lf, lf.write(range(0, 10)):
...     pass
"""

from ._errors import (
    DeadlockError,
    ForkedError,
    IllegalArgumentError,
    IllegalWithStatement,
    InvalidSpanError,
    LocksfileError,
    LockTableError,
    LockTableFullError,
    LockTimeout,
    MixedModesError,
    NoLockWarning,
    NotRegularFileError,
    ReadOnlyLockFileError,
    UnsupportedError,
    WouldBlockError,
)
from ._filelock import FileLock, ReadWriteLock, Timeout
from ._native import INDEX_END, Guard, Holder, LocksFile, __version__, pylocksfile

__all__ = [
    "pylocksfile",
    "IllegalArgumentError",
    "IllegalWithStatement",
    "LocksFile",
    "Guard",
    "Holder",
    "INDEX_END",
    "LocksfileError",
    "WouldBlockError",
    "DeadlockError",
    "LockTimeout",
    "InvalidSpanError",
    "ForkedError",
    "ReadOnlyLockFileError",
    "NotRegularFileError",
    "UnsupportedError",
    "MixedModesError",
    "LockTableError",
    "LockTableFullError",
    "NoLockWarning",
    "FileLock",
    "ReadWriteLock",
    "Timeout",
]
