"""Errors of opening a lock file carry the kernel's errno and the path, and
timeouts too long for the clock mean "no limit"."""

import errno
import os

import pytest

import support
from pylocksfile import LocksFile, LocksfileError


# --------------------------------------------------------------------------
# Open errors: OSError(errno, strerror, filename), subclass picked by Python
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", support.MODES)
@pytest.mark.parametrize("create", [True, False])
def test_missing_directory_is_file_not_found_with_errno_and_filename(tmp_path, mode, create):
    path = tmp_path / "no-such-dir" / "x.lock"
    with pytest.raises(FileNotFoundError) as info:
        LocksFile(path, mode=mode, create=create)
    e = info.value
    assert e.errno == errno.ENOENT
    assert e.strerror == os.strerror(errno.ENOENT)
    assert e.filename == str(path)
    assert str(path) in str(e)
    # A plain system call failure, not one of the lock machinery's errors.
    assert not isinstance(e, LocksfileError)
    assert not (tmp_path / "no-such-dir").exists()


def test_missing_file_without_create_is_file_not_found(lock_path):
    with pytest.raises(FileNotFoundError) as info:
        LocksFile(lock_path, create=False)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(lock_path)
    assert not lock_path.exists()


def test_a_path_under_a_regular_file_is_not_a_directory_error(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"data")
    with pytest.raises(NotADirectoryError) as info:
        LocksFile(plain / "x.lock")
    assert info.value.errno == errno.ENOTDIR
    assert info.value.filename == str(plain / "x.lock")
    assert plain.read_bytes() == b"data"


def test_no_descriptor_left_is_emfile(spawn_worker):
    """In a child with RLIMIT_NOFILE at its lowest free descriptor number,
    opening fails with EMFILE itself (errno kept, not guessed)."""
    w = spawn_worker()
    w.exec(
        "import resource\n"
        "lowest = 0\n"
        "while True:\n"
        "    try:\n"
        "        os.fstat(lowest)\n"
        "    except OSError:\n"
        "        break\n"
        "    lowest += 1\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))\n"
        "try:\n"
        "    LocksFile(path)\n"
        "except OSError as e:\n"
        "    got = (type(e).__name__, e.errno, e.filename)\n"
        "else:\n"
        "    got = None\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))\n"
    )
    name, err, filename = w.eval("got")
    assert err == errno.EMFILE
    assert name == "OSError"
    assert filename == os.fspath(w.path)


# --------------------------------------------------------------------------
# Timeouts past what the clock can hold wait as long as it takes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [1e19, float("inf")])
@pytest.mark.parametrize("mode", support.MODES)
def test_a_timeout_past_the_clocks_range_waits_as_long_as_it_takes(spawn_worker, timeout, mode):
    holder = spawn_worker()
    holder_mode = "shm" if mode == "shm" else "process"
    holder.exec(f"h = LocksFile(path, mode={holder_mode!r}); h.acquire('exclusive', (2, 2))")
    waiter = spawn_worker()
    waiter.exec(f"lf = LocksFile(path, mode={mode!r})")
    waiter.send("exec", f"g = lf.write(3, timeout=float({str(timeout)!r}))")
    # Asleep in the kernel (OFD waiters show pid -1 in /proc/locks) or
    # queued in the shm table, not back with LockTimeout.
    if mode == "shm":
        waiting = lambda: waiter.pid in {lk.pid for lk in support.table_locks(waiter.path) if lk.waiting}  # noqa: E731
    else:
        pid = waiter.pid if mode == "process" else -1
        waiting = lambda: pid in support.waiting_pids(waiter.path)  # noqa: E731
    support.wait_until(
        lambda: waiting() or waiter.replied(),
        what=f"the waiter to sleep on a {timeout} s timeout",
    )
    assert not waiter.replied(), f"gave up at once: {waiter.result()!r}"
    holder.exec("h.release()")
    waiter.result()
    assert waiter.eval("g.kind") == "exclusive"
    assert waiter.eval("lf.held()") == [(range(3, 4), "exclusive")]


# --------------------------------------------------------------------------
# Shm mode: what cannot be used is refused clearly, and nothing is touched
# --------------------------------------------------------------------------


def test_shm_refuses_a_file_with_kernel_locks_and_the_reverse(lock_path):
    from pylocksfile import MixedModesError

    kernel = LocksFile(lock_path, mode="process")
    held = kernel.write(0)
    with pytest.raises(MixedModesError) as info:
        LocksFile(lock_path, mode="shm")
    assert info.value.errno == errno.EBUSY and info.value.filename == str(lock_path)
    assert "fcntl record locks" in str(info.value)
    held.release()
    kernel.close()
    shm = LocksFile(lock_path, mode="shm")
    for mode in ["ofd", "process", "flock"]:
        with pytest.raises(MixedModesError, match="shared-memory lock table"):
            LocksFile(lock_path, mode=mode)
    with pytest.raises(MixedModesError):
        pylocksfile_default = __import__("pylocksfile").pylocksfile
        pylocksfile_default(lock_path)
    shm.close()
    # The table is no longer in use: kernel modes may have the file again.
    LocksFile(lock_path, mode="ofd").close()


