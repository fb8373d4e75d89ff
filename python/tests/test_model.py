"""Random sequences of acquire/release checked against a model, step by step.

The model of an owner: one layer per object (explicit acquire/release, the
last call on an index wins) plus one per live guard; the kernel must hold
each index at the strongest kind any layer asks for. After every step the
kernel's table (or the shm table, read from outside) is compared with the
model, and at the end of each sequence another process probes every index
with F_GETLK."""

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import support  # noqa: E402

WIDTH = 8
RANK = {".": 0, "R": 1, "W": 2}


def effective(*layers):
    return "".join(max(cells, key=RANK.__getitem__) for cells in zip(*layers))


def put(layer, start, count, kind):
    cells = list(layer)
    for i in range(start, min(start + count, WIDTH)):
        cells[i] = kind
    return "".join(cells)


def span_st():
    return st.integers(0, WIDTH - 1).flatmap(lambda s: st.tuples(st.just(s), st.integers(1, WIDTH - s)))


# --------------------------------------------------------------------------
# The original's API, two objects in one worker process
# --------------------------------------------------------------------------

seed_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(["a", "b"]), st.booleans(), span_st()),
        st.tuples(st.just("release"), st.sampled_from(["a", "b"]), st.none(), span_st()),
        st.tuples(st.just("release_all"), st.sampled_from(["a", "b"]), st.none(), st.none()),
    ),
    min_size=1,
    max_size=14,
)


@pytest.fixture(scope="module")
def seed_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "seed.lock"
    owner = support.Worker("fork", path)
    prober = support.Worker("fork", path)
    owner.exec("objs = {'a': pylocksfile(path), 'b': pylocksfile(path)}")
    prober.exec("fd = os.open(path, os.O_RDWR)")
    yield owner, prober
    owner.close()
    prober.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=seed_ops)
def test_seed_objects_match_the_model(seed_pair, ops):
    owner, prober = seed_pair
    owner.exec("objs['a'].release(); objs['b'].release()")
    layers = {"a": "." * WIDTH, "b": "." * WIDTH}
    assert owner.held(WIDTH) == "." * WIDTH
    for n, (op, who, write, span) in enumerate(ops):
        if op == "acquire":
            ok = owner.eval(f"objs[{who!r}].acquire(writeLock={write}, lock_n={span!r}, blocking=False)")
            assert ok is True, f"step {n}: {op} {who} {span}"
            layers[who] = put(layers[who], *span, "W" if write else "R")
        elif op == "release":
            owner.exec(f"objs[{who!r}].release({span!r})")
            layers[who] = put(layers[who], *span, ".")
        else:
            owner.exec(f"objs[{who!r}].release()")
            layers[who] = "." * WIDTH
        want = effective(layers["a"], layers["b"])
        assert owner.held(WIDTH) == want, f"after step {n} ({op} {who} {write} {span}): layers {layers}"
    # Another process's view, through F_GETLK.
    seen = prober.eval(f"[(support.getlk(fd, i, 1, True), support.getlk(fd, i, 1, False)) for i in range({WIDTH})]")
    want = effective(layers["a"], layers["b"])
    for i, (as_writer, as_reader) in enumerate(seen):
        if want[i] == ".":
            assert as_writer is None and as_reader is None, f"index {i}"
        elif want[i] == "R":
            assert as_writer == ("R", owner.pid) and as_reader is None, f"index {i}"
        else:
            assert as_writer == ("W", owner.pid) and as_reader == ("W", owner.pid), f"index {i}"


# --------------------------------------------------------------------------
# LocksFile: explicit layer and guards on one OFD owner in this process
# --------------------------------------------------------------------------

modern_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(["shared", "exclusive"]), span_st()),
        st.tuples(st.just("release"), st.none(), span_st()),
        st.tuples(st.just("release_all"), st.none(), st.none()),
        st.tuples(st.just("guard"), st.sampled_from(["shared", "exclusive"]), span_st()),
        st.tuples(st.just("drop"), st.integers(0, 5), st.none()),
        st.tuples(st.just("downgrade"), st.integers(0, 5), st.none()),
        st.tuples(st.just("upgrade"), st.integers(0, 5), st.none()),
    ),
    min_size=1,
    max_size=16,
)


