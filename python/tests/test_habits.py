"""Python habits: a guard dropped unused warns as an unclosed file does;
``thread_local=True`` makes the threads of one ``LocksFile`` exclude each
other; ``LocksFile()`` removes the temporary file it created."""

import gc
import os
import sys
import threading
import warnings

import pytest

import support
from pylocksfile import LocksFile

OFD = -1
JOIN = 10.0


def ofd_held(path, width=10):
    return support.held_map(path, OFD, width)


def resource_warnings(action):
    """The ResourceWarnings that ``action()`` and a full collection emit."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
        gc.collect()
    return [w for w in caught if issubclass(w.category, ResourceWarning)]


# --------------------------------------------------------------------------
# Guards dropped without being used
# --------------------------------------------------------------------------


def test_a_bare_statement_warns_and_releases(lock_path):
    lf = LocksFile(lock_path)

    def bare():
        lf.write(5)  # the guard goes at once

    found = resource_warnings(bare)
    assert len(found) == 1
    assert "range(5, 6)" in str(found[0].message) and "release()" in str(found[0].message)
    assert ofd_held(lock_path) == ".........."


def test_a_dropped_guard_warns_when_collected(lock_path):
    lf = LocksFile(lock_path)
    box = [lf.try_read(2)]
    assert ofd_held(lock_path) == "..R......."
    assert resource_warnings(box.clear) and ofd_held(lock_path) == ".........."


def test_guards_used_properly_do_not_warn(lock_path):
    lf = LocksFile(lock_path)
    kept = []

    def proper():
        with lf.write(1):  # entered
            pass
        g = lf.read(2)  # released explicitly
        g.release()
        g = lf.write(3)  # entered by hand, then collected unreleased
        g.__enter__()
        del g
        closed = LocksFile(lock_path)  # released by closing its file
        g = closed.write(4)
        closed.close()
        del g
        kept.append(lf.write(6))  # still referenced: nothing to say yet

    assert resource_warnings(proper) == []
    assert ofd_held(lock_path) == "......W..."
    assert resource_warnings(lambda: kept[0].release()) == []


def test_the_warning_can_be_made_an_error_without_keeping_the_lock(lock_path):
    """Under ``-W error`` the warning cannot propagate out of a collection:
    it is reported as unraisable (as for files) and the lock still goes."""
    lf = LocksFile(lock_path)
    seen = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_type)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            lf.write(7)
    finally:
        sys.unraisablehook = old
    assert seen == [ResourceWarning]
    assert ofd_held(lock_path) == ".........."


def test_an_exception_in_flight_survives_the_warning(lock_path):
    """A guard dropped while an exception unwinds the stack: the warning is
    emitted and the exception arrives unchanged."""
    lf = LocksFile(lock_path)

    def fails():
        return (lf.write(8), 1 // 0)

    def run():
        with pytest.raises(ZeroDivisionError):
            fails()

    assert len(resource_warnings(run)) == 1
    assert ofd_held(lock_path) == ".........."


# --------------------------------------------------------------------------
# Threads sharing one object
# --------------------------------------------------------------------------


class Runner(threading.Thread):
    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def outcome(self):
        self.join(JOIN)
        assert not self.is_alive(), "thread still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def test_threads_of_one_object_exclude_each_other(lock_path):
    """The documented default: a second thread is kept out, as with
    ``threading.Lock``; ``threads="share"`` lets it in (the old model)."""
    for threads, let_in in (("exclude", False), ("share", True)):
        lf = LocksFile(lock_path, threads=threads)

        def second():
            g = lf.try_write(0)
            return g is not None and g.release() is None

        with lf.write(0):
            t = Runner(second)
            t.start()
            assert t.outcome() is let_in, threads
        lf.close()


@pytest.mark.parametrize("mode", ["ofd", "shm"])
def test_thread_local_threads_exclude_each_other(lock_path, mode):
    lf = LocksFile(lock_path, mode=mode, thread_local=True)
    g = lf.write(0)
    events = []

    def second():
        events.append("waiting")
        with lf.write(0):
            events.append("got it")
            return lf.held()

    def queued():
        if mode == "shm":
            return any(lk.waiting for lk in support.table_locks(lock_path))
        return OFD in support.waiting_pids(lock_path)

    t = Runner(second)
    t.start()
    # The second thread sleeps in the kernel (F_SETLKW), or queued in the
    # table, behind the first.
    support.wait_until(lambda: queued() or not t.is_alive(), what="the second thread to block")
    assert t.is_alive() and events == ["waiting"]
    assert lf.held() == [(range(0, 1), "exclusive")]
    g.release()
    assert t.outcome() == [(range(0, 1), "exclusive")]
    assert events == ["waiting", "got it"]
    assert lf.held() == []


def test_thread_local_held_and_release_are_per_thread(lock_path):
    lf = LocksFile(lock_path, thread_local=True)
    lf.acquire("shared", (0, 2))
    ready, done = threading.Event(), threading.Event()

    def other():
        before = lf.held()
        # The first thread's lock is another owner's here.
        seen = lf.conflicts("exclusive", 0)
        assert seen is not None and seen.kind == "shared"
        lf.acquire("shared", 5)
        lf.release(0)  # not this thread's: harmless
        ready.set()
        done.wait(JOIN)
        return before, lf.held()

    t = Runner(other)
    t.start()
    assert ready.wait(JOIN)
    assert lf.held() == [(range(0, 2), "shared")]
    assert ofd_held(lock_path) == "RR...R...."
    done.set()
    assert t.outcome() == ([], [(range(5, 6), "shared")])
    # The thread has ended: its owner is closed and its explicit lock gone.
    gc.collect()
    assert ofd_held(lock_path) == "RR........"


def test_thread_local_close_releases_every_thread(lock_path):
    lf = LocksFile(lock_path, thread_local=True)
    ready, done = threading.Event(), threading.Event()

    def other():
        lf.acquire("exclusive", 3)
        g = lf.read(4)
        ready.set()
        done.wait(JOIN)
        return g.held

    t = Runner(other)
    t.start()
    assert ready.wait(JOIN)
    assert ofd_held(lock_path) == "...WR....."
    lf.close()
    assert ofd_held(lock_path) == ".........."
    done.set()
    assert t.outcome() is False
    with pytest.raises(ValueError):
        lf.held()


def test_thread_local_is_refused_in_process_mode(lock_path):
    with pytest.raises(ValueError, match="thread_local=True needs mode=\"ofd\""):
        LocksFile(lock_path, mode="process", thread_local=True)
    assert "thread_local=True" in repr(LocksFile(lock_path, thread_local=True))


# --------------------------------------------------------------------------
# The temporary file of LocksFile()
# --------------------------------------------------------------------------


@pytest.fixture
def tmpdir_as_tempdir(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.filterwarnings("ignore::pylocksfile.NoLockWarning")  # a with block for the closing only
def test_the_temp_file_goes_on_close(tmpdir_as_tempdir):
    lf = LocksFile()
    path = lf.path
    assert os.path.dirname(path) == str(tmpdir_as_tempdir) and os.path.exists(path)
    with lf.write(1):
        pass
    lf.close()
    assert not os.path.exists(path)
    with LocksFile() as lf2:
        path2 = lf2.path
    assert not os.path.exists(path2)
    assert os.listdir(tmpdir_as_tempdir) == []


def test_the_temp_file_goes_when_collected(tmpdir_as_tempdir):
    lf = LocksFile(thread_local=True)
    path = lf.path
    del lf
    gc.collect()
    assert not os.path.exists(path)
    assert os.listdir(tmpdir_as_tempdir) == []


def test_a_file_given_by_path_stays(lock_path):
    lf = LocksFile(lock_path)
    lf.close()
    LocksFile(lock_path)
    gc.collect()
    assert lock_path.exists()


def test_a_file_put_in_place_of_the_temp_file_stays(tmpdir_as_tempdir):
    """Only the file it created is removed: one renamed over it is someone else's."""
    lf = LocksFile()
    other = tmpdir_as_tempdir / "other"
    other.write_bytes(b"x")
    os.replace(other, lf.path)
    lf.close()
    assert os.path.exists(lf.path)


def test_a_forked_child_leaves_the_temp_file(tmpdir_as_tempdir):
    lf = LocksFile()
    pid = os.fork()
    if pid == 0:
        try:
            lf.close()
            del lf
            gc.collect()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.exists(lf.path)
    lf.close()
    assert not os.path.exists(lf.path)
