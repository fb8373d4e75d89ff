"""Lock paths name the file the kernel names: the same string opens the same
file in Python, in the Rust core and in the CLI.

`os.path.abspath` rewrites `link/../x.lock` to `x.lock` next to the link,
while the kernel follows `link` first and then goes up from its target; the
two name different files, whose locks do not exclude each other."""

import os
import subprocess
from pathlib import Path

import pytest

import support
from pylocksfile import IllegalArgumentError, LocksFile, pylocksfile

CLI = Path(__file__).resolve().parents[2] / "target" / "release" / "locksfile"


@pytest.fixture
def through_link(tmp_path):
    """`tmp/link -> tmp/d/sub`: `tmp/link/../x.lock` is `tmp/d/x.lock`."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "d" / "sub", tmp_path / "link")
    return tmp_path, f"{tmp_path}/link/../x.lock"


def cli_can_lock(path, index):
    """Whether `locksfile run -n` (the Rust core, another process) gets the lock."""
    if not CLI.is_file():
        pytest.skip(f"the CLI is not built at {CLI} (run scripts/setup)")
    rc = subprocess.run([str(CLI), "run", "-n", "-i", str(index), path, "--", "true"], timeout=10).returncode
    assert rc in (0, 1), f"locksfile run exited with {rc}"
    return rc == 0


def test_modern_path_through_a_symlinked_directory_is_the_kernels(through_link):
    tmp, path = through_link
    lf = LocksFile(path)
    assert lf.path == path, "the path is kept as the core reports it, `..` included"
    assert (tmp / "d" / "x.lock").is_file()
    assert not (tmp / "x.lock").exists(), "the lexical reading opened another file"
    g = lf.write(0)
    assert not cli_can_lock(path, 0)
    assert not support.can_lock(tmp / "d" / "x.lock", 0, write=False)
    assert cli_can_lock(path, 1)
    g.release()
    assert cli_can_lock(path, 0)


def test_seed_path_through_a_symlinked_directory_is_the_kernels(through_link):
    tmp, path = through_link
    lf = pylocksfile(path)
    assert lf.locksfile_path == path
    assert (tmp / "d" / "x.lock").is_file()
    assert not (tmp / "x.lock").exists()
    assert lf.acquire(writeLock=True, lock_n=0) is True
    assert not cli_can_lock(path, 0)
    assert not support.can_lock(tmp / "d" / "x.lock", 0, write=False)
    lf.release()
    assert cli_can_lock(path, 0)


def test_relative_path_through_a_symlinked_directory(through_link, monkeypatch):
    tmp, path = through_link
    monkeypatch.chdir(tmp)
    lf = LocksFile("link/../x.lock")
    seed = pylocksfile("link/../x.lock")
    assert lf.path == seed.locksfile_path == path
    with lf.write(3):
        assert seed.acquire(writeLock=False, lock_n=3, blocking=False) is False
        assert not cli_can_lock("link/../x.lock", 3)
    assert not (tmp / "x.lock").exists()


def test_the_cli_holding_excludes_python_through_the_same_string(through_link):
    tmp, path = through_link
    if not CLI.is_file():
        pytest.skip(f"the CLI is not built at {CLI} (run scripts/setup)")
    r, w = os.pipe()
    # The CLI holds lock 5 while its command waits for the pipe to close.
    cli = subprocess.Popen(
        [str(CLI), "run", "-i", "5", path, "--", "sh", "-c", "echo held; read _ || :"],
        stdin=r,
        stdout=subprocess.PIPE,
    )
    os.close(r)
    try:
        assert cli.stdout.readline() == b"held\n"
        assert LocksFile(path).try_read(5) is None
        assert pylocksfile(path).acquire(writeLock=False, lock_n=5, blocking=False) is False
    finally:
        os.close(w)
        assert cli.wait(10) == 0
    assert LocksFile(path).try_write(5) is not None


@pytest.mark.parametrize("name", ["", "x.lock/", "sub/"], ids=repr)
def test_empty_path_and_trailing_slash_are_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="empty|ends with '/'"):
        LocksFile(name)
    with pytest.raises(IllegalArgumentError, match="empty|ends with '/'"):
        pylocksfile(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"], "nothing may be created"


def test_trailing_slash_after_an_existing_file_is_refused(lock_path):
    lock_path.touch()
    with pytest.raises(ValueError, match="ends with '/'"):
        LocksFile(f"{lock_path}/")
    with pytest.raises(IllegalArgumentError, match="ends with '/'"):
        pylocksfile(f"{lock_path}/")


@pytest.mark.parametrize("how", ["delete", "rename over"])
def test_replacing_a_held_lock_file_splits_the_lock(lock_path, how):
    """The README's caveat: locks belong to the inode, so a new opener of a
    deleted or replaced lock file gets another file and is not excluded."""
    a = LocksFile(lock_path)
    g = a.write(0)
    if how == "delete":
        os.unlink(lock_path)
    else:
        other = lock_path.with_name("other.lock")
        other.touch()
        os.rename(other, lock_path)
    b = LocksFile(lock_path)
    assert os.fstat(a.fileno()).st_ino != os.fstat(b.fileno()).st_ino
    split = b.try_write(0)
    assert split is not None, "the new file's lock 0 is free although a still holds the old one's"
    assert g.held


def test_names_that_are_not_utf8_pass_through(tmp_path):
    """`os.fsdecode` turns undecodable bytes into surrogate escapes; the path
    must reach the kernel as those bytes, and come back the same way."""
    name = os.fsdecode(b"\xff\xfe.lock")
    path = os.path.join(str(tmp_path), name)
    lf = LocksFile(path)
    seed = pylocksfile(path)
    assert lf.path == seed.locksfile_path == path
    assert os.listdir(os.fsencode(str(tmp_path))) == [b"\xff\xfe.lock"]
    with lf.write(1):
        assert seed.acquire(writeLock=False, lock_n=1, blocking=False) is False
