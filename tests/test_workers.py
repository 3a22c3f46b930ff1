import os

from normexp import sweep as sweep_lib
from normexp import workers

from conftest import write_sweep


def test_workers_get_disjoint_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    assert workers.worker_cores(2) == [{0, 1}, {2, 3, 4}]
    assert workers.worker_cores(5) == [{0}, {1}, {2}, {3}, {4}]
    assert workers.worker_cores(6) == [None] * 6  # fewer cores than workers: not pinned


def test_a_worker_pins_itself_to_the_cores_its_parent_chose(monkeypatch):
    pinned = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(cores),
                        raising=False)
    monkeypatch.setenv("NORMEXP_CORES", "2,3")
    workers.pin()
    monkeypatch.setenv("NORMEXP_CORES", "")  # more workers than cores: left unpinned
    workers.pin()
    assert pinned == [{2, 3}]


def test_no_more_workers_than_units_with_work(tmp_path, monkeypatch):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]}, seeds=2,
                                       vectorize="seeds"))
    started = []

    class Child:
        returncode = 0

        def __init__(self, args, env):
            started.append(env["NORMEXP_CORES"])

        def poll(self):
            return 0

    monkeypatch.setattr(workers.subprocess, "Popen", Child)
    assert workers.run_workers(sweep, sweep.units(), 2, progress=False) == 0
    assert len(started) == 1  # one vectorized group: a second worker would only hold a core
    plain = sweep_lib.load(write_sweep(tmp_path, "p", grid={"optim.lr": [1e-3, 2e-3]},
                                       out_dir=str(tmp_path / "p")))
    started.clear()
    workers.run_workers(plain, plain.units(), 2, progress=False)
    assert len(started) == 2


def test_workers_get_the_sweeps_settings_and_their_cores(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3]})
    sweep = sweep_lib.load(path, settings=[("optim.lr", [1e-3, 3e-3]), ("model.qk_norm",
                                                                         "per_head")])
    calls = []

    class Child:
        returncode = 0

        def __init__(self, args, env):
            calls.append((args, env["NORMEXP_CORES"]))

        def poll(self):
            return 0

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(workers.subprocess, "Popen", Child)
    workers.run_workers(sweep, sweep.units(), 2, progress=False)
    assert [cores for _, cores in calls] == ["0", "1"]
    args = calls[0][0]
    assert "--set=optim.lr=[0.001, 0.003]" in args and "--set=model.qk_norm=per_head" in args
    # what the worker loads from those arguments is the parent's sweep
    from normexp.config import parse_overrides
    again = sweep_lib.load(path, settings=parse_overrides(
        [a.removeprefix("--set=") for a in args if a.startswith("--set=")]))
    assert [r.cfg for r in again.runs] == [r.cfg for r in sweep.runs]


def test_each_worker_gets_its_share_of_the_gpus():
    eight = [str(i) for i in range(8)]
    assert workers.worker_gpus(8, eight) == [([str(i)], 1) for i in range(8)]
    assert workers.worker_gpus(2, eight) == [(eight[:4], 1), (eight[4:], 1)]
    assert workers.worker_gpus(3, ["0", "1"]) == [(["0"], 2), (["1"], 1), (["0"], 2)]
    assert workers.worker_gpus(2, []) == [([], 2), ([], 2)]  # one accelerator shared, or none


def test_a_workers_environment_names_its_gpus_and_memory_share(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert workers.worker_env({0}, ["3"], 1) == {"NORMEXP_CORES": "0",
                                                 "CUDA_VISIBLE_DEVICES": "3"}
    assert workers.worker_env(None, ["0", "1"], 1)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert workers.worker_env(None, ["0"], 2)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")  # the user's own is kept
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in workers.worker_env(None, [], 4)


def test_visible_gpus_from_the_environment_or_the_device_files(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert workers.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert workers.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(workers.glob, "glob", lambda pattern: [
        "/dev/nvidia10", "/dev/nvidiactl", "/dev/nvidia2", "/dev/nvidia-uvm", "/dev/nvidia0"])
    assert workers.visible_gpus() == ["0", "2", "10"]


def test_eight_workers_on_an_eight_gpu_host_get_one_gpu_each(tmp_path, monkeypatch):
    sweep = sweep_lib.load(write_sweep(tmp_path, grid={"optim.lr": [1e-3, 2e-3, 3e-3, 4e-3]},
                                       seeds=2))
    envs = []

    class Child:
        returncode = 0

        def __init__(self, args, env):
            envs.append(env)

        def poll(self):
            return 0

    monkeypatch.setattr(workers.subprocess, "Popen", Child)
    monkeypatch.setattr(workers, "visible_gpus", lambda: [str(i) for i in range(8)])
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert workers.run_workers(sweep, sweep.units(), 8, progress=False) == 0
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == [str(i) for i in range(8)]
    assert not any("XLA_PYTHON_CLIENT_MEM_FRACTION" in e for e in envs)
