"""Fixtures: a fresh lock path per test and worker processes that are always
cleaned up, whatever the test's outcome."""

import pytest

import support


@pytest.fixture
def lock_path(tmp_path):
    """A path for a lock file in a fresh temporary directory (not created)."""
    return tmp_path / "test.lock"


@pytest.fixture(params=["shm", "ofd"])
def pair(request, tmp_path):
    """Two owners of one file (``lf`` takes, ``other`` probes), in each mode
    where two objects exclude each other (process mode: one owner)."""
    from pylocksfile import LocksFile

    path = str(tmp_path / "pair.lock")
    lf = LocksFile(path, mode=request.param)
    other = LocksFile(path, mode=request.param)
    yield lf, other
    lf.close()
    other.close()


@pytest.fixture
def spawn_worker(lock_path):
    """``spawn_worker(ctx="fork", path=lock_path)`` starts a :class:`support.Worker`."""
    started = []

    def start(ctx="fork", path=None):
        w = support.Worker(ctx, path if path is not None else lock_path)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


try:
    from hypothesis import settings
except ImportError:  # the model tests skip themselves then
    pass
else:
    # No example database in the working tree; a failure prints a blob that
    # replays it (@reproduce_failure).
    settings.register_profile("locksfile", database=None, print_blob=True)
    settings.load_profile("locksfile")


def pytest_terminal_summary(terminalreporter):
    """The figures tests recorded in ``support.SUMMARIES`` (the stress runs)."""
    if support.SUMMARIES:
        terminalreporter.section("figures")
        for line in support.SUMMARIES:
            terminalreporter.write_line(line)
