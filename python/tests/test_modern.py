"""The API for new code: ``LocksFile`` with guards, spans, timeouts, typed
exceptions, ``held()`` and ``conflicts()``. Locks in this process are read
back from /proc/locks (OFD locks have pid -1 there) and contention is
checked from other processes."""

import errno
import os
import stat
import threading
import time

import pytest

import support
from pylocksfile import (
    DeadlockError,
    ForkedError,
    InvalidSpanError,
    LocksFile,
    LocksfileError,
    LockTimeout,
    WouldBlockError,
)

OFD = -1
ME = os.getpid()
END = 2**63 - 1


def ofd_held(path, width=10):
    return support.held_map(path, OFD, width)


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------


def test_exception_hierarchy():
    for cls in (WouldBlockError, DeadlockError, LockTimeout, InvalidSpanError, ForkedError):
        assert issubclass(cls, LocksfileError)
    assert issubclass(LocksfileError, OSError)
    assert issubclass(WouldBlockError, BlockingIOError)
    assert issubclass(LockTimeout, TimeoutError)
    assert issubclass(InvalidSpanError, ValueError)
    assert not issubclass(DeadlockError, WouldBlockError)
    assert not issubclass(LockTimeout, WouldBlockError)


def test_exception_names_are_exported():
    import pylocksfile as pkg

    for name in ("LocksFile", "LocksfileError", "WouldBlockError", "DeadlockError", "LockTimeout",
                 "InvalidSpanError", "ForkedError"):
        assert hasattr(pkg, name), name


# --------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------


def test_defaults(lock_path):
    lf = LocksFile(lock_path)
    assert lf.mode == "ofd"
    assert lf.path == str(lock_path)
    assert not lf.closed
    assert stat.S_IMODE(os.stat(lock_path).st_mode) == 0o644


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert LocksFile("x.lock").path == str(tmp_path / "x.lock")


