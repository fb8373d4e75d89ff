"""No silent no-lock: ``with LocksFile(p):`` that takes no lock says so
(``NoLockWarning``), and ``FileLock``/``ReadWriteLock``/``Timeout`` behave as
``filelock``'s, excluding real ``flock(1)`` and ``filelock`` users of the file.

Other processes are real (``subprocess``), synchronised by their pipes."""

import asyncio
import os
import pickle
import subprocess
import sys
import threading
import warnings

import pytest

import pylocksfile
from pylocksfile import FileLock, LocksFile, LockTimeout, NoLockWarning, ReadWriteLock, Timeout

WAIT = 60


def child(code, *args):
    """Run ``code`` in a fresh interpreter (``sys.argv[1:]`` = args); its stdout, stripped."""
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


TRY_FILELOCK = """
import sys
from pylocksfile import FileLock, Timeout
try:
    FileLock(sys.argv[1]).acquire(blocking=False)
    print("got")
except Timeout:
    print("busy")
"""

TRY_RW = """
import sys
from pylocksfile import ReadWriteLock, Timeout
rw = ReadWriteLock(sys.argv[1])
try:
    (rw.acquire_read if sys.argv[2] == "read" else rw.acquire_write)(blocking=False)
    print("got")
except Timeout:
    print("busy")
"""

TRY_OFD_WRITE0 = """
import sys
from pylocksfile import LocksFile
g = LocksFile(sys.argv[1]).try_write(0)
print("busy" if g is None else "got")
"""


def flock_n(path, *opts):
    """util-linux ``flock -n [opts] FILE true``: 0 when it got the lock, 1 when busy."""
    return subprocess.run(["flock", "-n", *opts, str(path), "true"], timeout=WAIT).returncode


