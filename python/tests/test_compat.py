"""Drop-in compatibility with pylocksfile 0.0.6, following its README: names,
constructor, properties, verbose output and argument checking.

Locks taken in this process are observed through /proc/locks (the kernel's
own table), never through the package."""

import os
import stat
import tempfile

import pytest

import support
from pylocksfile import IllegalArgumentError, IllegalWithStatement, __version__, pylocksfile

ME = os.getpid()


def held(path, width=10):
    return support.held_map(path, ME, width)


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


def test_seed_names_import():
    import pylocksfile as pkg

    assert pkg.pylocksfile is pylocksfile
    assert isinstance(__version__, str) and __version__
    assert issubclass(IllegalArgumentError, ValueError)
    assert issubclass(IllegalWithStatement, ValueError)
    assert not issubclass(IllegalArgumentError, IllegalWithStatement)


def test_star_import():
    import pylocksfile as pkg

    ns = {}
    exec("from pylocksfile import *", ns)  # noqa: S102
    assert ns["pylocksfile"] is pylocksfile
    assert "pylocksfile" in pkg.__all__
    for name in pkg.__all__:
        assert hasattr(pkg, name), f"__all__ names {name!r}, which does not exist"
        assert ns[name] is getattr(pkg, name)


# --------------------------------------------------------------------------
# Constructor and properties
# --------------------------------------------------------------------------


def test_default_path_is_a_fresh_private_file_in_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    a = pylocksfile()
    b = pylocksfile()
    for lf in (a, b):
        p = lf.locksfile_path
        assert os.path.isabs(p)
        assert os.path.dirname(p) == str(tmp_path)
        st = os.stat(p)
        assert stat.S_ISREG(st.st_mode)
        assert st.st_mode & 0o077 == 0, f"lock file {p} is open to others: {oct(st.st_mode)}"
    assert a.locksfile_path != b.locksfile_path
    assert a.acquire(writeLock=True, lock_n=3) is True
    assert held(a.locksfile_path) == "...W......"
    assert not support.can_lock(a.locksfile_path, 3)


def test_existing_file_content_is_kept(lock_path):
    lock_path.write_bytes(b"precious data\n")
    lf = pylocksfile(locksfile_path=str(lock_path))
    assert lf.acquire(writeLock=True, lock_n=(0, 4)) is True
    lf.release()
    del lf
    assert lock_path.read_bytes() == b"precious data\n"


def test_path_given_as_pathlike(lock_path):
    lf = pylocksfile(lock_path)
    assert lf.locksfile_path == str(lock_path)
    assert lock_path.exists()


def test_relative_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lf = pylocksfile("rel.lock")
    assert isinstance(lf.locksfile_path, str)
    assert lf.locksfile_path == str(tmp_path / "rel.lock")
    assert (tmp_path / "rel.lock").exists()


def test_missing_directory_is_an_illegal_argument(tmp_path):
    with pytest.raises(IllegalArgumentError):
        pylocksfile(locksfile_path=str(tmp_path / "no" / "such" / "dir" / "x.lock"))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("verbose", [1, 0, "yes", None, 1.0])
def test_non_bool_verbose_is_an_illegal_argument(lock_path, verbose):
    with pytest.raises(IllegalArgumentError, match="verbose"):
        pylocksfile(locksfile_path=str(lock_path), verbose=verbose)


def test_l_id_defaults_to_the_pid(lock_path):
    lf = pylocksfile(locksfile_path=str(lock_path))
    assert str(lf.l_id) == str(os.getpid())


def test_l_id_is_kept(lock_path):
    lf = pylocksfile(locksfile_path=str(lock_path), verbose=False, l_id="process_1")
    assert lf.l_id == "process_1"


def test_properties(lock_path):
    lf = pylocksfile(locksfile_path=str(lock_path), verbose=False, l_id="p")
    assert lf.locksfile_path == str(lock_path)
    assert lf.verbose is False
    lf.verbose = True
    assert lf.verbose is True
    lf.verbose = False
    assert lf.verbose is False


