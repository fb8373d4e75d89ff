"""Objects inherited through fork never release their parent's locks.

A worker process (the parent) takes locks, forks a child that releases,
closes and deletes what it inherited, and the test process (a third
process) checks the kernel's table and probes with fcntl while the child is
still alive and after it has exited."""

import errno
import multiprocessing
import os

import pytest

import support

FORK_CODE = """
r1, w1 = os.pipe()
r2, w2 = os.pipe()
child = os.fork()
if child == 0:
    # Own only the ends it uses, so it sees EOF (and exits) if the parent dies.
    os.close(r1)
    os.close(w2)
    results = []
    def step(src):
        try:
            value = eval(src)
        except BaseException as e:
            value = type(e).__name__
        results.append(value if value is None or isinstance(value, (bool, str, int, list)) else repr(value))
    try:
        for src in ACTIONS:
            step(src)
        os.write(w1, repr(results).encode())
    except BaseException as e:
        os.write(w1, repr(["ERR", repr(e)]).encode())
    os.read(r2, 1)
    os._exit(0)
os.close(w1)
os.close(r2)
report = eval(os.read(r1, 1 << 16).decode())
"""

EXIT_CHILD = "os.write(w2, b'x'); os.waitpid(child, 0)"


def run_child(w, actions):
    w.exec(f"ACTIONS = {actions!r}\n" + FORK_CODE)
    return w.eval("report"), w.eval("child")


@pytest.mark.parametrize("mode", ["process", "shm"])
def test_seed_object_in_a_forked_child_is_a_fresh_owner(spawn_worker, lock_path, mode):
    w = spawn_worker()
    w.exec(f"lf = pylocksfile(path, mode={mode!r})")
    assert w.eval("lf.acquire(writeLock=True, lock_n=(0, 2))") is True
    assert w.eval("lf.acquire(writeLock=False, lock_n=3)") is True
    report, child = run_child(
        w,
        [
            "lf.acquire(writeLock=True, lock_n=0, blocking=False)",  # the parent's: refused
            "lf.release()",
            "lf.release((0, 4))",
            "lf.acquire(writeLock=False, lock_n=3, blocking=False)",  # shares the parent's read
            "lf.acquire(writeLock=True, lock_n=5, blocking=False)",  # its own
            f"support.held_map(path, os.getpid(), mode={mode!r})",
            "lf.release(3)",
            "globals().pop('lf') and None",
            "gc.collect() and None",
            f"support.held_map(path, os.getpid(), mode={mode!r})",
        ],
    )
    assert report == [False, None, None, True, True, "...R.W....", None, None, None, ".........."]
    assert support.held_map(lock_path, w.pid, mode=mode) == "WW.R......"
    assert not support.can_lock(lock_path, 1, write=False, mode=mode)
    assert not support.can_lock(lock_path, 3, write=True, mode=mode)
    w.exec(EXIT_CHILD)
    assert support.held_map(lock_path, w.pid, mode=mode) == "WW.R......"
    assert support.held_map(lock_path, child, mode=mode) == ".........."
    # The parent's object still works normally.
    w.exec("lf.release(0)")
    assert support.held_map(lock_path, w.pid, mode=mode) == ".W.R......"


@pytest.mark.parametrize("mode", support.MODES)
def test_modern_object_in_a_forked_child_never_touches_the_parents_locks(spawn_worker, lock_path, mode):
    w = spawn_worker()
    w.exec(f"lf = LocksFile(path, mode={mode!r})")
    w.exec("g = lf.write(0)\nlf.acquire('shared', (2, 2))")
    owner = -1 if mode == "ofd" else w.pid  # shm: the table names the pid
    assert support.held_map(lock_path, owner, mode=mode) == "W.RR......"
    report, child = run_child(
        w,
        [
            "lf.write(7)",
            "lf.acquire('exclusive', 8, blocking=False)",
            "g.release()",
            "lf.release((2, 1))",
            "lf.release()",
            "lf.close()",
            "globals().pop('g') and None",
            "globals().pop('lf') and None",
            "gc.collect() and None",
        ],
    )
    assert report[0] == "ForkedError" and report[1] == "ForkedError", report
    assert all(r in (None, "ForkedError") for r in report[2:]), report
    assert support.held_map(lock_path, owner, mode=mode) == "W.RR......"
    assert support.held_map(lock_path, child, mode=mode) == ".........."
    assert not support.can_lock(lock_path, 0, write=False, mode=mode)
    assert not support.can_lock(lock_path, 3, write=True, mode=mode)
    w.exec(EXIT_CHILD)
    assert support.held_map(lock_path, owner, mode=mode) == "W.RR......"
    assert not support.can_lock(lock_path, 0, write=False, mode=mode)
    # In the parent everything still works, and a fresh object in a child works too.
    w.exec("g.release()")
    assert support.held_map(lock_path, owner, mode=mode) == "..RR......"
    report, child = run_child(w, [f"LocksFile(path, mode={mode!r}).try_write(0) is not None", f"LocksFile(path, mode={mode!r}).try_write(2) is None"])
    assert report == [True, True]
    w.exec(EXIT_CHILD)


