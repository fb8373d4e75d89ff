"""The package as shipped: typing markers, stubs that match the runtime
(mypy's stubtest) and serve ``mypy --strict`` users, and docstrings on
everything public."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import pylocksfile as pkg

PKG_DIR = Path(pkg.__file__).parent


def public_members(cls):
    return sorted(n for n in dir(cls) if not n.startswith("_") and n not in dir(object))


def test_py_typed_marker():
    assert (PKG_DIR / "py.typed").is_file()


def test_version_is_a_version():
    parts = pkg.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


def run_mypy(args, cwd):
    """``python -m mypy...`` in ``cwd`` (its cache goes there), as text."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_stubs_match_the_runtime(tmp_path):
    """mypy's stubtest: every name, signature, property and base in the
    stubs as the runtime has it."""
    code, out = run_mypy(["mypy.stubtest", "pylocksfile"], tmp_path)
    assert code == 0, out


SAMPLE = """
import asyncio
import threading
from typing import List, Optional, Tuple

from pylocksfile import Guard, LocksFile, LockTimeout, WouldBlockError, pylocksfile


def modern(path: str) -> int:
    with LocksFile(path, thread_local=True) as lf:
        with lf.write(range(0, 10)):
            return 1  # no "missing return" after the with: __exit__ lets errors through


def explicit(path: str) -> List[Tuple[range, str]]:
    lf = LocksFile(path, mode="process")
    try:
        lf.acquire("shared", (1, 2), timeout=0.5)
    except (LockTimeout, WouldBlockError) as e:
        print(e.errno, e.holder_span if isinstance(e, WouldBlockError) else None)
    g: Optional[Guard] = lf.try_read(slice(20, None))
    if g is not None:
        print(g.span.start, g.kind, g.upgrade(timeout=1.0).kind)
        g.release()
    held: List[Tuple[range, str]] = [(r, k) for r, k in lf.held()]
    lf.close()
    return held


async def waits(lf: LocksFile) -> bool:
    async with lf.write_async(5, timeout=1.0) as g:
        ok = g.held
    r = await lf.read_async((6, 2))
    r.release()
    await lf.acquire_async("exclusive", 7)
    return ok


def seed(path: str) -> bool:
    lf = pylocksfile(path, verbose=False, l_id="p1")
    with lf(writeLock=True, lock_n=(1, 3)) as same:
        same.release(2)
        return lf.acquire(writeLock=False, lock_n=0, blocking=False)


def threads(path: str) -> None:
    lf = LocksFile(path, thread_local=True)
    t = threading.Thread(target=lambda: lf.write(0).release())
    t.start()
    t.join()


if __name__ == "__main__":
    print(modern("a.lock"), explicit("a.lock"), seed("a.lock"))
    print(asyncio.run(waits(LocksFile())))
    threads("a.lock")
"""


def test_a_sample_program_passes_mypy_strict(tmp_path):
    (tmp_path / "sample.py").write_text(SAMPLE)
    code, out = run_mypy(["mypy", "--strict", "--warn-unreachable", "sample.py"], tmp_path)
    assert code == 0, out


@pytest.mark.parametrize("name", sorted(set(pkg.__all__) - {"INDEX_END"}))
def test_public_names_have_docstrings(name):
    obj = getattr(pkg, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"
    if inspect.isclass(obj):
        ours = [c for c in obj.__mro__ if c.__module__.startswith("pylocksfile")]
        for member in public_members(obj):
            if not any(member in vars(c) for c in ours):
                continue  # inherited from a built-in base such as OSError
            raw = inspect.getattr_static(obj, member)
            if not (callable(raw) or hasattr(raw, "__get__")):
                continue  # a plain class attribute, described by the class docstring
            assert inspect.getdoc(getattr(obj, member)), f"{name}.{member} has no docstring"


def test_module_docstring():
    assert inspect.getdoc(pkg)