def test_l_id_default_in_a_child_is_the_childs_pid(spawn_worker):
    w = spawn_worker("spawn")
    w.exec("lf = pylocksfile(path)")
    assert str(w.eval("lf.l_id")) == str(w.pid)


# --------------------------------------------------------------------------
# Verbose output
# --------------------------------------------------------------------------


def test_verbose_prints_each_operation_prefixed_by_l_id(lock_path, capfd):
    lf = pylocksfile(locksfile_path=str(lock_path), verbose=True, l_id="Sparrow")
    capfd.readouterr()

    def lines():
        out = capfd.readouterr().out
        got = [ln for ln in out.splitlines() if ln.strip()]
        assert got, "verbose=True printed nothing"
        for ln in got:
            assert "Sparrow" in ln, f"line without the l_id: {ln!r}"
            assert ln.index("Sparrow") < len(ln) - len("Sparrow"), f"l_id is not a prefix: {ln!r}"
        return got

    assert lf.acquire(writeLock=True, lock_n=(0, 3)) is True
    assert any("acquired" in ln or "locked" in ln for ln in lines())
    assert lf.acquire(writeLock=False, lock_n=1) is True
    assert any("convert" in ln for ln in lines())
    lf.release(1)
    assert any("releas" in ln for ln in lines())
    lf.verbose = False
    lf.acquire(writeLock=True, lock_n=5)
    lf.release()
    assert capfd.readouterr().out == ""


def test_not_verbose_prints_nothing(lock_path, capfd):
    lf = pylocksfile(locksfile_path=str(lock_path), l_id="Quiet")
    lf.acquire(writeLock=True, lock_n=(0, 3))
    lf.acquire(writeLock=False, lock_n=1)
    with lf(writeLock=True, lock_n=7):
        pass
    lf.release()
    del lf
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_verbose_set_later_turns_output_on(lock_path, capfd):
    lf = pylocksfile(locksfile_path=str(lock_path), l_id="Late")
    lf.acquire(writeLock=True, lock_n=1)
    assert capfd.readouterr().out == ""
    lf.verbose = True
    lf.release(1)
    assert "Late" in capfd.readouterr().out


# --------------------------------------------------------------------------
# Bad arguments: IllegalArgumentError, a useful message, object still usable
# --------------------------------------------------------------------------

BIG = 2**63  # one past the kernel's largest offset

BAD_WRITELOCK = [1, 0, "True", None, 1.0]
BAD_BLOCKING = [1, 0, "False", None]
NEGATIVE = ("negative",)
COUNT = ("count", "positive")
SHAPE = ("(start, count)", "2", "pair", "items")
TYPE = ("int",)
RANGE = ("beyond", "range", "large", "last")

# (bad lock_n, words of which the message must contain one)
BAD_LOCK_N = [
    (-1, NEGATIVE),
    ((-1, 1), NEGATIVE),
    (-(2**100), NEGATIVE),
    ((0, 0), COUNT),
    ((0, -1), COUNT),
    ((3, -5), COUNT),
    ((1, 2, 3), SHAPE),
    ((1,), SHAPE),
    ((), SHAPE),
    ([1, 2, 3], SHAPE),
    ([4], SHAPE),
    ("3", TYPE),
    ("(1, 2)", TYPE),
    (1.5, TYPE),
    (2.0, TYPE),
    ((1.5, 2), TYPE),
    ((1, 2.0), TYPE),
    (("1", 2), TYPE),
    (None, TYPE),
    (BIG, RANGE),
    (2**64, RANGE),
    (2**100, RANGE),
    ((BIG, 1), RANGE),
    ((0, BIG), RANGE),
    ((0, 2**100), RANGE),
    ((2**62, 2**62 + 1), RANGE),
]


