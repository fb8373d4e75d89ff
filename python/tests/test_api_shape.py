"""One API shape in both languages: ``conflicts(kind, span)`` in the order of
``acquire`` (the former ``conflicts(span, kind)`` and keywords still work),
and ``blocking=False`` wherever ``timeout=`` is taken (it does not wait and
ignores the timeout, as filelock does). The locks in the way are held by
another process."""

import asyncio
import inspect
import time

import pytest

from pylocksfile import LocksFile, LockTimeout, WouldBlockError

# Well under the timeouts given below: a call that waited would take seconds.
AT_ONCE = 1.0


@pytest.fixture
def other(spawn_worker):
    """Another process holding exclusive 2..4 and shared 5 (OFD locks)."""
    w = spawn_worker()
    w.exec("o = LocksFile(path); g = o.write((2, 2)); r = o.read(5)")
    return w


def test_conflicts_takes_kind_then_span_as_acquire_does(lock_path, other):
    lf = LocksFile(lock_path)
    forms = {
        "kind, span": lambda k, s: lf.conflicts(k, s),
        "span, kind (former order)": lambda k, s: lf.conflicts(s, k),
        "keywords": lambda k, s: lf.conflicts(span=s, kind=k),
        "kind, span=": lambda k, s: lf.conflicts(k, span=s),
        "span, kind=": lambda k, s: lf.conflicts(s, kind=k),
    }
    for kind, span, expected in [
        ("exclusive", (0, 10), (range(2, 4), "exclusive")),
        ("shared", (0, 10), (range(2, 4), "exclusive")),
        ("exclusive", 5, (range(5, 6), "shared")),
        ("write", range(4, 6), (range(5, 6), "shared")),
        ("shared", 5, None),
        ("read", slice(6, None), None),
    ]:
        for name, call in forms.items():
            h = call(kind, span)
            got = None if h is None else (h.span, h.kind)
            assert got == expected, (name, kind, span)
    # Without a kind: exclusive.
    assert lf.conflicts(5).span == range(5, 6)
    assert lf.conflicts(span=5).span == range(5, 6)
    assert lf.conflicts(4) is None
    # Same order as acquire.
    params = list(inspect.signature(LocksFile.acquire).parameters)
    assert params[1:3] == ["kind", "span"]


def test_conflicts_refuses_what_it_cannot_tell_apart(lock_path):
    lf = LocksFile(lock_path)
    with pytest.raises(TypeError, match="span"):
        lf.conflicts()
    with pytest.raises(TypeError, match="span"):
        lf.conflicts("shared")
    with pytest.raises(TypeError, match="two values for kind"):
        lf.conflicts("shared", "exclusive")
    with pytest.raises(TypeError, match="two values for span"):
        lf.conflicts(1, 2)
    with pytest.raises(TypeError, match="two values for span"):
        lf.conflicts("shared", 1, span=2)
    with pytest.raises(TypeError, match="positional"):
        lf.conflicts("shared", 1, 2)
    with pytest.raises(ValueError, match="kind"):
        lf.conflicts("sideways", 1)


def timed(call):
    t0 = time.monotonic()
    try:
        return call(), time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - returned for the test to judge
        return e, time.monotonic() - t0


def test_blocking_false_refuses_at_once_while_another_process_holds(lock_path, other):
    lf = LocksFile(lock_path)
    refused = [
        lambda: lf.write(2, blocking=False),
        lambda: lf.read(3, blocking=False),
        lambda: lf.write(5, blocking=False),
        lambda: lf.acquire("exclusive", 2, blocking=False),
        # The timeout is ignored: no wait, and a would-block error, not LockTimeout.
        lambda: lf.write(2, blocking=False, timeout=5),
        lambda: lf.read(3, blocking=False, timeout=5),
        lambda: lf.acquire("shared", 2, blocking=False, timeout=5),
    ]
    for call in refused:
        e, took = timed(call)
        assert isinstance(e, WouldBlockError), e
        assert not isinstance(e, LockTimeout)
        assert took < AT_ONCE
        assert "2..4" in str(e) or "5" in str(e)
    g = lf.read(5, blocking=False)
    with pytest.raises(WouldBlockError):
        g.upgrade(blocking=False, timeout=5)
    assert g.kind == "shared"
    g.release()
    assert lf.held() == []
    # blocking=True with a timeout still waits and times out.
    with pytest.raises(LockTimeout):
        lf.write(2, blocking=True, timeout=0.05)


def test_blocking_false_takes_what_is_free(lock_path, other):
    lf = LocksFile(lock_path)
    with lf.write(0, blocking=False) as g:
        assert g.kind == "exclusive"
    g = lf.read(5, blocking=False, timeout=5)
    assert lf.held() == [(range(5, 6), "shared")]
    g.release()
    lf.acquire("exclusive", 7, blocking=False, timeout=5)
    assert lf.held() == [(range(7, 8), "exclusive")]
    other.exec("g.release()")
    with lf.write(2, blocking=False) as g:
        assert g.span == range(2, 3)
        assert other.eval("o.try_write(2)") is None
    assert other.eval("o.try_write(2) is not None")


def test_blocking_false_in_the_async_forms(lock_path, other):
    lf = LocksFile(lock_path)

    async def main():
        for request in (
            lambda: lf.write_async(2, blocking=False),
            lambda: lf.read_async(3, blocking=False, timeout=5),
            lambda: lf.acquire_async("exclusive", 5, blocking=False, timeout=5),
        ):
            t0 = time.monotonic()
            with pytest.raises(WouldBlockError):
                await request()
            assert time.monotonic() - t0 < AT_ONCE
        async with lf.write_async(0, blocking=False) as g:
            assert g.kind == "exclusive"
        await lf.acquire_async("shared", 5, blocking=False)
        assert lf.held() == [(range(5, 6), "shared")]

    asyncio.run(main())