def held_cells(held):
    cells = ["."] * WIDTH
    for r, kind in held:
        for i in r:
            if i < WIDTH:
                cells[i] = "W" if kind == "exclusive" else "R"
    return "".join(cells)


@pytest.mark.parametrize("mode", ["ofd", "shm"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=modern_ops)
def test_locksfile_matches_the_model(tmp_path_factory, ops, mode):
    from pylocksfile import LocksFile

    path = tmp_path_factory.mktemp("model") / "modern.lock"
    lf = LocksFile(path, mode=mode)
    explicit = "." * WIDTH
    guards = []  # [guard, span, kind-letter]
    for n, (op, arg, span) in enumerate(ops):
        if op == "acquire":
            lf.acquire(arg, span, blocking=False)
            explicit = put(explicit, *span, "W" if arg == "exclusive" else "R")
        elif op == "release":
            lf.release(span)
            explicit = put(explicit, *span, ".")
        elif op == "release_all":
            lf.release()
            explicit = "." * WIDTH
        elif op == "guard":
            g = lf.try_write(span) if arg == "exclusive" else lf.try_read(span)
            assert g is not None, "one owner never conflicts with itself"
            guards.append([g, span, "W" if arg == "exclusive" else "R"])
        elif guards:
            entry = guards[arg % len(guards)]
            if op == "drop":
                entry[0].release()
                guards.remove(entry)
            elif op == "downgrade":
                entry[0].downgrade()
                entry[2] = "R"
            else:
                entry[0].upgrade(blocking=False)
                entry[2] = "W"
        layers = [explicit] + [put("." * WIDTH, *s, k) for _, s, k in guards]
        want = effective(*layers)
        where = f"after step {n} ({op} {arg} {span})"
        assert held_cells(lf.held()) == want, where
        assert held_cells(lf.held_explicitly()) == explicit, where
        assert support.held_map(path, -1, WIDTH, mode=mode) == want, where
    lf.close()
    assert support.mode_locks(path, mode) == []
    assert os.path.exists(path)


# --------------------------------------------------------------------------
# The original's API in shm mode: two objects in one process are two owners
# --------------------------------------------------------------------------


def owner_cells(path, owner_id):
    """What the shm table says the owner with this id holds on 0..WIDTH."""
    from pylocksfile import _native

    cells = ["."] * WIDTH
    for _pid, owner, start, stop, kind in _native._shm_table(os.fspath(path))["holders"]:
        if owner == owner_id:
            for i in range(start, min(stop, WIDTH)):
                assert cells[i] == ".", "two records of one owner overlap"
                cells[i] = "W" if kind == "exclusive" else "R"
    return "".join(cells)


def conflicts(layer, start, count, write):
    return any(c == "W" or (write and c == "R") for c in layer[start : start + count])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=seed_ops)
def test_seed_objects_in_shm_mode_match_the_model(tmp_path_factory, ops):
    """Each object is an owner: an acquire is granted exactly when the other
    object's locks allow it, and a refused one changes nothing."""
    from pylocksfile import pylocksfile

    path = tmp_path_factory.mktemp("model") / "seed-shm.lock"
    objs = {"a": pylocksfile(os.fspath(path), mode="shm"), "b": pylocksfile(os.fspath(path), mode="shm")}
    ids = {k: o._table_owner for k, o in objs.items()}
    layers = {"a": "." * WIDTH, "b": "." * WIDTH}
    for n, (op, who, write, span) in enumerate(ops):
        other = layers["b" if who == "a" else "a"]
        if op == "acquire":
            ok = objs[who].acquire(writeLock=write, lock_n=span, blocking=False)
            assert ok is (not conflicts(other, *span, write)), f"step {n}: {op} {who} {write} {span}: {layers}"
            if ok:
                layers[who] = put(layers[who], *span, "W" if write else "R")
        elif op == "release":
            objs[who].release(span)
            layers[who] = put(layers[who], *span, ".")
        else:
            objs[who].release()
            layers[who] = "." * WIDTH
        for k in objs:
            assert owner_cells(path, ids[k]) == layers[k], f"after step {n} ({op} {who} {write} {span}): {layers}"
    for o in objs.values():
        o.release()
    assert support.table_locks(path) == []
