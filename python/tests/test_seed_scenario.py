"""The original's ``testReadWriteLocks``: two processes, 'One' and 'Two', run
its fixed scripts and block each other at each step. Here the parent drives
both step by step and checks, after every step, exactly what each process
holds in the kernel (``/proc/locks``; in shm mode, the table) and who is
asleep waiting.

Each step is (who, call, outcome) where outcome is ``True`` (returns True at
once), ``"blocks"`` (must sleep in the kernel) or ``None`` (a release), then
the expected holdings of One and Two on indices 0..9 and the calls that must
complete because of this step.
"""

import pytest

BLOCKS = "blocks"

# fmt: off
SCRIPT = [
    # who    call                                         outcome   One           Two           completes
    ("one", "lf.acquire(writeLock=True, lock_n=(0, 3))",  True,    "WWW.......", "..........", []),
    ("two", "lf.acquire(writeLock=True, lock_n=(3, 3))",  True,    "WWW.......", "...WWW....", []),
    ("one", "lf.acquire(writeLock=False, lock_n=(1, 1))", True,    "WRW.......", "...WWW....", []),
    # Two wants 1 exclusively while One reads it.
    ("two", "lf.acquire(writeLock=True, lock_n=(1, 1))",  BLOCKS,  "WRW.......", "...WWW....", []),
    ("one", "lf.release(1)",                              None,    "W.W.......", ".W.WWW....", ["two"]),
    # One wants 3 and 4 exclusively; Two gives them back one at a time.
    ("one", "lf.acquire(writeLock=True, lock_n=(3, 2))",  BLOCKS,  "W.W.......", ".W.WWW....", []),
    ("two", "lf.release(4)",                              None,    "W.W.......", ".W.W.W....", []),
    ("two", "lf.release(3)",                              None,    "W.WWW.....", ".W...W....", ["one"]),
    # Two wants to read 0 while One writes it; One converts 0 to shared.
    ("two", "lf.acquire(writeLock=False, lock_n=0)",      BLOCKS,  "W.WWW.....", ".W...W....", []),
    ("one", "lf.acquire(writeLock=False, lock_n=(0, 1))", True,    "R.WWW.....", "RW...W....", ["two"]),
    # Two converts its shared 0 to exclusive: waits for One's shared 0.
    ("two", "lf.acquire(writeLock=True, lock_n=0)",       BLOCKS,  "R.WWW.....", "RW...W....", []),
    ("one", "lf.release(0)",                              None,    "..WWW.....", "WW...W....", ["two"]),
    ("one", "lf.acquire(writeLock=False, lock_n=3)",      True,    "..WRW.....", "WW...W....", []),
    ("one", "lf.acquire(writeLock=False, lock_n=0)",      BLOCKS,  "..WRW.....", "WW...W....", []),
    ("two", "lf.release((0, 2))",                         None,    "R.WRW.....", ".....W....", ["one"]),
    # One wants 0..5 exclusively; only Two's 5 is in the way.
    ("one", "lf.acquire(writeLock=True, lock_n=(0, 6))",  BLOCKS,  None,         ".....W....", []),
    ("two", "lf.release((4, 1))",                         None,    None,         ".....W....", []),
    ("two", "lf.release((3, 1))",                         None,    None,         ".....W....", []),
    # Two's object goes away: its last lock (5) is released and One proceeds.
    ("two", "del lf; gc.collect()",                       None,    "WWWWWW....", "..........", ["one"]),
    ("one", "lf.release()",                               None,    "..........", "..........", []),
]
# fmt: on


@pytest.mark.parametrize("mode", ["process", "shm"])
@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_two_processes_block_each_other_at_each_step(spawn_worker, lock_path, ctx, mode):
    workers = {"one": spawn_worker(ctx), "two": spawn_worker(ctx)}
    workers["one"].exec(f"lf = pylocksfile(locksfile_path=path, verbose=False, l_id='One', mode={mode!r})")
    workers["two"].exec(f"lf = pylocksfile(locksfile_path=path, verbose=False, l_id='Two', mode={mode!r})")
    before = {"one": "..........", "two": ".........."}

    for n, (who, call, outcome, one_map, two_map, completes) in enumerate(SCRIPT):
        where = f"step {n}: {who}: {call}"
        w = workers[who]
        if outcome is BLOCKS:
            w.send_eval(call)
            w.wait_blocked(mode=mode)
        elif outcome is True:
            assert w.eval(call) is True, where
        else:
            w.exec(call)

        for name in completes:
            try:
                done = workers[name].result()
            except AssertionError as e:
                raise AssertionError(f"{where}: {name}'s pending call: {e}") from None
            assert done in (True, None), f"{where}: {name}'s pending call returned {done!r}"
        for name, other in workers.items():
            if other.pending:
                # Still asleep on the same request (re-blocked after any wake-up).
                other.wait_blocked(mode=mode)

        expected = {"one": one_map, "two": two_map}
        for name, want in expected.items():
            got = workers[name].held(mode=mode)
            if want is None:
                # Mid-wait on a multi-index request: whatever the waiter already
                # took, it lost nothing it held before.
                for i, (was, now) in enumerate(zip(before[name], got)):
                    assert was == "." or now != ".", f"{where}: {name} lost index {i}: {got}"
            else:
                assert got == want, f"{where}: {name} holds {got}, expected {want}"
                before[name] = want