def test_no_path_makes_a_private_temp_file(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    a, b = LocksFile(), LocksFile()
    assert a.path != b.path
    for lf in (a, b):
        assert os.path.dirname(lf.path) == str(tmp_path)
        assert stat.S_IMODE(os.stat(lf.path).st_mode) & 0o077 == 0


def test_permissions_are_applied_exactly(tmp_path):
    old = os.umask(0o077)
    try:
        LocksFile(tmp_path / "a.lock", permissions=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.lock").st_mode) == 0o640


def test_existing_content_is_never_touched(lock_path):
    lock_path.write_bytes(b"keep me")
    lf = LocksFile(lock_path)
    with lf.write((0, 100)):
        pass
    lf.close()
    assert lock_path.read_bytes() == b"keep me"


def test_create_false_refuses_a_missing_file(lock_path):
    with pytest.raises(FileNotFoundError):
        LocksFile(lock_path, create=False)
    assert not lock_path.exists()


def test_symlinks_are_refused_unless_followed(tmp_path):
    target = tmp_path / "target.lock"
    target.touch()
    link = tmp_path / "link.lock"
    os.symlink(target, link)
    with pytest.raises(LocksfileError):
        LocksFile(link)
    lf = LocksFile(link, follow_symlinks=True)
    with lf.write(2):
        assert support.held_map(target, OFD) == "..W......."


def test_directory_is_refused(tmp_path):
    with pytest.raises(OSError):
        LocksFile(tmp_path)


@pytest.mark.parametrize("mode", ["posix-ish", "SHM", ""])
def test_bad_mode(lock_path, mode):
    with pytest.raises(ValueError, match='mode must be "ofd", "process", "flock" or "shm", got') as info:
        LocksFile(lock_path, mode=mode)
    assert repr(mode).replace("'", '"') in str(info.value)
    # Refused before anything is made.
    assert not lock_path.exists()
    assert not (lock_path.parent / (lock_path.name + "-shm")).exists()


def test_shm_mode_opens_a_sidecar_and_says_so(lock_path):
    lf = LocksFile(lock_path, mode="shm", permissions=0o640)
    assert lf.mode == "shm" and 'mode="shm"' in repr(lf)
    sidecar = lock_path.parent / (lock_path.name + "-shm")
    # Beside the lock file, with its permission bits; the lock file is untouched.
    assert stat.S_IMODE(os.stat(sidecar).st_mode) == 0o640
    assert os.path.getsize(lock_path) == 0
    with lf.write(range(3, 6)):
        assert support.held_map(lock_path, os.getpid(), mode="shm") == "...WWW...."
    assert os.path.getsize(lock_path) == 0


# --------------------------------------------------------------------------
# Spans
# --------------------------------------------------------------------------

SPANS = [
    (3, "...W......", [(range(3, 4), "exclusive")]),
    (range(2, 5), "..WWW.....", [(range(2, 5), "exclusive")]),
    (range(0, 10, 1), "WWWWWWWWWW", [(range(0, 10), "exclusive")]),
    (slice(4, 6), "....WW....", [(range(4, 6), "exclusive")]),
    ((1, 2), ".WW.......", [(range(1, 3), "exclusive")]),
    (slice(7, None), ".......WWW+", [(range(7, END), "exclusive")]),
    (slice(None, 3), "WWW.......", [(range(0, 3), "exclusive")]),
    (slice(None, None), "WWWWWWWWWW+", [(range(0, END), "exclusive")]),
    (range(8, END), "........WW+", [(range(8, END), "exclusive")]),
    ((9, END - 9), ".........W+", [(range(9, END), "exclusive")]),
    (END - 1, "..........+", [(range(END - 1, END), "exclusive")]),
]


@pytest.mark.parametrize("span, kernel, listed", SPANS, ids=lambda v: repr(v) if not isinstance(v, list) else "")
def test_span_forms(lock_path, span, kernel, listed):
    lf = LocksFile(lock_path)
    lf.acquire("exclusive", span)
    assert ofd_held(lock_path) == kernel
    assert lf.held() == listed
    lf.release(span)
    assert ofd_held(lock_path) == ".........."
    assert lf.held() == []
    with lf.write(span) as g:
        assert ofd_held(lock_path) == kernel
        assert g.span == listed[0][0]
    assert lf.held() == []


BAD_SPANS = [-1, range(3, 1), range(2, 2), range(0, 6, 2), range(5, 0, -1), slice(0, 6, 2), slice(5, 2),
             (0, 0), (2, -1), (-1, 3), 2**63, (2**63 - 10, 20), range(0, 2**64), slice(-3, None)]


@pytest.mark.parametrize("span", BAD_SPANS, ids=repr)
def test_invalid_spans(lock_path, span):
    lf = LocksFile(lock_path)
    for call in (lambda: lf.write(span), lambda: lf.try_read(span), lambda: lf.acquire("shared", span),
                 lambda: lf.release(span)):
        with pytest.raises(InvalidSpanError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert info.value.errno == errno.EINVAL
    assert lf.held() == []
    assert ofd_held(lock_path) == ".........."
    with lf.write(1):
        assert ofd_held(lock_path) == ".W........"


@pytest.mark.parametrize("span", ["3", 1.0, None, (1, 2, 3), (1.0, 2), object()], ids=repr)
def test_spans_of_the_wrong_type(lock_path, span):
    lf = LocksFile(lock_path)
    with pytest.raises((TypeError, ValueError)):
        lf.write(span)
    assert ofd_held(lock_path) == ".........."


# --------------------------------------------------------------------------
# Guards, conversions, explicit layer
# --------------------------------------------------------------------------


def test_guard_release_and_context(lock_path):
    lf = LocksFile(lock_path)
    g = lf.write(range(0, 3))
    assert g.held and g.kind == "exclusive" and g.span == range(0, 3)
    assert not support.can_lock(lock_path, 1, write=False)
    g.release()
    assert not g.held and g.kind is None
    g.release()  # twice is harmless
    assert support.can_lock(lock_path, 0, 3)
    with lf.read(5) as r:
        assert r.kind == "shared"
        assert support.can_lock(lock_path, 5, write=False)
        assert not support.can_lock(lock_path, 5, write=True)
    assert support.can_lock(lock_path, 5)


def test_guard_released_when_collected(lock_path):
    lf = LocksFile(lock_path)
    g = lf.write(4)
    assert ofd_held(lock_path) == "....W....."
    import gc

    # Never entered nor released: it says so, as an unclosed file does.
    with pytest.warns(ResourceWarning):
        del g
        gc.collect()
    assert ofd_held(lock_path) == ".........."


def test_guard_downgrade_and_upgrade_in_place(spawn_worker, lock_path):
    lf = LocksFile(lock_path)
    other = spawn_worker()
    other.exec("o = LocksFile(path)")
    g = lf.write((0, 3))
    # A writer waits in the other process; downgrading must not let it in.
    other.send_eval("o.write(1).kind")
    support.wait_until(lambda: support.waiting_pids(lock_path) == {OFD} or other.replied(), what="the writer to wait")
    assert g.downgrade() is g
    assert g.kind == "shared"
    assert ofd_held(lock_path) == "RRR......."
    assert not other.replied()
    assert support.can_lock(lock_path, 2, write=False)
    # Upgrading back waits for nobody (the writer is not holding).
    assert g.upgrade() is g and g.kind == "exclusive"
    g.release()
    assert other.result() == "exclusive"


def test_upgrade_contention(spawn_worker, lock_path):
    lf = LocksFile(lock_path)
    reader = spawn_worker()
    # Process mode, so its lock shows under its pid in /proc/locks.
    reader.exec("o = LocksFile(path, mode='process'); r = o.read(1)")
    g = lf.read((0, 3))
    with pytest.raises(WouldBlockError):
        g.upgrade(blocking=False)
    assert g.kind == "shared" and ofd_held(lock_path) == "RRR......."
    t0 = time.monotonic()
    with pytest.raises(LockTimeout):
        g.upgrade(timeout=0.1)
    assert time.monotonic() - t0 >= 0.1
    assert g.kind == "shared" and ofd_held(lock_path) == "RRR......."
    # A blocking upgrade in a thread completes once the reader lets go.
    done = []
    t = threading.Thread(target=lambda: done.append(g.upgrade().kind))
    t.start()
    support.wait_until(lambda: OFD in support.waiting_pids(lock_path), what="the upgrade to wait")
    reader.exec("r.release()")
    t.join(10)
    assert done == ["exclusive"]
    assert not support.can_lock(lock_path, 1, write=False)


def test_explicit_layer_converts_in_place_and_composes_with_guards(lock_path):
    lf = LocksFile(lock_path)
    lf.acquire("shared", (0, 6))
    lf.acquire("exclusive", (2, 2))
    assert ofd_held(lock_path) == "RRWWRR...."
    assert lf.held() == [(range(0, 2), "shared"), (range(2, 4), "exclusive"), (range(4, 6), "shared")]
    g = lf.write((5, 3))
    assert ofd_held(lock_path) == "RRWWRWWW.."
    lf.release((3, 4))
    # The guard keeps 5..7; the explicit layer lost 3..6.
    assert ofd_held(lock_path) == "RRW..WWW.."
    assert lf.held_explicitly() == [(range(0, 2), "shared"), (range(2, 3), "exclusive")]
    g.release()
    assert ofd_held(lock_path) == "RRW......."
    lf.acquire("read", 2)
    lf.acquire("write", 0)
    assert ofd_held(lock_path) == "WRR......."
    lf.release()
    assert lf.held() == [] and ofd_held(lock_path) == ".........."


def test_close_releases_guards_and_explicit_locks(lock_path):
    lf = LocksFile(lock_path)
    g = lf.write(0)
    lf.acquire("shared", (3, 2))
    assert ofd_held(lock_path) == "W..RR....."
    lf.close()
    assert lf.closed
    assert ofd_held(lock_path) == ".........."
    assert not g.held
    lf.close()
    with pytest.raises(ValueError):
        lf.write(0)


def test_context_manager_closes(lock_path):
    with LocksFile(lock_path) as lf:
        lf.acquire("exclusive", 1)
        g = lf.read(2)
        assert ofd_held(lock_path) == ".WR......."
    assert lf.closed and not g.held
    assert ofd_held(lock_path) == ".........."


def test_deleting_releases_everything(spawn_worker, lock_path):
    w = spawn_worker()
    w.exec("lf = LocksFile(path, mode='process'); lf.acquire('exclusive', (0, 2)); g = lf.read(5)")
    assert w.held() == "WW...R...."
    w.exec("del lf, g; gc.collect()")
    assert w.held() == ".........."


# --------------------------------------------------------------------------
# Contention: try, would-block, timeouts, deadlock
# --------------------------------------------------------------------------


@pytest.fixture
def holder(spawn_worker, request):
    """A process holding write locks on 2 and 3 and a read lock on 5 (process
    mode; shm mode for a test parametrised with ``mode="shm"``, as the
    kernel's locks never meet the table)."""
    callspec = getattr(request.node, "callspec", None)
    mode = "shm" if callspec is not None and callspec.params.get("mode") == "shm" else "process"
    w = spawn_worker()
    w.exec(f"h = LocksFile(path, mode={mode!r}); h.acquire('exclusive', (2, 2)); h.acquire('shared', 5)")
    return w


@pytest.mark.parametrize("mode", support.MODES)
def test_try_returns_none_on_conflict(lock_path, holder, mode):
    lf = LocksFile(lock_path, mode=mode)
    assert lf.try_write(3) is None
    assert lf.try_read((0, 3)) is None
    assert lf.try_write(5) is None
    g = lf.try_read(5)
    assert g is not None and g.kind == "shared"
    g2 = lf.try_write((0, 2))
    assert g2 is not None and g2.kind == "exclusive"
    assert lf.held() == [(range(0, 2), "exclusive"), (range(5, 6), "shared")]


@pytest.mark.parametrize("mode", support.MODES)
def test_would_block_error(lock_path, holder, mode):
    lf = LocksFile(lock_path, mode=mode)
    with pytest.raises(WouldBlockError) as info:
        lf.acquire("exclusive", (0, 4), blocking=False)
    e = info.value
    assert isinstance(e, BlockingIOError) and e.errno == errno.EAGAIN
    assert lf.held() == [] and support.held_map(lock_path, OFD if mode == "ofd" else ME, mode=mode) == ".........."
    holder_info = getattr(e, "holder", None)
    if holder_info is not None:
        assert holder_info.pid == holder.pid
        assert holder_info.kind == "exclusive"


@pytest.mark.parametrize("call", ["write(2, timeout=T)", "write_for(3, T)", "read_for((1, 3), T)",
                                  "acquire('shared', 2, timeout=T)", "acquire('exclusive', 5, timeout=T)"])
@pytest.mark.parametrize("mode", support.MODES)
def test_timeouts_are_honoured(lock_path, holder, call, mode):
    lf = LocksFile(lock_path, mode=mode)
    timeout = 0.15
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        eval("lf." + call.replace("T", repr(timeout)))
    took = time.monotonic() - t0
    assert isinstance(info.value, TimeoutError)
    assert timeout <= took < timeout + 0.15, f"timed out after {took:.3f}s for a {timeout}s timeout"
    assert lf.held() == []
    assert support.held_map(lock_path, OFD if mode == "ofd" else ME, mode=mode) == ".........."


def test_zero_timeout_does_not_wait(lock_path, holder):
    lf = LocksFile(lock_path)
    t0 = time.monotonic()
    with pytest.raises(LockTimeout):
        lf.write(2, timeout=0)
    assert time.monotonic() - t0 < 0.05


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_timeouts(lock_path, bad):
    lf = LocksFile(lock_path)
    with pytest.raises(ValueError):
        lf.write(0, timeout=bad)
    assert lf.held() == []


def test_timed_wait_gets_the_lock_soon_after_release(lock_path, holder):
    lf = LocksFile(lock_path)
    out = {}

    def wait():
        out["tid"] = threading.get_native_id()
        g = lf.write(3, timeout=20.0)
        out["got"] = time.monotonic()
        out["g"] = g

    t = threading.Thread(target=wait)
    t.start()
    # A timed wait sleeps in the kernel as an untimed one does (an OFD
    # request, pid -1 in /proc/locks).
    support.wait_until(
        lambda: any(lk.waiting and lk.pid == OFD for lk in support.kernel_locks(lock_path)),
        what="the timed wait to sleep in the kernel",
    )
    released = time.monotonic()
    holder.exec("h.release()")
    t.join(10)
    assert "g" in out, "the timed wait did not get the lock"
    # Woken by the release, long before the 20 s timeout.
    assert out["got"] - released < 0.25
    assert ofd_held(lock_path) == "...W......"


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_deadlock_error_between_processes(spawn_worker, lock_path, mode):
    a, b = spawn_worker(), spawn_worker()
    a.exec(f"lf = LocksFile(path, mode={mode!r}); lf.acquire('exclusive', 0)")
    b.exec(f"lf = LocksFile(path, mode={mode!r}); g = lf.write(1)")
    a.send("exec", "ga = lf.write(1)")
    a.wait_blocked(mode=mode)
    with pytest.raises(support.RemoteError) as info:
        b.eval("lf.write(0)")
    assert info.value.isa("DeadlockError") and info.value.isa("LocksfileError")
    assert b.eval("lf.held()") == [(range(1, 2), "exclusive")]
    assert b.held(mode=mode) == ".W........"
    b.exec("g.release()")
    a.result()
    assert a.eval("ga.kind") == "exclusive"
    assert a.held(mode=mode) == "WW........"


def test_deadlock_cycle_of_three_processes_in_shm_mode(spawn_worker, lock_path):
    """Each holds its own lock and waits for the next one's: the request
    closing the cycle fails, whatever its length, and the others complete."""
    ws = [spawn_worker() for _ in range(3)]
    for i, w in enumerate(ws):
        w.exec(f"lf = LocksFile(path, mode='shm'); g = lf.write({i})")
    for i, w in enumerate(ws[:2]):
        w.send("exec", f"g2 = lf.write({i + 1})")
        w.wait_blocked(mode="shm")
    with pytest.raises(support.RemoteError) as info:
        ws[2].eval("lf.write(0)")
    assert info.value.isa("DeadlockError")
    assert ws[2].held(mode="shm") == "..W......."
    ws[2].exec("g.release()")
    ws[1].result()
    ws[1].exec("g.release(); g2.release()")
    ws[0].result()
    assert ws[0].held(mode="shm") == "WW........"


# --------------------------------------------------------------------------
# held() and conflicts()
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_conflicts_names_the_pid(lock_path, holder, mode):
    lf = LocksFile(lock_path, mode=mode)
    h = lf.conflicts(3)
    assert (h.span, h.kind, h.pid) == (range(2, 4), "exclusive", holder.pid)
    assert lf.conflicts("shared", (0, 10)).pid == holder.pid
    assert lf.conflicts("shared", 5) is None
    h = lf.conflicts("exclusive", 5)
    assert (h.span, h.kind, h.pid) == (range(5, 6), "shared", holder.pid)
    assert lf.conflicts(4) is None
    assert lf.conflicts(slice(6, None)) is None
    assert lf.held() == []


def test_conflicts_with_ofd_owners(spawn_worker, lock_path):
    w = spawn_worker()
    w.exec("o = LocksFile(path); g = o.write((4, 2))")
    mine = LocksFile(lock_path)
    h = mine.conflicts((0, 10))
    assert (h.span, h.kind) == (range(4, 6), "exclusive")
    assert h.pid is None
    assert mine.conflicts(3) is None
    # A second object in this process is another owner in OFD mode.
    g = mine.write(7)
    other = LocksFile(lock_path)
    assert other.conflicts(7).span == range(7, 8)
    assert mine.conflicts(7) is None
    g.release()


def test_process_mode_objects_in_one_process_are_one_owner(lock_path):
    a = LocksFile(lock_path, mode="process")
    b = LocksFile(lock_path, mode="process")
    ga = a.write(0)
    gb = b.try_write(0)
    assert gb is not None, "objects of one process share process-associated locks"
    ga.release()
    assert support.held_map(lock_path, ME) == "W........."
    gb.release()
    assert support.held_map(lock_path, ME) == ".........."


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_upgrade_deadlock_keeps_the_shared_lock(spawn_worker, lock_path, mode):
    """Two readers both upgrading: the kernel (process mode) or the table
    (shm mode) refuses the second; its guard is still shared, and the first
    completes once it goes."""
    a, b = spawn_worker(), spawn_worker()
    for w in (a, b):
        w.exec(f"lf = LocksFile(path, mode={mode!r}); g = lf.read((0, 2))")
    a.send_eval("g.upgrade().kind")
    a.wait_blocked(mode=mode)
    with pytest.raises(support.RemoteError) as info:
        b.eval("g.upgrade()")
    assert info.value.isa("DeadlockError")
    assert b.eval("g.kind") == "shared"
    assert b.held(mode=mode) == "RR........"
    b.exec("g.release()")
    assert a.result() == "exclusive"
    assert a.held(mode=mode) == "WW........"


def test_upgrade_deadlock_between_threads_with_separate_objects_in_shm_mode(lock_path):
    """Shm mode detects cycles between any owners, so two objects in one
    process (where process mode sees one owner and OFD mode waits forever)."""
    a, b = LocksFile(lock_path, mode="shm"), LocksFile(lock_path, mode="shm")
    ga, gb = a.read(4), b.read(4)
    out = {}

    def upgrade():
        out["kind"] = ga.upgrade().kind

    t = threading.Thread(target=upgrade)
    t.start()
    support.wait_until(lambda: any(lk.waiting for lk in support.table_locks(lock_path)), what="the upgrade to queue")
    with pytest.raises(DeadlockError):
        gb.upgrade()
    assert gb.kind == "shared" and b.held() == [(range(4, 5), "shared")]
    gb.release()
    t.join(support.DEFAULT_TIMEOUT)
    assert out == {"kind": "exclusive"}
