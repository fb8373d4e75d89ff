"""The original's ``testRace``: K processes walk a cyclic list of N tracks R
times, hand over hand with write locks. Checked for mutual exclusion (each
track's log, written under its lock, is whole and every occupancy check
passed) and for order (no racer overtakes another), under every
multiprocessing start method."""

import multiprocessing

import pytest

import support

RACERS, TRACKS, ROUNDS = 4, 20, 50


def run_race(ctx_name, lock_path, api, racers=RACERS, tracks=TRACKS, rounds=ROUNDS):
    ctx = multiprocessing.get_context(ctx_name)
    per_track = racers * rounds
    occupant = ctx.Array("i", [-1] * tracks, lock=False)
    visits = ctx.Array("i", tracks, lock=False)
    log_who = ctx.Array("i", tracks * per_track, lock=False)
    log_step = ctx.Array("i", tracks * per_track, lock=False)
    errors = ctx.Array("i", racers, lock=False)
    barrier = ctx.Barrier(racers)
    procs = [
        ctx.Process(
            target=support.race_runner,
            args=(str(lock_path), api, i, tracks, rounds, barrier, occupant, visits, log_who, log_step, errors),
        )
        for i in range(racers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * racers
    assert list(errors) == [0] * racers, "a racer saw an occupied track or a failed acquire"
    assert list(occupant) == [-1] * tracks
    support.check_race(racers, tracks, rounds, visits, log_who, log_step)
    mode = "shm" if api.endswith("shm") else ""
    assert support.mode_locks(lock_path, mode) == [], "locks left behind after the race"


@pytest.mark.parametrize("api", ["seed", "seed-shm"])
@pytest.mark.parametrize("ctx", ["fork", "spawn", "forkserver"])
def test_race_seed_api(lock_path, ctx, api):
    run_race(ctx, lock_path, api)


@pytest.mark.parametrize("api", ["modern", "modern-shm"])
def test_race_modern_api(lock_path, api):
    run_race("fork", lock_path, api)


@pytest.mark.parametrize("api", ["seed", "seed-shm"])
def test_race_with_few_tracks(lock_path, api):
    """One spare track only: racers constantly wait on each other."""
    run_race("fork", lock_path, api, racers=3, tracks=4, rounds=60)


def test_check_race_catches_overtaking():
    """The order check itself: a log where racer 1 passes racer 0 fails."""
    tracks, rounds, racers = 3, 1, 2
    visits = [2, 2, 2]
    # step 0 (track 0): 0 then 1; step 1 (track 1): 1 then 0 -> overtaking.
    who = [0, 1, 1, 0, 0, 1]
    step = [0, 0, 1, 1, 2, 2]
    with pytest.raises(AssertionError, match="overtook"):
        support.check_race(racers, tracks, rounds, visits, who, step)