def assert_usable(lf, path):
    """No lock was taken by the bad call; the object still locks and releases."""
    assert held(path) == ".........."
    assert lf.acquire(writeLock=True, lock_n=2) is True
    assert held(path) == "..W......."
    lf.release(2)
    assert held(path) == ".........."


@pytest.mark.parametrize("value", BAD_WRITELOCK, ids=repr)
def test_bad_writelock(lock_path, value):
    lf = pylocksfile(str(lock_path))
    with pytest.raises(IllegalArgumentError, match="writeLock"):
        lf.acquire(writeLock=value, lock_n=0)
    assert_usable(lf, lock_path)


@pytest.mark.parametrize("value", BAD_BLOCKING, ids=repr)
def test_bad_blocking(lock_path, value):
    lf = pylocksfile(str(lock_path))
    with pytest.raises(IllegalArgumentError, match="blocking"):
        lf.acquire(writeLock=True, lock_n=0, blocking=value)
    assert_usable(lf, lock_path)


def assert_says_what_was_wrong(message, words):
    assert "lock_n" in message, f"message does not name lock_n: {message!r}"
    assert any(w in message for w in words), f"message does not say what was wrong: {message!r}"


@pytest.mark.parametrize("value, words", BAD_LOCK_N, ids=repr)
def test_bad_lock_n_in_acquire(lock_path, value, words):
    lf = pylocksfile(str(lock_path))
    with pytest.raises(IllegalArgumentError) as info:
        lf.acquire(writeLock=True, lock_n=value)
    assert_says_what_was_wrong(str(info.value), words)
    assert_usable(lf, lock_path)


@pytest.mark.parametrize("value, words", [b for b in BAD_LOCK_N if b[0] is not None], ids=repr)
def test_bad_lock_n_in_release(lock_path, value, words):
    lf = pylocksfile(str(lock_path))
    assert lf.acquire(writeLock=True, lock_n=(0, 5)) is True
    with pytest.raises(IllegalArgumentError) as info:
        lf.release(value)
    assert_says_what_was_wrong(str(info.value), words)
    assert held(lock_path) == "WWWWW.....", "a bad release must release nothing"
    lf.release()
    assert_usable(lf, lock_path)


@pytest.mark.parametrize("value", [(0, 0), -1, "x", 2**64], ids=repr)
def test_bad_lock_n_in_with(lock_path, value):
    lf = pylocksfile(str(lock_path))
    with pytest.raises((IllegalArgumentError, IllegalWithStatement)):
        with lf(writeLock=True, lock_n=value):
            pytest.fail("the body must not run")
    assert_usable(lf, lock_path)


def test_bad_writelock_in_with(lock_path):
    lf = pylocksfile(str(lock_path))
    with pytest.raises((IllegalArgumentError, IllegalWithStatement)):
        with lf(writeLock="yes", lock_n=1):
            pytest.fail("the body must not run")
    assert_usable(lf, lock_path)


def test_largest_indices_are_accepted(lock_path):
    """The kernel's range ends at 2**63 - 1; spans just inside it are fine."""
    lf = pylocksfile(str(lock_path))
    assert lf.acquire(writeLock=True, lock_n=BIG - 2) is True
    assert lf.acquire(writeLock=False, lock_n=(2**62, 2**62 - 2)) is True
    locks = [lk for lk in support.kernel_locks(lock_path) if lk.pid == ME]
    assert {(lk.kind, lk.start) for lk in locks} >= {("W", BIG - 2), ("R", 2**62)}
    lf.release()
    assert [lk for lk in support.kernel_locks(lock_path) if lk.pid == ME] == []


# --------------------------------------------------------------------------
# Accepted forms of lock_n
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lock_n, expect",
    [
        (0, "W........."),
        (4, "....W....."),
        ((2, 1), "..W......."),
        ((1, 3), ".WWW......"),
        ([5, 2], ".....WW..."),
    ],
    ids=repr,
)
def test_lock_n_forms(lock_path, lock_n, expect):
    lf = pylocksfile(str(lock_path))
    assert lf.acquire(writeLock=True, lock_n=lock_n) is True
    assert held(lock_path) == expect
    lf.release(lock_n)
    assert held(lock_path) == ".........."


