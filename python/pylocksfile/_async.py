"""asyncio waits for :class:`LocksFile` locks (``read_async``, ``write_async``,
``acquire_async``).

A lock that is free is taken at once on the event loop's thread. Otherwise the
wait runs in a thread of its own (not the loop's default executor, whose
threads outlive the wait) as one wait for the lock, timed or not, so it keeps
its place in a fair queue and deadlock detection sees it: the loop keeps
running, and a cancelled task cancels the wait, which wakes the thread at once
where it sleeps, and waits (asynchronously) for the thread to end. So when
``CancelledError`` reaches the caller the thread has ended, nothing is asleep
in the kernel, and whatever the wait got as the cancellation came has been
given back. Closing the ``LocksFile`` ends the wait the same way (``ValueError``).

The thread takes a guard, for ``acquire_async`` too: a temporary one at the
kind asked for over the span, which raises what the owner holds and lowers
nothing. Only once the task has received it does ``acquire`` make the
explicit acquire (which then only lowers, so it is never refused and never
waits) and release that guard; a cancelled task releases the guard, and the
explicit layer is as it was before the call.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generator, List, Optional, Type

if TYPE_CHECKING:
    from ._native import Guard, _Wait

__all__ = ["GuardRequest", "acquire"]


async def _run(wait: _Wait) -> Any:
    """The Guard once granted (True when the explicit acquire was made at
    once on the loop's thread)."""
    now = wait.try_now()
    if now is not None:
        return now
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: Optional[BaseException]) -> None:
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    # What the thread got, also when no task will take it from `done`.
    got: List[Any] = []

    def work() -> None:
        value: Any = None
        error: Optional[BaseException] = None
        try:
            value = wait.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            error = e
        got.append(value)
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop is closed; the task below gives it back

    thread = threading.Thread(target=work, name="pylocksfile-wait", daemon=True)
    thread.start()
    try:
        # Shielded: a cancelled task must not cancel `done`, which the
        # thread still settles.
        value = await asyncio.shield(done)
    except BaseException as e:
        # Cancelled (or interrupted, or failed): end the wait (it wakes at
        # once), wait for its thread, and give back what it got meanwhile.
        wait.cancel()
        if isinstance(e, asyncio.CancelledError):
            while not done.done():
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    continue  # cancelled again: still wait for the thread
                except BaseException:  # noqa: BLE001 - the cancellation wins
                    break
        # Returns at once once `done` is settled; else as soon as the
        # cancelled wait has returned.
        thread.join()
        if got:
            _give_back(got[0])
        raise
    # The thread settled `done` as its last act, so this join returns at
    # once, and no thread of the wait is left when the caller resumes.
    thread.join()
    return value


def _give_back(value: Any) -> None:
    """Undo a grant nobody will receive: release the guard (an
    ``acquire_async``'s temporary one too, so its explicit acquire is never
    made)."""
    if value is not None:
        value.release()


class GuardRequest:
    """What ``LocksFile.read_async``/``write_async`` return: ``await`` it for a
    :class:`Guard`, or use it in ``async with`` (the guard is released at the
    end of the block). One use only, as a coroutine."""

    __slots__ = ("_wait", "_used", "_guard")

    def __init__(self, wait: _Wait) -> None:
        self._wait = wait
        self._used = False
        self._guard: Optional[Guard] = None

    def _start(self) -> _Wait:
        if self._used:
            raise RuntimeError("this lock request was awaited already; call read_async/write_async again")
        self._used = True
        return self._wait

    def __await__(self) -> Generator[Any, None, Guard]:
        guard: Guard = yield from _run(self._start()).__await__()
        return guard

    async def __aenter__(self) -> Guard:
        guard: Guard = await _run(self._start())
        self._guard = guard.__enter__()
        return guard

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.release()


async def acquire(wait: _Wait) -> None:
    """What ``LocksFile.acquire_async`` returns, awaited."""
    got = await _run(wait)
    if got is True:
        return
    # The task has the thread's guard: no cancellation can come between
    # here and the end of the explicit acquire, which it makes and then
    # releases the guard (released below too, whatever interrupts).
    try:
        wait.commit(got)
    finally:
        got.release()