class Holder:
    """Another process holding a lock on ``path`` until ``release()``: it
    prints ``held`` once it has it and waits for a line on its stdin."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(WAIT) == 0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


@pytest.fixture
def holders():
    made = []
    yield lambda argv: made.append(Holder(argv)) or made[-1]
    for h in made:
        h.kill()


def flock1_holds(path, opt="-x"):
    return ["flock", opt, str(path), "sh", "-c", "echo held; read x"]


# --- with LocksFile(p): no silent no-lock ---------------------------------


def test_with_locksfile_taking_nothing_warns_at_the_with_line_naming_the_fix(lock_path):
    with pytest.warns(NoLockWarning) as record:
        line = sys._getframe().f_lineno + 1
        with LocksFile(lock_path):
            # The block is not locked: another process takes lock 0 meanwhile.
            assert child(TRY_OFD_WRITE0, lock_path) == "got"
    (w,) = record
    assert issubclass(w.category, UserWarning)
    assert (w.filename, w.lineno) == (__file__, line)
    msg = str(w.message)
    assert f"with LocksFile({str(lock_path)!r}):" in msg
    assert "with lf.write(0):" in msg and "with lf.write(slice(None)):" in msg
    assert "pylocksfile.FileLock(path)" in msg
    assert pylocksfile.NoLockWarning is NoLockWarning


def test_a_failed_try_is_no_lock(lock_path):
    with LocksFile(lock_path) as holder, holder.write(0):
        with pytest.warns(NoLockWarning, match="mode='flock'"):
            with LocksFile(lock_path, mode="flock") as lf:
                pass
        with pytest.warns(NoLockWarning):
            with LocksFile(lock_path) as lf:
                assert lf.try_write(0) is None


@pytest.mark.parametrize("how", ["guard", "try", "timed", "acquire", "async", "acquire_async", "pickled", "thread"])
def test_a_block_that_takes_a_lock_does_not_warn(lock_path, how):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoLockWarning)
        with LocksFile(lock_path) as lf:
            if how == "guard":
                with lf.read(0):
                    pass
            elif how == "try":
                lf.try_write(slice(None)).release()
            elif how == "timed":
                lf.write_for(3, 1.0).release()
            elif how == "acquire":
                lf.acquire("exclusive", 1)
                lf.release()
            elif how == "async":
                async def take():
                    async with lf.write_async(2):
                        pass
                asyncio.run(take())
            elif how == "acquire_async":
                asyncio.run(lf.acquire_async("shared", 2))
            elif how == "pickled":
                # Handed to another process, which takes the locks through it.
                pickle.dumps(lf)
            elif how == "thread":
                t = threading.Thread(target=lambda: lf.write(4).release())
                t.start()
                t.join()


def test_a_block_entered_holding_a_lock_does_not_warn(lock_path):
    lf = LocksFile(lock_path)
    lf.acquire("exclusive", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoLockWarning)
        with lf:
            pass  # it releases the lock held at entry: what it is used for
    assert lf.closed


def test_nested_blocks_each_judge_their_own(lock_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lf = LocksFile(lock_path)
        with lf:
            with lf:  # takes nothing: warns (the outer block keeps the handle open)
                pass
            assert not lf.closed
        # The outer block took nothing either.
        assert lf.closed
        assert [w.category for w in record] == [NoLockWarning, NoLockWarning]
        record.clear()
        lf = LocksFile(lock_path)
        with lf:
            with lf:
                with lf.write(0):
                    pass
        assert record == []  # the take counts for both


def test_a_block_that_raises_does_not_warn(lock_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoLockWarning)
        with pytest.raises(KeyError):
            with LocksFile(lock_path) as lf:
                raise KeyError("before any lock")
    assert lf.closed


def test_as_an_error_it_raises_at_the_with_and_the_handle_is_closed(lock_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoLockWarning)
        with pytest.raises(NoLockWarning, match="only closes the handle"):
            with LocksFile(lock_path) as lf:
                pass
    assert lf.closed


def test_minus_w_error_makes_it_an_error(lock_path):
    # The interpreter's -W resolves only categories importable at start-up;
    # NoLockWarning is a UserWarning, which it always knows.
    code = "import sys\nfrom pylocksfile import LocksFile\nwith LocksFile(sys.argv[1]):\n    pass\nprint('ran on')\n"
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, str(lock_path)],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 1
    assert "NoLockWarning" in out.stderr and "ran on" not in out.stdout


@pytest.mark.filterwarnings("error::pylocksfile.NoLockWarning")
def test_pytest_filter_by_name(lock_path):
    with pytest.raises(NoLockWarning):
        with LocksFile(lock_path):
            pass


# --- FileLock ---------------------------------------------------------------


def test_filelock_excludes_another_process_until_released(lock_path):
    lock = FileLock(lock_path)
    with lock:
        assert lock.is_locked and lock.lock_counter == 1
        assert child(TRY_FILELOCK, lock_path) == "busy"
    assert not lock.is_locked
    assert child(TRY_FILELOCK, lock_path) == "got"


def test_filelock_is_reentrant(lock_path):
    lock = FileLock(lock_path)
    lock.acquire()
    with lock.acquire() as same:
        assert same is lock and lock.lock_counter == 2
    assert lock.lock_counter == 1 and lock.is_locked
    lock.acquire()
    lock.release()
    assert lock.is_locked and child(TRY_FILELOCK, lock_path) == "busy"
    lock.release()
    assert not lock.is_locked and lock.lock_counter == 0
    assert child(TRY_FILELOCK, lock_path) == "got"
    lock.release()  # not held: nothing to do, as in filelock
    lock.acquire()
    lock.acquire()
    lock.release(force=True)
    assert not lock.is_locked


def test_timeout_and_blocking_false_raise_timeout(lock_path, holders):
    h = holders(flock1_holds(lock_path))
    lock = FileLock(lock_path, timeout=0.2)
    for call in (lock.acquire, lambda: lock.acquire(timeout=0.1), lambda: lock.acquire(blocking=False),
                 lambda: FileLock(lock_path, blocking=False).acquire()):
        with pytest.raises(Timeout) as e:
            call()
        assert isinstance(e.value, TimeoutError) and isinstance(e.value, LockTimeout)
        assert e.value.lock_file == str(lock_path)
        assert str(e.value) == f"The file lock '{lock_path}' could not be acquired."
        assert not lock.is_locked and lock.lock_counter == 0
    h.release()
    with lock.acquire(timeout=WAIT):
        assert lock.is_locked
    assert pickle.loads(pickle.dumps(Timeout(str(lock_path)))).lock_file == str(lock_path)


def test_flock1_is_excluded_while_held(lock_path):
    lock = FileLock(lock_path)
    with lock:
        assert flock_n(lock_path) == 1
        assert flock_n(lock_path, "-s") == 1
    assert flock_n(lock_path) == 0


def test_real_filelock_is_excluded_both_ways(lock_path, holders):
    filelock = pytest.importorskip("filelock")
    theirs = """