def test_defaults_read_lock_on_zero_blocking(lock_path):
    lf = pylocksfile(str(lock_path))
    assert lf.acquire() is True
    assert held(lock_path) == "R........."
    lf.release()
    assert held(lock_path) == ".........."


def test_releasing_what_is_not_held_is_harmless(lock_path):
    lf = pylocksfile(str(lock_path))
    lf.release()
    lf.release(3)
    lf.release((0, 100))
    assert lf.acquire(writeLock=True, lock_n=1) is True
    lf.release(7)
    lf.release((2, 5))
    assert held(lock_path) == ".W........"


def test_readme_example(lock_path):
    """The README's usage example, step by step."""
    lf = pylocksfile(locksfile_path=str(lock_path), verbose=False, l_id="process_1")
    assert lf.acquire(writeLock=False, lock_n=0, blocking=True) is True
    assert held(lock_path) == "R........."
    assert lf.acquire(writeLock=True, lock_n=(1, 3), blocking=True) is True
    assert held(lock_path) == "RWWW......"
    with lf(writeLock=False, lock_n=(2, 1)):
        assert held(lock_path) == "RWRW......"
    assert held(lock_path) == "RW.W......"
    lf.release(lock_n=(0, 1))
    assert held(lock_path) == ".W.W......"
    lf.release(lock_n=(3, 997))
    assert held(lock_path) == ".W........"
    lf.release()
    assert held(lock_path) == ".........."


# --------------------------------------------------------------------------
# `lf(...)` outside a `with` statement
# --------------------------------------------------------------------------


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_calls_never_entered_leave_nothing_behind(lock_path):
    """Each call used to leave a record on the object (about 31 bytes) that
    only a `with` removed: 300,000 calls kept about 10 MB."""
    lf = pylocksfile(str(lock_path))
    for _ in range(300_000):  # warm up the allocator
        lf(writeLock=True, lock_n=(1, 3))
    before = rss_bytes()
    for _ in range(300_000):
        lf(writeLock=True, lock_n=(1, 3))
    grown = rss_bytes() - before
    assert grown < 2 * 1024 * 1024, f"300,000 calls kept {grown} bytes"
    with lf(writeLock=True, lock_n=2):
        assert held(lock_path) == "..W......."
    assert held(lock_path) == ".........."


def test_bare_with_after_a_call_never_entered_is_illegal(lock_path):
    """`lf(...)` without `with`, then a bare `with lf:`: the original raises
    for a bare `with`, and the stale call must not lend it its span."""
    lf = pylocksfile(str(lock_path))
    lf(writeLock=True, lock_n=3)
    with pytest.raises(IllegalWithStatement):
        with lf:
            pytest.fail("the body must not run")
    assert held(lock_path) == ".........."
    with lf(writeLock=True, lock_n=4):
        lf(writeLock=True, lock_n=5)  # stale, inside another statement
        with pytest.raises(IllegalWithStatement):
            with lf:
                pytest.fail("the body must not run")
        assert held(lock_path) == "....W....."
    assert held(lock_path) == ".........."


def test_a_call_kept_for_later_still_enters(lock_path):
    lf = pylocksfile(str(lock_path))
    statement = lf(writeLock=True, lock_n=(6, 2))
    assert held(lock_path) == ".........."
    with statement as entered:
        assert entered is lf
        assert held(lock_path) == "......WW.."
    assert held(lock_path) == ".........."
    # Code that used the call's result as the object itself still works.
    assert statement.locksfile_path == lf.locksfile_path
    assert statement.acquire(writeLock=True, lock_n=1) is True
    assert held(lock_path) == ".W........"
    statement.release()
    assert held(lock_path) == ".........."


