"""Guard objects and their cells are reused (a freelist of Guard objects, a
LocksFile's cells refilled in place) and the guard path's three calls are
raw methods: none of that may let an old guard reach a newer guard's lock,
nor change what the calls accept."""

import gc
import inspect
import warnings

import pytest

from pylocksfile import Guard, LocksFile
from support import free


def test_a_guard_kept_after_its_block_never_releases_a_newer_guards_lock(pair):
    lf, other = pair
    with lf.write(5) as old:
        pass
    assert not old.held
    for _ in range(50):  # whatever cell or object the next guards get
        with lf.write(5):
            pass
    with lf.write(5) as new:
        old.release()
        old.__exit__(None, None, None)
        assert new.held
        assert not free(other, 5)
    assert free(other, 5)
    assert old.kind is None and not old.held


def test_a_released_guard_kept_while_others_come_and_go(pair):
    lf, other = pair
    kept = lf.write(1)
    kept.release()
    guards = [lf.write(i) for i in range(2, 12)]
    for g in guards:
        g.release()
    del guards
    gc.collect()
    newer = lf.write(1)
    kept.release()
    assert newer.held and not free(other, 1)
    newer.release()
    assert free(other, 1)


def test_a_guard_dropped_unreleased_frees_its_lock_and_its_cell_serves_again(pair):
    lf, other = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        g = lf.write(3)
        del g
        gc.collect()
    assert free(other, 3)
    g = lf.write(4)
    assert g.held and not free(other, 4) and free(other, 3)
    g.release()


def test_dropping_an_unreleased_guard_still_warns(pair):
    lf, _ = pair
    with pytest.warns(ResourceWarning, match="unreleased Guard"):
        g = lf.write(6)
        del g
        gc.collect()


def test_close_releases_live_guards_among_reused_cells(pair):
    lf, other = pair
    for i in range(20):
        with lf.write(i):
            pass
    live = [lf.write(i) for i in (30, 31)]
    lf.close()
    assert all(not g.held for g in live)
    assert free(other, 30) and free(other, 31)
    for g in live:
        g.release()  # harmless, as before


def test_nested_blocks_and_exceptions_release(pair):
    lf, other = pair
    with pytest.raises(KeyError):
        with lf.write(7) as a:
            with lf.read(8) as b:
                assert a.held and b.held
                raise KeyError("x")
    assert free(other, 7) and free(other, 8)


def test_the_raw_methods_take_what_pyo3s_took(pair):
    lf, other = pair
    with lf.write(span=9) as g:
        assert g.kind == "exclusive"
    with lf.write(9, timeout=None) as g:
        assert g.held
    with lf.read(9, blocking=False) as g:
        assert g.kind == "shared"
    with pytest.raises(TypeError):
        lf.write()
    with pytest.raises(TypeError):
        lf.write(1, 2)
    with pytest.raises(TypeError):
        lf.write(1, nope=True)
    g = lf.write(10)
    assert g.__enter__() is g
    assert g.__exit__(exc_type=None, exc=None, tb=None) is False
    assert free(other, 10)
    g = lf.write(10)
    with pytest.raises(TypeError):
        g.__exit__(None, None, None, None)
    assert g.__exit__() is False
    with pytest.raises(TypeError):
        g.__enter__(1)
    assert free(other, 10)


def test_signatures_are_kept():
    # PyO3's text signatures, shown as before.
    assert str(inspect.signature(LocksFile.write)) == "(self, /, span, *, blocking=True, timeout=None)"
    assert str(inspect.signature(LocksFile.read)) == "(self, /, span, *, blocking=True, timeout=None)"
    assert str(inspect.signature(Guard.__exit__)) == "(self, /, exc_type=None, exc=None, tb=None)"
    assert LocksFile.write.__doc__ and "exclusive lock" in LocksFile.write.__doc__


def test_a_subclass_of_locksfile_takes_through_the_raw_methods(tmp_path):
    class Mine(LocksFile):
        pass

    lf = Mine(str(tmp_path / "sub.lock"), mode="shm")
    with lf.write(2) as g:
        assert g.held
    lf.close()


