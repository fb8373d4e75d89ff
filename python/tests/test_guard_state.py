"""A guard's state (held, released, closed, converting) and its LocksFile's
handle are kept without locks, the GIL keeping the calls that reach them
apart; the one reader without the GIL is an upgrade's wait. These tests
walk every transition, through the with statement's fast calls and by hand,
and race releases against upgrades from other threads."""

import gc
import random
import threading
import warnings

import pytest

from pylocksfile import LocksFile
from support import free, shared_free


def test_every_transition_shows_in_held_kind_and_repr(pair):
    lf, other = pair
    g = lf.write(3)
    assert g.held and g.kind == "exclusive" and "exclusive" in repr(g)
    assert not shared_free(other, 3)
    assert g.downgrade() is g
    assert g.held and g.kind == "shared" and "shared" in repr(g)
    assert shared_free(other, 3) and not free(other, 3)
    assert g.upgrade() is g
    assert g.kind == "exclusive" and not shared_free(other, 3)
    g.release()
    assert not g.held and g.kind is None and "released" in repr(g)
    assert free(other, 3)
    g.release()  # twice: harmless
    with pytest.raises(RuntimeError, match="released"):
        g.upgrade()
    with pytest.raises(RuntimeError, match="released"):
        g.downgrade()
    assert not g.held and free(other, 3)


def test_a_closed_guard_stays_closed(pair):
    lf, other = pair
    g = lf.read(4)
    with lf.write(5) as w:
        lf.close()
        assert not w.held and w.kind is None
    assert not g.held and g.kind is None and "released" in repr(g)
    with pytest.raises(ValueError, match="closing"):
        g.upgrade()
    g.release()  # harmless
    assert free(other, 4) and free(other, 5)
    with pytest.raises(ValueError):
        lf.write(4)
    with pytest.raises(ValueError):
        with lf.write(4):
            pass


def test_a_block_that_raises_releases_and_its_guard_serves_again(pair):
    lf, other = pair
    for i in range(3):
        with pytest.raises(KeyError):
            with lf.write(6) as g:
                assert g.held and not free(other, 6)
                raise KeyError(i)
        assert not g.held and free(other, 6)
    del g
    with lf.write(6) as g:
        assert g.held and g.kind == "exclusive" and not free(other, 6)
    assert free(other, 6)


def test_a_guard_whose_earlier_holder_kept_it_is_not_the_next(pair):
    lf, other = pair
    with lf.write(7) as kept:
        pass
    with lf.write(7) as new:
        assert new is not kept
        assert not kept.held and new.held
        # The old object's calls never reach the new lock.
        kept.release()
        kept.__exit__(None, None, None)
        with pytest.raises(RuntimeError, match="released Guard"):
            with kept:
                raise AssertionError("a released guard's block ran")
        assert new.held and not free(other, 7)
    assert free(other, 7)


def test_exit_by_hand_with_an_exception_releases_and_never_swallows(pair):
    lf, other = pair
    g = lf.write(8)
    assert g.__exit__(KeyError, KeyError("x"), None) is False
    assert not g.held and free(other, 8)
    g = lf.write(8)
    g.__enter__()
    assert g.__exit__(None, None) is False
    assert not g.held and free(other, 8)
    g = lf.write(8)
    assert g.__exit__(tb=None, exc=None, exc_type=None) is False
    assert not g.held and free(other, 8)


def test_nested_blocks_of_one_guard_release_at_the_outermost_end(pair):
    lf, other = pair
    g = lf.write(9)
    with g as a:
        with g as b:
            with g:
                assert a is b is g and g.held
            assert g.held and not free(other, 9)
        # The inner blocks' ends left the lock to the outer block.
        assert g.held and not free(other, 9)
    assert not g.held and free(other, 9)
    # An exception through nested blocks: the outermost end releases.
    g = lf.write(9)
    with pytest.raises(KeyError):
        with g:
            try:
                with g:
                    raise KeyError("x")
            finally:
                assert g.held and not free(other, 9)
    assert not g.held and free(other, 9)
    # An explicit release inside stands; the ends after it are harmless.
    g = lf.write(9)
    with g:
        with g:
            g.release()
            assert free(other, 9)
        assert not g.held
    assert not g.held and free(other, 9)


def test_a_released_guard_cannot_be_entered(pair):
    lf, other = pair
    g = lf.write(9)
    g.release()
    ran = []
    with pytest.raises(RuntimeError, match="released Guard"):
        with g:
            ran.append(True)
    with pytest.raises(RuntimeError):
        g.__enter__()
    assert ran == [] and free(other, 9)
    # Released by closing its LocksFile: ValueError, as a closed file's.
    g = lf.write(9)
    lf.close()
    with pytest.raises(ValueError, match="closing its LocksFile"):
        with g:
            ran.append(True)
    assert ran == [] and free(other, 9)
    # A refused entry changes nothing: a later guard is entered as usual.
    lf2 = LocksFile(other.path, mode=other.mode)
    with lf2.write(9) as g2:
        assert g2.held and not free(other, 9)
    assert free(other, 9)
    lf2.close()


def test_a_with_of_one_locks_file_nested_keeps_the_outer_blocks_locks(pair):
    lf, other = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lf:
            g = lf.write(11)
            with lf:
                pass
            # The inner block's end did not close the handle.
            assert not lf.closed and g.held and not free(other, 11)
            with lf.write(12):
                assert not free(other, 12)
        assert lf.closed and not g.held and free(other, 11)


