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


@pytest.mark.parametrize("mode", ["ofd", "process"])
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
@pytest.mark.parametrize("mode", ["ofd", "process"])
def test_a_timeout_past_the_clocks_range_waits_as_long_as_it_takes(spawn_worker, timeout, mode):
    holder = spawn_worker()
    holder.exec("h = LocksFile(path, mode='process'); h.acquire('exclusive', (2, 2))")
    waiter = spawn_worker()
    waiter.exec(f"lf = LocksFile(path, mode={mode!r})")
    waiter.send("exec", f"g = lf.write(3, timeout=float({str(timeout)!r}))")
    # Asleep in the kernel (OFD waiters show pid -1 in /proc/locks), not
    # back with LockTimeout.
    pid = waiter.pid if mode == "process" else -1
    support.wait_until(
        lambda: pid in support.waiting_pids(waiter.path) or waiter.replied(),
        what=f"the waiter to sleep on a {timeout} s timeout",
    )
    assert not waiter.replied(), f"gave up at once: {waiter.result()!r}"
    holder.exec("h.release()")
    waiter.result()
    assert waiter.eval("g.kind") == "exclusive"
    assert waiter.eval("lf.held()") == [(range(3, 4), "exclusive")]
