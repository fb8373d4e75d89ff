"""Exceptions raised by pylocksfile.

Everything the lock machinery raises derives from :class:`LocksfileError`
(an :class:`OSError`), and each class also derives from the built-in
exception that fits it, so ``except BlockingIOError`` or
``except TimeoutError`` work as well. Failures of plain system calls
(opening a missing file with ``create=False``, say) are the usual
:class:`OSError` subclasses such as :class:`FileNotFoundError`.

The original package's :class:`IllegalArgumentError` and
:class:`IllegalWithStatement` are :class:`ValueError` subclasses, as there.
"""

from typing import Optional

__all__ = [
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
    "IllegalArgumentError",
    "IllegalWithStatement",
    "NoLockWarning",
]


class LocksfileError(OSError):
    """Base class of every error of the lock machinery."""


class WouldBlockError(LocksfileError, BlockingIOError):
    """Another owner holds a conflicting lock and the call was not to wait.

    ``holder`` is the conflicting lock as the kernel reported it (a
    :class:`pylocksfile.Holder`), or None when it could not be named (it may
    have gone already). ``holder_span``, ``holder_kind`` and ``holder_pid``
    are shortcuts to its fields (None without a holder).
    """

    holder = None

    @property
    def holder_span(self) -> Optional[range]:
        """The conflicting lock's indices, or None."""
        return None if self.holder is None else self.holder.span

    @property
    def holder_kind(self) -> Optional[str]:
        """``"shared"`` or ``"exclusive"``, or None."""
        return None if self.holder is None else self.holder.kind

    @property
    def holder_pid(self) -> Optional[int]:
        """The holding process (process-associated and shm locks), or None."""
        return None if self.holder is None else self.holder.pid


class DeadlockError(LocksfileError):
    """Waiting would deadlock (``EDEADLK``): found by the kernel in process
    mode, by the lock table in shm mode (any cycle of owners, such as two
    readers that both upgrade).

    Nothing was acquired (an upgrade keeps its shared lock); release
    something and try again.
    """


class LockTimeout(LocksfileError, TimeoutError):
    """The timeout passed before the lock could be had; nothing was acquired."""


class InvalidSpanError(LocksfileError, ValueError):
    """A span was empty, reversed, negative or beyond the last lock index."""


class ForkedError(LocksfileError):
    """A ``LocksFile`` inherited through ``fork`` was used in the child.

    It does nothing there and never touches the parent's locks; open the
    lock file again in the child.
    """


class ReadOnlyLockFileError(LocksfileError, PermissionError):
    """An exclusive lock was asked of a file that could only be opened read-only."""


class NotRegularFileError(LocksfileError):
    """The lock path names a directory, FIFO, socket, device or symbolic link."""


class UnsupportedError(LocksfileError):
    """The kernel or file system cannot take these locks (``ENOLCK``, no OFD
    locks, or shm mode on a network file system, whose mapped memory is not
    coherent between hosts)."""


class MixedModesError(LocksfileError):
    """The lock file is in use with locks this mode would not exclude (``EBUSY``).

    Opening in shm mode while the file has ``fcntl`` or ``flock`` locks, or
    in another mode while its shm lock table is in use, is refused rather
    than letting the two kinds of lock miss each other. ``filename`` is the
    lock path.
    """


class LockTableError(LocksfileError):
    """The shm sidecar file (``<lock path>-shm``, in ``filename``) is not a
    lock table this version can use: another file, a newer version, the
    wrong size, or a table found corrupt (something wrote over it while in
    use; it is set up afresh once every user has closed the lock file)
    (``EINVAL``). It is left untouched."""


class LockTableFullError(LocksfileError):
    """The shm lock table has no room for another owner, lock piece or
    waiting thread (``ENOLCK``); nothing was changed."""


class IllegalArgumentError(ValueError):
    """A bad argument to the original ``pylocksfile`` API; the object stays usable."""


class IllegalWithStatement(ValueError):
    """``with lf:`` without a call: use ``with lf(writeLock=..., lock_n=...):``."""


class NoLockWarning(UserWarning):
    """A ``with LocksFile(...):`` block ran without taking any lock.

    A ``LocksFile``'s with statement only closes the handle at its end;
    the block it guards is not locked. Emitted at the end of a block that
    took no lock through the handle (and held none at its start), pointing
    at the ``with`` line. Take a lock in the block (``with lf.write(0):``)
    or use :class:`pylocksfile.FileLock`, whose with statement locks the
    file as ``filelock``'s does. ``-W error::pylocksfile.NoLockWarning``
    makes it an error.
    """
