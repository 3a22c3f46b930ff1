import io
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from normexp.checkpoint import RECORD, Checkpoints, damage, resume_step
from normexp.stderr_filter import StderrFilter

from conftest import TINY, cli_in_process, normexp
from test_train import KILLER, train_records

ARGS = [*TINY, "log.every=1"]  # 12 steps, a checkpoint every 4, the last 2 kept


def state(value=1.0):
    return {"w": jnp.full((64, 64), value), "step": jnp.asarray(3, jnp.int32)}


def largest_file(step_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names
             if f != RECORD]
    return max(files, key=os.path.getsize)


def test_a_saved_checkpoint_verifies_and_any_change_to_it_is_found(tmp_path):
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), keep=3)
    checkpoints.save(4, state())
    checkpoints.close()
    step_dir = tmp_path / "ckpt" / "4"
    assert damage(step_dir) is None
    lines = (step_dir / RECORD).read_text().splitlines()
    assert len(lines) >= 5 and all(len(line.split("  ")) == 2 for line in lines)
    if shutil.which("sha256sum"):  # the record is sha256sum's format
        subprocess.run(["sha256sum", "--quiet", "-c", RECORD], cwd=step_dir, check=True)
    restored = Checkpoints(str(tmp_path / "ckpt"), keep=3)
    assert restored.intact == [4] and restored.damaged == {}
    np.testing.assert_array_equal(restored.restore(4, state(0.0))["w"], state()["w"])
    restored.close()

    data = largest_file(step_dir)
    blob = bytearray(open(data, "rb").read())
    blob[len(blob) // 2] ^= 0x01  # one bit
    open(data, "wb").write(bytes(blob))
    assert "does not match its checksum" in damage(step_dir)
    os.unlink(step_dir / RECORD)
    assert "did not finish" in damage(step_dir)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The tiny run SIGKILLed at step 9, with checkpoints 4 and 8."""
    root = tmp_path_factory.mktemp("killed")
    broken = root / "broken"
    killer = root / "killer.py"
    killer.write_text(KILLER)
    killed = subprocess.run([sys.executable, str(killer), "9", "SIGKILL", "train", *ARGS,
                             f"run.out_dir={broken}"], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert sorted(os.listdir(broken / "checkpoints")) == ["4", "8"]
    return broken


def copy_run(source, target):
    """A copy of a run directory that resumes as itself (its config names its directory)."""
    shutil.copytree(source, target)
    config = target / "config.yaml"
    config.write_text(config.read_text().replace(str(source), str(target)))


def _delete(path):
    os.unlink(path)


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _flip(path):
    blob = bytearray(open(path, "rb").read())
    middle = len(blob) // 2
    blob[middle:middle + 64] = bytes(b ^ 0xFF for b in blob[middle:middle + 64])
    open(path, "wb").write(bytes(blob))


def _empty_dir(step_dir):
    for name in os.listdir(step_dir):
        path = os.path.join(step_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


DAMAGE = {
    "delete the largest data file": lambda d: _delete(largest_file(d)),
    "truncate the largest data file": lambda d: _truncate(largest_file(d)),
    "flip 64 bytes inside a data file": lambda d: _flip(largest_file(d)),
    "empty the manifest": lambda d: os.truncate(os.path.join(d, "default", "manifest.ocdbt"), 0),
    "delete _METADATA": lambda d: _delete(os.path.join(d, "default", "_METADATA")),
    "empty the step dir": _empty_dir,
}


@pytest.mark.parametrize("how", DAMAGE)
def test_each_kind_of_damage_is_found_and_the_checkpoint_set_aside(killed_run, tmp_path, how,
                                                                    capsys):
    broken = tmp_path / "run"
    copy_run(killed_run, broken)
    DAMAGE[how](str(broken / "checkpoints" / "8"))
    checkpoints = Checkpoints(str(broken / "checkpoints"), keep=2)
    try:
        assert checkpoints.intact == [4] and list(checkpoints.damaged) == [8]
        assert resume_step([checkpoints]) == 4
        assert checkpoints.intact == [4]
    finally:
        checkpoints.close()
    (warning,) = capsys.readouterr().err.splitlines()
    assert f"{broken}/checkpoints/8: damaged (" in warning and "resuming from step 4" in warning
    assert os.listdir(broken / "checkpoints_damaged") == ["8"]  # moved aside, not deleted
    assert sorted(os.listdir(broken / "checkpoints")) == ["4"]


def test_a_run_whose_latest_checkpoint_is_damaged_resumes_from_the_one_before(
        killed_run, reference_run, tmp_path):
    """The whole path, through the command line, for one kind of damage (the test above
    covers each kind)."""
    broken = tmp_path / "run"
    copy_run(killed_run, broken)
    DAMAGE["flip 64 bytes inside a data file"](str(broken / "checkpoints" / "8"))
    resumed = cli_in_process("train", *ARGS, f"run.out_dir={broken}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and f"{broken}/checkpoints/8" in warnings[0], resumed.stderr
    assert "resuming from step 4" in warnings[0]
    assert os.path.isdir(broken / "checkpoints_damaged" / "8")  # moved aside, not deleted
    assert train_records(broken) == reference_run  # bit for bit, every step


def test_no_intact_checkpoint_is_an_error_and_nothing_is_moved(killed_run, tmp_path):
    broken = tmp_path / "run"
    copy_run(killed_run, broken)
    for step in ("4", "8"):
        _flip(largest_file(str(broken / "checkpoints" / step)))
    resumed = normexp("train", *ARGS, f"run.out_dir={broken}", "--resume")
    assert resumed.returncode == 2
    assert resumed.stderr.count("\n") == 1 and "no intact checkpoint" in resumed.stderr
    assert sorted(os.listdir(broken / "checkpoints")) == ["4", "8"]
    assert not os.path.exists(broken / "checkpoints_damaged")


# --- the stderr filter (normexp.stderr_filter), as checkpoints use it -------------------------

def test_checkpoints_never_replace_sys_stderr(tmp_path, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    Checkpoints(str(tmp_path / "a"), 1, background=True).close()
    assert sys.stderr is stream  # a library caller's stderr is its own
    stderr = StderrFilter(stream)
    monkeypatch.setattr(sys, "stderr", stderr)
    Checkpoints(str(tmp_path / "b"), 1, background=False).close()
    assert sys.stderr is stderr and not stderr.background
    Checkpoints(str(tmp_path / "c"), 1, background=True).close()
    assert sys.stderr is stderr and stderr.background  # the process's filter, told


FAILING_SAVE = '''
import resource, signal, sys
import jax.numpy as jnp
from normexp.checkpoint import Checkpoints
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
stderr = sys.stderr
checkpoints = Checkpoints(sys.argv[1], 1, background=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    checkpoints.save(1, {"w": jnp.ones(100_000)})
    checkpoints.wait()
except OSError as e:
    print("failed:", e.strerror, file=sys.stderr)
print("same stderr:", sys.stderr is stderr, file=sys.stderr)
'''


def test_a_failed_background_save_leaves_a_library_callers_stderr_alone(tmp_path):
    done = subprocess.run([sys.executable, "-c", FAILING_SAVE, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert "failed: File too large" in lines and "same stderr: True" in lines, done.stderr