@pytest.mark.parametrize("content", [b"not a lock table", b"\0" * 4096])
def test_shm_refuses_a_foreign_sidecar_and_leaves_it_alone(lock_path, content):
    from pylocksfile import LockTableError

    sidecar = lock_path.parent / (lock_path.name + "-shm")
    sidecar.write_bytes(content)
    with pytest.raises(LockTableError) as info:
        LocksFile(lock_path, mode="shm")
    assert info.value.filename == str(sidecar)
    assert isinstance(info.value, LocksfileError)
    assert sidecar.read_bytes() == content


def test_shm_in_a_directory_without_write_permission_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    d = tmp_path / "ro"
    d.mkdir()
    (d / "x.lock").write_bytes(b"")
    d.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as info:
            LocksFile(d / "x.lock", mode="shm")
        assert info.value.errno == errno.EACCES
        assert info.value.filename == str(d / "x.lock-shm")
    finally:
        d.chmod(0o755)


def test_shm_table_full_of_owners_is_a_clear_error(spawn_worker):
    """A table full of owners: the next open raises LockTableFullError
    (ENOLCK), and closing one makes room again. The table holds over
    100,000; the worker is given 1,024 of them so that it fills at once."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 8192:
        pytest.skip("needs about 4 descriptors per owner")
    w = spawn_worker()
    w.exec(
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))\n"
        "from pylocksfile import _native\n"
        "_native._cap_shm_for_tests(1 << 30, 1024)\n"
        "objs = []\n"
        "err = None\n"
        "while len(objs) < 2000:\n"
        "    try:\n"
        "        objs.append(LocksFile(path, mode='shm'))\n"
        "    except OSError as e:\n"
        "        err = e\n"
        "        break\n",
        # 1,025 opens: seconds alone, far more on a loaded machine.
        timeout=300,
    )
    assert w.eval("type(err).__name__") == "LockTableFullError", w.eval("repr(err)")
    assert w.eval("len(objs)") == 1024
    assert w.eval("err.errno") == errno.ENOLCK
    assert "owners" in w.eval("str(err)")
    # Nothing was changed: the owners in the table still work, and one gone
    # makes room for another.
    assert w.eval("objs[0].try_write(0) is not None")
    w.exec("objs.pop().close()\nobjs.append(LocksFile(path, mode='shm'))")
    w.exec("for o in objs: o.close()", timeout=300)


# --------------------------------------------------------------------------
# Contention errors say where: the lock file and the span, each once
# --------------------------------------------------------------------------


def test_a_timeout_names_the_file_and_the_span(lock_path):
    from pylocksfile import LockTimeout

    a, b = LocksFile(lock_path), LocksFile(lock_path)
    held = a.write(range(3, 5))
    with pytest.raises(LockTimeout) as info:
        b.write(range(3, 5), timeout=0.02)
    assert f"timed out waiting for an exclusive lock on 3..5 of {lock_path}" in str(info.value)
    held.release()


def test_a_refusal_names_the_file_the_span_and_the_holder_once(lock_path):
    from pylocksfile import WouldBlockError

    a, b = LocksFile(lock_path, mode="shm"), LocksFile(lock_path, mode="shm")
    held = a.write(4)
    with pytest.raises(WouldBlockError) as info:
        b.acquire("shared", range(3, 6), blocking=False)
    msg = str(info.value)
    assert "a shared lock on 3..6" in msg and f"pid {os.getpid()}" in msg, msg
    assert msg.count(str(lock_path)) == 1, msg
    held.release()


def test_a_deadlock_names_the_file_and_the_span(lock_path):
    import threading

    import support
    from pylocksfile import DeadlockError

    a, b = LocksFile(lock_path, mode="shm"), LocksFile(lock_path, mode="shm")
    b.acquire("shared", range(7, 9))

    def upgrade():
        # One thread takes and upgrades: a thread's locks are its own.
        a.acquire("shared", range(7, 9))
        a.acquire("exclusive", range(7, 9))
        a.release()

    t = threading.Thread(target=upgrade)
    t.start()
    support.wait_until(
        lambda: any(lk.waiting for lk in support.table_locks(lock_path)),
        what="the upgrade to wait",
    )
    with pytest.raises(DeadlockError) as info:
        b.acquire("exclusive", range(7, 9))
    b.release()
    t.join()
    msg = str(info.value)
    assert f"waiting for an exclusive lock on 7..9 of {lock_path} would deadlock" in msg, msg


def test_mixed_modes_names_the_path_once(lock_path):
    from pylocksfile import MixedModesError

    kernel = LocksFile(lock_path, mode="process")
    held = kernel.write(0)
    with pytest.raises(MixedModesError) as info:
        LocksFile(lock_path, mode="shm")
    assert str(info.value).count(str(lock_path)) == 1, str(info.value)
    held.release()
