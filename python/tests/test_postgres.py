"""``LocksFile`` and ``pylocksfile`` on a lock namespace on a real
PostgreSQL server (``LOCKSFILE_TEST_PG``, set by scripts/test). Without a
server these tests skip, unless ``LOCKSFILE_REQUIRE_PG`` is set."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from pylocksfile import LocksFile, LockTimeout, WouldBlockError, pylocksfile

SERVER = os.environ.get("LOCKSFILE_TEST_PG")
if not SERVER:
    if os.environ.get("LOCKSFILE_REQUIRE_PG"):
        raise RuntimeError("LOCKSFILE_TEST_PG is not set but LOCKSFILE_REQUIRE_PG is")
    pytest.skip("no PostgreSQL server (set LOCKSFILE_TEST_PG)", allow_module_level=True)


def target(name):
    return f"{SERVER}?name=py-{name}-{os.getpid()}"


def test_two_objects_exclude_each_other_and_name_the_holder():
    t = target("excl")
    a = LocksFile(t)
    b = LocksFile(t)
    assert a.mode == "postgres"
    assert "name=py-excl" in a.path
    with a.write(range(3, 6)):
        assert b.try_read(4) is None
        assert b.try_read(6) is not None
        holder = b.conflicts(4)
        assert holder is not None and "backend pid" in str(holder)
        assert holder.application_name == f"locksfile pid {os.getpid()}"
        assert holder.backend_pid > 0 and holder.client_addr is None
        with pytest.raises(LockTimeout):
            b.write_for(5, 0.1)
        with pytest.raises(WouldBlockError):
            b.acquire("exclusive", 4, blocking=False)
    assert b.try_write(range(3, 6)) is not None
    assert not a.lost()


def test_another_process_is_kept_out():
    t = target("proc")
    a = LocksFile(t)
    g = a.write(7)
    code = textwrap.dedent(
        f"""
        import sys
        from pylocksfile import LocksFile
        lf = LocksFile({t!r})
        sys.exit(0 if lf.try_write(7) is None and lf.try_write(8) is not None else 1)
        """
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    g.release()
    code = code.replace("is None and", "is not None and")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_fencing_tokens_grow():
    t = target("fence")
    a = LocksFile(t)
    with a.write(1):
        first = a.fence(1)
    with LocksFile(t).write(1) as g:
        assert g is not None
    b = LocksFile(t)
    with b.write(1):
        assert b.fence(1) > first


def test_the_seed_api_takes_a_server_target():
    t = target("seed")
    a = pylocksfile(t)
    b = pylocksfile(t)
    assert a.acquire(writeLock=True, lock_n=2)
    assert not b.acquire(writeLock=False, lock_n=2, blocking=False)
    a.release(2)
    assert b.acquire(writeLock=False, lock_n=2, blocking=False)
    assert "hunter2" not in pylocksfile(
        t.replace("postgres@", "postgres:hunter2@")
    ).locksfile_path


def test_bad_targets_raise_typed_errors():
    with pytest.raises(ValueError):
        LocksFile("postgresql://h:notaport/db?name=x")
    with pytest.raises(ValueError):
        LocksFile(target("m"), mode="flock")
    with pytest.raises(OSError):
        LocksFile("postgresql://u:hunter2@%2Fnonexistent-dir/db?name=x")


def test_guards_of_a_lost_session_say_they_hold_nothing():
    # An application name of its own: terminating by it must not hit the
    # sessions of tests running beside this one.
    app = f"py-terminated-{os.getpid()}"
    t = f"{SERVER}?application_name={app}&name=py-lost-{os.getpid()}"
    lf = LocksFile(t)
    w = lf.write(range(1, 3))
    r = lf.read(7)
    assert w.held and r.held and w.kind == "exclusive" and r.kind == "shared"
    assert "exclusive" in repr(w)
    subprocess.run(
        [
            "psql",
            SERVER,
            "-XAtqc",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'",
        ],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 10
    while not lf.lost():
        assert time.monotonic() < deadline, "the loss never showed"
        time.sleep(0.01)
    assert lf.held() == []
    assert w.held is False and r.held is False
    assert w.kind is None and r.kind is None
    assert "lost" in repr(w)
    # Releasing what is lost is no error; the locks are free on the server.
    w.release()
    r.release()
    assert not w.held
    with LocksFile(f"{SERVER}?name=py-lost-{os.getpid()}") as again:
        assert again.try_write(range(1, 3)) is not None and again.try_write(7) is not None


def test_on_lost_fires_without_a_call_when_the_session_ends(tmp_path):
    """``on_lost`` is called by itself once the server ends the session,
    its guards then say they hold nothing; a lock file refuses it."""
    import threading

    app = f"py-on-lost-{os.getpid()}"
    fired = threading.Event()
    seen = {}

    def lost():
        seen["held"] = g.held
        fired.set()

    lf = LocksFile(f"{SERVER}?application_name={app}&name=py-on-lost-{os.getpid()}", on_lost=lost)
    g = lf.write(4)
    assert not fired.wait(0.2), "fired while the session lives"
    subprocess.run(
        [
            "psql",
            SERVER,
            "-XAtqc",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'",
        ],
        check=True,
        capture_output=True,
    )
    assert fired.wait(10), "on_lost never fired"
    assert seen["held"] is False
    assert lf.lost()
    with pytest.raises(ValueError, match="on_lost= is for server targets"):
        LocksFile(tmp_path / "x.lock", on_lost=lost)


def test_tls_settings_take_libpqs_names_and_meanings():
    # libpq ignores sslmode over a Unix socket; the mode stays shown.
    if "@%2F" not in SERVER:
        pytest.skip("the server is not reached over a Unix socket")
    t = f"{SERVER}?sslmode=verify-full&sslrootcert=%2Fnonexistent%2Froot.crt&name=py-tls-{os.getpid()}"
    lf = LocksFile(t)
    assert "sslmode=verify-full" in lf.path
    with lf.write(1):
        pass
    with pytest.raises(ValueError, match="sslmode"):
        LocksFile(f"{SERVER}?sslmode=sometimes&name=py-tls-{os.getpid()}")


def test_keepalive_words_take_libpqs_names_and_meanings():
    # On a Unix socket they do not apply, but are taken and checked.
    t = target("keepalive") + (
        "&keepalives=1&keepalives_idle=7&keepalives_interval=3"
        "&keepalives_count=2&tcp_user_timeout=12000"
    )
    a = LocksFile(t)
    assert "keepalives" not in a.path
    with a.write(1):
        assert LocksFile(t).try_write(1) is None
    with pytest.raises(ValueError, match="keepalives_idle"):
        LocksFile(target("keepalive") + "&keepalives_idle=soon")


def test_the_session_marker_is_not_among_the_namespaces_locks():
    t = target("marker")
    a = LocksFile(t)
    b = LocksFile(t)
    # Each holds its marker all along; only index 2 is ever in the way.
    assert b.conflicts(range(0, 4096)) is None
    with a.write(2):
        holder = b.conflicts(range(0, 4096))
        assert holder is not None and holder.span == range(2, 3)
    assert a.conflicts(range(0, 4096)) is None