def test_with_runs_a_subclass_enter_and_exit(lock_path):
    calls = []

    class Logged(pylocksfile):
        def __enter__(self):
            calls.append("enter")
            return super().__enter__()

        def __exit__(self, *exc):
            calls.append("exit")
            return super().__exit__(*exc)

    lf = Logged(str(lock_path))
    with lf(writeLock=False, lock_n=1) as entered:
        assert entered is lf
        assert held(lock_path) == ".R........"
    assert calls == ["enter", "exit"]
    assert held(lock_path) == ".........."


# --------------------------------------------------------------------------
# The mode keyword: process mode by default (what 0.0.6 takes), shm or OFD
# on request, anything else refused before a file is made
# --------------------------------------------------------------------------


def test_mode_defaults_to_process_and_excludes_the_original_packages_locks(lock_path):
    lf = pylocksfile(lock_path)
    assert lf.mode == "process"
    assert lf.acquire(writeLock=True, lock_n=4) is True
    # What pylocksfile 0.0.6 does: fcntl.lockf, process-associated, in
    # another process. It must be kept out.
    assert not support.can_lock(lock_path, 4)
    assert "mode=" not in repr(lf)


@pytest.mark.parametrize("mode", ["shm", "ofd"])
def test_other_modes_make_each_object_an_owner(lock_path, mode):
    a, b = pylocksfile(lock_path, mode=mode), pylocksfile(lock_path, mode=mode)
    assert a.mode == mode and f"mode={mode!r}".replace("'", '"') in repr(a)
    assert a.acquire(writeLock=True, lock_n=(2, 2)) is True
    # A second object in this very thread is another owner now.
    assert b.acquire(writeLock=False, lock_n=3, blocking=False) is False
    assert b.acquire(writeLock=True, lock_n=5, blocking=False) is True
    a.release()
    assert b.acquire(writeLock=True, lock_n=(2, 2), blocking=False) is True
    if mode == "shm":
        assert support.held_map(lock_path, os.getpid(), mode="shm") == "..WW.W...."


@pytest.mark.parametrize(
    "mode, words",
    [
        ("flock", "whole file"),
        ("SHM", 'got "SHM"'),
        ("", 'got ""'),
        (3, "got int"),
    ],
    ids=repr,
)
def test_a_bad_mode_is_an_illegal_argument_and_makes_no_file(lock_path, mode, words):
    with pytest.raises(IllegalArgumentError, match="mode") as info:
        pylocksfile(lock_path, mode=mode)
    assert words in str(info.value)
    assert not lock_path.exists()
    assert not (lock_path.parent / (lock_path.name + "-shm")).exists()


def test_mode_is_keyword_only(lock_path):
    with pytest.raises(TypeError):
        pylocksfile(str(lock_path), False, None, "shm")


def test_a_shm_deadlock_fails_the_acquire_and_the_with_raises(spawn_worker, lock_path):
    """As in process mode: the acquire that would close the cycle returns
    False (nothing acquired), and a blocking `with` raises DeadlockError."""
    a, b = spawn_worker(), spawn_worker()
    for w in (a, b):
        w.exec("lf = pylocksfile(path, mode='shm')")
    assert a.eval("lf.acquire(writeLock=True, lock_n=0)") is True
    assert b.eval("lf.acquire(writeLock=True, lock_n=1)") is True
    a.send_eval("lf.acquire(writeLock=True, lock_n=1)")
    a.wait_blocked(mode="shm")
    assert b.eval("lf.acquire(writeLock=True, lock_n=0)") is False
    with pytest.raises(support.RemoteError) as info:
        b.exec("with lf(writeLock=True, lock_n=0):\n    pass")
    assert info.value.isa("DeadlockError")
    assert support.held_map(lock_path, b.pid, mode="shm") == ".W........"
    b.exec("lf.release()")
    assert a.result() is True
    assert support.held_map(lock_path, a.pid, mode="shm") == "WW........"