def test_a_with_of_one_locks_file_in_two_threads_closes_at_the_last_end(pair):
    lf, other = pair
    inside, ended = threading.Barrier(2), threading.Event()

    def second():
        with lf:
            with lf.write(14):
                inside.wait()
        ended.set()

    with lf:
        g = lf.write(13)
        t = threading.Thread(target=second)
        t.start()
        inside.wait()
        assert ended.wait(60)
        # The other thread's block ended first: this block keeps its lock.
        assert not lf.closed and g.held and not free(other, 13)
        t.join()
    assert lf.closed and free(other, 13) and free(other, 14)


def test_an_unreleased_guard_dropped_warns_once_and_frees(pair):
    lf, other = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lf.write(10)
        gc.collect()
        with lf.write(10) as g:
            assert g.held
        del g
        gc.collect()
    assert [w.category for w in caught] == [ResourceWarning]
    assert free(other, 10)


def test_a_thread_local_object_takes_and_closes(tmp_path):
    path = str(tmp_path / "local.lock")
    lf = LocksFile(path, mode="shm", thread_local=True)
    other = LocksFile(path, mode="shm")
    out = []

    def run():
        with lf.write(11) as g:
            out.append(g.held and not free(other, 11))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    with lf.write(11) as g:
        out.append(g.held)
    lf.close()
    with pytest.raises(ValueError):
        lf.write(11)
    assert out == [True, True] and free(other, 11)
    other.close()


@pytest.mark.parametrize("mode", ["shm"])
def test_releases_racing_upgrades_end_every_upgrade(tmp_path, mode):
    """An upgrade that must wait (another owner reads the span) while its
    guard is released by this thread, at every moment of its start: the
    upgrade always ends (RuntimeError, nothing held); none waits on."""
    path = str(tmp_path / "race.lock")
    lf = LocksFile(path, mode=mode)
    other = LocksFile(path, mode=mode)
    rnd = random.Random(7)
    for n in range(60):
        reader = other.read(0)
        g = lf.read(0)
        result = []

        def up():
            try:
                g.upgrade()
                result.append("upgraded")
            except RuntimeError as e:
                result.append(str(e))

        t = threading.Thread(target=up, daemon=True)
        t.start()
        # Anywhere from before the upgrade starts to while it waits.
        for _ in range(rnd.randrange(0, 200)):
            pass
        if n % 3 == 0:
            threading.Event().wait(rnd.random() * 0.002)
        g.release()
        # The other reader still holds: an upgrade that missed the release
        # would wait here for ever.
        t.join(10)
        alive = t.is_alive()
        reader.release()
        t.join(10)
        assert not alive, f"round {n}: the upgrade waited on after its guard's release"
        assert len(result) == 1 and "released" in result[0], result
        assert not g.held and lf.held() == []
        assert free(other, 0)
    lf.close()
    other.close()


# A `read(i)`/`write(i)` guard borrows its LocksFile's handle without a
# count; these check that the handle stays as long as any such lock lives.


def test_a_guard_outlives_its_locksfile(pair, tmp_path):
    import weakref

    _, other = pair
    path = other.path
    mode = other.mode
    lf = LocksFile(path, mode=mode)
    g = lf.write(1)
    with lf.write(2):
        pass
    wr = weakref.ref(lf)
    del lf
    gc.collect()
    assert wr() is None
    assert g.held and g.kind == "exclusive" and not shared_free(other, 1)
    assert g.downgrade() is g and g.kind == "shared"
    assert shared_free(other, 1) and not free(other, 1)
    assert g.upgrade() is g and g.kind == "exclusive"
    g.release()
    assert not g.held and free(other, 1)
    # Dropped unreleased after its LocksFile: warns, and frees the lock.
    lf = LocksFile(path, mode=mode)
    g = lf.write(3)
    del lf
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del g
        gc.collect()
    assert [w.category for w in caught] == [ResourceWarning]
    assert free(other, 3)


@pytest.mark.parametrize("end", ["close", "drop"])
def test_a_warning_that_ends_the_locksfile_of_the_guard_it_reports(pair, end):
    _, other = pair
    owners = {"lf": LocksFile(other.path, mode=other.mode)}
    g = owners["lf"].write(4)
    assert not free(other, 4)
    seen = []

    def handler(message, category, filename, lineno, file=None, line=None):
        seen.append(category)
        lf = owners.pop("lf")
        if end == "close":
            lf.close()
        del lf
        gc.collect()

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = handler
        del g
        gc.collect()
    assert seen == [ResourceWarning]
    assert free(other, 4)


def test_a_locksfile_collected_while_its_guard_upgrades(tmp_path):
    import support

    path = str(tmp_path / "upgrade.lock")
    other = LocksFile(path, mode="shm")
    reader = other.read(0)
    lf = LocksFile(path, mode="shm")
    g = lf.read(0)
    out = []
    t = threading.Thread(target=lambda: out.append(g.upgrade()), daemon=True)
    t.start()
    support.wait_until(lambda: any(lk.waiting for lk in support.table_locks(path)), what="the upgrade to wait")
    del lf
    gc.collect()
    reader.release()
    t.join(10)
    assert not t.is_alive() and out == [g]
    assert g.kind == "exclusive" and not shared_free(other, 0)
    g.release()
    assert free(other, 0)
    other.close()
