import json
import os
import subprocess
import sys

import pytest

from normexp.locks import RunLock


def test_one_holder_at_a_time_and_a_released_lock_is_free(tmp_path):
    first, second = RunLock(str(tmp_path), "run"), RunLock(str(tmp_path), "run")
    assert not first.held()
    assert first.acquire() and first.stale is None
    assert first.held() and not second.acquire()
    info = json.load(open(first.path))
    assert info["pid"] == os.getpid() and first.holder().endswith(f"pid {os.getpid()} since "
                                                                  f"{info['since']}")
    first.release()
    assert not second.held() and os.path.getsize(first.path) == 0
    assert second.acquire() and second.stale is None  # released cleanly: nothing taken over
    second.release()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    hold = ("import sys, os; from normexp.locks import RunLock; "
            "assert RunLock(sys.argv[1], 'run').acquire(); os._exit(0)")  # dies holding it
    subprocess.run([sys.executable, "-c", hold, str(tmp_path)], check=True)
    lock = RunLock(str(tmp_path), "run")
    assert not lock.held()
    assert lock.acquire() and "pid" in lock.stale
    lock.release()


def test_a_probe_never_keeps_a_lock_from_being_taken(tmp_path, monkeypatch):
    from normexp import locks
    prober, taker = RunLock(str(tmp_path), "run"), RunLock(str(tmp_path), "run")
    os.makedirs(os.path.dirname(prober.path))
    open(prober.path, "w").close()
    taken = []
    close = os.close

    def take_while_probing(fd):  # the probe's file is still open: the old probe held it
        if not taken:
            taken.append(taker.acquire())
        close(fd)

    monkeypatch.setattr(locks.os, "close", take_while_probing)
    assert prober.held() is False
    monkeypatch.setattr(locks.os, "close", close)
    assert taken == [True]
    assert prober.held()
    taker.release()


def test_a_group_is_taken_whole_or_not_at_all(tmp_path):
    from normexp.errors import BusyError
    from normexp.locks import take_all
    runs = [str(tmp_path / name) for name in ("a", "b", "c")]
    other = RunLock.of(runs[2])  # another worker got here first, with the last run
    assert other.acquire()
    with pytest.raises(BusyError, match=r"/c: being trained by .* pid"):
        take_all(runs)
    assert not RunLock.of(runs[0]).held() and not RunLock.of(runs[1]).held()  # let go again
    other.release()
    held = take_all(runs)
    assert [lock.held() for lock in map(RunLock.of, runs)] == [True] * 3
    for lock in held:
        lock.release()


def test_a_runs_lock_is_its_sweeps_lock_for_that_name(tmp_path):
    assert RunLock.of(str(tmp_path / "sweep" / "lr=0.1")).path == \
        RunLock(str(tmp_path / "sweep"), "lr=0.1").path