import sys, filelock
try:
    filelock.FileLock(sys.argv[1]).acquire(blocking=False)
    print("got")
except filelock.Timeout:
    print("busy")
"""
    with FileLock(lock_path):
        assert child(theirs, lock_path) == "busy"
    assert child(theirs, lock_path) == "got"
    hold = "import sys, filelock\nwith filelock.FileLock(sys.argv[1]):\n    print('held', flush=True)\n    input()\n"
    h = holders([sys.executable, "-c", hold, str(lock_path)])
    with pytest.raises(Timeout):
        FileLock(lock_path).acquire(blocking=False)
    h.release()
    with FileLock(lock_path).acquire(blocking=False):
        pass
    assert filelock.FileLock(str(lock_path)).acquire(blocking=False)


def test_threads_sharing_one_filelock_exclude_each_other(lock_path):
    lock = FileLock(lock_path)  # thread_local=True, as filelock's default
    start = threading.Barrier(4)
    count = {"n": 0, "inside": 0, "most": 0}
    tally = threading.Lock()

    def work():
        start.wait(WAIT)
        for _ in range(200):
            with lock:
                with tally:
                    count["inside"] += 1
                    count["most"] = max(count["most"], count["inside"])
                n = count["n"]
                os.sched_yield()
                count["n"] = n + 1
                with tally:
                    count["inside"] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert count["most"] == 1
    assert count["n"] == 800


def test_thread_local_false_shares_the_counter_as_filelock_does(lock_path):
    lock = FileLock(lock_path, thread_local=False)
    lock.acquire()
    t = threading.Thread(target=lock.acquire)
    t.start()
    t.join(WAIT)
    assert lock.lock_counter == 2 and not lock.is_thread_local()
    lock.release(force=True)
    assert not lock.is_locked


def test_singleton_and_a_second_instance_in_one_thread(lock_path):
    one = FileLock(lock_path, is_singleton=True)
    assert FileLock(str(lock_path), is_singleton=True) is one
    with pytest.raises(ValueError):
        FileLock(lock_path, timeout=3, is_singleton=True)
    with FileLock(lock_path):
        # Waiting for ever on a file this thread holds through another
        # instance would hang: filelock raises, and so does this.
        with pytest.raises(RuntimeError, match="Deadlock"):
            FileLock(lock_path).acquire()


# --- ReadWriteLock ------------------------------------------------------------


def test_readers_share_and_a_reader_keeps_another_process_writer_out(lock_path):
    rw = ReadWriteLock(lock_path)
    assert ReadWriteLock(lock_path) is rw  # is_singleton=True by default, as in filelock
    with rw.read_lock():
        assert child(TRY_RW, lock_path, "read") == "got"
        assert child(TRY_RW, lock_path, "write") == "busy"
        assert flock_n(lock_path, "-s") == 0 and flock_n(lock_path) == 1
        with rw.read_lock():  # reentrant in its mode
            pass
        with pytest.raises(RuntimeError, match="upgrade not allowed"):
            rw.acquire_write()
    assert child(TRY_RW, lock_path, "write") == "got"
    with rw.write_lock():
        assert child(TRY_RW, lock_path, "read") == "busy"
        assert child(TRY_FILELOCK, lock_path) == "busy"
    with pytest.raises(RuntimeError):
        rw.release()


def test_rw_timeout(lock_path, holders):
    h = holders(flock1_holds(lock_path, "-s"))
    rw = ReadWriteLock(lock_path, is_singleton=False)
    with rw.read_lock(blocking=False):
        pass
    with pytest.raises(Timeout):
        rw.acquire_write(timeout=0.1)
    h.release()
    rw.acquire_write(timeout=WAIT)
    rw.release()


def test_content_and_mode_are_left_alone(lock_path):
    lock_path.write_bytes(b"the owner's data\n")
    os.chmod(lock_path, 0o640)
    with FileLock(lock_path, mode=0o600), FileLock(lock_path.with_name("x")) as other:
        assert other.is_locked
    with ReadWriteLock(lock_path).write_lock():
        pass
    assert lock_path.read_bytes() == b"the owner's data\n"
    assert os.stat(lock_path).st_mode & 0o777 == 0o640
    made = lock_path.with_name("made")
    with FileLock(made, mode=0o600):
        pass
    assert os.stat(made).st_mode & 0o777 == 0o600 and made.read_bytes() == b""