def _mp_child_uses_inherited(lf, results):
    results[0] = int(lf.acquire(writeLock=True, lock_n=0, blocking=False))
    results[1] = int(lf.acquire(writeLock=True, lock_n=1, blocking=False))
    lf.release()
    del lf


def test_multiprocessing_fork_child_with_an_inherited_object(lock_path):
    from pylocksfile import pylocksfile

    lf = pylocksfile(str(lock_path))
    assert lf.acquire(writeLock=True, lock_n=0) is True
    ctx = multiprocessing.get_context("fork")
    results = ctx.Array("i", [-1, -1], lock=False)
    p = ctx.Process(target=_mp_child_uses_inherited, args=(lf, results))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert list(results) == [0, 1]
    assert support.held_map(lock_path, os.getpid()) == "W........."
    assert not support.can_lock(lock_path, 0)
    lf.release()
    assert support.can_lock(lock_path, 0)


def _mp_child_opens_by_path(path, conn):
    from pylocksfile import pylocksfile

    lf = pylocksfile(path)
    conn.send(
        (
            lf.acquire(writeLock=True, lock_n=0, blocking=False),
            lf.acquire(writeLock=False, lock_n=1, blocking=False),
            lf.acquire(writeLock=True, lock_n=2, blocking=False),
        )
    )
    conn.recv()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_start_methods(lock_path, method):
    from pylocksfile import pylocksfile

    lf = pylocksfile(str(lock_path))
    assert lf.acquire(writeLock=True, lock_n=0) is True
    assert lf.acquire(writeLock=False, lock_n=1) is True
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_mp_child_opens_by_path, args=(str(lock_path), child))
    p.start()
    assert parent.poll(30)
    assert parent.recv() == (False, True, True)
    assert support.held_map(lock_path, p.pid) == ".RW......."
    parent.send("done")
    p.join(30)
    assert p.exitcode == 0
    assert support.held_map(lock_path, p.pid) == ".........."
    assert support.held_map(lock_path, os.getpid()) == "WR........"
    lf.release()


def _busy_write(path, index):
    from pylocksfile import LocksFile

    LocksFile(path, mode="process").acquire("exclusive", index, blocking=False)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_lock_errors_cross_process_boundaries(lock_path, method):
    """A pool task failing with WouldBlockError reaches the parent as that
    error (multiprocessing pickles it), naming the holder."""
    from pylocksfile import LocksFile, WouldBlockError

    mine = LocksFile(lock_path, mode="process")
    mine.acquire("exclusive", 4)
    with multiprocessing.get_context(method).Pool(1) as pool:
        with pytest.raises(WouldBlockError) as info:
            pool.apply(_busy_write, (str(lock_path), 4))
    e = info.value
    assert e.errno == errno.EAGAIN
    if e.holder is not None:
        assert (e.holder.span, e.holder.kind, e.holder.pid) == (range(4, 5), "exclusive", os.getpid())


def test_lock_errors_pickle(lock_path):
    import pickle

    from pylocksfile import IllegalArgumentError, LocksFile, LockTimeout, WouldBlockError, pylocksfile

    a, b = LocksFile(lock_path), LocksFile(lock_path)
    g = a.write(0)
    errors = []
    for call in (
        lambda: b.acquire("exclusive", 0, blocking=False),
        lambda: b.write(0, timeout=0),
        lambda: pylocksfile(str(lock_path)).acquire(lock_n=-1),
    ):
        with pytest.raises((WouldBlockError, LockTimeout, IllegalArgumentError)) as info:
            call()
        errors.append(info.value)
    for e in errors:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and back.args == e.args
        assert getattr(back, "holder", None) == getattr(e, "holder", None)
    g.release()