def test_a_weakly_referenced_released_guard_is_never_reused(pair):
    import weakref

    lf, other = pair
    with lf.write(5) as g:
        pass
    wr = weakref.ref(g)
    del g
    with lf.write(5) as new:
        old = wr()
        assert old is not new
        if old is not None:
            assert not old.held
            old.release()
        assert new.held and not free(other, 5)
    assert free(other, 5)


def test_the_same_object_may_serve_again_only_when_nothing_holds_it(pair):
    lf, other = pair
    kept = []
    for i in range(5):
        with lf.write(i) as g:
            kept.append(g)
    assert len({id(g) for g in kept}) == 5
    with lf.write(20) as new:
        for g in kept:
            g.release()
            assert g.span != new.span
        assert new.held and not free(other, 20)


def test_a_collected_locksfile_with_a_kept_guard_goes(tmp_path):
    import weakref

    lf = LocksFile(str(tmp_path / "gone.lock"), mode="shm")
    with lf.write(1):
        pass
    lf.write(2).release()
    wr = weakref.ref(lf)
    del lf
    gc.collect()
    assert wr() is None


def test_a_guard_reused_after_close_is_not_possible(pair):
    lf, other = pair
    with lf.write(1):
        pass
    lf.close()
    with pytest.raises(ValueError):
        lf.write(1)
    assert free(other, 1)


def test_the_methods_looked_up_on_a_guard(pair):
    lf, other = pair
    g = lf.write(11)
    enter, exit_ = g.__enter__, g.__exit__
    assert enter.__self__ is g and exit_.__self__ is g
    assert enter() is g
    assert exit_(None, None, None) is False
    assert free(other, 11)
    # A bound method kept keeps its guard from being reused.
    with lf.write(12) as new:
        assert new is not g
        exit_()
        assert new.held and not free(other, 12)
    # On the class: PyO3's methods, as before.
    g = lf.write(13)
    assert Guard.__enter__(g) is g
    assert Guard.__exit__(g, None, None, None) is False
    assert free(other, 13)
    with pytest.raises(TypeError):
        Guard.__dict__["__exit__"].__get__(object(), object)()
    with pytest.raises(TypeError):
        g.__exit__(None, None, None, None)
    with pytest.raises(TypeError):
        g.__exit__(nope=1)


def test_many_bound_methods_alive_at_once(pair):
    lf, other = pair
    guards = [lf.write(i) for i in range(40, 80)]
    bound = [(g.__enter__, g.__exit__) for g in guards]
    for e, x in bound:
        assert e().held
    for e, x in reversed(bound):
        x(None, None, None)
    del bound, guards
    gc.collect()
    assert all(free(other, i) for i in range(40, 80))


def test_with_blocks_in_threads(pair):
    import threading

    lf, _ = pair
    errors = []

    def run(base):
        try:
            for n in range(300):
                with lf.write(base + n % 3) as g:
                    assert g.held
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(100 + 10 * i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


def test_keyword_forms_of_write_keep_their_meaning(pair):
    lf, other = pair
    with lf.write(14, timeout=None) as g:
        assert g.held and not free(other, 14)
    with lf.write(14, blocking=False, timeout=None) as g:
        assert g.held
    with lf.write(14, timeout=0.5, blocking=True) as g:
        assert g.held
    with lf.read(14, timeout=1) as g:
        assert g.kind == "shared"
    with other.write(14):
        from pylocksfile import LockTimeout, WouldBlockError

        with pytest.raises(WouldBlockError):
            lf.write(14, blocking=False)
        with pytest.raises(LockTimeout):
            lf.write(14, timeout=0.05)
        with pytest.raises(WouldBlockError):
            lf.write(14, blocking=False, timeout=5)
    with pytest.raises(TypeError):
        lf.write(14, blocking=1)
    with pytest.raises(ValueError):
        lf.write(14, timeout=-1.0)
    with pytest.raises(TypeError):
        lf.write(14, timeout="1")
    with pytest.raises(TypeError):
        lf.write(14, blocking=True, blocking2=True)
    assert free(other, 14)
