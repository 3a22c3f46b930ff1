import json
import os
import subprocess
import sys

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