@pytest.mark.parametrize("make", ["pylocksfile(path)", "LocksFile(path, mode='process')"])
def test_dropping_an_inherited_object_keeps_the_childs_own_locks(spawn_worker, lock_path, make):
    """Closing any descriptor of a file drops the calling process's POSIX
    locks on it: the inherited object's descriptors must not be closed under
    the child's own, newer objects."""
    w = spawn_worker()
    w.exec(f"inh = {make}")
    w.exec("inh.acquire(writeLock=True, lock_n=0)" if make.startswith("pyl") else "inh.acquire('exclusive', 0)")
    report, child = run_child(
        w,
        [
            "globals().__setitem__('fresh', pylocksfile(path)) or fresh.acquire(writeLock=True, lock_n=5)",
            "globals().__setitem__('fresh2', LocksFile(path, mode='process')) or fresh2.acquire('exclusive', 7)",
            "support.held_map(path, os.getpid())",
            "globals().pop('inh') and None",
            "gc.collect() and None",
            "support.held_map(path, os.getpid())",
        ],
    )
    assert report == [True, None, ".....W.W..", None, None, ".....W.W.."]
    assert w.held() == "W........."
    w.exec(EXIT_CHILD)
    assert w.held() == "W........."


@pytest.mark.parametrize("mode", support.MODES)
def test_every_guard_and_object_method_refuses_in_a_forked_child(spawn_worker, lock_path, mode):
    """Each call on an inherited guard or object raises ForkedError in the
    child, changes nothing there and never touches the parent's locks
    (in OFD mode the child shares them through the open file description)."""
    w = spawn_worker()
    w.exec(f"lf = LocksFile(path, mode={mode!r})")
    w.exec("gr = lf.read(0)\ngw = lf.write(2)\nlf.acquire('shared', 4)")
    owner = -1 if mode == "ofd" else w.pid  # shm: the table names the pid
    assert support.held_map(lock_path, owner, mode=mode) == "R.W.R....."
    calls = [
        "gw.downgrade()",
        "gr.upgrade()",
        "gr.upgrade(blocking=False)",
        "gr.upgrade(timeout=0.1)",
        "gw.release()",
        "gr.release()",
        "gw.__enter__()",
        "gr.__exit__(None, None, None)",
        "lf.read(6)",
        "lf.write(6, timeout=0.1)",
        "lf.try_read(6)",
        "lf.try_write(6)",
        "lf.read_for(6, 0.1)",
        "lf.write_for(6, 0.1)",
        "lf.acquire('exclusive', 6)",
        "lf.release(4)",
        "lf.release()",
        "lf.held()",
        "lf.held_explicitly()",
        "lf.conflicts(0)",
        "lf.fileno()",
        "lf.writable",
        "lf.__enter__()",
    ]
    report, child = run_child(w, calls + ["[gr.kind, gw.kind, gr.held, gw.held]"])
    assert dict(zip(calls, report)) == {c: "ForkedError" for c in calls}
    assert report[-1] == ["shared", "exclusive", True, True], "the child's guards changed"
    assert support.held_map(lock_path, owner, mode=mode) == "R.W.R....."
    assert support.held_map(lock_path, child, mode=mode) == ".........."
    w.exec(EXIT_CHILD)
    assert support.held_map(lock_path, owner, mode=mode) == "R.W.R....."
    assert not support.can_lock(lock_path, 2, write=False, mode=mode)
    # The parent's guards still work.
    w.exec("gw.downgrade()\ngr.upgrade()")
    assert support.held_map(lock_path, owner, mode=mode) == "W.R.R....."


def test_ofd_lock_outlives_its_holder_in_a_forked_child(spawn_worker, lock_path):
    """The README's caveat: a child forked by the holder (no exec) keeps the
    open file description, so the holder's OFD lock survives the holder's
    death until that child exits too."""
    r, w_end = os.pipe()
    try:
        holder = spawn_worker()  # forked from this process: it has both pipe ends
        holder.exec(f"os.close({w_end})\nlf = LocksFile(path)\ng = lf.write(0)")
        # The grandchild keeps only the lock's descriptor and the pipe's read
        # end (so the holder's other pipes see the holder die), and waits for
        # this test to close the pipe's write end.
        holder.exec(
            "keep = sorted({%d, lf.fileno()})\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    os.closerange(3, keep[0])\n"
            "    os.closerange(keep[0] + 1, keep[1])\n"
            "    os.closerange(keep[1] + 1, 1 << 16)\n"
            "    os.read(%d, 1)\n"
            "    os._exit(0)\n" % (r, r)
        )
        assert not support.can_lock(lock_path, 0, write=False)
        holder.kill()
        assert not holder.proc.is_alive()
        assert not support.can_lock(lock_path, 0, write=False), "the forked child keeps the dead holder's lock"
        assert [(lk.family, lk.kind) for lk in support.kernel_locks(lock_path)] == [("OFDLCK", "W")]
    finally:
        os.close(w_end)
        os.close(r)
    support.wait_until(lambda: support.kernel_locks(lock_path) == [], what="the child to exit and the lock to go")
    assert support.can_lock(lock_path, 0, write=True)
